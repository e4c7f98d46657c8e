//! A structured (or extended) reply checked chunk by chunk as it comes: a successful read must
//! be covered exactly once, whole; anything else is an error. The data itself goes straight
//! to the driver's buffers: nothing here holds it.

use std::collections::BTreeMap;
use std::io;

use super::wire::*;

/// The request a reply is for, as far as reading the reply goes.
#[derive(Clone, Copy)]
pub(super) struct Wanted {
    pub(super) cmd: u16,
    pub(super) offset: u64,
    pub(super) len: u32,
}

/// What the chunks of one structured reply have covered so far.
pub(super) struct Assembly {
    /// The request is a read.
    read: bool,
    /// The request's offset and length.
    start: u64,
    len: u32,
    /// The parts of the range chunks have covered: start → end, relative to `start`.
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    failure: Option<io::Error>,
    chunks: usize,
}

impl Assembly {
    pub(super) fn new(want: &Wanted) -> Assembly {
        Assembly {
            read: want.cmd == CMD_READ,
            start: want.offset,
            len: want.len,
            covered: BTreeMap::new(),
            covered_bytes: 0,
            failure: None,
            chunks: 0,
        }
    }

    /// True if the request is a read.
    pub(super) fn is_read(&self) -> bool {
        self.read
    }

    /// Counts one more chunk: however the server cuts its reply, it ends.
    pub(super) fn count_chunk(&mut self) -> io::Result<()> {
        self.chunks += 1;
        if self.chunks > 64 + self.len as usize / 512 {
            return Err(proto("a reply cut into too many chunks"));
        }
        Ok(())
    }

    /// Marks `[at, at + n)` (absolute) as covered and returns where it starts in the request;
    /// a chunk outside the range, empty, or over a part already covered breaks the protocol.
    pub(super) fn cover(&mut self, at: u64, n: u64, what: &str) -> io::Result<u64> {
        let end = self.start + u64::from(self.len);
        if n == 0 || at < self.start || at.checked_add(n).is_none_or(|e| e > end) {
            return Err(proto(format!(
                "{what} outside the requested range or empty"
            )));
        }
        let (from, to) = (at - self.start, at - self.start + n);
        let before = self.covered.range(..=from).next_back();
        let after = self.covered.range(from..).next();
        if before.is_some_and(|(_, &e)| e > from) || after.is_some_and(|(&s, _)| s < to) {
            return Err(proto(format!("{what} overlaps data already sent")));
        }
        self.covered.insert(from, to);
        self.covered_bytes += n;
        Ok(from)
    }

    /// An error chunk: the request failed (the first error is the one reported).
    pub(super) fn fail(&mut self, e: io::Error) {
        self.failure.get_or_insert(e);
    }

    /// The reply is complete: its result. A successful read must have covered its whole
    /// range; anything less is an error, never zeros.
    pub(super) fn finish(mut self) -> io::Result<()> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        if self.read && self.covered_bytes != u64::from(self.len) {
            let e = proto(format!(
                "the reply to a read of {} bytes at {} covered only {} of them",
                self.len, self.start, self.covered_bytes
            ));
            tracing::warn!("{e}");
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(offset: u64, len: u32) -> Assembly {
        Assembly::new(&Wanted {
            cmd: CMD_READ,
            offset,
            len,
        })
    }

    #[test]
    fn a_read_must_be_covered_exactly_once() {
        let mut a = read(4096, 4096);
        assert_eq!(a.cover(4096, 1024, "data").unwrap(), 0);
        assert_eq!(a.cover(6144, 2048, "data").unwrap(), 2048);
        // Overlaps, outside the range, empty.
        assert!(a.cover(4096 + 1000, 100, "data").is_err());
        assert!(a.cover(0, 10, "data").is_err());
        assert!(a.cover(8192, 1, "data").is_err());
        assert!(a.cover(5120, 0, "data").is_err());
        // A gap left: an error, never zeros.
        assert!(read_with_gap().finish().is_err());
        assert_eq!(a.cover(5120, 1024, "a hole").unwrap(), 1024);
        a.finish().unwrap();
    }

    fn read_with_gap() -> Assembly {
        let mut a = read(0, 4096);
        a.cover(0, 2048, "data").unwrap();
        a
    }

    #[test]
    fn an_error_chunk_fails_the_request_and_chunks_are_counted() {
        let mut a = read(0, 512);
        a.fail(io::Error::other("first"));
        a.fail(io::Error::other("second"));
        assert_eq!(a.finish().unwrap_err().to_string(), "first");
        let mut a = read(0, 512);
        for _ in 0..65 {
            a.count_chunk().unwrap();
        }
        assert!(a.count_chunk().is_err());
    }
}

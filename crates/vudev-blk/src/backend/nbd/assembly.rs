//! A structured (or extended) reply put together from its chunks, checked as it comes: a
//! successful read must be covered exactly once, whole; anything else is an error.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::wire::*;

/// The request a reply is for, as far as reading the reply goes.
pub(super) struct Wanted {
    pub(super) cmd: u16,
    pub(super) offset: u64,
    pub(super) len: u32,
    /// Already answered (timed out, or its queue went away): its data is not kept.
    pub(super) failed: bool,
}

/// A structured reply being put together from its chunks.
pub(super) struct Assembly<'a> {
    /// The request is a read.
    read: bool,
    /// The request's offset and length.
    start: u64,
    len: u32,
    /// A read's whole range, filled by data and hole chunks; empty when the data is not
    /// kept (the request failed already).
    data: Vec<u8>,
    keep: bool,
    /// The parts of the range chunks have covered: start → end, relative to `start`.
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    failure: Option<io::Error>,
    chunks: usize,
    /// Bytes held in partial replies, kept up to date.
    held: &'a AtomicUsize,
}

impl<'a> Assembly<'a> {
    pub(super) fn new(want: &Wanted, held: &'a AtomicUsize) -> Assembly<'a> {
        let read = want.cmd == CMD_READ;
        let keep = read && !want.failed;
        let data = if keep {
            held.fetch_add(want.len as usize, Ordering::Relaxed);
            vec![0; want.len as usize]
        } else {
            Vec::new()
        };
        Assembly {
            read,
            start: want.offset,
            len: want.len,
            data,
            keep,
            covered: BTreeMap::new(),
            covered_bytes: 0,
            failure: None,
            chunks: 0,
            held,
        }
    }

    /// Stops keeping the data: the request is answered already.
    pub(super) fn discard(&mut self) {
        if self.keep {
            self.held.fetch_sub(self.data.len(), Ordering::Relaxed);
            self.data = Vec::new();
            self.keep = false;
        }
    }

    /// Marks `[at, at + n)` (absolute) as covered; a chunk outside the range, empty, or over
    /// a part already covered breaks the protocol.
    fn cover(&mut self, at: u64, n: u64, what: &str) -> io::Result<usize> {
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
        Ok(from as usize)
    }

    /// Takes one chunk (its header read) of `len` bytes.
    pub(super) fn chunk(&mut self, r: &mut dyn Read, kind: u16, len: u64) -> io::Result<()> {
        // However the server cuts its reply, it ends: a bound on the number of chunks.
        self.chunks += 1;
        if self.chunks > 64 + self.len as usize / 512 {
            return Err(proto("a reply cut into too many chunks"));
        }
        let mut be64 = || -> io::Result<u64> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            Ok(u64::from_be_bytes(b))
        };
        match kind {
            CHUNK_NONE if len == 0 => {}
            CHUNK_OFFSET_DATA if self.read && len >= 8 => {
                let at = be64()?;
                let n = len - 8;
                let from = self.cover(at, n, "read data")?;
                if self.keep {
                    r.read_exact(&mut self.data[from..from + n as usize])?;
                } else {
                    skip(r, n)?;
                }
            }
            CHUNK_OFFSET_HOLE if self.read && len == 12 => {
                let at = be64()?;
                let mut b = [0u8; 4];
                r.read_exact(&mut b)?;
                let n = u64::from(u32::from_be_bytes(b));
                let from = self.cover(at, n, "a hole")?;
                if self.keep {
                    self.data[from..from + n as usize].fill(0);
                }
            }
            k if k & 0x8000 != 0 && (6..=MAX_CHUNK).contains(&len) => {
                let mut body = vec![0u8; len as usize];
                r.read_exact(&mut body)?;
                let code = u32::from_be_bytes(body[0..4].try_into().unwrap_or_default());
                let mlen = usize::from(u16::from_be_bytes([body[4], body[5]]));
                let msg = body.get(6..6 + mlen).unwrap_or(&[]);
                let known = k == CHUNK_ERROR || k == CHUNK_ERROR_OFFSET;
                // An unknown error chunk type still means the request failed.
                let code = if known && code != 0 { code } else { 5 };
                if self.failure.is_none() {
                    self.failure = Some(server_error(code, msg));
                }
            }
            _ => {
                return Err(proto(format!(
                    "unexpected reply chunk type {kind} of {len} bytes"
                )))
            }
        }
        Ok(())
    }

    /// The reply is complete: the result, and a read's data. A successful read must have
    /// covered its whole range; anything less is an error, never zeros.
    pub(super) fn finish(mut self) -> (io::Result<()>, Option<Vec<u8>>) {
        if let Some(e) = self.failure.take() {
            return (Err(e), None);
        }
        if self.read && self.covered_bytes != u64::from(self.len) {
            let e = proto(format!(
                "the reply to a read of {} bytes at {} covered only {} of them",
                self.len, self.start, self.covered_bytes
            ));
            tracing::warn!("{e}");
            return (Err(e), None);
        }
        let data = std::mem::take(&mut self.data);
        (Ok(()), self.keep.then_some(data))
    }
}

impl Drop for Assembly<'_> {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Reads and drops `n` bytes.
fn skip(r: &mut dyn Read, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ));
    }
    Ok(())
}

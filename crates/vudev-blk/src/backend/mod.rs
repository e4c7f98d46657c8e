//! Storage backends behind the virtio-blk device.
//!
//! The interface is asynchronous so that io_uring and network backends fit: a queue worker
//! [`QueueBackend::submit`]s operations and later [`QueueBackend::reap`]s their results,
//! waking on [`QueueBackend::completion_fd`]. The file backend does this with io_uring; the
//! memory and null backends finish each operation inside `submit` (their completion is ready
//! at once), the simplest case of that contract.

use std::io;
use std::os::fd::RawFd;

use vm_memory::VolatileSlice;

mod file;
mod memory;
mod nbd;
mod null;
mod uring;

pub use file::{Aio, FileBackend};
pub use memory::MemoryBackend;
pub use nbd::{NbdAddress, NbdBackend, NbdTls, NbdUri};
pub use null::NullBackend;

/// One storage operation. Offsets and lengths are in bytes.
#[derive(Debug)]
pub enum IoOp<'a> {
    /// Read into `bufs`, in order, starting at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination buffers (driver memory).
        bufs: &'a [VolatileSlice<'a>],
    },
    /// Write `bufs`, in order, starting at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Source buffers (driver memory).
        bufs: &'a [VolatileSlice<'a>],
    },
    /// Make every completed write durable.
    Flush,
    /// The range's contents may be dropped.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// The range must read back as zeros afterwards.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The backend may deallocate the range.
        may_unmap: bool,
    },
}

/// A finished operation: the cookie given to `submit`, and its result.
pub type IoDone = (u64, io::Result<()>);

/// A storage backend: what a device is exported from.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// True if writes are refused.
    fn read_only(&self) -> bool;
    /// True if `Discard` does something useful.
    fn supports_discard(&self) -> bool {
        true
    }
    /// A submission context for one queue.
    fn queue(&self) -> io::Result<Box<dyn QueueBackend>>;
    /// One line for logs: kind and path or size.
    fn describe(&self) -> String;
}

/// One queue's submission context.
pub trait QueueBackend: Send {
    /// Starts `op`. The buffers must stay valid until `reap` returns `cookie`.
    fn submit(&mut self, cookie: u64, op: IoOp<'_>);
    /// Readable when results are waiting (None: results are ready right after `submit`).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    /// Moves finished operations into `out`.
    fn reap(&mut self, out: &mut Vec<IoDone>);
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// True if `reap` may find results now: a check without a system call, for a worker
    /// that busy-polls (the default, true, only costs a `reap` that finds nothing).
    fn has_results(&mut self) -> bool {
        true
    }
    /// The worker busy-polls (`true`) or is about to sleep (`false`): while it polls, the
    /// backend may stop signalling `completion_fd` (no system call per completion).
    fn set_polling(&mut self, _on: bool) {}
}

/// A backend queue whose operations finish inside `submit`.
pub(crate) trait RunNow: Send {
    /// Performs `op` to completion.
    fn run(&mut self, op: IoOp<'_>) -> io::Result<()>;
}

/// Adapts a [`RunNow`] queue to the asynchronous [`QueueBackend`] contract: results are
/// ready for `reap` right after `submit`.
pub(crate) struct Immediate<T> {
    inner: T,
    done: Vec<IoDone>,
}

impl<T: RunNow + 'static> Immediate<T> {
    /// Boxes `inner` as a queue backend.
    pub(crate) fn boxed(inner: T) -> Box<dyn QueueBackend> {
        Box::new(Immediate {
            inner,
            done: Vec::new(),
        })
    }
}

impl<T: RunNow> QueueBackend for Immediate<T> {
    fn submit(&mut self, cookie: u64, op: IoOp<'_>) {
        let res = self.inner.run(op);
        self.done.push((cookie, res));
    }
    fn reap(&mut self, out: &mut Vec<IoDone>) {
        out.append(&mut self.done);
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn has_results(&mut self) -> bool {
        !self.done.is_empty()
    }
}

/// Checks `[offset, offset + len)` against a backend of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is past the end ({size} bytes)"),
        )),
    }
}

/// A new non-blocking eventfd: how an asynchronous queue backend tells its worker that
/// results are waiting.
pub(crate) fn eventfd() -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain eventfd creation; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new fd that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Total length of `bufs`.
pub(crate) fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Parses a size: plain bytes, or with a K/M/G/T suffix (powers of 1024; `KiB`, `MiB`… too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "invalid size '{s}': expected a number such as 1048576, 64M or 1G"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}': number too large"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "invalid size '{s}': unknown suffix '{suffix}' (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn ranges_check() {
        assert!(check_range(0, 512, 512).is_ok());
        assert!(check_range(512, 1, 512).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}

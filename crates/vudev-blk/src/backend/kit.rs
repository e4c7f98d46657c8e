//! What a backend needs besides the traits, public so that a backend can be written outside
//! this crate (see `examples/`): [`RunNow`] and [`Immediate`] turn a synchronous queue into
//! an asynchronous one, [`check_range`] bounds a request, [`eventfd`] makes the completion fd
//! an asynchronous queue signals, [`total_len`] and [`zero_fill`] work on driver buffers.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, VolatileSlice};

use super::interface::{IoDone, IoOp, QueueBackend};

/// A page of zeros to copy from.
static ZEROS: [u8; 4096] = [0; 4096];

/// A backend queue whose operations finish inside `submit`.
pub trait RunNow: Send {
    /// Performs `op` to completion.
    fn run(&mut self, op: IoOp<'_>) -> io::Result<()>;
}

/// Adapts a [`RunNow`] queue to the asynchronous [`QueueBackend`] contract: results are
/// ready for `reap` right after `submit`.
pub struct Immediate<T> {
    inner: T,
    done: Vec<IoDone>,
}

impl<T: RunNow + 'static> Immediate<T> {
    /// Boxes `inner` as a queue backend.
    pub fn boxed(inner: T) -> Box<dyn QueueBackend> {
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

/// A size that can change while queues run (an online resize): shared by a backend and its
/// queues, read on every request.
#[derive(Clone, Debug)]
pub struct Capacity(Arc<AtomicU64>);

impl Capacity {
    /// A capacity of `bytes`.
    pub fn new(bytes: u64) -> Capacity {
        Capacity(Arc::new(AtomicU64::new(bytes)))
    }

    /// The size now, in bytes.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Changes the size.
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::Release)
    }
}

/// Checks `[offset, offset + len)` against a backend of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
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
pub fn eventfd() -> io::Result<std::fs::File> {
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
pub fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Fills `buf` with zeros.
pub fn zero_fill(buf: &VolatileSlice<'_>) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = (buf.len() - off).min(ZEROS.len());
        buf.write_slice(&ZEROS[..n], off)
            .map_err(io::Error::other)?;
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_check() {
        assert!(check_range(0, 512, 512).is_ok());
        assert!(check_range(512, 1, 512).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}

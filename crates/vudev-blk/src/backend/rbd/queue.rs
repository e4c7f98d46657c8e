//! One queue's requests to an RBD image: each is started with librbd's asynchronous calls
//! and completed by a callback on a librbd thread, which hands the result to the queue and
//! wakes its worker through an eventfd.
//!
//! Why callbacks and not `rbd_set_image_notification` + `rbd_poll_io_events`: those deliver
//! an image's completions on one event fd, and all of a device's queues share the image
//! (one handle per export: two handles of one image would pass its exclusive lock back and
//! forth on every write). A callback knows its queue, so each worker sees only its own.
//!
//! Driver memory is only touched on the worker's thread: a read lands in a buffer of the
//! request's own and is copied into the driver's buffers when the worker reaps it, so a read
//! that completes after the queue went away (a device reset, which librbd cannot be told
//! about) writes nothing the driver could have reused. Writes are copied by librbd when they
//! are started (`rbd_disable_zero_copy_writes`, which `cluster.rs` sets).

use std::ffi::c_void;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, VolatileSlice};

use super::super::interface::{IoDone, IoOp, QueueBackend};
use super::super::kit::{check_range, eventfd, total_len, Capacity};
use super::error::errno;
use super::ffi;
use super::Image;

/// librbd's flag for a write-zeroes that must leave the range allocated.
const WRITE_ZEROES_THICK: i32 = 1;

/// A finished request, waiting to be reaped.
struct Finished {
    cookie: u64,
    res: io::Result<()>,
    /// A read's data, to be copied into the driver's buffers on reaping.
    read: Option<ReadBack>,
}

/// A read's own buffer and where its data goes.
struct ReadBack {
    /// Not zeroed first (that cost 4000 instructions per 4 KiB read): only librbd writes
    /// it, and it is read only once librbd said it wrote all of it ([`outcome`]; librbd
    /// returns a read's length only when it filled the buffer, holes with zeros).
    data: Box<[MaybeUninit<u8>]>,
    /// The driver's buffers (pointer, length), valid until the request is reaped.
    dest: Vec<(usize, usize)>,
}

/// What a queue and its completion callbacks share.
struct Shared {
    /// Results not yet reaped.
    done: Mutex<Vec<Finished>>,
    /// Requests started and not yet called back.
    pending: Mutex<usize>,
    settled: Condvar,
    /// Readable when `done` has results.
    wake: File,
    /// The worker busy-polls: no eventfd write per completion.
    polling: AtomicBool,
    /// `done.len()`, readable without the lock.
    ready: AtomicUsize,
    /// The image and this connection's client name, for messages.
    label: String,
    /// Set when the cluster has fenced this connection (shared with the connection).
    fenced: Arc<AtomicBool>,
}

impl Shared {
    fn started(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn push(&self, f: Finished) {
        let first = {
            let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
            done.push(f);
            self.ready.store(done.len(), Ordering::Release);
            done.len() == 1
        };
        if first && !self.polling.load(Ordering::Acquire) {
            let _ = (&self.wake).write(&1u64.to_ne_bytes());
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *pending -= 1;
        if *pending == 0 {
            self.settled.notify_all();
        }
    }
}

/// A request in librbd's hands: given to the callback, which takes it back.
struct Pending {
    cookie: u64,
    shared: Arc<Shared>,
    read: Option<ReadBack>,
    /// A write's buffers: librbd reads this array while it starts the request.
    _iov: Vec<libc::iovec>,
}

/// Why a request failed, from librbd's return value.
#[derive(Debug, PartialEq)]
enum Failure {
    /// `-ESHUTDOWN`: the cluster blocklisted this connection.
    Fenced,
    /// Another negative errno.
    Errno(i64),
    /// A read that returned another length than asked (got, wanted).
    Length(isize, usize),
}

/// What librbd's return value `ret` means for a request; `read`: the length a read asked
/// for. A read succeeds only if librbd returned exactly that: anything shorter would leave
/// part of the driver's buffers as they were (stale or zeroed memory passed off as data),
/// and it is also what keeps the read's unzeroed buffer from being copied before librbd
/// wrote all of it.
fn outcome(ret: isize, read: Option<usize>) -> Result<(), Failure> {
    match (ret, read) {
        (r, _) if r == -(libc::ESHUTDOWN as isize) => Err(Failure::Fenced),
        (r, _) if r < 0 => Err(Failure::Errno(r as i64)),
        (r, Some(wanted)) if r as usize != wanted => Err(Failure::Length(r, wanted)),
        _ => Ok(()),
    }
}

/// Called by librbd, once per request, on one of its threads. Touches no driver memory.
extern "C" fn completed(c: ffi::CompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Pending> leaked when the request was started; librbd calls
    // back exactly once, so it is taken back exactly once.
    let p = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    // SAFETY: `c` is the completion librbd is calling back for; released once, here.
    let ret = unsafe {
        let ret = ffi::rbd_aio_get_return_value(c);
        ffi::rbd_aio_release(c);
        ret
    };
    let Pending {
        cookie,
        shared,
        read,
        ..
    } = *p;
    let res = match outcome(ret, read.as_ref().map(|rb| rb.data.len())) {
        Ok(()) => Ok(()),
        Err(Failure::Fenced) => {
            // The connection is no use any more: the next export opened makes a new one.
            shared.fenced.store(true, Ordering::Release);
            Err(io::Error::other(format!(
                "the cluster fenced (blocklisted) {}, typically because another client broke \
                 its lock on the image (rbd lock rm, or a client that took it for dead): \
                 nothing more is done through this connection; make sure only one client \
                 uses the image, then restart the export",
                shared.label
            )))
        }
        Err(Failure::Errno(r)) => Err(errno(r)),
        Err(Failure::Length(got, wanted)) => Err(io::Error::other(format!(
            "RBD returned {got} of {wanted} bytes"
        ))),
    };
    let read = read.filter(|_| res.is_ok());
    shared.push(Finished { cookie, res, read });
}

/// A queue's context.
pub(super) struct RbdQueue {
    image: Arc<Image>,
    capacity: Capacity,
    read_only: bool,
    shared: Arc<Shared>,
    /// How long drop waits for librbd to call back what is in flight.
    settle: Duration,
}

impl RbdQueue {
    pub(super) fn new(
        image: Arc<Image>,
        capacity: Capacity,
        read_only: bool,
        settle: Duration,
        label: String,
        fenced: Arc<AtomicBool>,
    ) -> io::Result<RbdQueue> {
        Ok(RbdQueue {
            image,
            capacity,
            read_only,
            shared: Arc::new(Shared {
                done: Mutex::new(Vec::new()),
                pending: Mutex::new(0),
                settled: Condvar::new(),
                wake: eventfd()?,
                polling: AtomicBool::new(false),
                ready: AtomicUsize::new(0),
                label,
                fenced,
            }),
            settle,
        })
    }

    /// Answers `cookie` at once (through the shared results, like the others).
    fn answer(&self, cookie: u64, res: io::Result<()>) {
        self.shared.started();
        self.shared.push(Finished {
            cookie,
            res,
            read: None,
        });
    }

    fn start(&mut self, cookie: u64, op: IoOp<'_>) -> io::Result<()> {
        let size = self.capacity.get();
        let writes = !matches!(op, IoOp::Read { .. } | IoOp::Flush);
        if writes && self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let (read, iov) = match &op {
            IoOp::Read { offset, bufs } | IoOp::Write { offset, bufs } => {
                let len = total_len(bufs);
                check_range(*offset, len, size)?;
                if len == 0 {
                    // Nothing to move (librbd refuses empty transfers): done at once.
                    self.answer(cookie, Ok(()));
                    return Ok(());
                }
                match op {
                    IoOp::Read { .. } => {
                        let data =
                            Box::new_uninit_slice(usize::try_from(len).map_err(io::Error::other)?);
                        let dest = bufs
                            .iter()
                            .map(|b| (b.ptr_guard_mut().as_ptr() as usize, b.len()))
                            .collect();
                        (Some(ReadBack { data, dest }), Vec::new())
                    }
                    _ => (None, iovecs(bufs)),
                }
            }
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len, .. } => {
                check_range(*offset, *len, size)?;
                (None, Vec::new())
            }
            IoOp::Flush => (None, Vec::new()),
        };
        let iovcnt = i32::try_from(iov.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many segments"))?;
        let iov_ptr = iov.as_ptr();
        let mut pending = Box::new(Pending {
            cookie,
            shared: self.shared.clone(),
            read,
            _iov: iov,
        });
        // The read's own buffer: its heap block stays put when the Box moves.
        let read_buf = pending.read.as_mut().map_or((ptr::null_mut(), 0), |r| {
            (r.data.as_mut_ptr().cast::<u8>(), r.data.len())
        });
        let pending = Box::into_raw(pending);
        let mut c: ffi::CompletionT = ptr::null_mut();
        // SAFETY: `c` is a valid out-pointer; `pending` is passed through to `completed`.
        let ret = unsafe { ffi::rbd_aio_create_completion(pending.cast(), completed, &mut c) };
        if ret < 0 {
            // SAFETY: librbd did not take `pending`: it is still ours to free.
            drop(unsafe { Box::from_raw(pending) });
            return Err(errno(ret.into()));
        }
        self.shared.started();
        let img = self.image.handle;
        // SAFETY: the image is open for as long as `self.image` lives, and drop keeps it open
        // while requests are in flight. A read goes into its own buffer, owned by `pending`
        // until the callback; a write's iovec array (in `pending`) points at driver memory
        // that the QueueBackend contract keeps valid until the result is reaped, and librbd
        // copies it when the request starts.
        let ret = unsafe {
            match op {
                IoOp::Read { offset, .. } => {
                    ffi::rbd_aio_read(img, offset, read_buf.1, read_buf.0.cast(), c)
                }
                IoOp::Write { offset, .. } => ffi::rbd_aio_writev(img, iov_ptr, iovcnt, offset, c),
                IoOp::Flush => ffi::rbd_aio_flush(img, c),
                IoOp::Discard { offset, len } => ffi::rbd_aio_discard(img, offset, len, c),
                IoOp::WriteZeroes {
                    offset,
                    len,
                    may_unmap,
                } => {
                    let flags = if may_unmap { 0 } else { WRITE_ZEROES_THICK };
                    ffi::rbd_aio_write_zeroes(img, offset, len as usize, c, flags, 0)
                }
            }
        };
        if ret < 0 {
            // librbd refused at once and will not call back.
            // SAFETY: not handed to librbd: ours to free, once.
            unsafe {
                ffi::rbd_aio_release(c);
                drop(Box::from_raw(pending));
            }
            *self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner()) -= 1;
            return Err(errno(ret.into()));
        }
        Ok(())
    }
}

/// The iovecs of driver buffers.
fn iovecs(bufs: &[VolatileSlice<'_>]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|b| libc::iovec {
            iov_base: b.ptr_guard_mut().as_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

/// Copies a finished read into the driver's buffers.
fn copy_back(rb: &ReadBack) -> io::Result<()> {
    // SAFETY: only called for a read that succeeded, and `completed` takes a read for a
    // success only if librbd returned its whole length: every byte has been written.
    let data = unsafe { std::slice::from_raw_parts(rb.data.as_ptr().cast::<u8>(), rb.data.len()) };
    let mut at = 0;
    for &(addr, len) in &rb.dest {
        // SAFETY: (addr, len) is one of the driver buffers the request was submitted with;
        // the QueueBackend contract keeps it mapped and ours until this result is reaped,
        // which is now, on the worker's thread.
        let slice = unsafe { VolatileSlice::new(addr as *mut u8, len) };
        slice
            .write_slice(&data[at..at + len], 0)
            .map_err(io::Error::other)?;
        at += len;
    }
    Ok(())
}

impl QueueBackend for RbdQueue {
    fn submit(&mut self, cookie: u64, op: IoOp<'_>) {
        if let Err(e) = self.start(cookie, op) {
            self.answer(cookie, Err(e));
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.shared.wake.as_raw_fd())
    }

    fn reap(&mut self, out: &mut Vec<IoDone>) {
        // Clear the wakeup first: a result pushed after this wakes the worker again.
        let mut buf = [0u8; 8];
        let _ = (&self.shared.wake).read(&mut buf);
        let finished = {
            let mut done = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.ready.store(0, Ordering::Release);
            std::mem::take(&mut *done)
        };
        out.extend(finished.into_iter().map(|f| {
            let res = match (&f.read, f.res) {
                (Some(rb), Ok(())) => copy_back(rb),
                (_, res) => res,
            };
            (f.cookie, res)
        }));
    }

    fn in_flight(&self) -> usize {
        *self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            + self.shared.ready.load(Ordering::Acquire)
    }

    fn has_results(&mut self) -> bool {
        self.shared.ready.load(Ordering::Acquire) > 0
    }

    fn set_polling(&mut self, on: bool) {
        self.shared.polling.store(on, Ordering::Release);
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        // Late completions touch no driver memory (see above), but the image must not be
        // closed under them: wait (every request is bounded by the op timeout), and if they
        // still have not come, keep the image open for good rather than close it under them.
        let deadline = Instant::now() + self.settle;
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while *pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::error!(
                    in_flight = *pending,
                    "RBD requests still unanswered at queue stop: leaving them, and the image \
                     open"
                );
                std::mem::forget(self.image.clone());
                return;
            }
            pending = match self.shared.settled.wait_timeout(pending, left) {
                Ok((p, _)) => p,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{outcome, Failure};

    #[test]
    fn a_read_succeeds_only_with_its_whole_length() {
        assert_eq!(outcome(4096, Some(4096)), Ok(()));
        assert_eq!(outcome(4095, Some(4096)), Err(Failure::Length(4095, 4096)));
        assert_eq!(outcome(0, Some(4096)), Err(Failure::Length(0, 4096)));
        assert_eq!(outcome(8192, Some(4096)), Err(Failure::Length(8192, 4096)));
        assert_eq!(outcome(-5, Some(4096)), Err(Failure::Errno(-5)));
        assert_eq!(
            outcome(-(libc::ESHUTDOWN as isize), Some(4096)),
            Err(Failure::Fenced)
        );
        // Other requests: any non-negative result is a success.
        assert_eq!(outcome(0, None), Ok(()));
        assert_eq!(outcome(4096, None), Ok(()));
        assert_eq!(
            outcome(-(libc::ESHUTDOWN as isize), None),
            Err(Failure::Fenced)
        );
        assert_eq!(outcome(-110, None), Err(Failure::Errno(-110)));
    }
}

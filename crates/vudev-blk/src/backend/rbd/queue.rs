//! One queue's requests to an RBD image: each is started with librbd's asynchronous calls
//! and completed by a callback on a librbd thread, which hands the result to the queue and
//! wakes its worker through an eventfd.
//!
//! Why callbacks and not `rbd_set_image_notification` + `rbd_poll_io_events`: those deliver
//! an image's completions on one event fd, and all of a device's queues share the image
//! (one handle per export: two handles of one image would pass its exclusive lock back and
//! forth on every write). A callback knows its queue, so each worker sees only its own.

use std::ffi::c_void;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use super::super::interface::{IoDone, IoOp, QueueBackend};
use super::super::kit::{check_range, eventfd, total_len, Capacity};
use super::error::errno;
use super::ffi;
use super::Image;

/// librbd's flag for a write-zeroes that must leave the range allocated.
const WRITE_ZEROES_THICK: i32 = 1;

/// What a queue and its completion callbacks share.
struct Shared {
    /// Results not yet reaped.
    done: Mutex<Vec<IoDone>>,
    /// Requests started and not yet called back (the callbacks' count; waits on drop).
    pending: Mutex<usize>,
    settled: Condvar,
    /// Readable when `done` has results.
    wake: File,
    /// The worker busy-polls: no eventfd write per completion.
    polling: AtomicBool,
    /// `done.len()`, readable without the lock.
    ready: AtomicUsize,
}

impl Shared {
    fn push(&self, cookie: u64, res: io::Result<()>) {
        let first = {
            let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
            done.push((cookie, res));
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

/// A request in librbd's hands: given to the callback, which frees it.
struct Pending {
    cookie: u64,
    shared: Arc<Shared>,
    /// Bytes a read must return.
    read_len: Option<u64>,
    /// The buffers of a read or write: librbd keeps a pointer to this array until done.
    _iov: Vec<libc::iovec>,
}

/// Called by librbd, once per request, on one of its threads.
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
    let res = if ret < 0 {
        Err(errno(ret as i64))
    } else {
        match p.read_len {
            // A short read would leave the rest of the buffers as they were: an error, never
            // a "successful" read of stale or zeroed memory.
            Some(want) if ret as u64 != want => Err(io::Error::other(format!(
                "RBD returned {ret} of {want} bytes"
            ))),
            _ => Ok(()),
        }
    };
    p.shared.push(p.cookie, res);
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
            }),
            settle,
        })
    }

    fn start(&mut self, cookie: u64, op: IoOp<'_>) -> io::Result<()> {
        let size = self.capacity.get();
        let writes = !matches!(op, IoOp::Read { .. } | IoOp::Flush);
        if writes && self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let (read_len, iov) = match &op {
            IoOp::Read { offset, bufs } | IoOp::Write { offset, bufs } => {
                check_range(*offset, total_len(bufs), size)?;
                let is_read = matches!(op, IoOp::Read { .. });
                (is_read.then(|| total_len(bufs)), iovecs(bufs))
            }
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len, .. } => {
                check_range(*offset, *len, size)?;
                (None, Vec::new())
            }
            IoOp::Flush => (None, Vec::new()),
        };
        if iov.is_empty() && matches!(op, IoOp::Read { .. } | IoOp::Write { .. }) {
            // Nothing to move (librbd refuses an empty vector): done at once.
            *self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner()) += 1;
            self.shared.push(cookie, Ok(()));
            return Ok(());
        }
        let iovcnt = i32::try_from(iov.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many segments"))?;
        let iov_ptr = iov.as_ptr();
        let pending = Box::into_raw(Box::new(Pending {
            cookie,
            shared: self.shared.clone(),
            read_len,
            _iov: iov,
        }));
        let mut c: ffi::CompletionT = ptr::null_mut();
        // SAFETY: `c` is a valid out-pointer; `pending` is passed through to `completed`.
        let ret = unsafe { ffi::rbd_aio_create_completion(pending.cast(), completed, &mut c) };
        if ret < 0 {
            // SAFETY: librbd did not take `pending`: it is still ours to free.
            drop(unsafe { Box::from_raw(pending) });
            return Err(errno(ret.into()));
        }
        *self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += 1;
        let img = self.image.handle;
        // SAFETY: the image is open for as long as `self.image` lives, which outlasts every
        // request (drop waits for them). The iovec array lives in `pending` until the
        // callback; the buffers it points at are driver memory that the QueueBackend
        // contract keeps valid until the result is reaped.
        let ret = unsafe {
            match op {
                IoOp::Read { offset, .. } => ffi::rbd_aio_readv(img, iov_ptr, iovcnt, offset, c),
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

impl QueueBackend for RbdQueue {
    fn submit(&mut self, cookie: u64, op: IoOp<'_>) {
        if let Err(e) = self.start(cookie, op) {
            // Answered like the others, through the shared results.
            *self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner()) += 1;
            self.shared.push(cookie, Err(e));
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.shared.wake.as_raw_fd())
    }

    fn reap(&mut self, out: &mut Vec<IoDone>) {
        // Clear the wakeup first: a result pushed after this wakes the worker again.
        let mut buf = [0u8; 8];
        let _ = (&self.shared.wake).read(&mut buf);
        let mut done = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
        out.append(&mut done);
        self.shared.ready.store(0, Ordering::Release);
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
        // librbd writes into driver memory until it calls back: wait for that (every request
        // is bounded by the op timeout) before the memory can go.
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
                    "RBD requests still unanswered at queue stop; leaving them"
                );
                return;
            }
            pending = match self.shared.settled.wait_timeout(pending, left) {
                Ok((p, _)) => p,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

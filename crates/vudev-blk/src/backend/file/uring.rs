//! The io_uring queue of the file backend: reads, writes and flushes go to the kernel
//! asynchronously, straight from and into driver memory, submitted in batches (one
//! `io_uring_enter` per batch of kicks) with completions signalled on an eventfd that the
//! queue worker polls. The file is registered with the ring. Discard, write-zeroes and O_DIRECT
//! requests whose buffers are not aligned take the synchronous path.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::VolatileSlice;

use super::sync::{aligned, FileQueue};
use crate::backend::interface::{IoDone, IoOp, QueueBackend};
use crate::backend::kit::{check_range, eventfd, total_len, RunNow};

/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 512;
/// Largest iovec count for one readv/writev (the kernel's UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;

/// A request in the kernel's hands.
struct Slot {
    cookie: u64,
    /// The iovec array the kernel reads; must live until the completion.
    iovecs: Vec<libc::iovec>,
    /// Bytes the request must transfer (0 for a flush).
    expected: u64,
}

/// One queue's io_uring.
pub(crate) struct UringQueue {
    ring: IoUring,
    eventfd: File,
    sync: FileQueue,
    direct: bool,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// iovec arrays of finished requests, for the next ones.
    spare: Vec<Vec<libc::iovec>>,
    /// The worker busy-polls: the eventfd is off and not read.
    polling: bool,
    unsubmitted: usize,
    in_kernel: usize,
    done: Vec<IoDone>,
}

impl UringQueue {
    /// A ring for `sync`'s file; fails where io_uring is unavailable (old kernel, seccomp).
    /// The ring runs only what this queue submits (readv, writev and fsync of its one
    /// registered file) and takes no registration after its setup: the process that reads
    /// peers' input cannot make it a way around its seccomp filter (io_uring can open files,
    /// make sockets and connect them).
    pub(crate) fn new(sync: FileQueue, direct: bool) -> io::Result<Self> {
        let ring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
        let submitter = ring.submitter();
        submitter.register_files(&[sync.raw_fd()])?;
        let eventfd = eventfd()?;
        submitter.register_eventfd(eventfd.as_raw_fd())?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(fixed),
            Restriction::sqe_flags_required(fixed),
        ])?;
        submitter.register_enable_rings()?;
        Ok(UringQueue {
            ring,
            eventfd,
            sync,
            direct,
            slots: Vec::new(),
            free: Vec::new(),
            spare: Vec::new(),
            polling: false,
            unsubmitted: 0,
            in_kernel: 0,
            done: Vec::new(),
        })
    }

    fn push(
        &mut self,
        cookie: u64,
        iovecs: Vec<libc::iovec>,
        expected: u64,
        build: impl FnOnce(*const libc::iovec, u32) -> io_uring::squeue::Entry,
    ) {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let entry = build(iovecs.as_ptr(), iovecs.len() as u32).user_data(idx as u64);
        self.slots[idx] = Some(Slot {
            cookie,
            iovecs,
            expected,
        });
        loop {
            // SAFETY: the entry's iovec array and buffers stay valid until its completion: the
            // array lives in `slots[idx]`, the buffers in driver memory that the device keeps
            // mapped while the request is pending.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            // The submission queue is full: hand it to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                let slot = self.slots[idx].take();
                self.free.push(idx);
                self.done.push((slot.map_or(cookie, |s| s.cookie), Err(e)));
                return;
            }
            self.unsubmitted = 0;
        }
        self.unsubmitted += 1;
        self.in_kernel += 1;
    }
}

impl UringQueue {
    /// Queues a readv or writev of `bufs` at `offset`.
    fn rw(&mut self, cookie: u64, offset: u64, bufs: &[VolatileSlice<'_>], write: bool) {
        let len = total_len(bufs);
        if let Err(e) = check_range(offset, len, self.sync.size()) {
            self.done.push((cookie, Err(e)));
            return;
        }
        // iovec arrays are reused: no allocation per request once the queue is warm.
        let mut iov = self.spare.pop().unwrap_or_default();
        iov.clear();
        iov.extend(bufs.iter().map(|b| libc::iovec {
            iov_base: b.ptr_guard_mut().as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }));
        let fd = types::Fixed(0);
        self.push(cookie, iov, len, |p, n| {
            if write {
                opcode::Writev::new(fd, p, n).offset(offset).build()
            } else {
                opcode::Readv::new(fd, p, n).offset(offset).build()
            }
        });
    }
}

impl QueueBackend for UringQueue {
    fn submit(&mut self, cookie: u64, op: IoOp<'_>) {
        let fd = types::Fixed(0);
        match op {
            IoOp::Read { offset, bufs } | IoOp::Write { offset, bufs }
                if bufs.len() > MAX_IOVECS || (self.direct && !aligned(offset, bufs)) =>
            {
                let res = self.sync.run(op);
                self.done.push((cookie, res));
            }
            IoOp::Read { offset, bufs } => self.rw(cookie, offset, bufs, false),
            IoOp::Write { offset, bufs } => self.rw(cookie, offset, bufs, true),
            IoOp::Flush => self.push(cookie, Vec::new(), 0, |_, _| {
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            }),
            op @ (IoOp::Discard { .. } | IoOp::WriteZeroes { .. }) => {
                let res = self.sync.run(op);
                self.done.push((cookie, res));
            }
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn reap(&mut self, out: &mut Vec<IoDone>) {
        if self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(_) => self.unsubmitted = 0,
                Err(e) => tracing::warn!("io_uring submit: {e}"),
            }
        }
        if !self.polling {
            let mut counter = [0u8; 8];
            let _ = (&self.eventfd).read(&mut counter);
        }
        out.append(&mut self.done);
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let idx = cqe.user_data() as usize;
            let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
                continue;
            };
            self.free.push(idx);
            self.in_kernel -= 1;
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if res as u64 != slot.expected {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {} bytes", slot.expected),
                ))
            } else {
                Ok(())
            };
            self.spare.push(slot.iovecs);
            out.push((slot.cookie, result));
        }
    }

    fn in_flight(&self) -> usize {
        self.in_kernel + self.done.len()
    }

    fn set_polling(&mut self, on: bool) {
        // The kernel skips the eventfd while this flag is set in the shared CQ ring.
        let cq = self.ring.completion();
        if on {
            cq.disable_eventfd();
        } else {
            cq.enable_eventfd();
        }
        self.polling = on;
    }

    fn has_results(&mut self) -> bool {
        // The completion queue's head and tail are in memory shared with the kernel.
        self.unsubmitted > 0 || !self.done.is_empty() || !self.ring.completion().is_empty()
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still use iovec arrays we own: wait for what it holds (bounded).
        let mut sink = Vec::new();
        for _ in 0..100 {
            self.reap(&mut sink);
            if self.in_kernel == 0 {
                return;
            }
            let mut pfd = libc::pollfd {
                fd: self.eventfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, 100 ms timeout.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
        tracing::error!(
            in_flight = self.in_kernel,
            "io_uring requests still in the kernel after 10 s; closing the ring anyway"
        );
    }
}

// SAFETY: the raw pointers in the slots' iovec arrays point into driver memory that the device
// keeps mapped for the request's lifetime; the queue is used by one worker thread at a time and
// nothing in it is tied to the thread that created it.
unsafe impl Send for UringQueue {}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::kit::Capacity;

    #[test]
    fn the_ring_runs_only_what_the_queue_submits() {
        let path = std::env::temp_dir().join(format!("vudev-uring-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let sync = FileQueue::new(Arc::new(file), Capacity::new(1 << 20), false, false);
        let mut q = UringQueue::new(sync, false).unwrap();
        let mut run = |entry: io_uring::squeue::Entry| {
            // SAFETY: the entries below point at no memory.
            unsafe { q.ring.submission().push(&entry).unwrap() };
            q.ring.submit_and_wait(1).unwrap();
            q.ring.completion().next().unwrap().result()
        };
        // What the queue submits runs; anything else (a no-op; a file that is not the
        // registered one) is refused by the kernel.
        assert_eq!(run(opcode::Fsync::new(types::Fixed(0)).build()), 0);
        assert_eq!(run(opcode::Nop::new().build()), -libc::EACCES);
        let not_fixed = types::Fd(std::io::stdin().as_raw_fd());
        assert_eq!(run(opcode::Fsync::new(not_fixed).build()), -libc::EACCES);
        std::fs::remove_file(&path).unwrap();
    }
}

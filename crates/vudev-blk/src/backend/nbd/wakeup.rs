//! The one fd a queue worker polls for its NBD queue: an epoll set of the connection's socket
//! (readable, and writable while bytes wait), the dialer's eventfd, the queue's own eventfd
//! (results another queue found for it) and a timer for the connection's deadlines.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// See the module documentation.
pub(super) struct Wakeup {
    epoll: OwnedFd,
    timer: OwnedFd,
    /// The socket watched: fd, generation, and whether for writing too.
    socket: Option<(RawFd, u64, bool)>,
    /// When the timer fires (None: disarmed).
    due: Option<Instant>,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Wakeup {
    /// A set watching `fixed` (and the timer) for readability.
    pub(super) fn new(fixed: &[RawFd]) -> io::Result<Wakeup> {
        // SAFETY: plain system calls; each fd returned is owned at once.
        let epoll =
            unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        // SAFETY: as above.
        let timer = unsafe {
            OwnedFd::from_raw_fd(check(libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            ))?)
        };
        let w = Wakeup {
            epoll,
            timer,
            socket: None,
            due: None,
        };
        w.ctl(libc::EPOLL_CTL_ADD, w.timer.as_raw_fd(), libc::EPOLLIN)?;
        for &fd in fixed {
            w.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN)?;
        }
        Ok(w)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: libc::c_int) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the call; the epoll fd is ours.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    /// The fd to poll: readable when any member is.
    pub(super) fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Watches `socket` (fd and generation; None: no connection), for writing too if `write`.
    pub(super) fn watch_socket(&mut self, socket: Option<(RawFd, u64)>, write: bool) {
        let now = socket.map(|(fd, g)| (fd, g, write));
        if now == self.socket {
            return;
        }
        if let Some((old, _, _)) = self.socket.take() {
            // The old socket may be closed already (which took it out of the set).
            let _ = self.ctl(libc::EPOLL_CTL_DEL, old, 0);
        }
        if let Some((fd, _, write)) = now {
            let events = libc::EPOLLIN | if write { libc::EPOLLOUT } else { 0 };
            let r = self.ctl(libc::EPOLL_CTL_ADD, fd, events);
            if r.is_err() {
                let _ = self.ctl(libc::EPOLL_CTL_MOD, fd, events);
            }
        }
        self.socket = now;
    }

    /// Makes the timer fire at `at` (None: never).
    pub(super) fn arm(&mut self, at: Option<Instant>) {
        let now = Instant::now();
        let left = match at {
            None if self.due.is_none() => return,
            None => Duration::ZERO,
            // Already set, and not fired yet: nothing to do.
            Some(t) if self.due == Some(t) && now < t => return,
            Some(t) => t
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is valid for the call; the timer fd is ours. Setting the timer also
        // clears a past expiry, so the fd stops being readable.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        self.due = at;
    }
}

//! Waiting for file descriptors to become readable (poll(2)): what every thread of vudev that
//! sleeps on an eventfd or a socket does.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// A pollfd that waits for `fd` to be readable (a negative `fd` is ignored by poll).
pub fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits for one of `fds` (forever when `timeout` is `None`); 0 when interrupted or timed out.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<i32> {
    // Rounded up, so that a deadline is never polled for 0 ms before it has passed.
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    });
    // SAFETY: `fds` is a valid, exclusively borrowed pollfd array.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n)
}

//! The reading half of a connection, as the reply thread uses it: reads never wait for long
//! and never hold a lock, and at least every [`TICK`], however the server sends, the
//! connection fails its old requests and the server is held to its deadlines.

use std::io::{self, Read};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::link::LinkReader;
use super::wire::proto;

/// How often the reply thread looks at the clock, whatever the server does.
pub(super) const TICK: Duration = Duration::from_millis(100);
/// Most failed requests whose replies a server may owe before its connection is replaced.
pub(super) const MAX_OWED: usize = 1024;

/// What the reading half needs of the connection it reads for.
pub(super) trait Keeper {
    /// The connection is being closed.
    fn stopping(&self) -> bool;
    /// Fails the requests whose time is up.
    fn expire(&self);
    /// The request timeout.
    fn timeout(&self) -> Duration;
    /// Requests that failed and still wait for the reply the server owes.
    fn owed(&self) -> usize;
    /// Writes what the socket takes of the backlog; an error when the server has taken
    /// nothing for the whole timeout.
    fn flush(&self) -> io::Result<()>;
    /// The writer's backlog holds bytes.
    fn backlogged(&self) -> bool;
    /// Readable when a queue left bytes in the backlog.
    fn wake_fd(&self) -> RawFd;
    /// Takes the wake-up on [`Keeper::wake_fd`].
    fn woken(&self);
}

/// The reading half of a link, for the reply thread: waits (polling the socket, and the
/// wake-up fd to flush the backlog) without ever holding a lock, and at least every tick,
/// however the server sends, fails old requests and checks the server keeps its deadlines.
pub(super) struct Patient<'a> {
    inner: LinkReader,
    shared: &'a dyn Keeper,
    /// When the reply being read began (None between replies: waiting is normal then).
    reply_began: Option<Instant>,
    /// When the server last sent a byte.
    last_byte: Instant,
    last_tick: Instant,
}

impl<'a> Patient<'a> {
    /// The reading half `inner` of the connection `shared` keeps.
    pub(super) fn new(inner: LinkReader, shared: &'a dyn Keeper) -> Patient<'a> {
        let now = Instant::now();
        Patient {
            inner,
            shared,
            reply_began: None,
            last_byte: now,
            last_tick: now,
        }
    }

    /// The next byte read begins a new reply.
    pub(super) fn between_replies(&mut self) {
        self.reply_began = None;
    }

    /// At most once a tick: fail old requests, and give up on a server that misses its
    /// deadlines.
    fn tick(&mut self) -> io::Result<()> {
        let now = Instant::now();
        if now.duration_since(self.last_tick) < TICK {
            return Ok(());
        }
        self.last_tick = now;
        let shared = self.shared;
        if shared.stopping() {
            return Err(io::Error::other("stopping"));
        }
        shared.expire();
        let timeout = shared.timeout();
        if let Some(began) = self.reply_began {
            if now.duration_since(began) > timeout {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the server took longer than {timeout:?} to send one reply"),
                ));
            }
        }
        let owed = shared.owed();
        // Silent for a whole timeout while it owes replies to requests that already failed:
        // start again on a new connection rather than let them pile up.
        if self.reply_began.is_none() && owed > 0 && now.duration_since(self.last_byte) > timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the server has not answered for the whole timeout",
            ));
        }
        if owed > MAX_OWED {
            return Err(proto(format!(
                "it owes replies to {owed} requests that timed out"
            )));
        }
        Ok(())
    }

    /// Waits up to a tick for the socket to have data; flushes the backlog when the socket
    /// takes more, or when a queue left bytes in it.
    fn wait(&mut self) -> io::Result<()> {
        let shared = self.shared;
        let out = shared.backlogged();
        let mut fds = [
            libc::pollfd {
                fd: self.inner.raw_fd(),
                events: libc::POLLIN | if out { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: shared.wake_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid pollfd array for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, TICK.as_millis() as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let woken = fds[1].revents != 0;
        if woken {
            shared.woken();
        }
        if woken || fds[0].revents & libc::POLLOUT != 0 || out {
            shared.flush()?;
        }
        Ok(())
    }
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.tick()?;
            match self.inner.read(buf) {
                Ok(0) if !buf.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ))
                }
                Ok(n) => {
                    let now = Instant::now();
                    self.last_byte = now;
                    self.reply_began.get_or_insert(now);
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    self.wait()?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

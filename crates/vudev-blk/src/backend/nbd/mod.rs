//! The NBD backend: the disk is an export of an NBD server (qemu-nbd, nbdkit, …), reached by
//! an NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`, and with TLS
//! `nbds://…?tls-certificates=DIR`, `nbds+unix://…`).
//!
//! Written from the protocol specification (NetworkBlockDevice `doc/proto.md`; no kept Rust
//! client exists):
//! - [`uri`]: the URI forms; [`handshake`]: fixed newstyle, STARTTLS, extended headers or
//!   structured replies, `NBD_OPT_GO` with the size, flags and block-size limits;
//!   [`link`]: the socket and TLS session, non-blocking after the handshake;
//!   [`wire`]: request and reply headers; [`engine`]: many requests in flight on one
//!   connection, matched to their replies by cookie, with reconnection and deadlines, driven
//!   by the queue's own thread; [`inbound`]: replies read as they come, [`assembly`]: a
//!   structured reply checked chunk by chunk; [`dialer`]: handshakes off the data path;
//!   [`wakeup`]: the one fd a queue worker polls; [`error`]: opening errors.
//! - Each queue has its own connection when the server allows it (`CAN_MULTI_CONN`) and
//!   drives it itself: requests of one kick go out in one write, replies land in the driver's
//!   buffers and complete on the same thread. Otherwise the queues share one connection, and
//!   whichever queue drives it passes the others their results.
//! - Requests larger than the server's maximum payload are split, and the pieces run in
//!   parallel.
//! - A lost connection is connected again with backoff and every unanswered request is sent
//!   again, so a server that restarts within the timeout is not noticed by the guest; a
//!   request unanswered after the timeout fails with an I/O error, never a hang.
//!
//! Everything the server sends is checked (magics, cookies, offsets, lengths); a server that
//! breaks the protocol loses its connection.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::interface::{BlockBackend, IoDone, IoOp, QueueBackend};
use super::kit::{check_range, eventfd, total_len};

mod assembly;
mod dialer;
mod engine;
mod error;
mod handshake;
mod inbound;
mod link;
mod uri;
mod wakeup;
mod wire;

use engine::{Bufs, Engine, Events, Req};
pub use error::NbdError;
use handshake::ExportInfo;
pub use uri::{NbdAddress, NbdTls, NbdUri};
use wakeup::Wakeup;
use wire::*;

/// An NBD export as a block backend.
pub struct NbdBackend {
    uri: NbdUri,
    timeout: Duration,
    info: ExportInfo,
    replies: Replies,
    read_only: bool,
    /// The one connection every queue shares when the server does not allow several.
    shared: Option<Arc<Mutex<Engine>>>,
    events: Arc<Events>,
}

impl NbdBackend {
    /// Connects to the export at `uri` (checking it exists and learning its size); every
    /// request waits at most `timeout` for the server.
    pub fn connect(uri: &str, read_only: bool, timeout: Duration) -> Result<Self, NbdError> {
        let parsed = NbdUri::parse(uri)?;
        let failed = |source| NbdError::Connect {
            uri: uri.into(),
            source,
        };
        let first = handshake::connect(&parsed, timeout).map_err(failed)?;
        let mut info = first.info;
        if info.min_block > info.max_payload {
            return Err(NbdError::BlockSizes {
                uri: uri.into(),
                min: info.min_block,
                max: info.max_payload,
            });
        }
        // Pieces of a split request stay whole blocks.
        info.max_payload -= info.max_payload % info.min_block;
        let replies = first.replies;
        let events = Arc::new(Events::default());
        let shared = if info.flags & TF_CAN_MULTI_CONN == 0 {
            let engine =
                Engine::new(&parsed, timeout, &info, Some(first), &events).map_err(failed)?;
            Some(Arc::new(Mutex::new(engine)))
        } else {
            None // each queue connects on its own
        };
        Ok(NbdBackend {
            uri: parsed,
            timeout,
            read_only: read_only || info.flags & TF_READ_ONLY != 0,
            info,
            replies,
            shared,
            events,
        })
    }

    /// The smallest unit of I/O the server accepts (NBD_INFO_BLOCK_SIZE minimum; 1 if it
    /// gave none): the device's logical block size must be a multiple of it.
    pub fn min_block_size(&self) -> u32 {
        self.info.min_block
    }
}

impl BlockBackend for NbdBackend {
    fn size(&self) -> u64 {
        self.info.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn supports_discard(&self) -> bool {
        self.info.flags & TF_SEND_TRIM != 0
    }
    fn events(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            ("reconnects", self.events.reconnects.load(Relaxed)),
            ("timeouts", self.events.timeouts.load(Relaxed)),
        ]
    }
    fn queue(&self) -> io::Result<Box<dyn QueueBackend>> {
        let (engine, wake) = match &self.shared {
            Some(e) => (e.clone(), Some(eventfd()?)),
            None => {
                let e = Engine::new(&self.uri, self.timeout, &self.info, None, &self.events)?;
                (Arc::new(Mutex::new(e)), None)
            }
        };
        let mut fixed = vec![lock(&engine).dialer_fd()];
        fixed.extend(wake.as_ref().map(|w| w.as_raw_fd()));
        let wakeup = Wakeup::new(&fixed)?;
        let owner = lock(&engine).attach(wake);
        let mut q = NbdQueue {
            engine,
            owner,
            wakeup,
            info: self.info,
            parts: HashMap::new(),
            ready: Vec::new(),
            arrived: Vec::new(),
        };
        NbdQueue::watch(&mut q.wakeup, &lock(&q.engine), false);
        Ok(Box::new(q))
    }
    fn describe(&self) -> String {
        let at = match &self.uri.address {
            NbdAddress::Tcp(h, p) => format!("{h}:{p}"),
            NbdAddress::Unix(p) => p.display().to_string(),
        };
        format!(
            "NBD export '{}' at {at}{}, {} bytes, {:?} replies, flags {:#x}, blocks {}..{}{}",
            self.uri.export,
            if self.uri.tls.is_some() { " (TLS)" } else { "" },
            self.info.size,
            self.replies,
            self.info.flags,
            self.info.min_block,
            self.info.max_payload,
            if self.shared.is_none() {
                ", a connection per queue"
            } else {
                ""
            }
        )
    }
}

/// A request of the queue split into pieces: how many have not answered, and the first
/// error among those that have.
struct Parts {
    left: u64,
    error: Option<io::Error>,
}

/// Most NBD requests one request of the driver is split into (a server with a tiny maximum
/// payload cannot make one request cost millions).
const MAX_PIECES: u64 = 4096;

/// Pieces of a request without payload (trim, write-zeroes): as large as a request header
/// takes, whole blocks.
fn no_payload_max(min_block: u32) -> u64 {
    let max = u64::from(u32::MAX);
    max - max % u64::from(min_block.max(1))
}

fn lock(e: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    e.lock().unwrap_or_else(|e| e.into_inner())
}

/// One queue's requests to the server.
struct NbdQueue {
    engine: Arc<Mutex<Engine>>,
    /// Who this queue is to the engine.
    owner: usize,
    wakeup: Wakeup,
    info: ExportInfo,
    parts: HashMap<u64, Parts>,
    /// Results known at submission (range errors, no-ops).
    ready: Vec<IoDone>,
    arrived: Vec<(u64, io::Result<()>)>,
}

impl NbdQueue {
    /// Sends a request over `[offset, offset + len)` in pieces of at most the server's
    /// payload limit; `piece(at, n)` makes the piece at `at` of `n` bytes.
    fn split(&mut self, cookie: u64, offset: u64, len: u64, piece: impl Fn(u64, u32) -> Req) {
        let max = u64::from(self.info.max_payload);
        self.split_by(cookie, offset, len, max, piece)
    }

    /// [`NbdQueue::split`] in pieces of at most `max` bytes.
    fn split_by(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u64,
        max: u64,
        piece: impl Fn(u64, u32) -> Req,
    ) {
        if let Err(e) = check_range(offset, len, self.info.size) {
            self.ready.push((cookie, Err(e)));
            return;
        }
        if len == 0 {
            self.ready.push((cookie, Ok(())));
            return;
        }
        if len.div_ceil(max) > MAX_PIECES {
            self.ready.push((
                cookie,
                Err(io::Error::other(format!(
                    "{len} bytes would take {} NBD requests of at most {max} bytes (the \
                     server's limit): refused, at most {MAX_PIECES} per request",
                    len.div_ceil(max)
                ))),
            ));
            return;
        }
        self.parts.insert(
            cookie,
            Parts {
                left: len.div_ceil(max),
                error: None,
            },
        );
        let mut e = lock(&self.engine);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(max) as u32;
            e.submit(self.owner, cookie, piece(at, n));
            at += u64::from(n);
        }
    }

    /// Drives the connection and takes this queue's results, then sets what wakes the
    /// worker.
    fn drive(&mut self) {
        let mut e = lock(&self.engine);
        e.drive(self.owner);
        e.take(self.owner, &mut self.arrived);
        Self::watch(&mut self.wakeup, &e, !self.parts.is_empty());
    }

    /// What wakes the worker: the socket (for writing too while bytes wait), and the timer
    /// while requests wait (failed ones whose replies are owed too: the server is held to
    /// those), or at once if data waits that no fd signals.
    fn watch(wakeup: &mut Wakeup, e: &Engine, ours: bool) {
        wakeup.watch_socket(e.socket(), e.wants_write());
        let at = if e.more_to_take() {
            Some(Instant::now())
        } else {
            (ours || e.waiting() > 0).then(|| e.next_tick())
        };
        wakeup.arm(at);
    }
}

/// A request with no data.
fn plain(cmd: u16, flags: u16, offset: u64, len: u32) -> Req {
    Req {
        cmd,
        flags,
        offset,
        len,
        bufs: Bufs::new(),
        skip: 0,
        zeros: false,
    }
}

impl QueueBackend for NbdQueue {
    fn submit(&mut self, cookie: u64, op: IoOp<'_>) {
        let flags = self.info.flags;
        match op {
            IoOp::Read { offset, bufs } | IoOp::Write { offset, bufs } => {
                let cmd = if matches!(op, IoOp::Read { .. }) {
                    CMD_READ
                } else {
                    CMD_WRITE
                };
                let list: Bufs = bufs
                    .iter()
                    .map(|b| (b.ptr_guard_mut().as_ptr() as usize, b.len()))
                    .collect();
                self.split(cookie, offset, total_len(bufs), |at, n| Req {
                    bufs: list.clone(),
                    skip: (at - offset) as usize,
                    ..plain(cmd, 0, at, n)
                });
            }
            IoOp::Flush if flags & TF_SEND_FLUSH != 0 => {
                self.parts.insert(
                    cookie,
                    Parts {
                        left: 1,
                        error: None,
                    },
                );
                lock(&self.engine).submit(self.owner, cookie, plain(CMD_FLUSH, 0, 0, 0));
            }
            // A server without a write cache has nothing to flush.
            IoOp::Flush => self.ready.push((cookie, Ok(()))),
            IoOp::Discard { offset, len } if flags & TF_SEND_TRIM != 0 => {
                let max = no_payload_max(self.info.min_block);
                self.split_by(cookie, offset, len, max, |at, n| plain(CMD_TRIM, 0, at, n))
            }
            // Discard is advisory.
            IoOp::Discard { offset, len } => {
                let res = check_range(offset, len, self.info.size);
                self.ready.push((cookie, res));
            }
            IoOp::WriteZeroes {
                offset,
                len,
                may_unmap,
            } if flags & TF_SEND_WRITE_ZEROES != 0 => {
                let f = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
                let max = no_payload_max(self.info.min_block);
                self.split_by(cookie, offset, len, max, |at, n| {
                    plain(CMD_WRITE_ZEROES, f, at, n)
                })
            }
            IoOp::WriteZeroes { offset, len, .. } => self.split(cookie, offset, len, |at, n| Req {
                zeros: true,
                ..plain(CMD_WRITE, 0, at, n)
            }),
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.wakeup.fd())
    }

    fn reap(&mut self, out: &mut Vec<IoDone>) {
        out.append(&mut self.ready);
        self.drive();
        for (cookie, res) in self.arrived.drain(..) {
            let Some(p) = self.parts.get_mut(&cookie) else {
                continue;
            };
            p.left -= 1;
            if let Err(e) = res {
                p.error.get_or_insert(e);
            }
            if p.left == 0 {
                if let Some(p) = self.parts.remove(&cookie) {
                    out.push((cookie, p.error.map_or(Ok(()), Err)));
                }
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.parts.len() + self.ready.len()
    }

    fn has_results(&mut self) -> bool {
        if !self.ready.is_empty() {
            return true;
        }
        // A worker that polls looks at the socket itself: no thread will wake it.
        let mut e = lock(&self.engine);
        e.drive(self.owner);
        e.has_results(self.owner)
    }
}

impl Drop for NbdQueue {
    fn drop(&mut self) {
        lock(&self.engine).detach(self.owner);
    }
}

#[cfg(test)]
mod tests;

//! The NBD backend: the disk is an export of an NBD server (qemu-nbd, nbdkit, …), reached by
//! an NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`, and with TLS
//! `nbds://…?tls-certificates=DIR`, `nbds+unix://…`).
//!
//! Written from the protocol specification (NetworkBlockDevice `doc/proto.md`; no kept Rust
//! client exists):
//! - [`uri`]: the URI forms; [`handshake`]: fixed newstyle, STARTTLS, extended headers or
//!   structured replies, `NBD_OPT_GO` with the size, flags and block-size limits;
//!   [`link`]: the socket and TLS session, split into a sending and a receiving half;
//!   [`wire`]: request and reply headers; [`connection`]: many requests in flight on one
//!   connection, matched to their replies by cookie, with reconnection and timeouts;
//!   [`patient`]: the reply thread's reads, which hold the server to its deadlines;
//!   [`assembly`]: a structured reply checked chunk by chunk; [`error`]: opening errors.
//! - Each queue has its own connection when the server allows it (`CAN_MULTI_CONN`);
//!   otherwise the queues share one.
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
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::VolatileSlice;

use super::interface::{BlockBackend, IoDone, IoOp, QueueBackend};
use super::kit::{check_range, total_len};

mod assembly;
mod connection;
mod error;
mod handshake;
mod link;
mod patient;
mod uri;
mod wire;

use connection::{Conn, Dest, Events, Req, Sink};
pub use error::NbdError;
use handshake::ExportInfo;
pub use uri::{NbdAddress, NbdTls, NbdUri};
use wire::*;

/// An NBD export as a block backend.
pub struct NbdBackend {
    uri: NbdUri,
    timeout: Duration,
    info: ExportInfo,
    replies: Replies,
    read_only: bool,
    /// The one connection every queue shares when the server does not allow several.
    shared: Option<Arc<Conn>>,
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
            let conn =
                Conn::start(&parsed, timeout, &info, Some(first), &events).map_err(failed)?;
            Some(Arc::new(conn))
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
        let conn = match &self.shared {
            Some(c) => c.clone(),
            None => Arc::new(Conn::start(
                &self.uri,
                self.timeout,
                &self.info,
                None,
                &self.events,
            )?),
        };
        Ok(Box::new(NbdQueue {
            conn,
            sink: Sink::new()?,
            info: self.info,
            parts: HashMap::new(),
            ready: Vec::new(),
            arrived: Vec::new(),
        }))
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

/// One queue's requests to the server.
struct NbdQueue {
    conn: Arc<Conn>,
    sink: Arc<Sink>,
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
        if let Err(e) = check_range(offset, len, self.info.size) {
            self.ready.push((cookie, Err(e)));
            return;
        }
        if len == 0 {
            self.ready.push((cookie, Ok(())));
            return;
        }
        let max = u64::from(self.info.max_payload);
        self.parts.insert(
            cookie,
            Parts {
                left: len.div_ceil(max),
                error: None,
            },
        );
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(max) as u32;
            self.conn.submit(&self.sink, cookie, piece(at, n));
            at += u64::from(n);
        }
    }
}

/// A request with no data.
fn plain(cmd: u16, flags: u16, offset: u64, len: u32) -> Req {
    Req {
        cmd,
        flags,
        offset,
        len,
        payload: None,
        dest: None,
    }
}

/// Copies `out.len()` bytes starting `skip` bytes into the concatenation of `bufs`.
fn gather(bufs: &[VolatileSlice<'_>], mut skip: usize, out: &mut [u8]) {
    let mut at = 0;
    for b in bufs {
        if at == out.len() {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(out.len() - at);
        if let Ok(s) = b.subslice(skip, n) {
            s.copy_to(&mut out[at..at + n]);
        }
        at += n;
        skip = 0;
    }
}

impl QueueBackend for NbdQueue {
    fn submit(&mut self, cookie: u64, op: IoOp<'_>) {
        let flags = self.info.flags;
        match op {
            IoOp::Read { offset, bufs } => {
                let list: Arc<[(usize, usize)]> = bufs
                    .iter()
                    .map(|b| (b.ptr_guard_mut().as_ptr() as usize, b.len()))
                    .collect();
                self.split(cookie, offset, total_len(bufs), |at, n| Req {
                    dest: Some(Dest {
                        bufs: list.clone(),
                        skip: (at - offset) as usize,
                    }),
                    ..plain(CMD_READ, 0, at, n)
                });
            }
            IoOp::Write { offset, bufs } => {
                self.split(cookie, offset, total_len(bufs), |at, n| {
                    let mut data = vec![0u8; n as usize];
                    gather(bufs, (at - offset) as usize, &mut data);
                    Req {
                        payload: Some(Arc::new(data)),
                        ..plain(CMD_WRITE, 0, at, n)
                    }
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
                self.conn
                    .submit(&self.sink, cookie, plain(CMD_FLUSH, 0, 0, 0));
            }
            // A server without a write cache has nothing to flush.
            IoOp::Flush => self.ready.push((cookie, Ok(()))),
            IoOp::Discard { offset, len } if flags & TF_SEND_TRIM != 0 => {
                self.split(cookie, offset, len, |at, n| plain(CMD_TRIM, 0, at, n))
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
                self.split(cookie, offset, len, |at, n| {
                    plain(CMD_WRITE_ZEROES, f, at, n)
                })
            }
            IoOp::WriteZeroes { offset, len, .. } => self.split(cookie, offset, len, |at, n| Req {
                payload: Some(Arc::new(vec![0u8; n as usize])),
                ..plain(CMD_WRITE, 0, at, n)
            }),
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.sink.fd())
    }

    fn reap(&mut self, out: &mut Vec<IoDone>) {
        out.append(&mut self.ready);
        self.sink.take(&mut self.arrived);
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
        !self.ready.is_empty() || self.sink.has_results()
    }
}

impl Drop for NbdQueue {
    fn drop(&mut self) {
        self.conn.detach(&self.sink);
    }
}

#[cfg(test)]
mod tests;

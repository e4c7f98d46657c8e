//! One connection to an NBD server with many requests in flight, driven by the queue that owns
//! it, on the queue's own thread: no reply thread, no hand-over, nothing that waits.
//!
//! Requests are encoded into one outgoing buffer as the queue takes them, and a kick's worth
//! goes out in one write when the queue next drives the connection. Replies are received into
//! a staging buffer ([`Inbound`]) and read data lands in the driver's buffers from there, on
//! the same thread that then puts the request on the used ring. Every request has a deadline:
//! at least every [`TICK`] while requests wait, the driver fails those whose time is up
//! (IOERR), and replies that come for them later are read and dropped.
//!
//! The server cannot stretch a deadline: one reply must arrive whole within the timeout, the
//! outgoing bytes must move within the timeout, and a handshake ends within its own deadline
//! (the [`Dialer`] connects off the data path). Otherwise the connection is replaced, every
//! request not yet answered is sent again on the next one, and the backoff between attempts
//! grows unless a connection lasted. It cannot grow our memory either: replies are never held,
//! and a server that owes replies to more than [`MAX_OWED`] failed requests loses its
//! connection.
//!
//! When the server does not allow several connections, the queues share one engine under a
//! mutex; whichever queue drives it hands the others' results over with their eventfds.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use vm_memory::VolatileSlice;

use super::assembly::Wanted;
use super::dialer::Dialer;
use super::handshake::{ExportInfo, Negotiated};
use super::inbound::{Answers, Inbound};
use super::link::Link;
use super::uri::NbdUri;
use super::wire::*;

/// How often a connection with requests waiting looks at the clock.
pub(super) const TICK: Duration = Duration::from_millis(100);
/// Most failed requests whose replies a server may owe before its connection is replaced.
pub(super) const MAX_OWED: usize = 1024;
/// The longest a connection attempt may take (the request timeout if shorter).
const MAX_HANDSHAKE: Duration = Duration::from_secs(5);
/// The first pause before connecting again, doubled after each connection that did not last.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between connection attempts.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// A connection that lasted this long was healthy: the next loss starts the backoff afresh.
const HEALTHY: Duration = Duration::from_secs(2);
/// Receive calls per drive: the queue goes back to its ring between bursts.
const RECEIVES: usize = 8;
/// Requests are encoded for the socket while less than this waits to go out: a server that
/// reads slowly costs at most this (and one request) of copies, not all of them.
const OUT_HIGH: usize = 4 << 20;
/// Most driver buffers one direct receive lands in (IOV_MAX is 1024, less the staging one).
const MAX_IOVECS: usize = 1023;
/// Flags a server that comes back must still have, if it had them: what the queues rely on.
const KEPT_FLAGS: u16 = TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN;

/// What happened to a backend's connections, for metrics; shared by all of them.
#[derive(Debug, Default)]
pub(super) struct Events {
    /// Connections made again after one was lost.
    pub(super) reconnects: AtomicU64,
    /// Requests failed because the server did not answer in time.
    pub(super) timeouts: AtomicU64,
    /// Writes the server acknowledged, and how many of them a successful flush covers: a
    /// server with a write cache may hold the others only in its memory.
    pub(super) acked_writes: AtomicU64,
    pub(super) flushed_writes: AtomicU64,
}

/// Driver buffers, as (address, length) pairs.
pub(super) type Bufs = SmallVec<[(usize, usize); 4]>;

/// One NBD request.
pub(super) struct Req {
    pub(super) cmd: u16,
    pub(super) flags: u16,
    pub(super) offset: u64,
    pub(super) len: u32,
    /// A READ's destination or a WRITE's source, from `skip` bytes in (a request split into
    /// pieces reaches further in). Kept until the reply: a write is sent again from them after
    /// a reconnect. Emptied once the request is answered.
    pub(super) bufs: Bufs,
    pub(super) skip: usize,
    /// A WRITE of zeros (no source buffers).
    pub(super) zeros: bool,
}

struct Pending {
    req: Req,
    owner: usize,
    tag: u64,
    deadline: Instant,
    /// Already answered to its queue (timed out, or the queue went away): the reply, if any,
    /// is read and dropped.
    failed: bool,
    /// Sent on some connection (so a new one sends it again).
    sent: bool,
    /// For a FLUSH: the writes acknowledged when it was taken (those it covers).
    covers: u64,
}

/// A queue the engine answers to.
struct Owner {
    attached: bool,
    done: Vec<(u64, io::Result<()>)>,
    /// Written when another queue left results here (shared engines only).
    wake: Option<File>,
    signalled: bool,
}

/// The connection while it is up.
struct Live {
    link: Link,
    replies: Replies,
    up: Instant,
}

/// What the keeper saw at the last tick, to tell progress from a stall.
#[derive(Default)]
struct Marks {
    /// Messages taken when a reply was last seen under way, and since when.
    reply: Option<(u64, Instant)>,
    /// Bytes sent when outgoing bytes were last seen waiting, and since when.
    out: Option<(u64, Instant)>,
    /// Bytes received at the last tick, and when that count last moved.
    heard: (u64, Option<Instant>),
}

/// The requests waiting for replies, and the queues their results go to.
struct Book {
    pending: HashMap<u64, Pending>,
    owners: Vec<Owner>,
    events: Arc<Events>,
}

/// One connection's requests and bytes; see the module documentation.
pub(super) struct Engine {
    timeout: Duration,
    /// The export as first seen: a server that comes back with another size, smaller
    /// limits or fewer of the flags the queues rely on is refused.
    info: ExportInfo,
    events: Arc<Events>,
    book: Book,
    /// Requests taken and not yet encoded for the connection, oldest first.
    unsent: VecDeque<u64>,
    next_cookie: u64,
    live: Option<Live>,
    /// Counts connections installed, so a queue knows when the socket changed.
    generation: u64,
    dialer: Dialer,
    pause: Duration,
    /// Since when there has been no connection.
    down_since: Instant,
    /// A connection was up before: the next one is a reconnection.
    was_up: bool,
    out: Vec<u8>,
    out_at: usize,
    sent: u64,
    inbound: Inbound,
    /// The TLS session held decrypted data after the last drive.
    buffered: bool,
    marks: Marks,
    last_tick: Instant,
}

fn timed_out(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl Engine {
    /// An engine for `uri`'s export of `info`; it starts on `first` if given, otherwise it
    /// connects on its own.
    pub(super) fn new(
        uri: &NbdUri,
        timeout: Duration,
        info: &ExportInfo,
        first: Option<Negotiated>,
        events: &Arc<Events>,
    ) -> io::Result<Engine> {
        let mut e = Engine {
            timeout,
            info: *info,
            events: events.clone(),
            book: Book {
                pending: HashMap::new(),
                owners: Vec::new(),
                events: events.clone(),
            },
            unsent: VecDeque::new(),
            next_cookie: 1,
            live: None,
            generation: 0,
            dialer: Dialer::start(uri, timeout.min(MAX_HANDSHAKE))?,
            pause: FIRST_PAUSE,
            down_since: Instant::now(),
            was_up: false,
            out: Vec::new(),
            out_at: 0,
            sent: 0,
            inbound: Inbound::new(),
            buffered: false,
            marks: Marks::default(),
            last_tick: Instant::now(),
        };
        match first {
            Some(n) => e.install(n)?,
            None => e.dialer.ask(Duration::ZERO),
        }
        Ok(e)
    }

    /// A queue to answer to; with `wake`, its results are signalled when another queue
    /// finds them.
    pub(super) fn attach(&mut self, wake: Option<File>) -> usize {
        let owner = Owner {
            attached: true,
            done: Vec::new(),
            wake,
            signalled: false,
        };
        // A slot a detached queue left (a device reset makes its queues again).
        let owners = &mut self.book.owners;
        match owners.iter().position(|o| !o.attached) {
            Some(i) => {
                owners[i] = owner;
                i
            }
            None => {
                owners.push(owner);
                owners.len() - 1
            }
        }
    }

    /// Forgets `owner`'s requests: their results are never delivered and nothing is written
    /// into their buffers any more (the queue is going away with its memory).
    pub(super) fn detach(&mut self, owner: usize) {
        // Not sent yet: nothing is owed for them.
        self.book.pending.retain(|_, p| p.owner != owner || p.sent);
        for p in self.book.pending.values_mut() {
            if p.owner == owner {
                p.failed = true;
                p.req.bufs = Bufs::new();
            }
        }
        if let Some(o) = self.book.owners.get_mut(owner) {
            *o = Owner {
                attached: false,
                done: Vec::new(),
                wake: None,
                signalled: false,
            };
        }
    }

    /// Takes `req` for `owner`; its result comes back with `tag`. It goes out on the next
    /// [`Engine::drive`] (or on the next connection, if there is none).
    pub(super) fn submit(&mut self, owner: usize, tag: u64, req: Req) {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        let now = Instant::now();
        let p = Pending {
            covers: self.events.acked_writes.load(Ordering::Acquire),
            req,
            owner,
            tag,
            // A timeout too large for the clock: as good as none.
            deadline: now
                .checked_add(self.timeout)
                .unwrap_or(now + Duration::from_secs(1 << 32)),
            failed: false,
            sent: false,
        };
        self.book.pending.insert(cookie, p);
        self.unsent.push_back(cookie);
    }

    /// Encodes waiting requests for the connection while little waits to go out.
    fn fill(&mut self) {
        let Some(live) = &self.live else { return };
        while self.out.len() - self.out_at < OUT_HIGH {
            let Some(c) = self.unsent.pop_front() else {
                break;
            };
            if let Some(p) = self.book.pending.get_mut(&c).filter(|p| !p.failed) {
                encode(&mut self.out, live.replies, c, &p.req);
                p.sent = true;
            }
        }
    }

    /// Moves `owner`'s results into `out`.
    pub(super) fn take(&mut self, owner: usize, out: &mut Vec<(u64, io::Result<()>)>) {
        let o = &mut self.book.owners[owner];
        out.append(&mut o.done);
        if o.signalled {
            o.signalled = false;
            if let Some(w) = &o.wake {
                let mut counter = [0u8; 8];
                let _ = std::io::Read::read(&mut &*w, &mut counter);
            }
        }
    }

    /// True if `owner` has results waiting.
    pub(super) fn has_results(&self, owner: usize) -> bool {
        !self.book.owners[owner].done.is_empty()
    }

    /// The socket and its generation while connected; the dialer's fd.
    pub(super) fn socket(&self) -> Option<(RawFd, u64)> {
        self.live
            .as_ref()
            .map(|l| (l.link.raw_fd(), self.generation))
    }

    /// Readable when a connection attempt has ended.
    pub(super) fn dialer_fd(&self) -> RawFd {
        self.dialer.fd()
    }

    /// True if bytes wait for the socket to take them.
    pub(super) fn wants_write(&self) -> bool {
        self.out_at < self.out.len() || self.live.as_ref().is_some_and(|l| l.link.backlogged())
    }

    /// When the engine next needs to look at the clock.
    pub(super) fn next_tick(&self) -> Instant {
        self.last_tick + TICK
    }

    /// Requests not answered yet (failed ones whose replies are owed included).
    pub(super) fn waiting(&self) -> usize {
        self.book.pending.len()
    }

    /// Does what can be done now on behalf of queue `driver`: takes a new connection if one
    /// was made, sends what waits, takes the replies that came, and once a tick fails old
    /// requests and holds the server to its deadlines.
    pub(super) fn drive(&mut self, driver: usize) {
        if self.live.is_none() {
            self.take_connection();
        }
        if self.live.is_some() {
            if let Err(e) = self.exchange() {
                self.lost(e);
            }
        }
        let now = Instant::now();
        if now >= self.next_tick() {
            self.last_tick = now;
            self.expire(now);
            if let Err(e) = self.keep(now) {
                self.lost(e);
            }
        }
        for (i, o) in self.book.owners.iter_mut().enumerate() {
            if i != driver && !o.done.is_empty() && !o.signalled {
                if let Some(w) = &o.wake {
                    let _ = (&*w).write(&1u64.to_ne_bytes());
                    o.signalled = true;
                }
            }
        }
    }

    /// Sends what waits and takes the replies that are there.
    fn exchange(&mut self) -> io::Result<()> {
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        live.link.flush_sealed()?;
        self.fill();
        while let Some(live) = self.live.as_mut() {
            if self.out_at == self.out.len() {
                break;
            }
            match live.link.send(&self.out[self.out_at..])? {
                0 => break,
                n => {
                    self.out_at += n;
                    self.sent += n as u64;
                }
            }
            if self.out_at == self.out.len() {
                self.out.clear();
                self.out_at = 0;
                self.fill();
            }
        }
        if self.out_at == self.out.len() {
            self.out.clear();
            self.out_at = 0;
            // Give back the memory of a large backlog once it is out.
            if self.out.capacity() > 4 << 20 {
                self.out = Vec::new();
            }
        }
        let Some(replies) = self.live.as_ref().map(|l| l.replies) else {
            return Ok(());
        };
        for _ in 0..RECEIVES {
            let Some(live) = self.live.as_mut() else {
                break;
            };
            // Read data still to come lands straight in the driver's buffers, the bytes after
            // it in the staging buffer, in one call.
            let direct = self
                .inbound
                .direct()
                .filter(|_| live.link.tls.is_none())
                .map(|(cookie, at, left)| (self.book.iovecs(cookie, at, left), left))
                .filter(|(iov, _)| !iov.is_empty());
            let space = self.inbound.space();
            let room = space.len();
            let n = match direct {
                Some((mut iov, left)) => {
                    iov.push(libc::iovec {
                        iov_base: space.as_mut_ptr().cast(),
                        iov_len: room,
                    });
                    let n = live.link.receive_vectored(&iov)?;
                    self.inbound.received_direct(n, replies, &mut self.book)?;
                    n.saturating_sub(left as usize)
                }
                None => {
                    let n = live.link.receive(space)?;
                    self.inbound.received(n, replies, &mut self.book)?;
                    n
                }
            };
            if n < room {
                break; // the socket had no more
            }
        }
        if let Some(live) = self.live.as_mut() {
            // Decrypted data the socket will not wake the queue for.
            self.buffered = live.link.buffered();
        }
        Ok(())
    }

    /// True if the last drive left data to take that no fd will signal.
    pub(super) fn more_to_take(&self) -> bool {
        self.buffered
    }

    /// Fails the requests that have waited longer than the timeout.
    fn expire(&mut self, now: Instant) {
        // Never sent: nothing is owed for it.
        let owners = &mut self.book.owners;
        let (timeout, events) = (self.timeout, &self.events);
        self.book.pending.retain(|_, p| {
            if p.failed || p.sent || p.deadline > now {
                return true;
            }
            events.timeouts.fetch_add(1, Ordering::Relaxed);
            owners[p.owner].done.push((
                p.tag,
                Err(timed_out(format!(
                    "NBD server did not answer within {timeout:?}"
                ))),
            ));
            false
        });
        for p in self.book.pending.values_mut() {
            if !p.failed && p.deadline <= now {
                self.events.timeouts.fetch_add(1, Ordering::Relaxed);
                p.failed = true;
                p.req.bufs = Bufs::new();
                self.book.owners[p.owner].done.push((
                    p.tag,
                    Err(timed_out(format!(
                        "NBD server did not answer within {:?}",
                        self.timeout
                    ))),
                ));
            }
        }
    }

    /// Holds the server to its deadlines: an error if it broke one.
    fn keep(&mut self, now: Instant) -> io::Result<()> {
        if self.live.is_none() {
            return Ok(());
        }
        let timeout = self.timeout;
        let over = |since: Instant| now.duration_since(since) > timeout;
        let m = &mut self.marks;
        if self.inbound.mid_reply() {
            match m.reply {
                Some((n, since)) if n == self.inbound.messages => {
                    if over(since) {
                        return Err(timed_out(format!(
                            "the server took longer than {timeout:?} to send one reply"
                        )));
                    }
                }
                _ => m.reply = Some((self.inbound.messages, now)),
            }
        } else {
            m.reply = None;
        }
        if self.out_at < self.out.len() || self.live.as_ref().is_some_and(|l| l.link.backlogged()) {
            match m.out {
                Some((n, since)) if n == self.sent => {
                    if over(since) {
                        return Err(timed_out(format!(
                            "the server has not read our requests for {timeout:?}"
                        )));
                    }
                }
                _ => m.out = Some((self.sent, now)),
            }
        } else {
            m.out = None;
        }
        if m.heard.0 != self.inbound.bytes || m.heard.1.is_none() {
            m.heard = (self.inbound.bytes, Some(now));
        }
        let owed = self.book.pending.values().filter(|p| p.failed).count();
        // Silent for a whole timeout while it owes replies to requests that already failed:
        // start again on a new connection rather than let them pile up.
        if owed > 0 && !self.inbound.mid_reply() && m.heard.1.is_some_and(over) {
            return Err(timed_out(
                "the server has not answered for the whole timeout".into(),
            ));
        }
        if owed > MAX_OWED {
            return Err(proto(format!(
                "it owes replies to {owed} requests that timed out"
            )));
        }
        Ok(())
    }

    /// The connection is gone (`why`): ask for another, after the backoff.
    fn lost(&mut self, why: io::Error) {
        let Some(live) = self.live.take() else {
            return;
        };
        let lasted = live.up.elapsed();
        drop(live);
        self.out = Vec::new();
        self.out_at = 0;
        self.unsent.clear();
        self.inbound.reset();
        self.buffered = false;
        // Replies owed on that connection never come.
        self.book.pending.retain(|_, p| !p.failed);
        let e = &self.events;
        let unflushed = e
            .acked_writes
            .load(Ordering::Acquire)
            .saturating_sub(e.flushed_writes.load(Ordering::Acquire));
        if unflushed > 0 && self.info.flags & TF_SEND_FLUSH != 0 {
            // Nothing tells a server that restarted from one that lost its cache: the guest
            // is not told (a restart stays invisible), the operator is.
            tracing::warn!(
                "{unflushed} writes the NBD server acknowledged were not flushed when the \
                 connection went: if the server lost its write cache (its machine died), \
                 they are gone"
            );
        }
        self.marks = Marks::default();
        self.down_since = Instant::now();
        if lasted >= HEALTHY {
            // Only a connection that lasted starts the backoff afresh: a server that accepts
            // and drops at once gets fewer and fewer attempts.
            self.pause = FIRST_PAUSE;
            tracing::warn!("NBD connection lost ({why}); reconnecting");
        } else {
            tracing::warn!(
                "NBD connection lost after {:.1} s ({why}); reconnecting in {:?}",
                lasted.as_secs_f64(),
                self.pause
            );
        }
        self.dialer.ask(self.pause);
        self.pause = (self.pause * 2).min(MAX_PAUSE);
    }

    /// Takes the connection the dialer made, or asks again if it failed.
    fn take_connection(&mut self) {
        let Some(r) = self.dialer.take() else { return };
        if let Err(e) = r.and_then(|n| self.install(n)) {
            tracing::debug!(
                "NBD server unreachable for {:.1} s: {e}",
                self.down_since.elapsed().as_secs_f64()
            );
            self.dialer.ask(self.pause);
            self.pause = (self.pause * 2).min(MAX_PAUSE);
        }
    }

    /// Makes `n` the connection and sends it every request still waiting.
    fn install(&mut self, n: Negotiated) -> io::Result<()> {
        let (was, now) = (&self.info, &n.info);
        let changed = if now.size != was.size {
            Some(format!("{} bytes, not {}", now.size, was.size))
        } else if now.max_payload < was.max_payload || now.min_block > was.min_block {
            Some(format!(
                "block sizes {}..{}, not {}..{}",
                now.min_block, now.max_payload, was.min_block, was.max_payload
            ))
        } else if (now.flags & TF_SEND_FLUSH) != (was.flags & TF_SEND_FLUSH)
            || was.flags & KEPT_FLAGS & !now.flags != 0
            || now.flags & TF_READ_ONLY & !was.flags != 0
        {
            Some(format!("flags {:#x}, not {:#x}", now.flags, was.flags))
        } else {
            None
        };
        if let Some(what) = changed {
            return Err(io::Error::other(format!(
                "the export now has {what}: not using it"
            )));
        }
        let link = n.link.go_live()?;
        // Answers to these would have come on the old connection: forget them.
        self.book.pending.retain(|_, p| !p.failed);
        let mut cookies: Vec<u64> = self.book.pending.keys().copied().collect();
        cookies.sort_unstable();
        let resent = cookies.iter().filter(|c| self.book.pending[c].sent).count();
        self.unsent = cookies.into();
        self.generation += 1;
        self.live = Some(Live {
            link,
            replies: n.replies,
            up: Instant::now(),
        });
        if self.was_up {
            self.events.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                "NBD server reconnected after {:.1} s; {resent} requests sent again",
                self.down_since.elapsed().as_secs_f64(),
            );
        }
        self.was_up = true;
        Ok(())
    }

    /// Bytes the engine holds for its connection now: the staging buffer and what waits to
    /// go out (for the tests' look at memory).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.inbound.capacity() + self.out.capacity()
    }
}

impl Book {
    /// The buffers of request `cookie` from `at` bytes into its range, `n` bytes of them, as
    /// iovecs to receive into; none if the request has failed (its data is dropped). They
    /// may be written while the request waits: its queue keeps their memory mapped until it
    /// reaps the answer, and a queue that goes away first detaches (see `land`).
    fn iovecs(&self, cookie: u64, at: u64, n: u64) -> SmallVec<[libc::iovec; 8]> {
        let mut out = SmallVec::new();
        let Some(p) = self.pending.get(&cookie).filter(|p| !p.failed) else {
            return out;
        };
        let mut skip = p.req.skip + at as usize;
        let mut want = n as usize;
        for &(addr, len) in p.req.bufs.iter() {
            if want == 0 {
                break;
            }
            if skip >= len {
                skip -= len;
                continue;
            }
            let k = (len - skip).min(want);
            out.push(libc::iovec {
                iov_base: (addr + skip) as *mut libc::c_void,
                iov_len: k,
            });
            want -= k;
            skip = 0;
        }
        // Shorter than the request (never happens), or more than readv takes with the
        // staging buffer after them: stage it instead.
        if want > 0 || out.len() >= MAX_IOVECS {
            out.clear();
        }
        out
    }
}

impl Answers for Book {
    fn wanted(&self, cookie: u64) -> Option<Wanted> {
        self.pending.get(&cookie).map(|p| Wanted {
            cmd: p.req.cmd,
            offset: p.req.offset,
            len: p.req.len,
        })
    }

    fn land(&mut self, cookie: u64, at: u64, data: &[u8]) {
        if let Some(p) = self.pending.get(&cookie).filter(|p| !p.failed) {
            // SAFETY: the buffers belong to a request that has not been answered: its queue
            // keeps their memory mapped until it reaps the answer, and a queue that goes away
            // first detaches, emptying them (and that queue's thread or the one holding this
            // engine under its lock is the only one that runs this).
            unsafe {
                scatter(
                    &p.req.bufs,
                    p.req.skip + at as usize,
                    Some(data),
                    data.len(),
                )
            };
        }
    }

    fn zero(&mut self, cookie: u64, at: u64, n: u64) {
        if let Some(p) = self.pending.get(&cookie).filter(|p| !p.failed) {
            // SAFETY: as in `land`.
            unsafe { scatter(&p.req.bufs, p.req.skip + at as usize, None, n as usize) };
        }
    }

    fn answer(&mut self, cookie: u64, result: io::Result<()>) {
        let Some(p) = self.pending.remove(&cookie) else {
            return;
        };
        if result.is_ok() {
            let e = &self.events;
            match p.req.cmd {
                CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
                    e.acked_writes.fetch_add(1, Ordering::AcqRel);
                }
                CMD_FLUSH => {
                    e.flushed_writes.fetch_max(p.covers, Ordering::AcqRel);
                }
                _ => {}
            }
        }
        if !p.failed {
            self.owners[p.owner].done.push((p.tag, result));
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // A polite goodbye if the connection is up and free (best effort: it never waits).
        if let Some(live) = self.live.as_mut() {
            if self.out_at == self.out.len() {
                let (h, n) = request_header(live.replies, CMD_DISC, 0, 0, 0, 0);
                live.link.goodbye(&h[..n]);
            }
        }
    }
}

/// Appends request `cookie` to `out`: its header, and a WRITE's data.
fn encode(out: &mut Vec<u8>, replies: Replies, cookie: u64, r: &Req) {
    let (h, n) = request_header(replies, r.cmd, r.flags, cookie, r.offset, r.len);
    out.extend_from_slice(&h[..n]);
    if r.cmd == CMD_WRITE {
        let at = out.len();
        out.resize(at + r.len as usize, 0);
        if !r.zeros {
            // SAFETY: the source buffers of a request not answered yet (see `land`).
            unsafe { gather(&r.bufs, r.skip, &mut out[at..]) };
        }
    }
}

/// Copies `n` bytes of `data` (zeros if None) into the concatenation of `bufs`, `skip` bytes
/// in.
///
/// # Safety
/// Every (address, length) pair of `bufs` must be memory that stays mapped for the call.
unsafe fn scatter(bufs: &Bufs, mut skip: usize, data: Option<&[u8]>, n: usize) {
    let mut at = 0;
    for &(addr, len) in bufs.iter() {
        if at == n {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let k = (len - skip).min(n - at);
        // SAFETY: within one of the caller's buffers. Driver memory may change under us;
        // VolatileSlice accesses allow it.
        let s = unsafe { VolatileSlice::new((addr + skip) as *mut u8, k) };
        match data {
            Some(d) => s.copy_from(&d[at..at + k]),
            None => {
                static ZEROS: [u8; 4096] = [0; 4096];
                let mut z = 0;
                while z < k {
                    let m = (k - z).min(ZEROS.len());
                    if let Ok(part) = s.subslice(z, m) {
                        part.copy_from(&ZEROS[..m]);
                    }
                    z += m;
                }
            }
        }
        at += k;
        skip = 0;
    }
}

/// Copies `out.len()` bytes, `skip` bytes into the concatenation of `bufs`, into `out`.
///
/// # Safety
/// As for [`scatter`].
unsafe fn gather(bufs: &Bufs, mut skip: usize, out: &mut [u8]) {
    let mut at = 0;
    for &(addr, len) in bufs.iter() {
        if at == out.len() {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let k = (len - skip).min(out.len() - at);
        // SAFETY: within one of the caller's buffers.
        let s = unsafe { VolatileSlice::new((addr + skip) as *mut u8, k) };
        s.copy_to(&mut out[at..at + k]);
        at += k;
        skip = 0;
    }
}

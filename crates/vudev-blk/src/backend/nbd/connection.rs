//! One connection to an NBD server with many requests in flight.
//!
//! Queue threads send requests themselves (under the writer lock) and go on: the socket is
//! non-blocking, and what it does not take waits in the writer's backlog, which the
//! connection's own thread flushes when the socket can take more. That thread reads the
//! replies, matches them to their request by cookie, copies read data into the driver's
//! buffers and hands each result to the queue that sent it (a [`Sink`]: a list and an eventfd
//! the queue polls). It also keeps the connection up: when it breaks, it connects again with
//! backoff and resends every request that has not been answered; and at least every tick,
//! whatever the server sends or does not send, it fails the requests older than the timeout
//! (IOERR) — their replies, if they ever come, are read and dropped.
//!
//! The server cannot stretch a deadline: one reply must arrive whole within the timeout, the
//! backlog must move within the timeout, and a handshake ends within its own deadline;
//! otherwise the connection is replaced. It cannot grow our memory without bound either: a
//! partial reply is kept only while its request waits, and a server that owes replies to more
//! than [`MAX_OWED`](super::patient::MAX_OWED) failed requests loses its connection. Reading replies with those deadlines
//! is [`Patient`]'s; checking a structured reply, [`Assembly`]'s.
//!
//! Locks: `writer` before `state`, never the other way; no lock is held while waiting.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use super::assembly::{Assembly, Wanted};
use super::handshake::{connect_ticking, ExportInfo, Negotiated};
use super::link::{LinkReader, LinkWriter, Sock};
use super::patient::{Keeper, Patient, TICK};
use super::uri::NbdUri;
use super::wire::*;
use crate::backend::kit::eventfd;

/// The longest a connection attempt may take (the request timeout if shorter).
const MAX_HANDSHAKE: Duration = Duration::from_secs(5);
/// The first pause before connecting again, doubled after each connection that did not last.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between connection attempts.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// A connection that lasted this long was healthy: the next loss starts the backoff afresh.
const HEALTHY: Duration = Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where one queue's results arrive: `(tag, result)` pairs, and an eventfd made readable
/// when there are some.
pub(super) struct Sink {
    done: Mutex<Vec<(u64, io::Result<()>)>>,
    efd: File,
}

impl Sink {
    pub(super) fn new() -> io::Result<Arc<Sink>> {
        Ok(Arc::new(Sink {
            done: Mutex::new(Vec::new()),
            efd: eventfd()?,
        }))
    }

    fn push(&self, tag: u64, result: io::Result<()>) {
        lock(&self.done).push((tag, result));
        let _ = (&self.efd).write(&1u64.to_ne_bytes());
    }

    /// Moves the results that arrived into `out`.
    pub(super) fn take(&self, out: &mut Vec<(u64, io::Result<()>)>) {
        let mut counter = [0u8; 8];
        let _ = (&self.efd).read(&mut counter);
        out.append(&mut lock(&self.done));
    }

    /// True if results are waiting (no system call).
    pub(super) fn has_results(&self) -> bool {
        !lock(&self.done).is_empty()
    }

    /// Readable when results are waiting.
    pub(super) fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }
}

/// Driver buffers a read lands in: (address, length) pairs, and how many bytes of them to
/// skip first (a read split in pieces lands further in).
pub(super) struct Dest {
    pub(super) bufs: Arc<[(usize, usize)]>,
    pub(super) skip: usize,
}

/// One NBD request.
pub(super) struct Req {
    pub(super) cmd: u16,
    pub(super) flags: u16,
    pub(super) offset: u64,
    pub(super) len: u32,
    /// What a WRITE sends (kept until the reply, to resend after a reconnect).
    pub(super) payload: Option<Arc<Vec<u8>>>,
    /// Where a READ's data goes.
    pub(super) dest: Option<Dest>,
}

struct Pending {
    req: Req,
    sink: Arc<Sink>,
    tag: u64,
    deadline: Instant,
    /// The connection generation the request went out on (0: not sent yet).
    sent: u64,
    /// Already answered to the queue (timed out, or the queue went away): the reply, if any,
    /// is dropped.
    failed: bool,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
    generation: u64,
    stop: bool,
}

struct Out {
    generation: u64,
    link: LinkWriter,
    replies: Replies,
}

/// What happened to a backend's connections, for metrics; shared by all of them.
#[derive(Debug, Default)]
pub(super) struct Events {
    /// Connections made again after one was lost.
    pub(super) reconnects: AtomicU64,
    /// Requests failed because the server did not answer in time.
    pub(super) timeouts: AtomicU64,
}

struct Shared {
    uri: NbdUri,
    events: Arc<Events>,
    timeout: Duration,
    /// The export as first seen: a server that comes back with another size is refused.
    size: u64,
    state: Mutex<State>,
    writer: Mutex<Option<Out>>,
    /// A handle on the current socket, to wake the reply thread when stopping.
    kill: Mutex<Option<Sock>>,
    /// Written when a queue leaves bytes in the backlog: wakes the reply thread to flush.
    wake: File,
    /// The writer's backlog holds bytes (read without the writer lock).
    backlogged: AtomicBool,
    /// Counts the requests failed for their timeout: the reply thread then drops their
    /// partial replies.
    expired: AtomicU64,
    /// Bytes held in partial read replies (for the tests' look at memory).
    assembling: AtomicUsize,
}

/// A connection (kept up by its own thread) that queues send requests on.
pub(super) struct Conn {
    shared: Arc<Shared>,
}

impl Conn {
    /// Starts a connection to `uri`'s export, whose size is `info.size`. `first` is a
    /// connection already negotiated, if there is one; otherwise the thread connects.
    pub(super) fn start(
        uri: &NbdUri,
        timeout: Duration,
        info: &ExportInfo,
        first: Option<Negotiated>,
        events: &Arc<Events>,
    ) -> io::Result<Conn> {
        let shared = Arc::new(Shared {
            uri: uri.clone(),
            events: events.clone(),
            timeout,
            size: info.size,
            state: Mutex::new(State {
                next_cookie: 1,
                ..State::default()
            }),
            writer: Mutex::new(None),
            kill: Mutex::new(None),
            wake: eventfd()?,
            backlogged: AtomicBool::new(false),
            expired: AtomicU64::new(0),
            assembling: AtomicUsize::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("vudev-nbd".into())
            .spawn(move || s.run(first))?;
        Ok(Conn { shared })
    }

    /// Sends `req`; its result goes to `sink` with `tag`.
    pub(super) fn submit(&self, sink: &Arc<Sink>, tag: u64, req: Req) {
        let cookie = {
            let mut st = lock(&self.shared.state);
            let cookie = st.next_cookie;
            st.next_cookie = st.next_cookie.wrapping_add(1).max(1);
            st.pending.insert(
                cookie,
                Pending {
                    req,
                    sink: sink.clone(),
                    tag,
                    deadline: Instant::now() + self.shared.timeout,
                    sent: 0,
                    failed: false,
                },
            );
            cookie
        };
        self.shared.send(cookie);
    }

    /// Bytes held in partial read replies now.
    #[cfg(test)]
    pub(super) fn assembling(&self) -> usize {
        self.shared.assembling.load(Ordering::Relaxed)
    }

    /// Forgets `sink`'s requests: their results are never delivered and nothing is written
    /// into their buffers any more (the queue is going away with its memory).
    pub(super) fn detach(&self, sink: &Arc<Sink>) {
        let mut st = lock(&self.shared.state);
        for p in st.pending.values_mut() {
            if Arc::ptr_eq(&p.sink, sink) {
                p.failed = true;
                p.req.dest = None;
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            st.stop = true;
            for p in st.pending.values_mut() {
                p.failed = true;
                p.req.dest = None;
            }
        }
        // A polite goodbye if the connection is up and free (best effort: the socket does
        // not wait), then wake the reply thread.
        if let Ok(mut w) = self.shared.writer.try_lock() {
            if let Some(out) = w.as_mut() {
                let (h, n) = request_header(out.replies, CMD_DISC, 0, 0, 0, 0);
                let _ = out.link.goodbye(&h[..n]);
            }
            *w = None;
        }
        if let Some(s) = lock(&self.shared.kill).as_ref() {
            s.shutdown();
        }
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        lock(&self.state).stop
    }

    /// Writes request `cookie` on the current connection unless it already went out on it;
    /// with no connection, the next one sends it. Never waits for the server: what the socket
    /// does not take now waits in the backlog, for the reply thread to flush.
    fn send(&self, cookie: u64) {
        let mut w = lock(&self.writer);
        let Some(out) = w.as_mut() else { return };
        let (header, n, payload) = {
            let mut st = lock(&self.state);
            let Some(p) = st.pending.get_mut(&cookie) else {
                return;
            };
            if p.failed || p.sent == out.generation {
                return;
            }
            p.sent = out.generation;
            let r = &p.req;
            let (h, n) = request_header(out.replies, r.cmd, r.flags, cookie, r.offset, r.len);
            (h, n, r.payload.clone())
        };
        let data = payload.as_deref().map_or(&[][..], |d| &d[..]);
        match out.link.send(&[&header[..n], data]) {
            Ok(true) => {}
            Ok(false) => {
                self.backlogged.store(true, Ordering::Release);
                let _ = (&self.wake).write(&1u64.to_ne_bytes());
            }
            Err(e) => {
                tracing::warn!("NBD connection lost while sending ({e}); reconnecting");
                *w = None;
                self.backlogged.store(false, Ordering::Release);
                if let Some(s) = lock(&self.kill).as_ref() {
                    s.shutdown();
                }
            }
        }
    }

    /// Writes what the socket takes of the backlog; fails if the server has taken nothing
    /// for the whole timeout while we had bytes for it.
    fn flush(&self) -> io::Result<()> {
        let mut w = lock(&self.writer);
        let Some(out) = w.as_mut() else {
            return Ok(());
        };
        if out.link.flush()? {
            self.backlogged.store(false, Ordering::Release);
            return Ok(());
        }
        if out.link.stalled_for() > self.timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the server has not read our requests for {:?}",
                    self.timeout
                ),
            ));
        }
        Ok(())
    }

    /// Fails the requests that have waited longer than the timeout.
    fn expire(&self) {
        let now = Instant::now();
        let mut st = lock(&self.state);
        for p in st.pending.values_mut() {
            if !p.failed && p.deadline <= now {
                self.expired.fetch_add(1, Ordering::Relaxed);
                self.events.timeouts.fetch_add(1, Ordering::Relaxed);
                p.failed = true;
                p.req.dest = None;
                // Never sent again: keep no copy of its data.
                p.req.payload = None;
                p.sink.push(
                    p.tag,
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("NBD server did not answer within {:?}", self.timeout),
                    )),
                );
            }
        }
    }

    /// The connection thread: connect, read replies until the connection breaks, again.
    fn run(self: Arc<Self>, mut first: Option<Negotiated>) {
        let mut pause = FIRST_PAUSE;
        let mut outage: Option<Instant> = None;
        let tick = || self.expire();
        loop {
            if self.stopping() {
                return;
            }
            self.expire();
            let attempt = match first.take() {
                Some(n) => Ok(n),
                None => connect_ticking(
                    &self.uri,
                    self.timeout.min(MAX_HANDSHAKE),
                    Some((TICK, &tick)),
                ),
            };
            match attempt.and_then(|n| self.install(n)) {
                Ok((reader, replies, resent)) => {
                    if let Some(since) = outage.take() {
                        self.events.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            "NBD server reconnected after {:.1} s; {resent} requests sent again",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    let up = Instant::now();
                    let err = self.replies(reader, replies);
                    *lock(&self.writer) = None;
                    self.backlogged.store(false, Ordering::Release);
                    if let Some(s) = lock(&self.kill).take() {
                        s.shutdown();
                    }
                    if self.stopping() {
                        return;
                    }
                    outage = Some(Instant::now());
                    if up.elapsed() >= HEALTHY {
                        // Only a connection that lasted starts the backoff afresh: a server
                        // that accepts and drops at once gets fewer and fewer attempts.
                        pause = FIRST_PAUSE;
                        tracing::warn!("NBD connection lost ({err}); reconnecting");
                    } else {
                        tracing::warn!(
                            "NBD connection lost after {:.1} s ({err}); reconnecting in {pause:?}",
                            up.elapsed().as_secs_f64()
                        );
                    }
                }
                Err(e) => {
                    if self.stopping() {
                        return;
                    }
                    let since = *outage.get_or_insert_with(Instant::now);
                    tracing::debug!(
                        "NBD server unreachable for {:.1} s: {e}",
                        since.elapsed().as_secs_f64()
                    );
                }
            }
            // Back off, failing old requests meanwhile.
            let until = Instant::now() + pause;
            while Instant::now() < until && !self.stopping() {
                std::thread::sleep(TICK.min(until - Instant::now()));
                self.expire();
            }
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Makes `n` the current connection and sends it every request still waiting; returns
    /// the reading half, the reply style and how many requests were sent again.
    fn install(&self, n: Negotiated) -> io::Result<(LinkReader, Replies, usize)> {
        if n.info.size != self.size {
            return Err(io::Error::other(format!(
                "the export is now {} bytes, not {}: not using it",
                n.info.size, self.size
            )));
        }
        let (link, reader, kill) = n.link.split()?;
        *lock(&self.kill) = Some(kill);
        let waiting = {
            let mut w = lock(&self.writer);
            let mut st = lock(&self.state);
            if st.stop {
                return Err(io::Error::other("stopping"));
            }
            st.generation += 1;
            // Answers to these would have come on the old connection: forget them.
            st.pending.retain(|_, p| !p.failed);
            *w = Some(Out {
                generation: st.generation,
                link,
                replies: n.replies,
            });
            let mut c: Vec<(u64, bool)> =
                st.pending.iter().map(|(c, p)| (*c, p.sent != 0)).collect();
            c.sort_unstable();
            c
        };
        let resent = waiting.iter().filter(|(_, sent)| *sent).count();
        for (c, _) in waiting {
            self.send(c);
        }
        Ok((reader, n.replies, resent))
    }

    /// The request a reply is for.
    fn lookup(&self, cookie: u64) -> io::Result<Wanted> {
        let st = lock(&self.state);
        let p = st
            .pending
            .get(&cookie)
            .ok_or_else(|| proto(format!("reply to a request we did not send ({cookie})")))?;
        Ok(Wanted {
            cmd: p.req.cmd,
            offset: p.req.offset,
            len: p.req.len,
            failed: p.failed,
        })
    }

    /// True if request `cookie` still waits for its answer (not failed, not answered).
    fn waiting(&self, cookie: u64) -> bool {
        lock(&self.state)
            .pending
            .get(&cookie)
            .is_some_and(|p| !p.failed)
    }

    /// Answers request `cookie`: copies `data` (a read's whole range) into its buffers on
    /// success, and hands the result to its queue — unless it was already answered.
    fn complete(&self, cookie: u64, result: io::Result<()>, data: Option<&[u8]>) {
        let mut st = lock(&self.state);
        let Some(p) = st.pending.remove(&cookie) else {
            return;
        };
        if p.failed {
            return;
        }
        if let (Ok(()), Some(data), Some(dest)) = (&result, data, &p.req.dest) {
            scatter(dest, data);
        }
        p.sink.push(p.tag, result);
    }

    /// Reads replies until the connection fails; returns why.
    fn replies(&self, reader: LinkReader, replies: Replies) -> io::Error {
        let mut r = Patient::new(reader, self);
        let mut partial: HashMap<u64, Assembly<'_>> = HashMap::new();
        let mut buf = Vec::new();
        let mut expired = self.expired.load(Ordering::Relaxed);
        loop {
            r.between_replies();
            let res = read_reply_header(&mut r, replies).and_then(|h| match h {
                ReplyHeader::Simple { cookie, error } => {
                    if partial.contains_key(&cookie) {
                        return Err(proto("a simple reply in the middle of a structured one"));
                    }
                    let want = self.lookup(cookie)?;
                    if error != 0 {
                        // No payload follows an error.
                        self.complete(cookie, Err(server_error(error, b"")), None);
                    } else if want.cmd == CMD_READ {
                        if replies != Replies::Simple {
                            return Err(proto("a read answered with a simple reply"));
                        }
                        buf.resize(want.len as usize, 0);
                        r.read_exact(&mut buf)?;
                        self.complete(cookie, Ok(()), Some(&buf));
                    } else {
                        self.complete(cookie, Ok(()), None);
                    }
                    Ok(())
                }
                ReplyHeader::Chunk {
                    cookie,
                    flags,
                    kind,
                    offset,
                    len,
                } => {
                    let want = self.lookup(cookie)?;
                    if offset.is_some_and(|o| o != want.offset) {
                        return Err(proto("reply offset differs from the request's"));
                    }
                    let a = partial
                        .entry(cookie)
                        .or_insert_with(|| Assembly::new(&want, &self.assembling));
                    a.chunk(&mut r, kind, len)?;
                    if flags & REPLY_FLAG_DONE != 0 {
                        if let Some(a) = partial.remove(&cookie) {
                            let (result, data) = a.finish();
                            self.complete(cookie, result, data.as_deref());
                        }
                    }
                    Ok(())
                }
            });
            if let Err(e) = res {
                return e;
            }
            // Requests that timed out keep no partial reply: what still comes for them is
            // read and dropped.
            let now = self.expired.load(Ordering::Relaxed);
            if now != expired {
                expired = now;
                for (cookie, a) in partial.iter_mut() {
                    if !self.waiting(*cookie) {
                        a.discard();
                    }
                }
            }
        }
    }
}

/// Copies a read's data into the driver buffers of `dest`.
fn scatter(dest: &Dest, data: &[u8]) {
    let mut skip = dest.skip;
    let mut at = 0;
    for &(addr, len) in dest.bufs.iter() {
        if at == data.len() {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(data.len() - at);
        // SAFETY: `addr..addr + len` is a driver buffer of a request that has not been
        // answered: the queue keeps the memory it lives in mapped until the answer is reaped,
        // and a queue that goes away first detaches (clearing `dest`) under the state lock
        // this runs under. Driver memory may change under us; VolatileSlice copies allow it.
        let s = unsafe { VolatileSlice::new((addr + skip) as *mut u8, n) };
        s.copy_from(&data[at..at + n]);
        at += n;
        skip = 0;
    }
}

impl Keeper for Shared {
    fn stopping(&self) -> bool {
        Shared::stopping(self)
    }
    fn expire(&self) {
        Shared::expire(self)
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn owed(&self) -> usize {
        lock(&self.state)
            .pending
            .values()
            .filter(|p| p.failed)
            .count()
    }
    fn flush(&self) -> io::Result<()> {
        Shared::flush(self)
    }
    fn backlogged(&self) -> bool {
        self.backlogged.load(Ordering::Acquire)
    }
    fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
    fn woken(&self) {
        let mut counter = [0u8; 8];
        let _ = (&self.wake).read(&mut counter);
    }
}

//! One connection to an NBD server with many requests in flight.
//!
//! Queue threads send requests themselves (under the writer lock) and go on; the
//! connection's own thread reads the replies, matches them to their request by cookie, copies
//! read data into the driver's buffers and hands each result to the queue that sent it (a
//! [`Sink`]: a list and an eventfd the queue polls). That thread also keeps the connection
//! up: when it breaks, it connects again with backoff and resends every request that has not
//! been answered, and every tick it fails the requests older than the timeout (IOERR) — their
//! replies, if they ever come, are read and dropped.
//!
//! Locks: `writer` before `state`, never the other way; the reply thread takes only `state`,
//! so a write blocked on a full socket never stops replies from being read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use super::handshake::{connect, ExportInfo, Negotiated};
use super::link::{LinkReader, LinkWriter, Sock};
use super::uri::NbdUri;
use super::wire::*;
use crate::backend::eventfd;

/// How often the reply thread looks at the clock while waiting.
const TICK: Duration = Duration::from_millis(100);
/// The longest a connection attempt may take (the request timeout if shorter).
const MAX_HANDSHAKE: Duration = Duration::from_secs(5);

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
    scratch: Vec<u8>,
}

struct Shared {
    uri: NbdUri,
    timeout: Duration,
    /// The export as first seen: a server that comes back with another size is refused.
    size: u64,
    state: Mutex<State>,
    writer: Mutex<Option<Out>>,
    /// A handle on the current socket, to wake the reply thread when stopping.
    kill: Mutex<Option<Sock>>,
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
    ) -> io::Result<Conn> {
        let shared = Arc::new(Shared {
            uri: uri.clone(),
            timeout,
            size: info.size,
            state: Mutex::new(State {
                next_cookie: 1,
                ..State::default()
            }),
            writer: Mutex::new(None),
            kill: Mutex::new(None),
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
        // A polite goodbye if the connection is up and free, then wake the reply thread.
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
    /// with no connection, the next one sends it.
    fn send(&self, cookie: u64) {
        let mut w = lock(&self.writer);
        let Some(out) = w.as_mut() else { return };
        let payload = {
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
            out.scratch.clear();
            out.scratch.extend_from_slice(&h[..n]);
            r.payload.clone()
        };
        if let Some(data) = payload {
            out.scratch.extend_from_slice(&data);
        }
        if let Err(e) = out.link.send(&out.scratch) {
            tracing::warn!("NBD connection lost while sending ({e}); reconnecting");
            *w = None;
            if let Some(s) = lock(&self.kill).as_ref() {
                s.shutdown();
            }
        }
    }

    /// Fails the requests that have waited longer than the timeout.
    fn expire(&self) {
        let now = Instant::now();
        let mut st = lock(&self.state);
        for p in st.pending.values_mut() {
            if !p.failed && p.deadline <= now {
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

    /// True if some request was answered with a timeout and its reply is still owed.
    fn owes_timed_out(&self) -> bool {
        lock(&self.state).pending.values().any(|p| p.failed)
    }

    /// The connection thread: connect, read replies until the connection breaks, again.
    fn run(self: Arc<Self>, mut first: Option<Negotiated>) {
        let mut pause = Duration::from_millis(50);
        let mut outage: Option<Instant> = None;
        loop {
            if self.stopping() {
                return;
            }
            self.expire();
            let attempt = match first.take() {
                Some(n) => Ok(n),
                None => connect(&self.uri, self.timeout.min(MAX_HANDSHAKE)),
            };
            match attempt.and_then(|n| self.install(n)) {
                Ok((reader, replies, resent)) => {
                    if let Some(since) = outage.take() {
                        tracing::info!(
                            "NBD server reconnected after {:.1} s; {resent} requests sent again",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    pause = Duration::from_millis(50);
                    let err = self.replies(reader, replies);
                    *lock(&self.writer) = None;
                    if let Some(s) = lock(&self.kill).take() {
                        s.shutdown();
                    }
                    if self.stopping() {
                        return;
                    }
                    tracing::warn!("NBD connection lost ({err}); reconnecting");
                    outage = Some(Instant::now());
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
            pause = (pause * 2).min(Duration::from_secs(1));
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
        let (link, reader, kill) = n.link.split(TICK, self.timeout)?;
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
                scratch: Vec::new(),
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

    /// The request a reply is for: its command, offset and length.
    fn lookup(&self, cookie: u64) -> io::Result<(u16, u64, u32)> {
        let st = lock(&self.state);
        let p = st
            .pending
            .get(&cookie)
            .ok_or_else(|| proto(format!("reply to a request we did not send ({cookie})")))?;
        Ok((p.req.cmd, p.req.offset, p.req.len))
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
        let mut r = Patient {
            inner: reader,
            shared: self,
            quiet: true,
            stalled: None,
        };
        let mut partial: HashMap<u64, Assembly> = HashMap::new();
        let mut buf = Vec::new();
        loop {
            r.quiet = true;
            let res = read_reply_header(&mut r, replies).and_then(|h| match h {
                ReplyHeader::Simple { cookie, error } => {
                    let (cmd, _, len) = self.lookup(cookie)?;
                    if error != 0 {
                        // No payload follows an error.
                        self.complete(cookie, Err(server_error(error, "")), None);
                    } else if cmd == CMD_READ {
                        if replies != Replies::Simple {
                            return Err(proto("a read answered with a simple reply"));
                        }
                        buf.resize(len as usize, 0);
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
                    let (cmd, start, rlen) = self.lookup(cookie)?;
                    if offset.is_some_and(|o| o != start) {
                        return Err(proto("reply offset differs from the request's"));
                    }
                    let a = partial
                        .entry(cookie)
                        .or_insert_with(|| Assembly::new(cmd, rlen));
                    a.chunk(&mut r, kind, start, rlen, len)?;
                    if flags & REPLY_FLAG_DONE != 0 {
                        if let Some(a) = partial.remove(&cookie) {
                            let data = a.read.then_some(&a.data[..]);
                            self.complete(cookie, a.failure.map_or(Ok(()), Err), data);
                        }
                    }
                    Ok(())
                }
            });
            if let Err(e) = res {
                return e;
            }
        }
    }
}

/// A structured reply being put together from its chunks.
struct Assembly {
    /// The request is a read.
    read: bool,
    /// A read's whole range, zeroed first: whatever the server leaves out reads as zeros.
    data: Vec<u8>,
    failure: Option<io::Error>,
    chunks: usize,
}

impl Assembly {
    fn new(cmd: u16, len: u32) -> Assembly {
        Assembly {
            read: cmd == CMD_READ,
            data: if cmd == CMD_READ {
                vec![0; len as usize]
            } else {
                Vec::new()
            },
            failure: None,
            chunks: 0,
        }
    }

    /// Takes one chunk (its header read) of a reply to a request over `[start, start + rlen)`.
    fn chunk(
        &mut self,
        r: &mut dyn Read,
        kind: u16,
        start: u64,
        rlen: u32,
        len: u64,
    ) -> io::Result<()> {
        // However the server cuts its reply, it ends: a bound on the number of chunks.
        self.chunks += 1;
        if self.chunks > 64 + rlen as usize / 512 {
            return Err(proto("a reply cut into too many chunks"));
        }
        let read = self.read;
        let end = start + u64::from(rlen);
        let in_range = |at: u64, n: u64| at >= start && at.checked_add(n).is_some_and(|e| e <= end);
        let mut be64 = || -> io::Result<u64> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            Ok(u64::from_be_bytes(b))
        };
        match kind {
            CHUNK_NONE if len == 0 => {}
            CHUNK_OFFSET_DATA if read && len >= 8 => {
                let at = be64()?;
                let n = len - 8;
                if !in_range(at, n) {
                    return Err(proto("read data outside the requested range"));
                }
                let from = (at - start) as usize;
                r.read_exact(&mut self.data[from..from + n as usize])?;
            }
            CHUNK_OFFSET_HOLE if read && len == 12 => {
                let at = be64()?;
                let mut b = [0u8; 4];
                r.read_exact(&mut b)?;
                let n = u64::from(u32::from_be_bytes(b));
                if !in_range(at, n) {
                    return Err(proto("hole outside the requested range"));
                }
                let from = (at - start) as usize;
                self.data[from..from + n as usize].fill(0);
            }
            k if k & 0x8000 != 0 && (6..=MAX_CHUNK).contains(&len) => {
                let mut body = vec![0u8; len as usize];
                r.read_exact(&mut body)?;
                let code = u32::from_be_bytes(body[0..4].try_into().unwrap_or_default());
                let mlen = usize::from(u16::from_be_bytes([body[4], body[5]]));
                let msg = body.get(6..6 + mlen).unwrap_or(&[]);
                let known = k == CHUNK_ERROR || k == CHUNK_ERROR_OFFSET;
                // An unknown error chunk type still means the request failed.
                let code = if known && code != 0 { code } else { 5 };
                if self.failure.is_none() {
                    self.failure = Some(server_error(code, &String::from_utf8_lossy(msg)));
                }
            }
            _ => {
                return Err(proto(format!(
                    "unexpected reply chunk type {kind} of {len} bytes"
                )))
            }
        }
        Ok(())
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

/// The reading half of a link, retrying through ticks: each tick fails old requests, and a
/// server that stops in the middle of a reply for longer than the timeout loses the
/// connection.
struct Patient<'a> {
    inner: LinkReader,
    shared: &'a Shared,
    /// Between replies: waiting is normal.
    quiet: bool,
    stalled: Option<Instant>,
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(0) if !buf.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ))
                }
                Ok(n) => {
                    self.quiet = false;
                    self.stalled = None;
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if self.shared.stopping() {
                        return Err(io::Error::other("stopping"));
                    }
                    self.shared.expire();
                    let since = *self.stalled.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.shared.timeout {
                        if !self.quiet {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the server stopped in the middle of a reply",
                            ));
                        }
                        // Silent for a whole timeout while it owes replies to requests that
                        // already failed: start again on a new connection rather than let
                        // them pile up.
                        if self.shared.owes_timed_out() {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the server has not answered for the whole timeout",
                            ));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

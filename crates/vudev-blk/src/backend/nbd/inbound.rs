//! The replies of one connection, read as they come: bytes go into a fixed staging buffer,
//! and each reply is taken from it as soon as it is whole enough (a header with the fixed
//! part of its chunk), with read data passed on to the driver's buffers as it arrives. Nothing
//! waits: what is not there yet is taken on the next call. Memory is the staging buffer and,
//! per structured reply under way, the ranges it has covered; never a reply's data.

use std::collections::HashMap;
use std::io;

use super::assembly::{Assembly, Wanted};
use super::wire::*;

/// Bytes the staging buffer holds: room for many small replies per system call, and more than
/// the largest chunk whose whole body we need at once (a header and [`MAX_CHUNK`]).
pub(super) const STAGING: usize = 64 << 10;

/// What the reader needs of the requests its replies answer.
pub(super) trait Answers {
    /// The request `cookie`, if one with that cookie waits for a reply (answered or not).
    fn wanted(&self, cookie: u64) -> Option<Wanted>;
    /// Read data for request `cookie`, `at` bytes into its range (dropped if it has failed).
    fn land(&mut self, cookie: u64, at: u64, data: &[u8]);
    /// A hole: `n` bytes of zeros `at` bytes into request `cookie`'s range.
    fn zero(&mut self, cookie: u64, at: u64, n: u64);
    /// The reply to `cookie` is complete.
    fn answer(&mut self, cookie: u64, result: io::Result<()>);
}

/// Where the reader is in the byte stream.
#[derive(Clone, Copy)]
enum State {
    /// At the start of a reply header.
    Header,
    /// In read data for `cookie`, `at` bytes into its range, `left` to come; `chunk` holds
    /// the flags of the structured chunk it belongs to (None: a simple reply).
    Data {
        cookie: u64,
        at: u64,
        left: u64,
        chunk: Option<u16>,
    },
}

/// One connection's reply stream.
pub(super) struct Inbound {
    buf: Box<[u8]>,
    /// The bytes of `buf` not taken yet.
    lo: usize,
    hi: usize,
    state: State,
    /// Structured replies begun and not done.
    partial: HashMap<u64, Assembly>,
    /// Messages (simple replies and chunks) taken whole, and bytes received: how the
    /// connection's keeper sees progress.
    pub(super) messages: u64,
    pub(super) bytes: u64,
}

impl Inbound {
    pub(super) fn new() -> Inbound {
        Inbound {
            buf: vec![0u8; STAGING].into_boxed_slice(),
            lo: 0,
            hi: 0,
            state: State::Header,
            partial: HashMap::new(),
            messages: 0,
            bytes: 0,
        }
    }

    /// Bytes of staging buffer.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Forgets the stream (the connection is gone): replies begun on it never end.
    pub(super) fn reset(&mut self) {
        self.lo = 0;
        self.hi = 0;
        self.state = State::Header;
        self.partial = HashMap::new();
    }

    /// True if a reply has begun and is not whole yet.
    pub(super) fn mid_reply(&self) -> bool {
        matches!(self.state, State::Data { .. }) || self.lo < self.hi
    }

    /// Structured replies under way.
    #[cfg(test)]
    pub(super) fn partial_replies(&self) -> usize {
        self.partial.len()
    }

    /// The free part of the staging buffer, to receive into (made as large as it can be).
    pub(super) fn space(&mut self) -> &mut [u8] {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.lo > 0 && self.buf.len() - self.hi < MAX_CHUNK as usize + 64 {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
        &mut self.buf[self.hi..]
    }

    /// Where the next bytes belong when they are read data with nothing of them staged:
    /// the request's cookie, how far into its range, and how many are still to come. The
    /// caller may then receive them straight into the request's buffers (with the staging
    /// space after them) and call [`Inbound::received_direct`].
    pub(super) fn direct(&self) -> Option<(u64, u64, u64)> {
        match self.state {
            State::Data {
                cookie, at, left, ..
            } if self.lo == self.hi => Some((cookie, at, left)),
            _ => None,
        }
    }

    /// Takes `n` bytes received as [`Inbound::direct`] said: the first of them (up to what
    /// the data still lacked) are in the request's buffers already, the rest in
    /// [`Inbound::space`].
    pub(super) fn received_direct(
        &mut self,
        n: usize,
        replies: Replies,
        to: &mut dyn Answers,
    ) -> io::Result<()> {
        if let State::Data {
            cookie,
            at,
            left,
            chunk,
        } = self.state
        {
            let k = (n as u64).min(left);
            self.bytes += k;
            if k == left {
                self.state = State::Header;
                self.end_message(cookie, chunk, to);
            } else {
                self.state = State::Data {
                    cookie,
                    at: at + k,
                    left: left - k,
                    chunk,
                };
            }
            return self.received(n - k as usize, replies, to);
        }
        self.received(n, replies, to)
    }

    /// Takes `n` bytes received into [`Inbound::space`], and every reply they complete.
    pub(super) fn received(
        &mut self,
        n: usize,
        replies: Replies,
        to: &mut dyn Answers,
    ) -> io::Result<()> {
        self.hi += n;
        self.bytes += n as u64;
        while self.step(replies, to)? {}
        Ok(())
    }

    /// Takes one thing from the buffer; false when it needs more bytes.
    fn step(&mut self, replies: Replies, to: &mut dyn Answers) -> io::Result<bool> {
        let avail = &self.buf[self.lo..self.hi];
        match self.state {
            State::Data {
                cookie,
                at,
                left,
                chunk,
            } => {
                if avail.is_empty() {
                    return Ok(false);
                }
                let n = left.min(avail.len() as u64) as usize;
                to.land(cookie, at, &avail[..n]);
                self.lo += n;
                if left == n as u64 {
                    self.state = State::Header;
                    self.end_message(cookie, chunk, to);
                } else {
                    self.state = State::Data {
                        cookie,
                        at: at + n as u64,
                        left: left - n as u64,
                        chunk,
                    };
                }
                Ok(true)
            }
            State::Header => {
                let Some((header, hlen)) = parse_reply_header(avail, replies)? else {
                    return Ok(false);
                };
                match header {
                    ReplyHeader::Simple { cookie, error } => {
                        if self.partial.contains_key(&cookie) {
                            return Err(proto("a simple reply in the middle of a structured one"));
                        }
                        let want = wanted(to, cookie)?;
                        self.lo += hlen;
                        if error != 0 {
                            // No payload follows an error.
                            to.answer(cookie, Err(server_error(error, b"")));
                            self.messages += 1;
                        } else if want.cmd == CMD_READ && want.len > 0 {
                            if replies != Replies::Simple {
                                return Err(proto("a read answered with a simple reply"));
                            }
                            self.state = State::Data {
                                cookie,
                                at: 0,
                                left: u64::from(want.len),
                                chunk: None,
                            };
                        } else {
                            to.answer(cookie, Ok(()));
                            self.messages += 1;
                        }
                        Ok(true)
                    }
                    ReplyHeader::Chunk {
                        cookie,
                        flags,
                        kind,
                        offset,
                        len,
                    } => self.chunk(hlen, cookie, flags, kind, offset, len, to),
                }
            }
        }
    }

    /// A chunk header of `hlen` bytes at the start of the buffer: taken with the fixed part
    /// of its body once both are there.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &mut self,
        hlen: usize,
        cookie: u64,
        flags: u16,
        kind: u16,
        offset: Option<u64>,
        len: u64,
        to: &mut dyn Answers,
    ) -> io::Result<bool> {
        let want = wanted(to, cookie)?;
        if offset.is_some_and(|o| o != want.offset) {
            return Err(proto("reply offset differs from the request's"));
        }
        let read = want.cmd == CMD_READ;
        // How much of the body must be here before the chunk is taken.
        let fixed = match kind {
            CHUNK_NONE if len == 0 => 0,
            CHUNK_OFFSET_DATA if read && len >= 8 => 8,
            CHUNK_OFFSET_HOLE if read && len == 12 => 12,
            k if k & 0x8000 != 0 && (6..=MAX_CHUNK).contains(&len) => len as usize,
            _ => {
                return Err(proto(format!(
                    "unexpected reply chunk type {kind} of {len} bytes"
                )))
            }
        };
        let avail = &self.buf[self.lo..self.hi];
        if avail.len() < hlen + fixed {
            return Ok(false);
        }
        let body = &avail[hlen..hlen + fixed];
        let a = self
            .partial
            .entry(cookie)
            .or_insert_with(|| Assembly::new(&want));
        a.count_chunk()?;
        let be64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
        let mut data = None;
        match kind {
            CHUNK_OFFSET_DATA => {
                let from = a.cover(be64(body), len - 8, "read data")?;
                data = Some((from, len - 8));
            }
            CHUNK_OFFSET_HOLE => {
                let n = u64::from(u32::from_be_bytes([body[8], body[9], body[10], body[11]]));
                let from = a.cover(be64(body), n, "a hole")?;
                to.zero(cookie, from, n);
            }
            CHUNK_NONE => {}
            k => {
                let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let mlen = usize::from(u16::from_be_bytes([body[4], body[5]]));
                let msg = body.get(6..6 + mlen).unwrap_or(&[]);
                let known = k == CHUNK_ERROR || k == CHUNK_ERROR_OFFSET;
                // An unknown error chunk type still means the request failed.
                let code = if known && code != 0 { code } else { 5 };
                a.fail(server_error(code, msg));
            }
        }
        debug_assert!(a.is_read() || data.is_none());
        self.lo += hlen + fixed;
        match data {
            Some((at, left)) => {
                self.state = State::Data {
                    cookie,
                    at,
                    left,
                    chunk: Some(flags),
                }
            }
            None => self.end_message(cookie, Some(flags), to),
        }
        Ok(true)
    }

    /// A simple reply's data, or a chunk, is whole: the reply ends with it unless it is a
    /// chunk without the DONE flag.
    fn end_message(&mut self, cookie: u64, chunk: Option<u16>, to: &mut dyn Answers) {
        self.messages += 1;
        match chunk {
            None => to.answer(cookie, Ok(())),
            Some(flags) if flags & REPLY_FLAG_DONE != 0 => {
                if let Some(a) = self.partial.remove(&cookie) {
                    to.answer(cookie, a.finish());
                }
            }
            Some(_) => {}
        }
    }
}

fn wanted(to: &dyn Answers, cookie: u64) -> io::Result<Wanted> {
    to.wanted(cookie)
        .ok_or_else(|| proto(format!("reply to a request we did not send ({cookie})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request as a test sees it: the request, the data landed, the result.
    type Req = (Wanted, Vec<u8>, Option<io::Result<()>>);

    #[derive(Default)]
    struct Seen {
        reqs: HashMap<u64, Req>,
    }

    impl Seen {
        fn read(&mut self, cookie: u64, offset: u64, len: u32) {
            let w = Wanted {
                cmd: CMD_READ,
                offset,
                len,
            };
            self.reqs
                .insert(cookie, (w, vec![0xee; len as usize], None));
        }
    }

    impl Answers for Seen {
        fn wanted(&self, cookie: u64) -> Option<Wanted> {
            self.reqs.get(&cookie).map(|r| r.0)
        }
        fn land(&mut self, cookie: u64, at: u64, data: &[u8]) {
            let buf = &mut self.reqs.get_mut(&cookie).unwrap().1;
            buf[at as usize..at as usize + data.len()].copy_from_slice(data);
        }
        fn zero(&mut self, cookie: u64, at: u64, n: u64) {
            let buf = &mut self.reqs.get_mut(&cookie).unwrap().1;
            buf[at as usize..(at + n) as usize].fill(0);
        }
        fn answer(&mut self, cookie: u64, result: io::Result<()>) {
            self.reqs.get_mut(&cookie).unwrap().2 = Some(result);
        }
    }

    fn feed(i: &mut Inbound, bytes: &[u8], replies: Replies, to: &mut Seen) -> io::Result<()> {
        for piece in bytes.chunks(7) {
            let space = i.space();
            space[..piece.len()].copy_from_slice(piece);
            i.received(piece.len(), replies, to)?;
        }
        Ok(())
    }

    fn chunk(cookie: u64, flags: u16, kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&(body.len() as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn data(cookie: u64, flags: u16, at: u64, bytes: &[u8]) -> Vec<u8> {
        let mut b = at.to_be_bytes().to_vec();
        b.extend_from_slice(bytes);
        chunk(cookie, flags, CHUNK_OFFSET_DATA, &b)
    }

    #[test]
    fn replies_cut_anywhere_land_whole() {
        let mut to = Seen::default();
        to.read(1, 0, 8);
        to.read(2, 100, 8);
        let mut i = Inbound::new();
        // A simple reply, cut in 7-byte pieces.
        let mut m = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u64.to_be_bytes());
        m.extend_from_slice(b"abcdefgh");
        feed(&mut i, &m, Replies::Simple, &mut to).unwrap();
        assert_eq!(to.reqs[&1].1, b"abcdefgh");
        assert!(to.reqs[&1].2.as_ref().unwrap().is_ok());
        assert!(!i.mid_reply());
        // Structured: data, hole, done.
        let mut m = data(2, 0, 104, b"wxyz");
        let mut hole = 100u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4u32.to_be_bytes());
        m.extend(chunk(2, 0, CHUNK_OFFSET_HOLE, &hole));
        m.extend(chunk(2, REPLY_FLAG_DONE, CHUNK_NONE, &[]));
        feed(&mut i, &m, Replies::Structured, &mut to).unwrap();
        assert_eq!(to.reqs[&2].1, b"\0\0\0\0wxyz");
        assert!(to.reqs[&2].2.as_ref().unwrap().is_ok());
        assert_eq!(i.partial_replies(), 0);
        assert_eq!(i.messages, 4);
    }

    #[test]
    fn a_read_not_covered_whole_fails_and_bad_chunks_break_the_stream() {
        let mut to = Seen::default();
        to.read(3, 0, 8);
        let mut i = Inbound::new();
        let m = data(3, REPLY_FLAG_DONE, 0, b"abcd");
        feed(&mut i, &m, Replies::Structured, &mut to).unwrap();
        assert!(
            to.reqs[&3].2.as_ref().unwrap().is_err(),
            "a gap is not zeros"
        );
        // Overlap, unknown cookie, a simple reply inside a structured one, bad magic.
        for bad in [
            [data(4, 0, 0, b"abcd"), data(4, 0, 2, b"cd")].concat(),
            data(99, REPLY_FLAG_DONE, 0, b"abcdefgh"),
            {
                let mut m = data(4, 0, 0, b"abcd");
                m.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                m.extend_from_slice(&0u32.to_be_bytes());
                m.extend_from_slice(&4u64.to_be_bytes());
                m
            },
            vec![0x12; 40],
        ] {
            let mut to = Seen::default();
            to.read(4, 0, 8);
            let mut i = Inbound::new();
            assert!(feed(&mut i, &bad, Replies::Structured, &mut to).is_err());
        }
    }
}

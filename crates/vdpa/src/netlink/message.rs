//! Netlink message framing: outgoing requests, incoming messages and extended acks.
use std::mem;

use super::attrs::*;
use super::bytes::*;
use super::consts::*;
use crate::error::*;

/// The extended-ack message of an NLMSG_ERROR payload: the error code, the echoed request
/// (its header only when NLM_F_CAPPED), then attributes when NLM_F_ACK_TLVS.
pub(crate) fn error_ext_ack(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let len = read_u32(payload.get(4..)?)? as usize;
        if len < NLMSG_HDRLEN {
            return None;
        }
        align4(len)
    };
    ext_ack_message(payload.get(4usize.checked_add(echoed)?..)?)
}

/// NLMSGERR_ATTR_MSG among extended-ack attributes; malformed attributes mean no message.
pub(crate) fn ext_ack_message(tlvs: &[u8]) -> Option<String> {
    for a in Attrs::new(tlvs) {
        let a = a.ok()?;
        if a.kind == NLMSGERR_ATTR_MSG {
            return a.string().ok().filter(|s| !s.is_empty());
        }
    }
    None
}

/// An outgoing generic netlink message: nlmsghdr, genlmsghdr, attributes.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) buf: Vec<u8>,
}

impl Request {
    pub(crate) fn new(family: u16, flags: u16, cmd: u8, version: u8) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN + GENL_HDRLEN];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[NLMSG_HDRLEN] = cmd;
        buf[NLMSG_HDRLEN + 1] = version;
        Request { buf }
    }

    pub(crate) fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.buf[6], self.buf[7]])
    }

    /// Appends attribute `kind` holding `value`, padded to 4 bytes.
    pub(crate) fn put(&mut self, kind: u16, value: &[u8]) -> Result<(), Error> {
        let len = u16::try_from(NLA_HDRLEN + value.len()).map_err(|_| Error::InvalidName {
            what: "attribute",
            value: format!("type {kind}"),
            reason: "longer than a netlink attribute can hold",
        })?;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        Ok(())
    }

    /// Appends a NUL-terminated string attribute, after checking the name is sendable.
    pub(crate) fn put_strz(&mut self, kind: u16, s: &str, what: &'static str) -> Result<(), Error> {
        let bad = |reason| Error::InvalidName {
            what,
            value: s.into(),
            reason,
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(bad("longer than 255 bytes"));
        }
        if s.contains('\0') {
            return Err(bad("it contains a NUL byte"));
        }
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(kind, &v)
    }

    /// Fills in length and sequence number; returns the bytes to send.
    pub(crate) fn finish(&mut self, seq: u32) -> &[u8] {
        // A request holds a few attributes of at most 64 KiB each: far below u32::MAX.
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

/// One netlink message of a datagram.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Message<'a> {
    pub(crate) kind: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    pub(crate) payload: &'a [u8],
}

/// The netlink messages of a datagram, every length checked. After an error it ends.
pub(crate) struct Messages<'a> {
    pub(crate) data: &'a [u8],
}

impl<'a> Messages<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Messages { data }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.data.is_empty() {
            return None;
        }
        let data = mem::take(&mut self.data);
        if data.len() < NLMSG_HDRLEN {
            return Some(Err(malformed(format!(
                "{} trailing bytes, shorter than a netlink header",
                data.len()
            ))));
        }
        let len = read_u32(data)? as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Some(Err(malformed(format!(
                "message length {len} outside 16..={}",
                data.len()
            ))));
        }
        let msg = Message {
            kind: read_u16(&data[4..])?,
            flags: read_u16(&data[6..])?,
            seq: read_u32(&data[8..])?,
            payload: &data[NLMSG_HDRLEN..len],
        };
        self.data = data.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    }
}

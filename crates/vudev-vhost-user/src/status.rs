//! SET_STATUS and GET_STATUS, which the `vhost` crate (0.18) parses but does not dispatch:
//! the session peeks at each message header and answers these two itself.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::session::{lock, Session};
use crate::wire::{recv_now, send_reply, HDR_LEN, HDR_NEED_REPLY, HDR_REPLY, HDR_VERSION};

/// Frontend requests the `vhost` crate (0.18) does not dispatch; this transport answers them.
const SET_STATUS: u32 = 39;
const GET_STATUS: u32 = 40;
/// A header and a u64 payload (SET_STATUS).
const STATUS_MSG_LEN: usize = 20;

/// Answers SET_STATUS / GET_STATUS (protocol feature STATUS) when that is the next message on
/// `sock`. Returns false, consuming nothing, when the next message is anything else or not
/// complete, so the `vhost` crate's handler takes it (and refuses what it does not know).
pub(crate) fn status_message(sock: &UnixStream, session: &Mutex<Session>) -> io::Result<bool> {
    let mut msg = [0u8; STATUS_MSG_LEN];
    let n = match recv_now(sock, &mut msg, libc::MSG_PEEK) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(e),
    };
    let word = |i: usize| u32::from_le_bytes(msg[i..i + 4].try_into().unwrap_or_default());
    let (code, flags, size) = (word(0), word(4), word(8));
    // GET_STATUS has no payload; SET_STATUS carries the status as a u64.
    let len = match code {
        GET_STATUS => HDR_LEN,
        SET_STATUS => STATUS_MSG_LEN,
        _ => return Ok(false),
    };
    let mut s = lock(session);
    if n < len || !s.protocol.contains(VhostUserProtocolFeatures::STATUS) {
        return Ok(false);
    }
    // Take the message off the socket (fds sent with it, which it must not carry, are closed
    // by the kernel since we receive no control data).
    if recv_now(sock, &mut msg[..len], 0)? != len {
        return Err(io::Error::other("status message cut short"));
    }
    if flags & 0x3 != HDR_VERSION || flags & HDR_REPLY != 0 || size as usize != len - HDR_LEN {
        return Err(io::Error::other("malformed header"));
    }
    let value = u64::from_le_bytes(msg[12..20].try_into().unwrap_or_default());
    let reply = if code == GET_STATUS {
        Some(u64::from(s.status))
    } else {
        let ok = s.set_status(value);
        let ack = flags & HDR_NEED_REPLY != 0
            && s.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        ack.then_some(u64::from(!ok))
    };
    drop(s);
    if let Some(v) = reply {
        send_reply(sock, code, v)?;
    }
    Ok(true)
}

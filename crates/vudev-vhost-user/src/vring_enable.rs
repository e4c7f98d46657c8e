//! SET_VRING_ENABLE sent before SET_FEATURES. QEMU's virtio-net enables its queue pairs when
//! it attaches its peer, as soon as the backend has offered PROTOCOL_FEATURES, before any
//! SET_FEATURES; the `vhost` crate (0.18) refuses the message until PROTOCOL_FEATURES is
//! acked, leaving QEMU waiting for an answer. The session peeks at each header and takes this
//! one message itself in that window only; once features are acked, the crate handles it.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserBackendReqHandlerMut;

use crate::session::{lock, Session};
use crate::wire::{
    peek_header, recv_now, send_reply, HDR_LEN, HDR_NEED_REPLY, HDR_REPLY, HDR_VERSION,
};

/// The request's code, and its length: a header and a vring state (index, 0 or 1).
const SET_VRING_ENABLE: u32 = 18;
const MSG_LEN: usize = HDR_LEN + 8;

/// Answers SET_VRING_ENABLE when it is the next message on `sock` and no features are acked
/// yet. Returns false, consuming nothing, for anything else (or a message not all there).
pub(crate) fn early_vring_enable(sock: &UnixStream, session: &Mutex<Session>) -> io::Result<bool> {
    let Some((code, flags, size)) = peek_header(sock)? else {
        return Ok(false);
    };
    let mut s = lock(session);
    if code != SET_VRING_ENABLE || s.acked != 0 {
        return Ok(false);
    }
    let mut msg = [0u8; MSG_LEN];
    match recv_now(sock, &mut msg, libc::MSG_PEEK) {
        Ok(MSG_LEN) => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(e),
    }
    if flags & 0x3 != HDR_VERSION || flags & HDR_REPLY != 0 || size as usize != MSG_LEN - HDR_LEN {
        // Left to the crate's handler, which refuses it with its own reason.
        return Ok(false);
    }
    // Taken off the socket: fds sent with it, which it must not carry, are closed by the
    // kernel since no control data is received.
    if recv_now(sock, &mut msg, 0)? != MSG_LEN {
        return Err(io::Error::other("SET_VRING_ENABLE cut short"));
    }
    let word = |i: usize| u32::from_le_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
    let (index, num) = (word(12), word(16));
    let done = match num {
        0 | 1 => s.set_vring_enable(index, num == 1).is_ok(),
        _ => false,
    };
    let ack =
        flags & HDR_NEED_REPLY != 0 && s.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
    drop(s);
    if !done {
        tracing::warn!("frontend request refused: SET_VRING_ENABLE of queue {index} to {num}");
    }
    if ack {
        send_reply(sock, SET_VRING_ENABLE, u64::from(!done))?;
    }
    Ok(true)
}

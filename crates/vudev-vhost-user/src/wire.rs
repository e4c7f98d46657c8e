//! The vhost-user message header, for the messages this transport reads and writes itself
//! (status, the backend channel) instead of the `vhost` crate.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// Header flags: protocol version 1, "this is a reply", "reply wanted" (REPLY_ACK).
pub(crate) const HDR_VERSION: u32 = 0x1;
pub(crate) const HDR_REPLY: u32 = 0x4;
pub(crate) const HDR_NEED_REPLY: u32 = 0x8;
/// A message header: request, flags, payload size.
pub(crate) const HDR_LEN: usize = 12;

/// The next message's header (request, flags, payload size), left on the socket; `None` if
/// no whole header is there yet.
pub(crate) fn peek_header(sock: &UnixStream) -> io::Result<Option<(u32, u32, u32)>> {
    let mut h = [0u8; HDR_LEN];
    // SAFETY: `h` is valid for writes of its length; the fd is the frontend's socket.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            h.as_mut_ptr().cast(),
            h.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match usize::try_from(n) {
        Ok(HDR_LEN) => {}
        Ok(_) => return Ok(None),
        Err(_) => {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(e),
            };
        }
    }
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    Ok(Some((word(0), word(4), word(8))))
}

/// Receives into `buf` without blocking (`flags`: MSG_PEEK to leave the bytes there); the
/// number of bytes, or the error (`WouldBlock` when nothing is there). Control data (fds sent
/// along) is not received, so the kernel closes it.
pub(crate) fn recv_now(sock: &UnixStream, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; the fd is the frontend's socket.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Replies to request `code` with a u64 (REPLY_ACK's status, GET_STATUS's value).
pub(crate) fn send_reply(sock: &UnixStream, code: u32, value: u64) -> io::Result<()> {
    let mut out = [0u8; HDR_LEN + 8];
    out[0..4].copy_from_slice(&code.to_le_bytes());
    out[4..8].copy_from_slice(&(HDR_VERSION | HDR_REPLY).to_le_bytes());
    out[8..12].copy_from_slice(&8u32.to_le_bytes());
    out[12..20].copy_from_slice(&value.to_le_bytes());
    send_whole(sock, &out)
}

/// Sends `msg` in one go without blocking: all of it, or an error (a peer that does not
/// read gets `WouldBlock`, never a stalled sender).
pub(crate) fn send_whole(sock: &UnixStream, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is valid for reads of its length; the fd is a socket we hold.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    match usize::try_from(n) {
        Ok(sent) if sent == msg.len() => Ok(()),
        Ok(_) => Err(io::Error::other("message cut short")),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

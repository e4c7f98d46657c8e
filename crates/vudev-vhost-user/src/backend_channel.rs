//! Taking the backend-to-frontend channel (SET_BACKEND_REQ_FD, protocol feature BACKEND_REQ)
//! in this transport itself: the `vhost` crate (0.18) hands it over only as a `Backend` that
//! cannot send CONFIG_CHANGE_MSG, which an online resize needs. The session takes the message
//! off the socket before the crate would see it, as it does the status messages.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::session::{lock, Session};
use crate::wire::{peek_header, send_reply, HDR_LEN, HDR_NEED_REPLY};

const SET_BACKEND_REQ_FD: u32 = 21;
/// Descriptors accepted with one message (more are closed; one is expected).
const MAX_FDS: usize = 4;

/// Takes SET_BACKEND_REQ_FD when that is the next message on `sock` (and BACKEND_REQ was
/// negotiated): the descriptor must be one unix stream socket. Returns false, consuming
/// nothing, for any other message.
pub(crate) fn take_channel(sock: &UnixStream, session: &Mutex<Session>) -> io::Result<bool> {
    let Some((code, flags, size)) = peek_header(sock)? else {
        return Ok(false);
    };
    let s = lock(session);
    if code != SET_BACKEND_REQ_FD || !s.protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
        return Ok(false);
    }
    let ack =
        flags & HDR_NEED_REPLY != 0 && s.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
    let channel = s.backend_req.clone();
    drop(s);
    let fds = receive_header_with_fds(sock)?;
    if size != 0 {
        return Err(io::Error::other("SET_BACKEND_REQ_FD with a payload"));
    }
    let mut fds = fds.into_iter();
    let (Some(fd), None) = (fds.next(), fds.next()) else {
        return Err(io::Error::other(
            "SET_BACKEND_REQ_FD needs exactly one descriptor",
        ));
    };
    let ok = is_unix_stream(fd.as_raw_fd());
    if ok {
        channel.set(Some(UnixStream::from(fd)));
    }
    if ack {
        send_reply(sock, SET_BACKEND_REQ_FD, u64::from(!ok))?;
    }
    if !ok {
        return Err(io::Error::other(
            "the backend channel is not a unix stream socket",
        ));
    }
    Ok(true)
}

/// Receives one message header and the descriptors sent with it.
fn receive_header_with_fds(sock: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut header = [0u8; HDR_LEN];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` describes buffers valid for writes of their lengths.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* walk stays within `control`, which recvmsg filled; each SCM_RIGHTS
    // entry holds descriptors now owned by this process, taken into OwnedFd exactly once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n as usize != HDR_LEN || msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("SET_BACKEND_REQ_FD cut short"));
    }
    Ok(fds)
}

fn is_unix_stream(fd: RawFd) -> bool {
    let opt = |name: i32| {
        let mut v: i32 = 0;
        let mut len = size_of::<i32>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut i32).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    opt(libc::SO_DOMAIN) == Some(libc::AF_UNIX) && opt(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

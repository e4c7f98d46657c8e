//! The netlink socket and one request/reply exchange (acks, dumps in several parts, errors).
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::bytes::*;
use super::consts::*;
use super::message::*;
use crate::error::*;

/// A generic netlink socket bound to an automatic port, with extended acks asked for.
pub(crate) fn new_socket() -> Result<OwnedFd, Error> {
    let io_err = |op: &str| Error::Io {
        op: op.into(),
        source: io::Error::last_os_error(),
    };
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_GENERIC,
        )
    };
    if fd < 0 {
        return Err(io_err("open generic netlink socket"));
    }
    // SAFETY: `fd` is a valid descriptor just returned by socket(2) and owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: an all-zero sockaddr_nl is a valid value (plain integers).
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `addr` is a valid sockaddr_nl and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast::<libc::sockaddr>(),
            mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io_err("bind generic netlink socket"));
    }

    // Extended acks carry the kernel's error text; capped acks keep error replies small.
    // Both are optional (older kernels lack them), so failures are ignored.
    for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
        let one: libc::c_int = 1;
        // SAFETY: `one` is a live c_int and the length passed is its size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_NETLINK,
                opt,
                (&one as *const libc::c_int).cast::<libc::c_void>(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok(sock)
}

/// Gives errors from the reply stream the name of the request.
pub(crate) fn refine(e: Error, op: &str) -> Error {
    match e {
        Error::Kernel {
            source, ext, hint, ..
        } => match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied { op: op.into() },
            _ => Error::Kernel {
                op: op.into(),
                source,
                ext,
                hint,
            },
        },
        Error::DumpInterrupted { .. } => Error::DumpInterrupted { op: op.into() },
        e => e,
    }
}

/// State of one request/reply exchange.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub(crate) seq: u32,
    pub(crate) family: u16,
    pub(crate) dump: bool,
    pub(crate) interrupted: bool,
}

impl Exchange {
    /// Processes one datagram. Returns true when the exchange is complete (acknowledged, or
    /// the dump is done); replies to other requests are skipped.
    pub(crate) fn process(
        &mut self,
        datagram: &[u8],
        on_reply: &mut impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        for msg in Messages::new(datagram) {
            let msg = msg?;
            if msg.seq != self.seq {
                tracing::debug!(
                    "ignoring a netlink message of sequence {} (want {})",
                    msg.seq,
                    self.seq
                );
                continue;
            }
            if msg.flags & NLM_F_DUMP_INTR != 0 {
                self.interrupted = true;
            }
            match msg.kind {
                NLMSG_NOOP => {}
                NLMSG_ERROR => {
                    let errno = read_i32(msg.payload)
                        .ok_or_else(|| malformed("NLMSG_ERROR shorter than its error code"))?;
                    if errno == 0 {
                        // The acknowledgement. A dump ends with NLMSG_DONE instead.
                        if !self.dump {
                            return Ok(true);
                        }
                        continue;
                    }
                    return Err(kernel_error(errno, error_ext_ack(msg.flags, msg.payload)));
                }
                NLMSG_DONE => {
                    // The payload is the dump's final status (0, or a negative errno).
                    let errno = read_i32(msg.payload).unwrap_or(0);
                    if errno != 0 {
                        let ext = if msg.flags & NLM_F_ACK_TLVS != 0 {
                            ext_ack_message(&msg.payload[4..])
                        } else {
                            None
                        };
                        return Err(kernel_error(errno, ext));
                    }
                    return Ok(true);
                }
                NLMSG_OVERRUN => return Err(malformed("NLMSG_OVERRUN: data lost")),
                kind if kind == self.family => {
                    let attrs = msg
                        .payload
                        .get(GENL_HDRLEN..)
                        .ok_or_else(|| malformed("reply shorter than a generic netlink header"))?;
                    // Requests here always ask for an ack, so a single reply does not end the
                    // exchange: the ack (or NLMSG_DONE) that follows does.
                    on_reply(attrs)?;
                }
                kind => {
                    return Err(malformed(format!(
                        "unexpected message type {kind:#x} (want {:#x})",
                        self.family
                    )))
                }
            }
        }
        Ok(false)
    }
}

/// An error from the kernel's (negative) errno; the request name is added by [`refine`].
pub(crate) fn kernel_error(errno: i32, ext: Option<String>) -> Error {
    // The kernel sends -errno; take the magnitude without overflowing on i32::MIN.
    let code = i32::try_from(errno.unsigned_abs()).unwrap_or(i32::MAX);
    Error::Kernel {
        op: String::new(),
        source: io::Error::from_raw_os_error(code),
        ext,
        hint: None,
    }
}

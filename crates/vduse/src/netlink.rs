//! vdpa device management over generic netlink — what iproute2's `vdpa` tool does, without it.
//!
//! Only four requests are needed (resolve the family, list management devices, list devices,
//! add and delete a device), so the messages are built and parsed here with bounds checks on
//! every length the kernel returns.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Generic netlink family name of vdpa (`VDPA_GENL_NAME`).
const VDPA_GENL_NAME: &str = "vdpa";
const VDPA_GENL_VERSION: u8 = 1;

// enum vdpa_command
const VDPA_CMD_MGMTDEV_GET: u8 = 2;
const VDPA_CMD_DEV_NEW: u8 = 3;
const VDPA_CMD_DEV_DEL: u8 = 4;
const VDPA_CMD_DEV_GET: u8 = 5;

// enum vdpa_attr
const VDPA_ATTR_MGMTDEV_BUS_NAME: u16 = 1;
const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
const VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES: u16 = 3;
const VDPA_ATTR_DEV_NAME: u16 = 4;
const VDPA_ATTR_DEV_ID: u16 = 5;
const VDPA_ATTR_DEV_VENDOR_ID: u16 = 6;
const VDPA_ATTR_DEV_MAX_VQS: u16 = 7;
const VDPA_ATTR_DEV_MAX_VQ_SIZE: u16 = 8;

// Generic netlink controller (linux/genetlink.h).
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// linux/netlink.h
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_EXT_ACK: i32 = 11;
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

const NLMSG_HDR: usize = 16;
const GENL_HDR: usize = 4;
const RECV_BUF: usize = 32 * 1024;

/// Errors of vdpa management, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel has no vdpa netlink family.
    #[error("generic netlink family 'vdpa' not found: load the vdpa module (modprobe vdpa)")]
    NoFamily,
    /// Not allowed.
    #[error("{0}: operation not permitted: vdpa management needs CAP_NET_ADMIN (run as root)")]
    Permission(String),
    /// The device name is in use.
    #[error("a vdpa device named '{0}' already exists")]
    Exists(String),
    /// No such device or management device.
    #[error("{what}: not found{hint}")]
    NotFound {
        /// What was looked for.
        what: String,
        /// How to fix it.
        hint: String,
    },
    /// The kernel refused the request.
    #[error("{op}: {source}{}", ext.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        /// The request.
        op: String,
        /// errno from the kernel.
        #[source]
        source: io::Error,
        /// The kernel's extended-ack message, if any.
        ext: Option<String>,
    },
    /// The kernel's reply did not parse.
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

/// A vdpa management device (`vdpa mgmtdev show`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MgmtDev {
    /// Bus name, for bus devices (none for "vduse").
    pub bus: Option<String>,
    /// Device name ("vduse").
    pub name: String,
    /// Bit mask of virtio device ids it can create.
    pub supported_classes: u64,
}

/// A vdpa device (`vdpa dev show`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VdpaDevice {
    /// Device name.
    pub name: String,
    /// Management device that created it.
    pub mgmtdev: String,
    /// virtio device id.
    pub device_id: u32,
    /// virtio vendor id.
    pub vendor_id: u32,
    /// Number of virtqueues.
    pub max_vqs: u32,
    /// Largest queue size.
    pub max_vq_size: u16,
}

/// A generic netlink socket bound to the vdpa family.
#[derive(Debug)]
pub struct VdpaNetlink {
    sock: OwnedFd,
    family: u16,
    seq: u32,
}

impl VdpaNetlink {
    /// Opens a socket and resolves the vdpa family.
    pub fn open() -> Result<Self, NetlinkError> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(kernel_err(
                "netlink socket",
                io::Error::last_os_error(),
                None,
            ));
        }
        // SAFETY: fd is a new socket we own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: i32 = 1;
        // SAFETY: setsockopt with a valid pointer to an int; failure only loses messages.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_NETLINK,
                NETLINK_EXT_ACK,
                &one as *const i32 as *const libc::c_void,
                4,
            )
        };
        let mut nl = VdpaNetlink {
            sock,
            family: GENL_ID_CTRL,
            seq: 1,
        };
        let mut msg = Message::new(GENL_ID_CTRL, NLM_F_REQUEST, CTRL_CMD_GETFAMILY, 1);
        msg.put_str(CTRL_ATTR_FAMILY_NAME, VDPA_GENL_NAME);
        let replies = match nl.transact(msg, "resolve vdpa family") {
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                return Err(NetlinkError::NoFamily)
            }
            r => r?,
        };
        let family = replies
            .iter()
            .find_map(|r| {
                attrs(r)
                    .find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID)
                    .and_then(|(_, v)| v.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]])))
            })
            .ok_or(NetlinkError::NoFamily)?;
        nl.family = family;
        Ok(nl)
    }

    /// Lists management devices.
    pub fn list_mgmtdevs(&mut self) -> Result<Vec<MgmtDev>, NetlinkError> {
        let msg = Message::new(
            self.family,
            NLM_F_REQUEST | NLM_F_DUMP,
            VDPA_CMD_MGMTDEV_GET,
            VDPA_GENL_VERSION,
        );
        let replies = self.transact(msg, "list vdpa management devices")?;
        Ok(replies.iter().map(|r| parse_mgmtdev(r)).collect())
    }

    /// Lists vdpa devices.
    pub fn list_devices(&mut self) -> Result<Vec<VdpaDevice>, NetlinkError> {
        let msg = Message::new(
            self.family,
            NLM_F_REQUEST | NLM_F_DUMP,
            VDPA_CMD_DEV_GET,
            VDPA_GENL_VERSION,
        );
        let replies = self.transact(msg, "list vdpa devices")?;
        Ok(replies.iter().map(|r| parse_device(r)).collect())
    }

    /// Adds device `name` through management device `mgmtdev` (`vdpa dev add`).
    pub fn add_device(&mut self, name: &str, mgmtdev: &str) -> Result<(), NetlinkError> {
        let mut msg = Message::new(
            self.family,
            NLM_F_REQUEST | NLM_F_ACK,
            VDPA_CMD_DEV_NEW,
            VDPA_GENL_VERSION,
        );
        msg.put_str(VDPA_ATTR_MGMTDEV_DEV_NAME, mgmtdev);
        msg.put_str(VDPA_ATTR_DEV_NAME, name);
        match self.transact(msg, &format!("vdpa dev add {name} mgmtdev {mgmtdev}")) {
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::EEXIST) =>
            {
                Err(NetlinkError::Exists(name.into()))
            }
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV)
                    || source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Err(NetlinkError::NotFound {
                    what: format!("vdpa dev add {name} mgmtdev {mgmtdev}"),
                    hint: format!(
                        ": is there a VDUSE device named {name} (/dev/vduse/{name}) and is the \
                         {mgmtdev} management device loaded?"
                    ),
                })
            }
            r => r.map(|_| ()),
        }
    }

    /// Deletes device `name` (`vdpa dev del`).
    pub fn del_device(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut msg = Message::new(
            self.family,
            NLM_F_REQUEST | NLM_F_ACK,
            VDPA_CMD_DEV_DEL,
            VDPA_GENL_VERSION,
        );
        msg.put_str(VDPA_ATTR_DEV_NAME, name);
        match self.transact(msg, &format!("vdpa dev del {name}")) {
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV)
                    || source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Err(NetlinkError::NotFound {
                    what: format!("vdpa device {name}"),
                    hint: ": `vudev vdpa list` shows the attached devices".into(),
                })
            }
            r => r.map(|_| ()),
        }
    }

    /// Sends `msg`, collects every reply payload (genl header stripped) until the ack or the
    /// end of a dump.
    fn transact(&mut self, mut msg: Message, op: &str) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = msg.flags() & NLM_F_DUMP == NLM_F_DUMP;
        let acked = msg.flags() & NLM_F_ACK != 0;
        let bytes = msg.finish(seq);
        // SAFETY: sending our own buffer on our socket (kernel address: zeroed sockaddr_nl).
        let n = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.sock.as_raw_fd(),
                bytes.as_ptr() as *const libc::c_void,
                bytes.len(),
                0,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => NetlinkError::Permission(op.into()),
                _ => kernel_err(op, e, None),
            });
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // SAFETY: receiving into our buffer of RECV_BUF bytes.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(kernel_err(op, e, None));
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(NetlinkError::Malformed(
                    "reply larger than the receive buffer",
                ));
            }
            for m in messages(&buf[..n]) {
                let (hdr, payload) = m?;
                if hdr.seq != seq {
                    continue;
                }
                match hdr.kind {
                    NLMSG_ERROR => {
                        let errno = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or(NetlinkError::Malformed("short error message"))?;
                        if errno == 0 {
                            return Ok(out);
                        }
                        let ext = ext_ack_message(hdr.flags, payload);
                        let e = io::Error::from_raw_os_error(-errno);
                        return Err(match -errno {
                            libc::EPERM | libc::EACCES => NetlinkError::Permission(op.into()),
                            _ => kernel_err(op, e, ext),
                        });
                    }
                    NLMSG_DONE => return Ok(out),
                    _ => {
                        let body = payload
                            .get(GENL_HDR..)
                            .ok_or(NetlinkError::Malformed("short generic netlink header"))?;
                        out.push(body.to_vec());
                        if !dump && !acked && hdr.flags & NLM_F_MULTI == 0 {
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }
}

fn kernel_err(op: &str, source: io::Error, ext: Option<String>) -> NetlinkError {
    NetlinkError::Kernel {
        op: op.into(),
        source,
        ext,
    }
}

/// An outgoing generic netlink message.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(family: u16, flags: u16, cmd: u8, version: u8) -> Self {
        let mut buf = vec![0u8; NLMSG_HDR + GENL_HDR];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[NLMSG_HDR] = cmd;
        buf[NLMSG_HDR + 1] = version;
        Message { buf }
    }

    fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.buf[6], self.buf[7]])
    }

    /// Appends a NUL-terminated string attribute.
    fn put_str(&mut self, kind: u16, s: &str) {
        let len = 4 + s.len() + 1;
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

struct Header {
    kind: u16,
    flags: u16,
    seq: u32,
}

/// Splits a datagram into netlink messages, checking every length.
fn messages(mut data: &[u8]) -> impl Iterator<Item = Result<(Header, &[u8]), NetlinkError>> {
    std::iter::from_fn(move || {
        if data.len() < NLMSG_HDR {
            return None;
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDR || len > data.len() {
            data = &[];
            return Some(Err(NetlinkError::Malformed("bad message length")));
        }
        let hdr = Header {
            kind: u16::from_ne_bytes([data[4], data[5]]),
            flags: u16::from_ne_bytes([data[6], data[7]]),
            seq: u32::from_ne_bytes([data[8], data[9], data[10], data[11]]),
        };
        let payload = &data[NLMSG_HDR..len];
        data = &data[align4(len).min(data.len())..];
        Some(Ok((hdr, payload)))
    })
}

/// Iterates the attributes of a payload; stops at the first malformed one.
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            data = &[];
            return None;
        }
        let value = &data[4..len];
        data = &data[align4(len).min(data.len())..];
        Some((kind, value))
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn attr_str(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

fn attr_u32(v: &[u8]) -> u32 {
    v.get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

fn attr_u64(v: &[u8]) -> u64 {
    v.get(..8)
        .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0)
}

fn parse_mgmtdev(payload: &[u8]) -> MgmtDev {
    let mut m = MgmtDev::default();
    for (kind, v) in attrs(payload) {
        match kind {
            VDPA_ATTR_MGMTDEV_BUS_NAME => m.bus = Some(attr_str(v)),
            VDPA_ATTR_MGMTDEV_DEV_NAME => m.name = attr_str(v),
            VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES => m.supported_classes = attr_u64(v),
            _ => {}
        }
    }
    m
}

fn parse_device(payload: &[u8]) -> VdpaDevice {
    let mut d = VdpaDevice::default();
    for (kind, v) in attrs(payload) {
        match kind {
            VDPA_ATTR_DEV_NAME => d.name = attr_str(v),
            VDPA_ATTR_MGMTDEV_DEV_NAME => d.mgmtdev = attr_str(v),
            VDPA_ATTR_DEV_ID => d.device_id = attr_u32(v),
            VDPA_ATTR_DEV_VENDOR_ID => d.vendor_id = attr_u32(v),
            VDPA_ATTR_DEV_MAX_VQS => d.max_vqs = attr_u32(v),
            VDPA_ATTR_DEV_MAX_VQ_SIZE => {
                d.max_vq_size = v
                    .get(..2)
                    .map(|b| u16::from_ne_bytes([b[0], b[1]]))
                    .unwrap_or(0)
            }
            _ => {}
        }
    }
    d
}

/// The extended-ack text after an error: the error code, the echoed request (just its header
/// when CAPPED), then attributes.
fn ext_ack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 4 + NLMSG_HDR {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDR
    } else {
        let l = &payload[4..8];
        align4(u32::from_ne_bytes([l[0], l[1], l[2], l[3]]) as usize)
    };
    let tlvs = payload.get(4 + echoed..)?;
    attrs(tlvs)
        .find(|(k, _)| *k == NLMSGERR_ATTR_MSG)
        .map(|(_, v)| attr_str(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_request() {
        let mut m = Message::new(0x1c, NLM_F_REQUEST | NLM_F_ACK, VDPA_CMD_DEV_NEW, 1);
        m.put_str(VDPA_ATTR_DEV_NAME, "vdisk0");
        let b = m.finish(7).to_vec();
        assert_eq!(b.len(), 16 + 4 + 4 + 8); // "vdisk0\0" is 7 bytes, padded to 8
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 0x1c);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        assert_eq!(b[16], VDPA_CMD_DEV_NEW);
        let parsed: Vec<_> = attrs(&b[20..]).collect();
        assert_eq!(parsed, vec![(VDPA_ATTR_DEV_NAME, &b"vdisk0\0"[..])]);
    }

    #[test]
    fn parses_device_attributes() {
        let mut m = Message::new(0x1c, 0, VDPA_CMD_DEV_GET, 1);
        m.put_str(VDPA_ATTR_DEV_NAME, "vdisk0");
        m.put_str(VDPA_ATTR_MGMTDEV_DEV_NAME, "vduse");
        let mut b = m.finish(1).to_vec();
        for (kind, val) in [(VDPA_ATTR_DEV_ID, 2u32), (VDPA_ATTR_DEV_MAX_VQS, 4)] {
            b.extend_from_slice(&8u16.to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(&val.to_ne_bytes());
        }
        let d = parse_device(&b[20..]);
        assert_eq!(d.name, "vdisk0");
        assert_eq!(d.mgmtdev, "vduse");
        assert_eq!(d.device_id, 2);
        assert_eq!(d.max_vqs, 4);
    }

    #[test]
    fn malformed_input_is_rejected_without_panic() {
        // Attribute longer than the buffer, zero length, truncated.
        assert_eq!(attrs(&[200, 0, 1, 0, 1, 2]).count(), 0);
        assert_eq!(attrs(&[0, 0, 1, 0]).count(), 0);
        assert_eq!(attrs(&[8, 0]).count(), 0);
        // Message length past the datagram, and below the header size.
        let mut dg = vec![0u8; 16];
        dg[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(matches!(messages(&dg).next(), Some(Err(_))));
        dg[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(matches!(messages(&dg).next(), Some(Err(_))));
        // Short values parse as zero.
        assert_eq!(attr_u32(&[1]), 0);
        assert_eq!(attr_u64(&[1, 2, 3]), 0);
        assert_eq!(ext_ack_message(NLM_F_ACK_TLVS, &[0; 3]), None);
    }
}

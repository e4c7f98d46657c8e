//! vdpa device management over generic netlink: what iproute2's `vdpa` tool does, without it.
//!
//! [`VdpaNetlink`] talks to the kernel's `vdpa` generic netlink family
//! (`include/uapi/linux/vdpa.h`) over a plain `AF_NETLINK` socket. Only a handful of requests
//! are needed, so the messages are built and parsed here by hand:
//!
//! - resolve the family id with the generic netlink controller (`CTRL_CMD_GETFAMILY`);
//! - list management devices and devices (`VDPA_CMD_MGMTDEV_GET`, `VDPA_CMD_DEV_GET`, dumps);
//! - add and delete a device (`VDPA_CMD_DEV_NEW`, `VDPA_CMD_DEV_DEL`, acknowledged requests).
//!
//! Every length in a reply is checked before use: a malformed reply is an error, never a panic
//! or an out-of-bounds read, and replies are received into one fixed 32 KiB buffer (a datagram
//! that does not fit is reported, not silently cut). Kernel errors carry the extended-ack
//! message when the kernel sends one.
//!
//! VDUSE devices are added through the management device [`VDUSE_MGMTDEV`] (`"vduse"`, no bus),
//! under the name of the VDUSE device (`/dev/vduse/NAME`).

use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The management device that VDUSE devices are added through (it has no bus name).
pub const VDUSE_MGMTDEV: &str = "vduse";

// include/uapi/linux/vdpa.h
const VDPA_GENL_NAME: &str = "vdpa";
const VDPA_GENL_VERSION: u8 = 0x1;

// enum vdpa_command
const VDPA_CMD_MGMTDEV_GET: u8 = 2;
const VDPA_CMD_DEV_NEW: u8 = 3;
const VDPA_CMD_DEV_DEL: u8 = 4;
const VDPA_CMD_DEV_GET: u8 = 5;

// enum vdpa_attr (VDPA_ATTR_UNSPEC = VDPA_ATTR_PAD = 0)
const VDPA_ATTR_MGMTDEV_BUS_NAME: u16 = 1;
const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
const VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES: u16 = 3;
const VDPA_ATTR_DEV_NAME: u16 = 4;
const VDPA_ATTR_DEV_ID: u16 = 5;
const VDPA_ATTR_DEV_VENDOR_ID: u16 = 6;
const VDPA_ATTR_DEV_MAX_VQS: u16 = 7;
const VDPA_ATTR_DEV_MAX_VQ_SIZE: u16 = 8;

// include/uapi/linux/genetlink.h
const GENL_ID_CTRL: u16 = 0x10; // NLMSG_MIN_TYPE
const CTRL_VERSION: u8 = 1;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// include/uapi/linux/netlink.h
const NLM_F_REQUEST: u16 = 0x01;
#[cfg(test)]
const NLM_F_MULTI: u16 = 0x02;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSG_NOOP: u16 = 0x1;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLMSG_OVERRUN: u16 = 0x4;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14)); // ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct genlmsghdr)`.
const GENL_HDRLEN: usize = 4;
/// `sizeof(struct nlattr)`.
const NLA_HDRLEN: usize = 4;

/// Receive buffer size. The kernel sizes dump datagrams to at most 32 KiB.
const RECV_BUF_LEN: usize = 32 * 1024;
/// Most entries a dump may return before it is treated as runaway.
const MAX_DUMP_ENTRIES: usize = 4096;
/// Longest device name accepted in a request (VDUSE allows up to 255 bytes).
const MAX_NAME_LEN: usize = 255;
/// How often a dump the kernel marks inconsistent (`NLM_F_DUMP_INTR`) is retried.
const DUMP_ATTEMPTS: usize = 3;

/// Errors of vdpa management, worded for the operator who has to fix them.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel has no `vdpa` generic netlink family.
    #[error(
        "generic netlink family 'vdpa' not found: load the vdpa module (modprobe vdpa); note \
         that vdpa management is only available in the initial network namespace"
    )]
    FamilyNotFound,
    /// The kernel refused the request for lack of privilege.
    #[error("{op}: permission denied: need CAP_NET_ADMIN (run as root)")]
    PermissionDenied {
        /// The refused request.
        op: String,
    },
    /// `add_device`: a vdpa device of this name exists already.
    #[error(
        "a vdpa device named '{name}' already exists: pick another name, or delete the old \
         one first (`vudev vdpa detach {name}`)"
    )]
    DeviceExists {
        /// The device name.
        name: String,
    },
    /// `del_device`: there is no vdpa device of this name.
    #[error("no vdpa device named '{name}': `vudev vdpa list` shows the existing devices")]
    NoSuchDevice {
        /// The device name.
        name: String,
    },
    /// `add_device`: the management device does not exist.
    #[error("no vdpa management device '{mgmtdev}': {hint}")]
    NoSuchMgmtDev {
        /// The management device as given.
        mgmtdev: String,
        /// What to do about it.
        hint: String,
    },
    /// A name given to a request cannot be sent.
    #[error("invalid {what} '{value}': {reason}")]
    InvalidName {
        /// Which name ("device name", "management device name").
        what: &'static str,
        /// The name as given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The kernel answered a request with an error.
    #[error("{op}: {source}{}", detail(.ext, .hint))]
    Kernel {
        /// The request.
        op: String,
        /// The errno the kernel returned.
        #[source]
        source: io::Error,
        /// The kernel's extended-ack message, if it sent one.
        ext: Option<String>,
        /// What to check, where the errno alone does not say.
        hint: Option<String>,
    },
    /// A system call on the netlink socket failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A reply did not fit the receive buffer.
    #[error(
        "netlink reply of {len} bytes does not fit the {RECV_BUF_LEN}-byte receive buffer: \
         this is a bug, please report it"
    )]
    Truncated {
        /// Size of the datagram the kernel had.
        len: usize,
    },
    /// A reply from the kernel does not parse.
    #[error("malformed netlink reply from the kernel: {0}")]
    Malformed(String),
    /// The kernel marked a dump inconsistent every time it was tried.
    #[error("{op}: the list kept changing while it was read: try again")]
    DumpInterrupted {
        /// The request.
        op: String,
    },
    /// A dump returned more entries than this crate accepts.
    #[error("{op}: more than {MAX_DUMP_ENTRIES} entries: refusing to read further")]
    TooManyEntries {
        /// The request.
        op: String,
    },
}

fn detail(ext: &Option<String>, hint: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(ext) = ext {
        s.push_str(" (kernel: ");
        s.push_str(ext);
        s.push(')');
    }
    if let Some(hint) = hint {
        s.push_str(": ");
        s.push_str(hint);
    }
    s
}

impl NetlinkError {
    /// The errno behind this error, where there is one (`EEXIST` for [`DeviceExists`],
    /// `ENODEV` for [`NoSuchDevice`] and [`NoSuchMgmtDev`], `EPERM` for [`PermissionDenied`],
    /// `ENOENT` for [`FamilyNotFound`]).
    ///
    /// [`DeviceExists`]: NetlinkError::DeviceExists
    /// [`NoSuchDevice`]: NetlinkError::NoSuchDevice
    /// [`NoSuchMgmtDev`]: NetlinkError::NoSuchMgmtDev
    /// [`PermissionDenied`]: NetlinkError::PermissionDenied
    /// [`FamilyNotFound`]: NetlinkError::FamilyNotFound
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::FamilyNotFound => Some(libc::ENOENT),
            NetlinkError::PermissionDenied { .. } => Some(libc::EPERM),
            NetlinkError::DeviceExists { .. } => Some(libc::EEXIST),
            NetlinkError::NoSuchDevice { .. } | NetlinkError::NoSuchMgmtDev { .. } => {
                Some(libc::ENODEV)
            }
            NetlinkError::Kernel { source, .. } | NetlinkError::Io { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

fn malformed(what: impl Into<String>) -> NetlinkError {
    NetlinkError::Malformed(what.into())
}

/// A vdpa management device (`vdpa mgmtdev show`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MgmtDev {
    /// Bus name for a device on a bus (e.g. `"pci"`); `None` for `"vduse"` and the simulators.
    pub bus: Option<String>,
    /// Device name (`"vduse"`, or e.g. `"0000:03:00.0"` on the pci bus).
    pub name: String,
    /// Bit mask of the virtio device ids it can create (bit 2: block, bit 1: net).
    pub supported_classes: u64,
}

/// A vdpa device (`vdpa dev show`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VdpaDevice {
    /// Device name (for VDUSE, the name of `/dev/vduse/NAME`).
    pub name: String,
    /// The management device that created it: its name, or `bus/name` when it is on a bus.
    pub mgmtdev: String,
    /// virtio device id (2 for block).
    pub device_id: u32,
    /// virtio vendor id (0 if the kernel did not report it).
    pub vendor_id: u32,
    /// Number of virtqueues (0 if the kernel did not report it).
    pub max_vqs: u32,
    /// Largest virtqueue size (0 if the kernel did not report it).
    pub max_vq_size: u16,
}

/// A generic netlink socket talking to the kernel's `vdpa` family.
///
/// Requests block until the kernel answers. Adding a VDUSE device probes its kernel driver
/// right away (virtio_vdpa or vhost_vdpa), which talks to the userspace device: the process
/// serving `/dev/vduse/NAME` must be answering its messages, or
/// [`add_device`](Self::add_device) waits for the VDUSE message timeout.
pub struct VdpaNetlink {
    sock: OwnedFd,
    family: u16,
    seq: u32,
    buf: Vec<u8>,
}

impl fmt::Debug for VdpaNetlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VdpaNetlink")
            .field("sock", &self.sock)
            .field("family", &self.family)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl VdpaNetlink {
    /// Opens a generic netlink socket and resolves the `vdpa` family.
    ///
    /// Fails with [`NetlinkError::FamilyNotFound`] when the vdpa module is not loaded.
    /// Listing needs no privilege; adding and deleting devices needs `CAP_NET_ADMIN`.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut nl = Self::connect()?;
        nl.family = match nl.resolve_family(VDPA_GENL_NAME) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(NetlinkError::FamilyNotFound)
            }
            r => r?,
        };
        Ok(nl)
    }

    /// The socket, not yet bound to a family.
    fn connect() -> Result<Self, NetlinkError> {
        Ok(VdpaNetlink {
            sock: new_socket()?,
            family: 0,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// The id of generic netlink family `name`, from the controller.
    fn resolve_family(&mut self, name: &str) -> Result<u16, NetlinkError> {
        let mut req = Request::new(
            GENL_ID_CTRL,
            NLM_F_REQUEST | NLM_F_ACK,
            CTRL_CMD_GETFAMILY,
            CTRL_VERSION,
        );
        req.put_strz(CTRL_ATTR_FAMILY_NAME, name, "generic netlink family name")?;
        let op = format!("resolve generic netlink family '{name}'");
        let mut id = None;
        self.transact(req, &op, GENL_ID_CTRL, |attrs| {
            for a in Attrs::new(attrs) {
                let a = a?;
                if a.kind == CTRL_ATTR_FAMILY_ID {
                    id = Some(a.u16()?);
                }
            }
            Ok(())
        })?;
        id.ok_or_else(|| malformed("family reply without CTRL_ATTR_FAMILY_ID"))
    }

    /// Lists the management devices (`vdpa mgmtdev show`).
    pub fn list_mgmtdevs(&mut self) -> Result<Vec<MgmtDev>, NetlinkError> {
        self.dump(
            VDPA_CMD_MGMTDEV_GET,
            "list vdpa management devices",
            parse_mgmtdev,
        )
    }

    /// Lists the vdpa devices (`vdpa dev show`).
    pub fn list_devices(&mut self) -> Result<Vec<VdpaDevice>, NetlinkError> {
        self.dump(VDPA_CMD_DEV_GET, "list vdpa devices", parse_device)
    }

    /// Adds vdpa device `name` through management device `mgmtdev` and waits for the kernel's
    /// acknowledgement (`vdpa dev add name NAME mgmtdev MGMTDEV`).
    ///
    /// For VDUSE, `mgmtdev` is [`VDUSE_MGMTDEV`] and `name` is the name of an existing VDUSE
    /// device whose virtqueues are all set up. A management device on a bus is given as
    /// `bus/name` (e.g. `pci/0000:03:00.0`). The kernel binds a vdpa bus driver right away.
    pub fn add_device(&mut self, name: &str, mgmtdev: &str) -> Result<(), NetlinkError> {
        let (bus, mdev) = split_mgmtdev(mgmtdev)?;
        let mut req = Request::new(
            self.family,
            NLM_F_REQUEST | NLM_F_ACK,
            VDPA_CMD_DEV_NEW,
            VDPA_GENL_VERSION,
        );
        if let Some(bus) = bus {
            req.put_strz(
                VDPA_ATTR_MGMTDEV_BUS_NAME,
                bus,
                "management device bus name",
            )?;
        }
        req.put_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, mdev, "management device name")?;
        req.put_strz(VDPA_ATTR_DEV_NAME, name, "device name")?;
        let op = format!("vdpa dev add name {name} mgmtdev {mgmtdev}");
        match self.transact(req, &op, self.family, |_| Ok(())) {
            Ok(()) => Ok(()),
            Err(NetlinkError::Kernel { source, ext, .. }) => Err(match source.raw_os_error() {
                Some(libc::EEXIST) => NetlinkError::DeviceExists { name: name.into() },
                Some(libc::ENODEV) => NetlinkError::NoSuchMgmtDev {
                    mgmtdev: mgmtdev.into(),
                    hint: if mgmtdev == VDUSE_MGMTDEV {
                        "load the vduse module (modprobe vduse)".into()
                    } else {
                        "`vudev vdpa list` shows the management devices".into()
                    },
                },
                Some(libc::EINVAL) if mgmtdev == VDUSE_MGMTDEV => NetlinkError::Kernel {
                    op,
                    source,
                    ext,
                    hint: Some(format!(
                        "is there a VDUSE device named '{name}' (/dev/vduse/{name}) with all \
                         its virtqueues set up?"
                    )),
                },
                _ => NetlinkError::Kernel {
                    op,
                    source,
                    ext,
                    hint: None,
                },
            }),
            Err(e) => Err(e),
        }
    }

    /// Deletes vdpa device `name` and waits for the kernel's acknowledgement
    /// (`vdpa dev del NAME`). The VDUSE device itself stays; only its vdpa device goes.
    pub fn del_device(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut req = Request::new(
            self.family,
            NLM_F_REQUEST | NLM_F_ACK,
            VDPA_CMD_DEV_DEL,
            VDPA_GENL_VERSION,
        );
        req.put_strz(VDPA_ATTR_DEV_NAME, name, "device name")?;
        let op = format!("vdpa dev del {name}");
        match self.transact(req, &op, self.family, |_| Ok(())) {
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV) =>
            {
                Err(NetlinkError::NoSuchDevice { name: name.into() })
            }
            r => r,
        }
    }

    /// Runs dump `cmd` of the vdpa family, parsing each entry's attributes with `parse`.
    fn dump<T>(
        &mut self,
        cmd: u8,
        op: &str,
        parse: fn(&[u8]) -> Result<T, NetlinkError>,
    ) -> Result<Vec<T>, NetlinkError> {
        for _ in 0..DUMP_ATTEMPTS {
            let req = Request::new(
                self.family,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP,
                cmd,
                VDPA_GENL_VERSION,
            );
            let mut out = Vec::new();
            let result = self.transact(req, op, self.family, |attrs| {
                if out.len() >= MAX_DUMP_ENTRIES {
                    return Err(NetlinkError::TooManyEntries { op: op.into() });
                }
                out.push(parse(attrs)?);
                Ok(())
            });
            match result {
                Ok(()) => return Ok(out),
                Err(NetlinkError::DumpInterrupted { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(NetlinkError::DumpInterrupted { op: op.into() })
    }

    /// Sends `req` and hands the attributes of every reply of type `family` to `on_reply`,
    /// until the acknowledgement (a request) or the end of the dump (a dump request).
    fn transact(
        &mut self,
        mut req: Request,
        op: &str,
        family: u16,
        mut on_reply: impl FnMut(&[u8]) -> Result<(), NetlinkError>,
    ) -> Result<(), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut state = Exchange {
            seq: self.seq,
            family,
            dump: req.flags() & NLM_F_DUMP == NLM_F_DUMP,
            interrupted: false,
        };
        self.send(req.finish(state.seq), op)?;
        let result = self.receive(&mut state, op, &mut on_reply);
        if result.is_err() && state.dump {
            // A dump cut short stays running on the socket (the kernel would refuse the next
            // dump with EBUSY until this one is read to its end): carry on with a fresh socket.
            match new_socket() {
                Ok(sock) => self.sock = sock,
                Err(e) => tracing::warn!("cannot replace the netlink socket: {e}"),
            }
        }
        result
    }

    /// Receives datagrams until `state` says the exchange is complete.
    fn receive(
        &mut self,
        state: &mut Exchange,
        op: &str,
        on_reply: &mut impl FnMut(&[u8]) -> Result<(), NetlinkError>,
    ) -> Result<(), NetlinkError> {
        loop {
            let n = self.recv(op)?;
            let finished = state
                .process(&self.buf[..n], on_reply)
                .map_err(|e| refine(e, op))?;
            if finished {
                return if state.interrupted {
                    Err(NetlinkError::DumpInterrupted { op: op.into() })
                } else {
                    Ok(())
                };
            }
        }
    }

    fn send(&self, bytes: &[u8], op: &str) -> Result<(), NetlinkError> {
        // SAFETY: an all-zero sockaddr_nl is a valid value; pid 0 addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `bytes` is a live buffer of the length passed, `addr` a valid sockaddr_nl
            // of the size passed; the socket is ours.
            let n = unsafe {
                libc::sendto(
                    self.sock.as_raw_fd(),
                    bytes.as_ptr().cast::<libc::c_void>(),
                    bytes.len(),
                    0,
                    (&addr as *const libc::sockaddr_nl).cast::<libc::sockaddr>(),
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return if n as usize == bytes.len() {
                    Ok(())
                } else {
                    Err(NetlinkError::Io {
                        op: format!("{op}: send request"),
                        source: io::Error::new(io::ErrorKind::WriteZero, "short netlink send"),
                    })
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(NetlinkError::Io {
                    op: format!("{op}: send request"),
                    source: e,
                });
            }
        }
    }

    /// Receives one datagram from the kernel into `self.buf`; returns its length.
    fn recv(&mut self, op: &str) -> Result<usize, NetlinkError> {
        loop {
            // SAFETY: an all-zero sockaddr_nl is a valid value.
            let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
            let mut addr_len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `self.buf` is a live, writable buffer of the length passed; `addr` and
            // `addr_len` are valid for writes and `addr_len` holds the size of `addr`.
            // MSG_TRUNC makes a netlink socket return the full datagram length even when the
            // buffer is smaller, which is checked below.
            let n = unsafe {
                libc::recvfrom(
                    self.sock.as_raw_fd(),
                    self.buf.as_mut_ptr().cast::<libc::c_void>(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                    (&mut addr as *mut libc::sockaddr_nl).cast::<libc::sockaddr>(),
                    &mut addr_len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Io {
                    op: format!("{op}: receive reply"),
                    source: e,
                });
            }
            let n = n as usize;
            if n > self.buf.len() {
                return Err(NetlinkError::Truncated { len: n });
            }
            if addr.nl_pid != 0 {
                tracing::debug!(
                    "ignoring a netlink datagram from port {} (not the kernel)",
                    addr.nl_pid
                );
                continue;
            }
            return Ok(n);
        }
    }
}

/// A generic netlink socket bound to an automatic port, with extended acks asked for.
fn new_socket() -> Result<OwnedFd, NetlinkError> {
    let io_err = |op: &str| NetlinkError::Io {
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
fn refine(e: NetlinkError, op: &str) -> NetlinkError {
    match e {
        NetlinkError::Kernel {
            source, ext, hint, ..
        } => match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                NetlinkError::PermissionDenied { op: op.into() }
            }
            _ => NetlinkError::Kernel {
                op: op.into(),
                source,
                ext,
                hint,
            },
        },
        NetlinkError::DumpInterrupted { .. } => NetlinkError::DumpInterrupted { op: op.into() },
        e => e,
    }
}

/// Splits `bus/name` (one slash at most, like iproute2) into its parts.
fn split_mgmtdev(mgmtdev: &str) -> Result<(Option<&str>, &str), NetlinkError> {
    let bad = |reason| NetlinkError::InvalidName {
        what: "management device",
        value: mgmtdev.into(),
        reason,
    };
    match mgmtdev.split_once('/') {
        None => Ok((None, mgmtdev)),
        Some((bus, name)) => {
            if name.contains('/') {
                Err(bad("expected NAME or BUS/NAME"))
            } else if bus.is_empty() || name.is_empty() {
                Err(bad("empty bus or device name in BUS/NAME"))
            } else {
                Ok((Some(bus), name))
            }
        }
    }
}

/// State of one request/reply exchange.
#[derive(Debug)]
struct Exchange {
    seq: u32,
    family: u16,
    dump: bool,
    interrupted: bool,
}

impl Exchange {
    /// Processes one datagram. Returns true when the exchange is complete (acknowledged, or
    /// the dump is done); replies to other requests are skipped.
    fn process(
        &mut self,
        datagram: &[u8],
        on_reply: &mut impl FnMut(&[u8]) -> Result<(), NetlinkError>,
    ) -> Result<bool, NetlinkError> {
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
fn kernel_error(errno: i32, ext: Option<String>) -> NetlinkError {
    // The kernel sends -errno; take the magnitude without overflowing on i32::MIN.
    let code = i32::try_from(errno.unsigned_abs()).unwrap_or(i32::MAX);
    NetlinkError::Kernel {
        op: String::new(),
        source: io::Error::from_raw_os_error(code),
        ext,
        hint: None,
    }
}

fn read_i32(b: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

fn read_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

fn read_u16(b: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The extended-ack message of an NLMSG_ERROR payload: the error code, the echoed request
/// (its header only when NLM_F_CAPPED), then attributes when NLM_F_ACK_TLVS.
fn error_ext_ack(flags: u16, payload: &[u8]) -> Option<String> {
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
fn ext_ack_message(tlvs: &[u8]) -> Option<String> {
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
struct Request {
    buf: Vec<u8>,
}

impl Request {
    fn new(family: u16, flags: u16, cmd: u8, version: u8) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN + GENL_HDRLEN];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[NLMSG_HDRLEN] = cmd;
        buf[NLMSG_HDRLEN + 1] = version;
        Request { buf }
    }

    fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.buf[6], self.buf[7]])
    }

    /// Appends attribute `kind` holding `value`, padded to 4 bytes.
    fn put(&mut self, kind: u16, value: &[u8]) -> Result<(), NetlinkError> {
        let len =
            u16::try_from(NLA_HDRLEN + value.len()).map_err(|_| NetlinkError::InvalidName {
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
    fn put_strz(&mut self, kind: u16, s: &str, what: &'static str) -> Result<(), NetlinkError> {
        let bad = |reason| NetlinkError::InvalidName {
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
    fn finish(&mut self, seq: u32) -> &[u8] {
        // A request holds a few attributes of at most 64 KiB each: far below u32::MAX.
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

/// One netlink message of a datagram.
#[derive(Clone, Copy, Debug)]
struct Message<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The netlink messages of a datagram, every length checked. After an error it ends.
struct Messages<'a> {
    data: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(data: &'a [u8]) -> Self {
        Messages { data }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, NetlinkError>;

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

/// One netlink attribute (type with the NESTED and NET_BYTEORDER flags masked off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attr<'a> {
    kind: u16,
    value: &'a [u8],
}

impl Attr<'_> {
    fn wrong_size(&self, want: &str) -> NetlinkError {
        malformed(format!(
            "attribute {} has {} bytes, want {want}",
            self.kind,
            self.value.len()
        ))
    }

    fn u16(&self) -> Result<u16, NetlinkError> {
        let b: [u8; 2] = self.value.try_into().map_err(|_| self.wrong_size("2"))?;
        Ok(u16::from_ne_bytes(b))
    }

    fn u32(&self) -> Result<u32, NetlinkError> {
        let b: [u8; 4] = self.value.try_into().map_err(|_| self.wrong_size("4"))?;
        Ok(u32::from_ne_bytes(b))
    }

    fn u64(&self) -> Result<u64, NetlinkError> {
        let b: [u8; 8] = self.value.try_into().map_err(|_| self.wrong_size("8"))?;
        Ok(u64::from_ne_bytes(b))
    }

    /// A string attribute: up to the first NUL (the kernel always sends one); invalid UTF-8
    /// is replaced rather than refused, so one odd name does not hide the others.
    fn string(&self) -> Result<String, NetlinkError> {
        let end = self
            .value
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.value.len());
        Ok(String::from_utf8_lossy(&self.value[..end]).into_owned())
    }
}

/// The attributes of a payload, every length checked. After an error it ends. Fewer than 4
/// trailing bytes are ignored, as the kernel and libmnl do.
struct Attrs<'a> {
    data: &'a [u8],
}

impl<'a> Attrs<'a> {
    fn new(data: &'a [u8]) -> Self {
        Attrs { data }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        let data = mem::take(&mut self.data);
        if data.len() < NLA_HDRLEN {
            return None;
        }
        let len = read_u16(data)? as usize;
        let kind = read_u16(&data[2..])? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > data.len() {
            return Some(Err(malformed(format!(
                "attribute {kind} length {len} outside 4..={}",
                data.len()
            ))));
        }
        self.data = data.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(Attr {
            kind,
            value: &data[NLA_HDRLEN..len],
        }))
    }
}

/// One entry of the VDPA_CMD_MGMTDEV_GET dump.
fn parse_mgmtdev(attrs: &[u8]) -> Result<MgmtDev, NetlinkError> {
    let mut bus = None;
    let mut name = None;
    let mut supported_classes = 0;
    for a in Attrs::new(attrs) {
        let a = a?;
        match a.kind {
            VDPA_ATTR_MGMTDEV_BUS_NAME => bus = Some(a.string()?),
            VDPA_ATTR_MGMTDEV_DEV_NAME => name = Some(a.string()?),
            VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES => supported_classes = a.u64()?,
            _ => {}
        }
    }
    Ok(MgmtDev {
        bus,
        name: name.ok_or_else(|| {
            malformed("management device entry without VDPA_ATTR_MGMTDEV_DEV_NAME")
        })?,
        supported_classes,
    })
}

/// One entry of the VDPA_CMD_DEV_GET dump.
fn parse_device(attrs: &[u8]) -> Result<VdpaDevice, NetlinkError> {
    let mut bus: Option<String> = None;
    let mut mgmtdev = None;
    let mut name = None;
    let mut device_id = None;
    let mut d = VdpaDevice::default();
    for a in Attrs::new(attrs) {
        let a = a?;
        match a.kind {
            VDPA_ATTR_MGMTDEV_BUS_NAME => bus = Some(a.string()?),
            VDPA_ATTR_MGMTDEV_DEV_NAME => mgmtdev = Some(a.string()?),
            VDPA_ATTR_DEV_NAME => name = Some(a.string()?),
            VDPA_ATTR_DEV_ID => device_id = Some(a.u32()?),
            VDPA_ATTR_DEV_VENDOR_ID => d.vendor_id = a.u32()?,
            VDPA_ATTR_DEV_MAX_VQS => d.max_vqs = a.u32()?,
            VDPA_ATTR_DEV_MAX_VQ_SIZE => d.max_vq_size = a.u16()?,
            _ => {}
        }
    }
    d.name = name.ok_or_else(|| malformed("device entry without VDPA_ATTR_DEV_NAME"))?;
    let mgmtdev = mgmtdev.ok_or_else(|| {
        malformed(format!(
            "device '{}' without VDPA_ATTR_MGMTDEV_DEV_NAME",
            d.name
        ))
    })?;
    d.mgmtdev = match bus {
        Some(bus) => format!("{bus}/{mgmtdev}"),
        None => mgmtdev,
    };
    d.device_id = device_id
        .ok_or_else(|| malformed(format!("device '{}' without VDPA_ATTR_DEV_ID", d.name)))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAMILY: u16 = 0x1c;

    /// A kernel-style reply: a request built with the same builder, given a type and flags.
    fn reply(flags: u16, seq: u32, build: impl FnOnce(&mut Request)) -> Vec<u8> {
        let mut r = Request::new(FAMILY, flags, VDPA_CMD_DEV_NEW, VDPA_GENL_VERSION);
        build(&mut r);
        r.finish(seq).to_vec()
    }

    fn control(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
        m
    }

    fn device_attrs(r: &mut Request) {
        r.put_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, "vduse", "x")
            .unwrap();
        r.put_strz(VDPA_ATTR_DEV_NAME, "vdisk0", "x").unwrap();
        r.put(VDPA_ATTR_DEV_ID, &2u32.to_ne_bytes()).unwrap();
        r.put(VDPA_ATTR_DEV_VENDOR_ID, &0x1af4u32.to_ne_bytes())
            .unwrap();
        r.put(VDPA_ATTR_DEV_MAX_VQS, &4u32.to_ne_bytes()).unwrap();
        r.put(VDPA_ATTR_DEV_MAX_VQ_SIZE, &256u16.to_ne_bytes())
            .unwrap();
        r.put(9, &1u16.to_ne_bytes()).unwrap(); // VDPA_ATTR_DEV_MIN_VQ_SIZE: ignored
    }

    fn run(ex: &mut Exchange, dgram: &[u8]) -> (Result<bool, NetlinkError>, Vec<Vec<u8>>) {
        let mut got = Vec::new();
        let r = ex.process(dgram, &mut |a: &[u8]| {
            got.push(a.to_vec());
            Ok(())
        });
        (r, got)
    }

    fn exchange(seq: u32, dump: bool) -> Exchange {
        Exchange {
            seq,
            family: FAMILY,
            dump,
            interrupted: false,
        }
    }

    #[test]
    fn builds_a_request() {
        let mut m = Request::new(FAMILY, NLM_F_REQUEST | NLM_F_ACK, VDPA_CMD_DEV_NEW, 1);
        m.put_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, "vduse", "x")
            .unwrap();
        m.put_strz(VDPA_ATTR_DEV_NAME, "vdisk0", "x").unwrap();
        let b = m.finish(7).to_vec();
        // "vduse\0" is 6 bytes, padded to 8; "vdisk0\0" is 7, padded to 8.
        assert_eq!(b.len(), 16 + 4 + (4 + 8) + (4 + 8));
        assert_eq!(read_u32(&b).unwrap() as usize, b.len());
        assert_eq!(read_u16(&b[4..]).unwrap(), FAMILY);
        assert_eq!(read_u16(&b[6..]).unwrap(), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(read_u32(&b[8..]).unwrap(), 7);
        assert_eq!(read_u32(&b[12..]).unwrap(), 0);
        assert_eq!(&b[16..20], &[VDPA_CMD_DEV_NEW, 1, 0, 0]);
        // The attribute length excludes the padding.
        assert_eq!(read_u16(&b[20..]).unwrap(), 10);
        assert_eq!(&b[30..32], &[0, 0]);
        let attrs: Vec<_> = Attrs::new(&b[20..]).map(Result::unwrap).collect();
        assert_eq!(
            attrs,
            vec![
                Attr {
                    kind: VDPA_ATTR_MGMTDEV_DEV_NAME,
                    value: b"vduse\0"
                },
                Attr {
                    kind: VDPA_ATTR_DEV_NAME,
                    value: b"vdisk0\0"
                },
            ]
        );
        let msgs: Vec<_> = Messages::new(&b).map(Result::unwrap).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].seq, 7);
        assert_eq!(msgs[0].payload.len(), b.len() - 16);
    }

    #[test]
    fn refuses_unsendable_names() {
        let mut m = Request::new(FAMILY, NLM_F_REQUEST, VDPA_CMD_DEV_DEL, 1);
        assert!(m.put_strz(VDPA_ATTR_DEV_NAME, "", "device name").is_err());
        assert!(m
            .put_strz(VDPA_ATTR_DEV_NAME, "a\0b", "device name")
            .is_err());
        let long = "x".repeat(256);
        let e = m.put_strz(VDPA_ATTR_DEV_NAME, &long, "device name");
        assert!(matches!(e, Err(NetlinkError::InvalidName { .. })));
        assert!(m.put(1, &vec![0; 70_000]).is_err());
        assert_eq!(m.buf.len(), 20, "nothing appended on error");
        assert_eq!(split_mgmtdev("vduse").unwrap(), (None, "vduse"));
        assert_eq!(
            split_mgmtdev("pci/0000:03:00.0").unwrap(),
            (Some("pci"), "0000:03:00.0")
        );
        assert!(split_mgmtdev("a/b/c").is_err());
        assert!(split_mgmtdev("/b").is_err());
    }

    #[test]
    fn parses_a_device_and_a_mgmtdev() {
        let b = reply(NLM_F_MULTI, 1, device_attrs);
        let d = parse_device(&b[20..]).unwrap();
        assert_eq!(
            d,
            VdpaDevice {
                name: "vdisk0".into(),
                mgmtdev: "vduse".into(),
                device_id: 2,
                vendor_id: 0x1af4,
                max_vqs: 4,
                max_vq_size: 256,
            }
        );

        let b = reply(NLM_F_MULTI, 1, |r| {
            r.put_strz(VDPA_ATTR_MGMTDEV_BUS_NAME, "pci", "x").unwrap();
            r.put_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, "0000:03:00.0", "x")
                .unwrap();
            r.put(0, &[0; 0]).unwrap(); // VDPA_ATTR_PAD before a u64
            r.put(VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES, &6u64.to_ne_bytes())
                .unwrap();
            r.put(19, &0u64.to_ne_bytes()).unwrap(); // newer attributes: ignored
        });
        let m = parse_mgmtdev(&b[20..]).unwrap();
        assert_eq!(m.bus.as_deref(), Some("pci"));
        assert_eq!(m.name, "0000:03:00.0");
        assert_eq!(m.supported_classes, 6);

        // A device of a bus management device shows as bus/name.
        let b = reply(0, 1, |r| {
            device_attrs(r);
            r.put_strz(VDPA_ATTR_MGMTDEV_BUS_NAME, "pci", "x").unwrap();
        });
        assert_eq!(parse_device(&b[20..]).unwrap().mgmtdev, "pci/vduse");
    }

    #[test]
    fn malformed_attributes_are_errors() {
        // Length past the end, below the header size, zero.
        assert!(Attrs::new(&[200, 0, 1, 0, 1, 2]).next().unwrap().is_err());
        assert!(Attrs::new(&[3, 0, 1, 0]).next().unwrap().is_err());
        assert!(Attrs::new(&[0, 0, 1, 0]).next().unwrap().is_err());
        // Fewer than 4 trailing bytes are ignored; the iterator ends after an error.
        assert!(Attrs::new(&[8, 0]).next().is_none());
        let mut it = Attrs::new(&[9, 0, 1, 0, 0, 0, 0, 0]);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
        // Unaligned last attribute without padding is accepted.
        let a: Vec<_> = Attrs::new(&[5, 0, 4, 0, b'x']).collect();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].as_ref().unwrap().string().unwrap(), "x");

        // Integers of the wrong size.
        let a = Attr {
            kind: 5,
            value: &[1, 2, 3],
        };
        assert!(a.u16().is_err() && a.u32().is_err() && a.u64().is_err());

        // A device entry with a short u32, or no name, or no mgmtdev, or no id.
        let b = reply(0, 1, |r| {
            r.put_strz(VDPA_ATTR_DEV_NAME, "d", "x").unwrap();
            r.put(VDPA_ATTR_DEV_ID, &[2, 0]).unwrap();
        });
        assert!(matches!(
            parse_device(&b[20..]),
            Err(NetlinkError::Malformed(_))
        ));
        let b = reply(0, 1, |r| {
            r.put(VDPA_ATTR_DEV_ID, &2u32.to_ne_bytes()).unwrap();
        });
        assert!(parse_device(&b[20..]).is_err());
        let b = reply(0, 1, |r| {
            r.put_strz(VDPA_ATTR_DEV_NAME, "d", "x").unwrap();
            r.put(VDPA_ATTR_DEV_ID, &2u32.to_ne_bytes()).unwrap();
        });
        assert!(parse_device(&b[20..]).is_err());
        let b = reply(0, 1, |r| {
            r.put_strz(VDPA_ATTR_DEV_NAME, "d", "x").unwrap();
            r.put_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, "vduse", "x")
                .unwrap();
        });
        assert!(parse_device(&b[20..]).is_err());
        assert!(parse_mgmtdev(&[]).is_err());
        // A truncated entry.
        let b = reply(0, 1, device_attrs);
        assert!(parse_device(&b[20..b.len() - 12]).is_err());
    }

    #[test]
    fn malformed_messages_are_errors() {
        let mut dg = reply(0, 1, device_attrs);
        // Length past the datagram, below the header size.
        dg[0..4].copy_from_slice(&4096u32.to_ne_bytes());
        assert!(Messages::new(&dg).next().unwrap().is_err());
        dg[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(Messages::new(&dg).next().unwrap().is_err());
        // Trailing bytes shorter than a header.
        let mut two = reply(0, 1, device_attrs);
        two.extend_from_slice(&[1, 2, 3]);
        let mut it = Messages::new(&two);
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
        // A reply shorter than the genl header, and an unknown message type.
        let mut ex = exchange(1, true);
        assert!(run(&mut ex, &control(FAMILY, NLM_F_MULTI, 1, &[5, 1]))
            .0
            .is_err());
        assert!(run(&mut ex, &control(0x99, NLM_F_MULTI, 1, &[0; 4]))
            .0
            .is_err());
        // Error and done messages without their error code.
        let mut ex = exchange(1, false);
        assert!(run(&mut ex, &control(NLMSG_ERROR, 0, 1, &[])).0.is_err());
        assert!(matches!(
            run(
                &mut ex,
                &control(NLMSG_ERROR, 0, 1, &i32::MIN.to_ne_bytes())
            )
            .0,
            Err(NetlinkError::Kernel { .. })
        ));
        // NLMSG_ERROR with bogus extended-ack lengths: still the error, no message.
        let mut p = (-libc::EINVAL).to_ne_bytes().to_vec();
        p.extend_from_slice(&u32::MAX.to_ne_bytes());
        p.extend_from_slice(&[0; 12]);
        match run(&mut ex, &control(NLMSG_ERROR, NLM_F_ACK_TLVS, 1, &p)).0 {
            Err(NetlinkError::Kernel { source, ext, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
                assert_eq!(ext, None);
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn multi_part_dump_until_done() {
        let mut ex = exchange(5, true);
        // First datagram: two entries, plus a stale message of another sequence.
        let mut dg = reply(NLM_F_MULTI, 5, device_attrs);
        dg.extend(reply(NLM_F_MULTI, 4, device_attrs));
        dg.extend(reply(NLM_F_MULTI, 5, device_attrs));
        let (r, got) = run(&mut ex, &dg);
        assert!(!r.unwrap());
        assert_eq!(got.len(), 2);
        assert_eq!(parse_device(&got[1]).unwrap().name, "vdisk0");
        // Second datagram: one more entry, then NLMSG_DONE.
        let mut dg = reply(NLM_F_MULTI, 5, device_attrs);
        dg.extend(control(NLMSG_DONE, NLM_F_MULTI, 5, &0i32.to_ne_bytes()));
        let (r, got) = run(&mut ex, &dg);
        assert!(r.unwrap());
        assert_eq!(got.len(), 1);
        assert!(!ex.interrupted);
    }

    #[test]
    fn dump_errors_and_interruptions() {
        // A dump that fails midway: NLMSG_DONE with -errno and an extended-ack message.
        let mut tlv = Request::new(0, 0, 0, 0);
        tlv.put_strz(NLMSGERR_ATTR_MSG, "vdpa: something broke", "x")
            .unwrap();
        let mut p = (-libc::EMSGSIZE).to_ne_bytes().to_vec();
        p.extend_from_slice(&tlv.buf[20..]);
        let mut ex = exchange(3, true);
        match run(
            &mut ex,
            &control(NLMSG_DONE, NLM_F_MULTI | NLM_F_ACK_TLVS, 3, &p),
        )
        .0
        {
            Err(NetlinkError::Kernel { source, ext, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EMSGSIZE));
                assert_eq!(ext.as_deref(), Some("vdpa: something broke"));
            }
            r => panic!("{r:?}"),
        }
        // An ack in the middle of a dump does not end it; DUMP_INTR is noted.
        let mut ex = exchange(3, true);
        let mut dg = control(NLMSG_ERROR, 0, 3, &[0; 20]);
        dg.extend(reply(NLM_F_MULTI | NLM_F_DUMP_INTR, 3, device_attrs));
        let (r, got) = run(&mut ex, &dg);
        assert!(!r.unwrap());
        assert_eq!(got.len(), 1);
        assert!(ex.interrupted);
        // A dump answered by NLMSG_OVERRUN.
        assert!(run(&mut ex, &control(NLMSG_OVERRUN, 0, 3, &[])).0.is_err());
    }

    #[test]
    fn acks_and_extended_ack_messages() {
        let mut ex = exchange(9, false);
        // A reply then the ack.
        let mut dg = reply(0, 9, device_attrs);
        let mut ack = 0i32.to_ne_bytes().to_vec();
        ack.extend_from_slice(&dg[..16]);
        dg.extend(control(NLMSG_ERROR, NLM_F_CAPPED, 9, &ack));
        let (r, got) = run(&mut ex, &dg);
        assert!(r.unwrap());
        assert_eq!(got.len(), 1);

        // A capped error with a message: error code, echoed header, TLVs.
        let req = Request::new(FAMILY, NLM_F_REQUEST | NLM_F_ACK, VDPA_CMD_DEV_DEL, 1)
            .finish(9)
            .to_vec();
        let mut tlv = Request::new(0, 0, 0, 0);
        tlv.put_strz(NLMSGERR_ATTR_MSG, "vdpa: device not found", "x")
            .unwrap();
        let mut p = (-libc::ENODEV).to_ne_bytes().to_vec();
        p.extend_from_slice(&req[..16]);
        p.extend_from_slice(&tlv.buf[20..]);
        let flags = NLM_F_CAPPED | NLM_F_ACK_TLVS;
        let e = run(&mut exchange(9, false), &control(NLMSG_ERROR, flags, 9, &p))
            .0
            .unwrap_err();
        let e = refine(e, "vdpa dev del x");
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
        let text = e.to_string();
        assert!(text.starts_with("vdpa dev del x: "), "{text}");
        assert!(text.ends_with("(kernel: vdpa: device not found)"), "{text}");

        // The same, uncapped: the whole request is echoed before the TLVs.
        let mut p = (-libc::ENODEV).to_ne_bytes().to_vec();
        p.extend_from_slice(&req);
        p.extend_from_slice(&tlv.buf[20..]);
        let (r, _) = run(
            &mut exchange(9, false),
            &control(NLMSG_ERROR, NLM_F_ACK_TLVS, 9, &p),
        );
        match r {
            Err(NetlinkError::Kernel { ext, .. }) => {
                assert_eq!(ext.as_deref(), Some("vdpa: device not found"))
            }
            r => panic!("{r:?}"),
        }

        // EPERM becomes the CAP_NET_ADMIN hint.
        let p = (-libc::EPERM).to_ne_bytes();
        let e = run(&mut exchange(9, false), &control(NLMSG_ERROR, 0, 9, &p))
            .0
            .unwrap_err();
        let text = refine(e, "vdpa dev add name x mgmtdev vduse").to_string();
        assert!(text.contains("need CAP_NET_ADMIN (run as root)"), "{text}");
    }

    #[test]
    fn error_messages_name_the_fix() {
        assert!(NetlinkError::FamilyNotFound
            .to_string()
            .contains("modprobe vdpa"));
        let e = NetlinkError::DeviceExists { name: "vd0".into() };
        assert!(e
            .to_string()
            .starts_with("a vdpa device named 'vd0' already exists"));
        let e = NetlinkError::Kernel {
            op: "vdpa dev add name vd0 mgmtdev vduse".into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
            ext: None,
            hint: Some("is there a VDUSE device?".into()),
        };
        assert!(e.to_string().ends_with(": is there a VDUSE device?"));
    }

    /// A generic netlink socket: every Linux host has one, so a failure here fails the test.
    fn live() -> VdpaNetlink {
        VdpaNetlink::connect().unwrap_or_else(|e| panic!("no generic netlink socket: {e}"))
    }

    #[test]
    fn live_resolves_the_controller_family() {
        let mut nl = live();
        assert_eq!(nl.resolve_family("nlctrl").unwrap(), GENL_ID_CTRL);
        let e = nl.resolve_family("no-such-family").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // Right after an error the socket still works.
        assert_eq!(nl.resolve_family("nlctrl").unwrap(), GENL_ID_CTRL);
    }

    #[test]
    fn live_dumps_the_families() {
        let mut nl = live();
        // Dump the controller's family list with the same machinery as the vdpa dumps.
        nl.family = GENL_ID_CTRL;
        let names = nl
            .dump(CTRL_CMD_GETFAMILY, "list families", |attrs| {
                let mut name = None;
                for a in Attrs::new(attrs) {
                    let a = a?;
                    if a.kind == CTRL_ATTR_FAMILY_NAME {
                        name = Some(a.string()?);
                    }
                }
                name.ok_or_else(|| malformed("no name"))
            })
            .unwrap();
        assert!(names.iter().any(|n| n == "nlctrl"), "{names:?}");

        // A dump abandoned midway (here: a parse error on its first entry) does not block
        // the next one.
        let e = nl
            .dump(CTRL_CMD_GETFAMILY, "list families", |_| {
                Err::<(), _>(malformed("refused"))
            })
            .unwrap_err();
        assert!(matches!(e, NetlinkError::Malformed(_)), "{e}");
        let again = nl
            .dump(CTRL_CMD_GETFAMILY, "list families", |_| Ok(()))
            .unwrap();
        assert_eq!(again.len(), names.len());
    }

    #[test]
    fn live_open_reports_a_missing_family_or_works() {
        match VdpaNetlink::open() {
            Ok(mut nl) => {
                // vdpa is loaded on this host: listing needs no privilege.
                nl.list_mgmtdevs().unwrap();
                nl.list_devices().unwrap();
            }
            // A host without vdpa (CONFIG_VDPA unset): the error that says so.
            Err(NetlinkError::FamilyNotFound) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

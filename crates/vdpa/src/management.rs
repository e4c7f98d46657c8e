//! vdpa device management over generic netlink: what iproute2's `vdpa` tool does, without it.
//!
//! [`VdpaNetlink`] talks to the kernel's `vdpa` generic netlink family
//! (`include/uapi/linux/vdpa.h`): resolve the family with the generic netlink controller, list
//! management devices and devices (dumps), add and delete a device (acknowledged requests).
//! VDUSE devices are added through the management device [`crate::VDUSE_MGMTDEV`], under the
//! name of the VDUSE device (`/dev/vduse/NAME`).
use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::*;
use crate::netlink::attrs::*;
use crate::netlink::consts::*;
use crate::netlink::message::*;
use crate::netlink::socket::*;

use crate::names::VDUSE_MGMTDEV;

// include/uapi/linux/vdpa.h
pub(crate) const VDPA_GENL_NAME: &str = "vdpa";
pub(crate) const VDPA_GENL_VERSION: u8 = 0x1;

// enum vdpa_command
pub(crate) const VDPA_CMD_MGMTDEV_GET: u8 = 2;
pub(crate) const VDPA_CMD_DEV_NEW: u8 = 3;
pub(crate) const VDPA_CMD_DEV_DEL: u8 = 4;
pub(crate) const VDPA_CMD_DEV_GET: u8 = 5;

// enum vdpa_attr (VDPA_ATTR_UNSPEC = VDPA_ATTR_PAD = 0)
pub(crate) const VDPA_ATTR_MGMTDEV_BUS_NAME: u16 = 1;
pub(crate) const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
pub(crate) const VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES: u16 = 3;
pub(crate) const VDPA_ATTR_DEV_NAME: u16 = 4;
pub(crate) const VDPA_ATTR_DEV_ID: u16 = 5;
pub(crate) const VDPA_ATTR_DEV_VENDOR_ID: u16 = 6;
pub(crate) const VDPA_ATTR_DEV_MAX_VQS: u16 = 7;
pub(crate) const VDPA_ATTR_DEV_MAX_VQ_SIZE: u16 = 8;

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
    pub(crate) sock: OwnedFd,
    pub(crate) family: u16,
    pub(crate) seq: u32,
    pub(crate) buf: Vec<u8>,
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
    /// Fails with [`Error::FamilyNotFound`] when the vdpa module is not loaded.
    /// Listing needs no privilege; adding and deleting devices needs `CAP_NET_ADMIN`.
    pub fn open() -> Result<Self, Error> {
        let mut nl = Self::connect()?;
        nl.family = match nl.resolve_family(VDPA_GENL_NAME) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(Error::FamilyNotFound),
            r => r?,
        };
        Ok(nl)
    }

    /// The socket, not yet bound to a family.
    pub(crate) fn connect() -> Result<Self, Error> {
        Ok(VdpaNetlink {
            sock: new_socket()?,
            family: 0,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// The id of generic netlink family `name`, from the controller.
    pub(crate) fn resolve_family(&mut self, name: &str) -> Result<u16, Error> {
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
    pub fn list_mgmtdevs(&mut self) -> Result<Vec<MgmtDev>, Error> {
        self.dump(
            VDPA_CMD_MGMTDEV_GET,
            "list vdpa management devices",
            parse_mgmtdev,
        )
    }

    /// Lists the vdpa devices (`vdpa dev show`).
    pub fn list_devices(&mut self) -> Result<Vec<VdpaDevice>, Error> {
        self.dump(VDPA_CMD_DEV_GET, "list vdpa devices", parse_device)
    }

    /// Adds vdpa device `name` through management device `mgmtdev` and waits for the kernel's
    /// acknowledgement (`vdpa dev add name NAME mgmtdev MGMTDEV`).
    ///
    /// For VDUSE, `mgmtdev` is [`VDUSE_MGMTDEV`] and `name` is the name of an existing VDUSE
    /// device whose virtqueues are all set up. A management device on a bus is given as
    /// `bus/name` (e.g. `pci/0000:03:00.0`). The kernel binds a vdpa bus driver right away.
    pub fn add_device(&mut self, name: &str, mgmtdev: &str) -> Result<(), Error> {
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
            Err(Error::Kernel { source, ext, .. }) => Err(match source.raw_os_error() {
                Some(libc::EEXIST) => Error::DeviceExists { name: name.into() },
                Some(libc::ENODEV) => Error::NoSuchMgmtDev {
                    mgmtdev: mgmtdev.into(),
                    hint: if mgmtdev == VDUSE_MGMTDEV {
                        "load the vduse module (modprobe vduse)".into()
                    } else {
                        "`vudev vdpa list` shows the management devices".into()
                    },
                },
                Some(libc::EINVAL) if mgmtdev == VDUSE_MGMTDEV => Error::Kernel {
                    op,
                    source,
                    ext,
                    hint: Some(format!(
                        "is there a VDUSE device named '{name}' (/dev/vduse/{name}) with all \
                         its virtqueues set up?"
                    )),
                },
                _ => Error::Kernel {
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
    pub fn del_device(&mut self, name: &str) -> Result<(), Error> {
        let mut req = Request::new(
            self.family,
            NLM_F_REQUEST | NLM_F_ACK,
            VDPA_CMD_DEV_DEL,
            VDPA_GENL_VERSION,
        );
        req.put_strz(VDPA_ATTR_DEV_NAME, name, "device name")?;
        let op = format!("vdpa dev del {name}");
        match self.transact(req, &op, self.family, |_| Ok(())) {
            Err(Error::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
                Err(Error::NoSuchDevice { name: name.into() })
            }
            r => r,
        }
    }

    /// Runs dump `cmd` of the vdpa family, parsing each entry's attributes with `parse`.
    pub(crate) fn dump<T>(
        &mut self,
        cmd: u8,
        op: &str,
        parse: fn(&[u8]) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
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
                    return Err(Error::TooManyEntries {
                        op: op.into(),
                        limit: MAX_DUMP_ENTRIES,
                    });
                }
                out.push(parse(attrs)?);
                Ok(())
            });
            match result {
                Ok(()) => return Ok(out),
                Err(Error::DumpInterrupted { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::DumpInterrupted { op: op.into() })
    }

    /// Sends `req` and hands the attributes of every reply of type `family` to `on_reply`,
    /// until the acknowledgement (a request) or the end of the dump (a dump request).
    pub(crate) fn transact(
        &mut self,
        mut req: Request,
        op: &str,
        family: u16,
        mut on_reply: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
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
    pub(crate) fn receive(
        &mut self,
        state: &mut Exchange,
        op: &str,
        on_reply: &mut impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        loop {
            let n = self.recv(op)?;
            let finished = state
                .process(&self.buf[..n], on_reply)
                .map_err(|e| refine(e, op))?;
            if finished {
                return if state.interrupted {
                    Err(Error::DumpInterrupted { op: op.into() })
                } else {
                    Ok(())
                };
            }
        }
    }

    pub(crate) fn send(&self, bytes: &[u8], op: &str) -> Result<(), Error> {
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
                    Err(Error::Io {
                        op: format!("{op}: send request"),
                        source: io::Error::new(io::ErrorKind::WriteZero, "short netlink send"),
                    })
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::Io {
                    op: format!("{op}: send request"),
                    source: e,
                });
            }
        }
    }

    /// Receives one datagram from the kernel into `self.buf`; returns its length.
    pub(crate) fn recv(&mut self, op: &str) -> Result<usize, Error> {
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
                return Err(Error::Io {
                    op: format!("{op}: receive reply"),
                    source: e,
                });
            }
            let n = n as usize;
            if n > self.buf.len() {
                return Err(Error::Truncated {
                    len: n,
                    limit: RECV_BUF_LEN,
                });
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

/// Splits `bus/name` (one slash at most, like iproute2) into its parts.
pub(crate) fn split_mgmtdev(mgmtdev: &str) -> Result<(Option<&str>, &str), Error> {
    let bad = |reason| Error::InvalidName {
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

/// One entry of the VDPA_CMD_MGMTDEV_GET dump.
pub(crate) fn parse_mgmtdev(attrs: &[u8]) -> Result<MgmtDev, Error> {
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
pub(crate) fn parse_device(attrs: &[u8]) -> Result<VdpaDevice, Error> {
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

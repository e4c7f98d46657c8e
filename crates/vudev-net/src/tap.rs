//! The TAP interface a net device is backed by: opened (or created) through `/dev/net/tun`
//! with `IFF_VNET_HDR`, so that every frame read or written carries the 12-byte virtio-net
//! header (`virtio_net_hdr_v1`) in front, and non-blocking, so that a queue's worker reads
//! and writes it from its own poll loop.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of the virtio-net header with VIRTIO_F_VERSION_1 (`num_buffers` included).
pub const VNET_HDR_LEN: usize = 12;

/// The offloads a TAP takes frames with (TUNSETOFFLOAD): what the kernel may hand us as
/// partially checksummed or as one large segment, for the driver to receive so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// TUN_F_CSUM: partial checksums.
    pub csum: bool,
    /// TUN_F_TSO4: TCP over IPv4 segmentation.
    pub tso4: bool,
    /// TUN_F_TSO6: TCP over IPv6 segmentation.
    pub tso6: bool,
    /// TUN_F_TSO_ECN: TSO with ECN.
    pub ecn: bool,
    /// TUN_F_UFO: UDP fragmentation.
    pub ufo: bool,
}

impl Offloads {
    fn bits(self) -> libc::c_uint {
        let mut b = 0;
        for (on, bit) in [
            (self.csum, libc::TUN_F_CSUM),
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.ecn, libc::TUN_F_TSO_ECN),
            (self.ufo, libc::TUN_F_UFO),
        ] {
            if on {
                b |= bit;
            }
        }
        b
    }
}

/// `struct ifreq` as TUNSETIFF and the SIOC*IF* calls use it: a name, then a union of which
/// only the flags (a short) and the MTU (an int) are used here.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    value: libc::c_int,
    _rest: [u8; 20],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            value: 0,
            _rest: [0; 20],
        };
        valid_name(name)?;
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }
}

/// Checks an interface name as the kernel would: 1 to 15 bytes, no '/', ':' or white space.
pub fn valid_name(name: &str) -> io::Result<()> {
    let bad = name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid interface name '{name}': use 1 to {} bytes without '/', ':' or spaces",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    Ok(())
}

/// One queue of a TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the TAP `name`, creating it if there is none (it then goes away with the last
    /// fd; create it with `ip tuntap add dev NAME mode tap` to keep it, and its addresses,
    /// across restarts). Errors say what to do.
    pub fn open(name: &str) -> io::Result<Tap> {
        Tap::open_queue(name, false)
    }

    /// `queues` queues of the multi-queue TAP `name` (created if there is none; `ip tuntap
    /// add dev NAME mode tap multi_queue` makes one that stays), one fd each; one queue is
    /// [`Tap::open`].
    pub fn open_queues(name: &str, queues: u16) -> io::Result<Vec<Tap>> {
        if queues <= 1 {
            return Ok(vec![Tap::open(name)?]);
        }
        (0..queues).map(|_| Tap::open_queue(name, true)).collect()
    }

    fn open_queue(name: &str, multi: bool) -> io::Result<Tap> {
        let mut req = IfReq::new(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => io::Error::new(
                    e.kind(),
                    "/dev/net/tun not found: load the tun module (modprobe tun)",
                ),
                _ => io::Error::new(e.kind(), format!("cannot open /dev/net/tun: {e}")),
            })?;
        req.value = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi {
            req.value |= libc::IFF_MULTI_QUEUE;
        }
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is (40 bytes).
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let why = match e.raw_os_error() {
                Some(libc::EPERM) => format!(
                    "permission denied: creating a TAP, or using one owned by another user, \
                     needs CAP_NET_ADMIN (run as root, or create it first with `ip tuntap add \
                     dev {name} mode tap{} user USER`)",
                    if multi { " multi_queue" } else { "" }
                ),
                Some(libc::EINVAL) if multi => format!(
                    "{name} exists and is not a multi-queue TAP (a TUN device, or a \
                     single-queue TAP): use another name, or remove it with `ip link del {name}`"
                ),
                Some(libc::EINVAL) => format!(
                    "{name} exists and is not a single-queue TAP (a TUN device, or a \
                     multi-queue TAP): use another name, or remove it with `ip link del {name}`"
                ),
                Some(libc::EBUSY) => format!("{name} is in use by another process"),
                _ => e.to_string(),
            };
            return Err(io::Error::new(
                e.kind(),
                format!("cannot open TAP {name}: {why}"),
            ));
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("TAP {name}: cannot set the virtio-net header size: {e}"),
            ));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        // Nothing offloaded until the driver says what it takes.
        tap.set_offloads(Offloads::default())?;
        Ok(tap)
    }

    /// Takes back a TAP [`Tap::into_file`] gave: an fd opened, attached and set up by
    /// [`Tap::open`] (by root, for a process that gave root up since).
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
        }
    }

    /// The open fd, to be handed to [`Tap::from_file`].
    pub fn into_file(self) -> File {
        self.file
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Attaches this queue to its multi-queue TAP, or detaches it: the TAP spreads frames
    /// over its attached queues only, so a queue whose pair the driver does not use must be
    /// detached, or the flows hashed to it are lost.
    pub fn set_attached(&self, attached: bool) -> io::Result<()> {
        let mut req = IfReq::new(&self.name)?;
        req.value = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        // SAFETY: TUNSETQUEUE reads one ifreq, which `req` is (40 bytes).
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETQUEUE, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            // Attached already (a pair's previous receive queue has not gone yet): as asked.
            if attached && e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "TAP {}: cannot {} a queue: {e}",
                    self.name,
                    if attached { "attach" } else { "detach" }
                ),
            ));
        }
        Ok(())
    }

    /// Tells the TAP which offloaded frames the driver takes.
    pub fn set_offloads(&self, o: Offloads) -> io::Result<()> {
        let bits = o.bits();
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, bits) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("TAP {}: offloads {o:?} refused: {e}", self.name),
            ));
        }
        Ok(())
    }

    /// The most this TAP accepts of `wanted`: UFO is the one some kernels refuse.
    pub fn probe_offloads(&self, wanted: Offloads) -> Offloads {
        let accepted = if self.set_offloads(wanted).is_ok() {
            wanted
        } else {
            let no_ufo = Offloads {
                ufo: false,
                ..wanted
            };
            match self.set_offloads(no_ufo) {
                Ok(()) => no_ufo,
                Err(_) => Offloads::default(),
            }
        };
        let _ = self.set_offloads(Offloads::default());
        accepted
    }

    /// The interface's MTU now.
    pub fn mtu(&self) -> io::Result<u32> {
        let mut req = IfReq::new(&self.name)?;
        with_socket(|s| {
            // SAFETY: SIOCGIFMTU fills the ifreq `req` is.
            cvt(unsafe { libc::ioctl(s, libc::SIOCGIFMTU, &mut req) })
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("TAP {}: cannot read its MTU: {e}", self.name),
            )
        })?;
        Ok(req.value.max(0) as u32)
    }

    /// Sets the interface's MTU (needs CAP_NET_ADMIN).
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        let mut req = IfReq::new(&self.name)?;
        req.value = mtu as libc::c_int;
        with_socket(|s| {
            // SAFETY: SIOCSIFMTU reads the ifreq `req` is.
            cvt(unsafe { libc::ioctl(s, libc::SIOCSIFMTU, &mut req) })
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("TAP {}: cannot set its MTU to {mtu}: {e}", self.name),
            )
        })
    }

    /// Another fd on the same queue, for a second user of it (the rx and the tx worker).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Reads one frame (header first) into `iov`: its full length, which is more than `iov`
    /// holds when the frame did not fit (the TAP then copied what fitted); `Ok(None)` when
    /// none waits.
    pub fn read_frame(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: every iovec points into memory the caller holds mapped and writable
            // for the call; at most IOV_MAX of them (the caller bounds the count).
            let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// Writes one frame (header first) gathered from `iov`.
    pub fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        loop {
            // SAFETY: every iovec points into memory the caller holds mapped for the call;
            // at most IOV_MAX of them (the caller bounds the count).
            let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs `f` with a datagram socket, which the SIOC*IF* calls need.
fn with_socket(f: impl FnOnce(RawFd) -> io::Result<()>) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a new fd nothing else owns.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    f(s.as_raw_fd())
}

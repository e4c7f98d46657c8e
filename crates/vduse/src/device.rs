//! A VDUSE device node `/dev/vduse/NAME`: virtqueue setup and info, kicks and interrupts,
//! config space, IOTLB lookups, and the control messages the kernel sends.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use crate::control::open_node;
use crate::error::{Result, VduseError};
use crate::uapi::*;

/// An open device node. The kernel allows one opener at a time.
#[derive(Debug)]
pub struct VduseDevice {
    file: File,
    name: String,
}

/// The driver's view of one virtqueue, from `VDUSE_VQ_GET_INFO`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VqInfo {
    /// Queue index.
    pub index: u32,
    /// Queue size chosen by the driver.
    pub num: u32,
    /// IOVA of the descriptor table.
    pub desc_addr: u64,
    /// IOVA of the driver (avail) area.
    pub driver_addr: u64,
    /// IOVA of the device (used) area.
    pub device_addr: u64,
    /// Split-ring avail index the kernel holds (restored state).
    pub avail_index: u16,
    /// Whether the driver set the queue ready.
    pub ready: bool,
}

/// Access allowed to an IOTLB range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Device may read only.
    ReadOnly,
    /// Device may write only.
    WriteOnly,
    /// Device may read and write.
    ReadWrite,
}

impl Access {
    fn from_perm(perm: u8) -> Option<Access> {
        match perm {
            VDUSE_ACCESS_RO => Some(Access::ReadOnly),
            VDUSE_ACCESS_WO => Some(Access::WriteOnly),
            VDUSE_ACCESS_RW => Some(Access::ReadWrite),
            _ => None,
        }
    }

    /// `mmap` protection bits for this access.
    pub fn prot(self) -> i32 {
        match self {
            Access::ReadOnly => libc::PROT_READ,
            Access::WriteOnly => libc::PROT_WRITE,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// An IOVA region as `VDUSE_IOTLB_GET_INFO` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaInfo {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
    /// Userspace memory may be registered for it (the bounce buffer).
    pub umem: bool,
}

/// One IOTLB range `[start, last]` and the file (and offset) that backs it.
#[derive(Debug)]
pub struct IotlbMapping {
    /// File to mmap (close-on-exec).
    pub file: File,
    /// mmap offset into `file` of `start`.
    pub offset: u64,
    /// First IOVA of the range.
    pub start: u64,
    /// Last IOVA of the range (inclusive).
    pub last: u64,
    /// Access permission.
    pub access: Access,
}

/// A control message from the kernel. Each must be answered with [`VduseDevice::reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Report the avail index of a virtqueue (used on device reset / migration).
    GetVqState {
        /// Request id to answer.
        id: u32,
        /// Queue index.
        index: u32,
    },
    /// The driver wrote the status register (0 = reset).
    SetStatus {
        /// Request id to answer.
        id: u32,
        /// New virtio status bits.
        status: u8,
    },
    /// Mappings inside `[start, last]` changed: drop cached ones and look them up again.
    UpdateIotlb {
        /// Request id to answer.
        id: u32,
        /// First IOVA.
        start: u64,
        /// Last IOVA (inclusive).
        last: u64,
        /// Address space (API v1; 0 otherwise).
        asid: u32,
    },
    /// A virtqueue group moves to another address space (API v1).
    SetVqGroupAsid {
        /// Request id to answer.
        id: u32,
        /// Group index.
        group: u32,
        /// Address space.
        asid: u32,
    },
    /// A virtqueue became ready or not ready (`VDUSE_F_QUEUE_READY`).
    SetVqReady {
        /// Request id to answer.
        id: u32,
        /// Queue index.
        index: u32,
        /// New ready state.
        ready: bool,
    },
    /// Stop processing every queue before answering (`VDUSE_F_SUSPEND`).
    Suspend {
        /// Request id to answer.
        id: u32,
    },
    /// A message type this crate does not know; answer it FAILED.
    Unknown {
        /// Request id to answer.
        id: u32,
        /// The raw type.
        kind: u32,
    },
}

impl Request {
    /// The id the reply must carry.
    pub fn id(&self) -> u32 {
        match *self {
            Request::GetVqState { id, .. }
            | Request::SetStatus { id, .. }
            | Request::UpdateIotlb { id, .. }
            | Request::SetVqGroupAsid { id, .. }
            | Request::SetVqReady { id, .. }
            | Request::Suspend { id }
            | Request::Unknown { id, .. } => id,
        }
    }

    /// Decodes the 152-byte record the kernel hands to read(2).
    pub fn decode(raw: &vduse_dev_request, api_version: u64) -> Request {
        let id = raw.request_id;
        // SAFETY (all union reads below): the union is plain old data of 128 bytes, every bit
        // pattern is valid for each member, and the member read is the one `type_` selects.
        unsafe {
            match raw.type_ {
                VDUSE_GET_VQ_STATE => Request::GetVqState {
                    id,
                    index: raw.payload.vq_state.index,
                },
                VDUSE_SET_STATUS => Request::SetStatus {
                    id,
                    status: raw.payload.s.status,
                },
                VDUSE_UPDATE_IOTLB => {
                    let asid = if api_version >= VDUSE_API_VERSION_1 {
                        raw.payload.iova_v2.asid
                    } else {
                        0
                    };
                    Request::UpdateIotlb {
                        id,
                        start: raw.payload.iova.start,
                        last: raw.payload.iova.last,
                        asid,
                    }
                }
                VDUSE_SET_VQ_GROUP_ASID => Request::SetVqGroupAsid {
                    id,
                    group: raw.payload.vq_group_asid.group,
                    asid: raw.payload.vq_group_asid.asid,
                },
                VDUSE_SET_VQ_READY => Request::SetVqReady {
                    id,
                    index: raw.payload.vq_ready.num,
                    ready: raw.payload.vq_ready.ready != 0,
                },
                VDUSE_SUSPEND => Request::Suspend { id },
                kind => Request::Unknown { id, kind },
            }
        }
    }
}

/// The answer to a [`Request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Success with nothing to report.
    Ok,
    /// Failure.
    Failed,
    /// Success for `GetVqState`: the split-ring avail index.
    VqState {
        /// Queue index.
        index: u32,
        /// Next avail index the device will process.
        avail_index: u16,
    },
}

impl VduseDevice {
    /// Opens `/dev/vduse/NAME` (O_CLOEXEC).
    pub fn open(name: &str) -> Result<Self> {
        let path = format!("/dev/vduse/{name}");
        let file = open_node(&path).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => VduseError::Io {
                op: format!("open {path}"),
                source: io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "another process is serving this device",
                ),
            },
            _ if e.kind() == io::ErrorKind::PermissionDenied => {
                VduseError::PermissionDenied { path: path.clone() }
            }
            _ => VduseError::Io {
                op: format!("open {path}"),
                source: e,
            },
        })?;
        Ok(VduseDevice {
            file,
            name: name.into(),
        })
    }

    /// A device node opened by someone else (handed over as an fd): `file` must be
    /// `/dev/vduse/NAME`, open read-write.
    pub fn from_file(name: &str, file: File) -> Self {
        VduseDevice {
            file,
            name: name.into(),
        }
    }

    /// The open node, to hand to another process.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl<T>(&self, req: u64, arg: *mut T, what: &str) -> Result<()> {
        // SAFETY: every caller passes a request number together with a pointer to the struct
        // type that request number encodes (size checked in `uapi`), valid for the call.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, arg) } < 0 {
            return Err(VduseError::last_os(format!("{what} on {}", self.name)));
        }
        Ok(())
    }

    /// Declares queue `index` with its maximum size (`VDUSE_VQ_SETUP`); needed for every queue
    /// before the device joins the vdpa bus.
    pub fn setup_vq(&self, index: u32, max_size: u16) -> Result<()> {
        let mut cfg = vduse_vq_config {
            index,
            max_size,
            ..Default::default()
        };
        self.ioctl(VDUSE_VQ_SETUP, &mut cfg, "VDUSE_VQ_SETUP")
    }

    /// Reads the driver's view of queue `index`.
    pub fn vq_info(&self, index: u32) -> Result<VqInfo> {
        let mut info = vduse_vq_info {
            index,
            ..Default::default()
        };
        self.ioctl(VDUSE_VQ_GET_INFO, &mut info, "VDUSE_VQ_GET_INFO")?;
        Ok(VqInfo {
            index: info.index,
            num: info.num,
            desc_addr: info.desc_addr,
            driver_addr: info.driver_addr,
            device_addr: info.device_addr,
            // SAFETY: the union is two u16 views of the same plain bytes.
            avail_index: unsafe { info.state.split.avail_index },
            ready: info.ready != 0,
        })
    }

    /// Installs (Some) or removes (None) the eventfd the kernel signals on a kick.
    pub fn set_kickfd(&self, index: u32, fd: Option<RawFd>) -> Result<()> {
        let mut e = vduse_vq_eventfd {
            index,
            fd: fd.unwrap_or(VDUSE_EVENTFD_DEASSIGN),
        };
        self.ioctl(VDUSE_VQ_SETUP_KICKFD, &mut e, "VDUSE_VQ_SETUP_KICKFD")
    }

    /// Interrupts the driver for queue `index` (used ring updated).
    pub fn inject_irq(&self, index: u32) -> Result<()> {
        let mut i = index;
        self.ioctl(VDUSE_VQ_INJECT_IRQ, &mut i, "VDUSE_VQ_INJECT_IRQ")
    }

    /// Overwrites `data.len()` bytes of config space at `offset`.
    pub fn set_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        let hdr = std::mem::size_of::<vduse_config_data>();
        let mut buf = vec![0u32; (hdr + data.len()).div_ceil(4)];
        let bytes = buf.as_mut_ptr() as *mut u8;
        let length = u32::try_from(data.len()).map_err(|_| VduseError::Io {
            op: "VDUSE_DEV_SET_CONFIG".into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: `buf` is 4-aligned and holds the header plus `data.len()` bytes.
        unsafe {
            std::ptr::write(
                bytes as *mut vduse_config_data,
                vduse_config_data { offset, length },
            );
            std::ptr::copy_nonoverlapping(data.as_ptr(), bytes.add(hdr), data.len());
        }
        self.ioctl(VDUSE_DEV_SET_CONFIG, bytes, "VDUSE_DEV_SET_CONFIG")
    }

    /// Tells the driver that config space changed.
    pub fn inject_config_irq(&self) -> Result<()> {
        self.ioctl::<u8>(
            VDUSE_DEV_INJECT_CONFIG_IRQ,
            std::ptr::null_mut(),
            "VDUSE_DEV_INJECT_CONFIG_IRQ",
        )
    }

    /// The features the driver accepted (valid after FEATURES_OK).
    pub fn negotiated_features(&self) -> Result<u64> {
        let mut f = 0u64;
        self.ioctl(VDUSE_DEV_GET_FEATURES, &mut f, "VDUSE_DEV_GET_FEATURES")?;
        Ok(f)
    }

    /// Finds the first IOTLB range overlapping `[start, last]`; `None` if nothing is mapped
    /// there.
    pub fn iotlb_get_fd(&self, start: u64, last: u64) -> Result<Option<IotlbMapping>> {
        let mut entry = vduse_iotlb_entry {
            start,
            last,
            ..Default::default()
        };
        // SAFETY: IOTLB_GET_FD reads and writes one vduse_iotlb_entry and returns a new fd.
        let fd = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VDUSE_IOTLB_GET_FD as _,
                &mut entry as *mut vduse_iotlb_entry,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(None);
            }
            return Err(VduseError::Io {
                op: format!(
                    "VDUSE_IOTLB_GET_FD [{start:#x}, {last:#x}] on {}",
                    self.name
                ),
                source: err,
            });
        }
        // SAFETY: the kernel just returned a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        // The kernel hands this fd out without O_CLOEXEC; a child must not inherit it.
        // SAFETY: F_SETFD on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(VduseError::last_os("fcntl(FD_CLOEXEC) on an IOTLB fd"));
        }
        let access = Access::from_perm(entry.perm).ok_or_else(|| VduseError::Io {
            op: format!(
                "VDUSE_IOTLB_GET_FD returned unknown permission {}",
                entry.perm
            ),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        if entry.last < entry.start {
            return Err(VduseError::Io {
                op: "VDUSE_IOTLB_GET_FD returned an empty range".into(),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        Ok(Some(IotlbMapping {
            file,
            offset: entry.offset,
            start: entry.start,
            last: entry.last,
            access,
        }))
    }

    /// Describes the first IOVA region overlapping `[start, last]` (`VDUSE_IOTLB_GET_INFO`):
    /// its bounds and whether userspace memory may back it (`VDUSE_IOVA_CAP_UMEM`, the bounce
    /// buffer). `None` if no region overlaps.
    pub fn iova_info(&self, start: u64, last: u64) -> Result<Option<IovaInfo>> {
        let mut info = vduse_iova_info {
            start,
            last,
            ..Default::default()
        };
        match self.ioctl(VDUSE_IOTLB_GET_INFO, &mut info, "VDUSE_IOTLB_GET_INFO") {
            Ok(()) => Ok(Some(IovaInfo {
                start: info.start,
                last: info.last,
                umem: info.capability & VDUSE_IOVA_CAP_UMEM != 0,
            })),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Registers `size` bytes of our memory at `uaddr` as the backing of IOVA `[iova, iova +
    /// size)` (`VDUSE_IOTLB_REG_UMEM`; the bounce buffer, page aligned).
    pub fn reg_umem(&self, uaddr: u64, iova: u64, size: u64) -> Result<()> {
        let mut umem = vduse_iova_umem {
            uaddr,
            iova,
            size,
            ..Default::default()
        };
        self.ioctl(VDUSE_IOTLB_REG_UMEM, &mut umem, "VDUSE_IOTLB_REG_UMEM")
    }

    /// Undoes [`VduseDevice::reg_umem`] (`VDUSE_IOTLB_DEREG_UMEM`).
    pub fn dereg_umem(&self, iova: u64, size: u64) -> Result<()> {
        let mut umem = vduse_iova_umem {
            iova,
            size,
            ..Default::default()
        };
        self.ioctl(VDUSE_IOTLB_DEREG_UMEM, &mut umem, "VDUSE_IOTLB_DEREG_UMEM")
    }

    /// Reads one control message; `Ok(None)` when none is pending (the fd is non-blocking
    /// only if the caller made it so — use [`VduseDevice::as_raw_fd`] with poll).
    pub fn read_request(&self, api_version: u64) -> Result<Option<Request>> {
        let mut raw = std::mem::MaybeUninit::<vduse_dev_request>::zeroed();
        let size = std::mem::size_of::<vduse_dev_request>();
        // SAFETY: the buffer is the zeroed request struct, `size` bytes long; all bit patterns
        // are valid for it.
        let buf = unsafe { std::slice::from_raw_parts_mut(raw.as_mut_ptr() as *mut u8, size) };
        match (&self.file).read(buf) {
            Ok(n) if n == size => {
                // SAFETY: fully written by the kernel (and zeroed before).
                let raw = unsafe { raw.assume_init() };
                Ok(Some(Request::decode(&raw, api_version)))
            }
            Ok(n) => Err(VduseError::Io {
                op: format!("short VDUSE message of {n} bytes on {}", self.name),
                source: io::Error::from_raw_os_error(libc::EIO),
            }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(VduseError::Io {
                op: format!("read VDUSE message on {}", self.name),
                source: e,
            }),
        }
    }

    /// Answers request `id`.
    pub fn reply(&self, id: u32, reply: Reply) -> Result<()> {
        let mut resp = vduse_dev_response::new(
            id,
            if reply == Reply::Failed {
                VDUSE_REQ_RESULT_FAILED
            } else {
                VDUSE_REQ_RESULT_OK
            },
        );
        if let Reply::VqState { index, avail_index } = reply {
            resp.payload.vq_state = vduse_vq_state {
                index,
                state: vduse_vq_state_union {
                    split: vduse_vq_state_split { avail_index },
                },
            };
            // Keep the packed view's other bytes zero: the union was zeroed by `new`, and
            // writing the split view touched only the first two bytes of the state.
        }
        let size = std::mem::size_of::<vduse_dev_response>();
        // SAFETY: `resp` is plain data of `size` bytes.
        let buf = unsafe { std::slice::from_raw_parts(&resp as *const _ as *const u8, size) };
        (&self.file).write_all(buf).map_err(|e| VduseError::Io {
            op: format!("write VDUSE reply on {}", self.name),
            source: e,
        })
    }
}

impl AsRawFd for VduseDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(type_: u32, fill: impl FnOnce(&mut vduse_dev_request_payload)) -> vduse_dev_request {
        let mut r = vduse_dev_request {
            type_,
            request_id: 7,
            reserved: [0; 4],
            payload: vduse_dev_request_payload { padding: [0; 32] },
        };
        fill(&mut r.payload);
        r
    }

    #[test]
    fn decodes_every_message() {
        let r = raw(VDUSE_SET_STATUS, |p| p.s = vduse_dev_status { status: 0xf });
        assert_eq!(
            Request::decode(&r, 0),
            Request::SetStatus { id: 7, status: 0xf }
        );
        let r = raw(VDUSE_UPDATE_IOTLB, |p| {
            p.iova_v2 = vduse_iova_range_v2 {
                start: 0x1000,
                last: 0x1fff,
                asid: 3,
            }
        });
        assert_eq!(
            Request::decode(&r, 0),
            Request::UpdateIotlb {
                id: 7,
                start: 0x1000,
                last: 0x1fff,
                asid: 0
            }
        );
        assert_eq!(
            Request::decode(&r, 1),
            Request::UpdateIotlb {
                id: 7,
                start: 0x1000,
                last: 0x1fff,
                asid: 3
            }
        );
        let r = raw(VDUSE_SET_VQ_READY, |p| {
            p.vq_ready = vduse_vq_ready { num: 1, ready: 1 }
        });
        assert_eq!(
            Request::decode(&r, 1),
            Request::SetVqReady {
                id: 7,
                index: 1,
                ready: true
            }
        );
        let r = raw(VDUSE_SUSPEND, |_| {});
        assert_eq!(Request::decode(&r, 1), Request::Suspend { id: 7 });
        let r = raw(99, |_| {});
        assert_eq!(Request::decode(&r, 1), Request::Unknown { id: 7, kind: 99 });
    }
}

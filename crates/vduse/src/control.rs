//! The control device `/dev/vduse/control`: API version, features, device create and destroy.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::error::{Result, VduseError};
use crate::uapi::*;

/// The virtio device id of a network device (virtio spec 5.1).
const VIRTIO_ID_NET: u32 = 1;

/// Path of the VDUSE control node.
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// What a device needs at creation: identity, features, queues and config space.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Device name; becomes `/dev/vduse/NAME` and the vdpa device name.
    pub name: String,
    /// virtio vendor id.
    pub vendor_id: u32,
    /// virtio device id (2 for block).
    pub device_id: u32,
    /// virtio feature bits the device offers (must include VIRTIO_F_ACCESS_PLATFORM).
    pub features: u64,
    /// Number of virtqueues.
    pub num_queues: u32,
    /// Alignment of virtqueue metadata (page size is the usual choice).
    pub vq_align: u32,
    /// Device configuration space bytes.
    pub config: Vec<u8>,
}

/// An open `/dev/vduse/control` with its negotiated API version and features.
#[derive(Debug)]
pub struct VduseControl {
    file: File,
    api_version: u64,
    features: u64,
}

impl VduseControl {
    /// Opens the control device and negotiates the newest API this crate and the kernel share:
    /// API version 1 and the `F_QUEUE_READY`/`F_SUSPEND` features where the kernel offers them
    /// (Linux 7.3), else version 0 with no features (Linux 6.12).
    pub fn open() -> Result<Self> {
        let file = open_node(CONTROL_PATH).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => VduseError::NoControlDevice,
            io::ErrorKind::PermissionDenied => VduseError::PermissionDenied {
                path: CONTROL_PATH.into(),
            },
            _ => VduseError::Io {
                op: format!("open {CONTROL_PATH}"),
                source: e,
            },
        })?;
        let mut ctl = VduseControl {
            file,
            api_version: VDUSE_API_VERSION,
            features: 0,
        };
        let mut kernel_version: u64 = 0;
        // SAFETY: GET_API_VERSION writes one u64 through the pointer, which is valid.
        if unsafe { libc::ioctl(ctl.fd(), VDUSE_GET_API_VERSION as _, &mut kernel_version) } < 0 {
            return Err(VduseError::last_os("VDUSE_GET_API_VERSION"));
        }
        let mut features: u64 = 0;
        // SAFETY: GET_FEATURES writes one u64 through the pointer; kernels without it fail
        // with EINVAL/ENOTTY and write nothing.
        let has_features =
            unsafe { libc::ioctl(ctl.fd(), VDUSE_GET_FEATURES as _, &mut features) } == 0;
        let want_version = kernel_version.min(VDUSE_API_VERSION_1);
        if want_version >= VDUSE_API_VERSION_1 {
            // SAFETY: SET_API_VERSION reads one u64 through the pointer.
            if unsafe { libc::ioctl(ctl.fd(), VDUSE_SET_API_VERSION as _, &want_version) } == 0 {
                ctl.api_version = want_version;
            } else {
                tracing::debug!("VDUSE API v1 refused, staying on v0");
            }
        } else {
            // The kernel would default to v0 anyway; say so explicitly.
            // SAFETY: as above.
            unsafe { libc::ioctl(ctl.fd(), VDUSE_SET_API_VERSION as _, &VDUSE_API_VERSION) };
        }
        if has_features {
            let wanted = features & ((1 << VDUSE_F_QUEUE_READY) | (1 << VDUSE_F_SUSPEND));
            // SAFETY: SET_FEATURES reads one u64 through the pointer.
            if unsafe { libc::ioctl(ctl.fd(), VDUSE_SET_FEATURES as _, &wanted) } == 0 {
                ctl.features = wanted;
            } else {
                tracing::debug!("VDUSE_SET_FEATURES({wanted:#x}) refused; using none");
            }
        }
        tracing::debug!(
            api_version = ctl.api_version,
            features = ctl.features,
            "VDUSE control opened"
        );
        Ok(ctl)
    }

    /// The negotiated API version (0 or 1).
    pub fn api_version(&self) -> u64 {
        self.api_version
    }

    /// The negotiated VDUSE features (bits `VDUSE_F_*`).
    pub fn features(&self) -> u64 {
        self.features
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Creates a device. Fails with [`VduseError::NameTaken`] if the name exists.
    pub fn create_device(&self, cfg: &DeviceConfig) -> Result<()> {
        let name = check_name(&cfg.name)?;
        let header_len = std::mem::size_of::<vduse_dev_config>();
        let config_size = u32::try_from(cfg.config.len()).map_err(|_| VduseError::Io {
            op: "VDUSE_CREATE_DEV".into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mut header = vduse_dev_config {
            name: [0; VDUSE_NAME_MAX],
            vendor_id: cfg.vendor_id,
            device_id: cfg.device_id,
            features: cfg.features,
            vq_num: cfg.num_queues,
            vq_align: cfg.vq_align,
            ngroups: 0,
            nas: 0,
            reserved: [0; 11],
            config_size,
        };
        if self.api_version >= VDUSE_API_VERSION_1 {
            header.ngroups = 1;
            header.nas = 1;
        }
        header.name[..name.as_bytes().len()].copy_from_slice(name.as_bytes());
        // One u64-aligned buffer holding the header followed by the config bytes.
        let total = header_len + cfg.config.len();
        let mut buf = vec![0u64; total.div_ceil(8)];
        let bytes = buf.as_mut_ptr() as *mut u8;
        // SAFETY: `buf` holds at least `total` bytes and is 8-aligned, enough for the header;
        // the two copies write disjoint ranges inside it.
        unsafe {
            std::ptr::write(bytes as *mut vduse_dev_config, header);
            std::ptr::copy_nonoverlapping(
                cfg.config.as_ptr(),
                bytes.add(header_len),
                cfg.config.len(),
            );
        }
        // SAFETY: the kernel reads the header and then `config_size` bytes, all inside `buf`.
        if unsafe { libc::ioctl(self.fd(), VDUSE_CREATE_DEV as _, bytes) } < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EEXIST) => VduseError::NameTaken(cfg.name.clone()),
                // The control node is open, so it is the device kind that was refused.
                Some(libc::EPERM) if cfg.device_id == VIRTIO_ID_NET => {
                    VduseError::NetNeedsNetAdmin(cfg.name.clone())
                }
                Some(libc::EPERM) | Some(libc::EACCES) => VduseError::PermissionDenied {
                    path: CONTROL_PATH.into(),
                },
                _ => VduseError::Io {
                    op: format!("VDUSE_CREATE_DEV '{}'", cfg.name),
                    source: err,
                },
            });
        }
        Ok(())
    }

    /// Destroys a device. The kernel refuses (EBUSY) while it is attached to the vdpa bus or
    /// any fd of it is open.
    pub fn destroy_device(&self, name: &str) -> Result<()> {
        let name = check_name(name)?;
        let mut buf = [0u8; VDUSE_NAME_MAX];
        buf[..name.as_bytes().len()].copy_from_slice(name.as_bytes());
        // SAFETY: the kernel reads VDUSE_NAME_MAX bytes from `buf`.
        if unsafe { libc::ioctl(self.fd(), VDUSE_DESTROY_DEV as _, buf.as_ptr()) } < 0 {
            return Err(VduseError::last_os(format!(
                "VDUSE_DESTROY_DEV '{}'",
                name.to_string_lossy()
            )));
        }
        Ok(())
    }
}

/// Opens a VDUSE node read-write with O_CLOEXEC, so that spawned helpers never hold it.
pub(crate) fn open_node(path: &str) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn check_name(name: &str) -> Result<CString> {
    if name.is_empty() || name.len() >= VDUSE_NAME_MAX || name.contains('/') || name == "control" {
        return Err(VduseError::BadName(name.into()));
    }
    CString::new(name).map_err(|_| VduseError::BadName(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("vdisk0").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("control").is_err());
        assert!(check_name("a\0b").is_err());
        assert!(check_name(&"x".repeat(256)).is_err());
        assert!(check_name(&"x".repeat(255)).is_ok());
    }
}

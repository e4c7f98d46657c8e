//! The Linux VDUSE (vDPA Device in Userspace) kernel interface, and nothing else.
//!
//! - [`uapi`]: the structs and ioctl numbers of `include/uapi/linux/vduse.h`, size-checked;
//! - [`VduseControl`]: `/dev/vduse/control` — API version and feature negotiation, create and
//!   destroy devices;
//! - [`VduseDevice`]: `/dev/vduse/NAME` — virtqueue setup and info, kick eventfds, interrupts,
//!   config space, IOTLB lookups, control messages ([`Request`], [`Reply`]);
//!
//! No virtio device logic lives here, and no vdpa management either (putting a device on the
//! vdpa bus is the `vdpa` crate's): any VDUSE device written in Rust can use this crate.
#![deny(missing_docs)]

pub mod control;
pub mod device;
pub mod error;
pub mod uapi;

pub use control::{DeviceConfig, VduseControl, CONTROL_PATH};
pub use device::{Access, IotlbMapping, IovaInfo, Reply, Request, VduseDevice, VqInfo};
pub use error::{Result, VduseError};

//! vdpa device management, the part of running a VDUSE device that is not VDUSE: adding and
//! removing vdpa devices over the kernel's `vdpa` generic netlink family (what iproute2's
//! `vdpa` tool does), and moving a device between the vdpa bus drivers in sysfs.
//!
//! - [`VdpaNetlink`] ([`management`]): list management devices and devices, add, delete;
//!   generic netlink itself (socket, framing, attributes) is in a private module;
//! - [`sysfs`]: which driver a device is bound to, binding `virtio_vdpa` (a virtio device on
//!   this host, e.g. `/dev/vdX`) or `vhost_vdpa` (`/dev/vhost-vdpa-N` for a VM), and finding
//!   the node that results;
//! - one [`Error`] type for both, each variant saying what to do.
//!
//! Written by hand: four netlink messages and a few sysfs files do not justify a general
//! netlink crate.
#![deny(missing_docs)]

pub mod error;
pub mod management;
mod names;
mod netlink;
pub mod sysfs;
#[cfg(test)]
mod tests;

pub use error::Error;
pub use management::{MgmtDev, VdpaDevice, VdpaNetlink};

pub use names::{VDPA_BUS, VDPA_DEVICES, VDUSE_MGMTDEV, VHOST_VDPA, VIRTIO_VDPA};

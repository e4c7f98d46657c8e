//! The virtio-net device of vudev (virtio 1.2, 5.1): a receive and a transmit queue over a
//! TAP interface opened with `IFF_VNET_HDR`, so that the virtio-net header passes through
//! to the kernel and the offloads the driver negotiates are the TAP's. The device knows
//! nothing of the transport that exports it (VDUSE or vhost-user): it implements
//! [`vudev_core::Device`], as the block device does.

#![warn(missing_docs)]

mod buffers;
mod config;
mod device;
mod rx;
mod stats;
pub mod tap;
mod tx;

#[cfg(test)]
mod tests;

pub use config::{MacAddress, NetConfig};
pub use device::{NetDevice, VIRTIO_ID_NET};
pub use stats::NetStats;
pub use tap::{Offloads, Tap};

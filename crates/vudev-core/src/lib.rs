//! The transport-neutral core of vudev.
//!
//! A [`Device`] (virtio-blk, say) describes its features, config space and queues, and gives
//! a [`QueueHandler`] per queue. The core owns everything between the ring and the handler:
//! the [`MemoryMap`] of driver memory, one [`Worker`] thread per queue that walks and bounds
//! descriptor chains (rust-vmm `virtio-queue`) and notifies the driver (EVENT_IDX), the
//! [`InflightArea`] that lets a restarted daemon finish its predecessor's requests, and the
//! [`DirtyLog`] of live migration. It knows no transport: `vudev-vduse` and
//! `vudev-vhost-user` drive a device through it.
#![deny(missing_docs)]

pub mod device;
pub mod dirty_log;
pub mod fault_guard;
pub mod inflight;
pub mod memory;
pub mod polling;
pub mod readiness;
pub mod socket;
#[cfg(any(test, feature = "test-utils"))]
pub mod testkit;
pub mod worker;

pub use device::{Chain, Completions, Device, QueueHandler};
pub use dirty_log::DirtyLog;
pub use inflight::{InflightArea, QueueInflight, Recovery};
pub use memory::{Mapping, MappingSource, Memory, MemoryMap};
pub use polling::Polling;
pub use worker::{
    stop_all, Notifier, QueuePosition, QueueSetup, Tracking, Worker, WorkerOptions, DRAIN_TIMEOUT,
};

use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Feature bits the core implements for every device, whatever the transport: a transport
/// offers them beside the device's own (VERSION_1, ACCESS_PLATFORM, EVENT_IDX and
/// INDIRECT_DESC).
pub const TRANSPORT_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_ACCESS_PLATFORM)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC);

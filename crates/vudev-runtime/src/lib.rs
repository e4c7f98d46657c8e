//! The transport-neutral device runtime.
//!
//! A [`Device`] (virtio-blk, say) describes its features, config space and queues, and gives
//! a [`QueueHandler`] per queue. The runtime owns everything between the ring and the
//! handler: the [`MemoryMap`] of driver memory, one [`Worker`] thread per queue that walks and
//! bounds descriptor chains (rust-vmm `virtio-queue`), notifications with EVENT_IDX, and the
//! transports that drive a device: [`vduse`] and [`vhost_user`], with the [`DirtyLog`] that
//! vhost-user live migration needs and the [`InflightArea`] that lets a restarted daemon finish
//! its predecessor's requests.

mod bounce;
pub mod device;
pub mod dirty_log;
pub mod inflight;
pub mod memory;
pub mod state_file;
pub mod vduse;
pub mod vhost_user;
pub mod worker;

pub use device::{Chain, Completions, Device, QueueHandler};
pub use dirty_log::DirtyLog;
pub use inflight::{InflightArea, QueueInflight, Recovery};
pub use memory::{Mapping, MappingSource, Memory, MemoryMap};
pub use worker::{
    stop_all, Notifier, QueuePosition, QueueSetup, Tracking, Worker, WorkerOptions, DRAIN_TIMEOUT,
};

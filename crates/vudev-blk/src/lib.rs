//! The virtio-blk device of vudev and its storage backends.
//!
//! - [`config`]: feature bits and configuration space;
//! - [`request`]: parsing and validating a request from a descriptor chain;
//! - [`device`]: [`BlockDevice`] (a runtime `Device`) and its per-queue handler;
//! - [`backend`]: the asynchronous [`BlockBackend`] trait and the file, memory, null, NBD
//!   and Ceph RBD backends (librbd is loaded when the first RBD image opens).
#![deny(missing_docs)]

pub mod backend;
pub mod config;
pub mod device;
pub mod request;
pub mod stats;

pub use backend::{
    check_range, eventfd, total_len, zero_fill, Aio, BlockBackend, FileBackend, Immediate, IoDone,
    IoOp, MemoryBackend, NbdBackend, NbdError, NullBackend, QueueBackend, RunNow,
};
pub use backend::{rbd_records_dir, RbdBackend, RbdError, RbdOptions, RbdSpec};
pub use config::BlockConfig;
pub use device::BlockDevice;

//! Storage backends behind the virtio-blk device.
//!
//! The interface is asynchronous so that io_uring and network backends fit: a queue worker
//! [`QueueBackend::submit`]s operations and later [`QueueBackend::reap`]s their results,
//! waking on [`QueueBackend::completion_fd`]. The file backend does this with io_uring; the
//! memory and null backends finish each operation inside `submit` (their completion is ready
//! at once), the simplest case of that contract.

mod file;
mod interface;
mod kit;
mod memory;
mod nbd;
mod null;
mod rbd;

pub use file::{Aio, FileBackend};
pub use interface::{BlockBackend, IoDone, IoOp, QueueBackend};
pub use kit::{check_range, eventfd, total_len, zero_fill, Capacity, Immediate, RunNow};
pub use memory::MemoryBackend;
pub use nbd::{NbdAddress, NbdBackend, NbdError, NbdTls, NbdUri};
pub use null::NullBackend;
pub use rbd::{records_dir as rbd_records_dir, RbdBackend, RbdError, RbdOptions, RbdSpec};

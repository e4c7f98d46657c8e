//! The interface between the virtio-blk device and its storage backends: a backend opens a
//! queue per device queue; a queue takes operations and gives their results back later, with
//! an fd to wait on.

use std::io;
use std::os::fd::RawFd;

use vm_memory::VolatileSlice;

/// One storage operation. Offsets and lengths are in bytes.
#[derive(Debug)]
pub enum IoOp<'a> {
    /// Read into `bufs`, in order, starting at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination buffers (driver memory).
        bufs: &'a [VolatileSlice<'a>],
    },
    /// Write `bufs`, in order, starting at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Source buffers (driver memory).
        bufs: &'a [VolatileSlice<'a>],
    },
    /// Make every completed write durable.
    Flush,
    /// The range's contents may be dropped.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// The range must read back as zeros afterwards.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The backend may deallocate the range.
        may_unmap: bool,
    },
}

/// A finished operation: the cookie given to `submit`, and its result.
pub type IoDone = (u64, io::Result<()>);

/// A storage backend: what a device is exported from.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// True if writes are refused.
    fn read_only(&self) -> bool;
    /// True if `Discard` does something useful.
    fn supports_discard(&self) -> bool {
        true
    }
    /// Changes the size to `bytes` while queues run (a multiple of the block size, checked
    /// by the caller). A backend that cannot says why, in an error of kind `Unsupported`.
    fn resize(&self, bytes: u64) -> io::Result<()> {
        let _ = bytes;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{} cannot change size", self.describe()),
        ))
    }
    /// Whether anything beyond `bytes` holds data (what a shrink to `bytes` would lose):
    /// true unless the backend knows better.
    fn has_data_beyond(&self, bytes: u64) -> bool {
        let _ = bytes;
        true
    }
    /// A size the storage took without vudev asking (an RBD image resized with `rbd
    /// resize`), reported once, and already taken on by the backend (its queues use it); the
    /// device then takes it on too. Never a request to resize the storage.
    fn changed_size(&self) -> Option<u64> {
        None
    }
    /// The backend's unit of allocation in bytes, if it has one the driver should align to
    /// (an RBD image's object size).
    fn optimal_io_size(&self) -> Option<u64> {
        None
    }
    /// Counts of what happened to the backend, for metrics, by name (an NBD client's
    /// `reconnects` and `timeouts`); none unless the backend has some.
    fn events(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// A submission context for one queue.
    fn queue(&self) -> io::Result<Box<dyn QueueBackend>>;
    /// One line for logs: kind and path or size.
    fn describe(&self) -> String;
}

/// One queue's submission context.
pub trait QueueBackend: Send {
    /// Starts `op`. The buffers must stay valid until `reap` returns `cookie`.
    fn submit(&mut self, cookie: u64, op: IoOp<'_>);
    /// Readable when results are waiting (None: results are ready right after `submit`).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    /// Moves finished operations into `out`.
    fn reap(&mut self, out: &mut Vec<IoDone>);
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// True if `reap` may find results now: a check without a system call, for a worker
    /// that busy-polls (the default, true, only costs a `reap` that finds nothing).
    fn has_results(&mut self) -> bool {
        true
    }
    /// The worker busy-polls (`true`) or is about to sleep (`false`): while it polls, the
    /// backend may stop signalling `completion_fd` (no system call per completion).
    fn set_polling(&mut self, _on: bool) {}
}

//! What a virtio device implements to be served by either transport.

use std::os::fd::RawFd;

use virtio_queue::desc::split::Descriptor;

use crate::memory::Memory;

/// A virtio device, independent of the transport that exports it.
pub trait Device: Send + Sync + 'static {
    /// virtio device id (2 = block).
    fn device_id(&self) -> u32;
    /// Device-specific feature bits offered (the transport adds its own, such as VERSION_1,
    /// ACCESS_PLATFORM, EVENT_IDX and INDIRECT_DESC).
    fn features(&self) -> u64;
    /// The configuration space as the driver reads it.
    fn config(&self) -> Vec<u8>;
    /// Number of queues.
    fn num_queues(&self) -> u16;
    /// Largest queue size the device accepts.
    fn max_queue_size(&self) -> u16;
    /// A handler for queue `index`, created when the driver starts the device; `features`
    /// are the negotiated ones.
    fn queue_handler(&self, index: u16, features: u64) -> std::io::Result<Box<dyn QueueHandler>>;
}

/// One descriptor chain, walked and bounded by the runtime: at most `queue size`
/// descriptors, indirect tables resolved, total length under 4 GiB.
#[derive(Debug)]
pub struct Chain<'a> {
    /// Head index, to complete the chain with.
    pub head: u16,
    /// Descriptors in chain order.
    pub descs: &'a [Descriptor],
}

/// Finished requests, to be put on the used ring by the worker: (head, bytes written).
#[derive(Debug, Default)]
pub struct Completions {
    done: Vec<(u16, u32)>,
}

impl Completions {
    /// Records that chain `head` finished after writing `written` bytes into its buffers.
    pub fn push(&mut self, head: u16, written: u32) {
        self.done.push((head, written));
    }

    /// Takes everything recorded so far.
    pub fn drain(&mut self) -> std::vec::Drain<'_, (u16, u32)> {
        self.done.drain(..)
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }
}

/// Handles the requests of one queue. Runs on that queue's worker thread only.
pub trait QueueHandler: Send {
    /// Starts (or finishes) the request in `chain`; finished requests go to `done`.
    fn handle(&mut self, mem: &Memory, chain: Chain<'_>, done: &mut Completions);

    /// An fd that becomes readable when submitted requests have completed, if the handler
    /// completes asynchronously.
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    /// Collects asynchronous completions.
    fn poll(&mut self, _mem: &Memory, _done: &mut Completions) {}

    /// Requests started but not yet in `done`.
    fn in_flight(&self) -> usize {
        0
    }

    /// True if `poll` may find finished requests now; checked without a system call by a
    /// worker that busy-polls (the default, true, only costs a `poll` that finds nothing).
    fn has_completions(&mut self) -> bool {
        true
    }

    /// The worker starts (`true`) or stops (`false`) busy-polling (as its options say);
    /// after `false` it calls `poll` once more before it sleeps on `completion_fd`.
    fn set_polling(&mut self, _on: bool) {}
}

//! The transmit queue: each chain is one frame (the virtio-net header first), checked and
//! written to the TAP by one `writev` straight from the driver's buffers.

use std::io;
use std::sync::Arc;

use vudev_core::{Chain, Completions, Memory, QueueHandler};

use crate::buffers::Buffers;
use crate::stats::NetStats;
use crate::tap::{Tap, VNET_HDR_LEN};

/// One transmit queue.
pub(crate) struct TxQueue {
    tap: Tap,
    /// The largest frame the driver may send, with its header.
    limit: u64,
    iov: Vec<libc::iovec>,
    stats: Arc<NetStats>,
    /// The TAP's last refusal was logged (they are counted, and logged once per kind).
    logged: Option<io::ErrorKind>,
}

// SAFETY: the raw pointers in `iov` are scratch, rebuilt for every system call and never
// used across calls; everything else is Send.
unsafe impl Send for TxQueue {}

impl TxQueue {
    /// A transmit queue sending frames of at most `max_frame` bytes (header not included)
    /// to `tap`.
    pub(crate) fn new(tap: Tap, max_frame: u32, stats: Arc<NetStats>) -> TxQueue {
        TxQueue {
            tap,
            limit: VNET_HDR_LEN as u64 + u64::from(max_frame),
            iov: Vec::new(),
            stats,
            logged: None,
        }
    }

    fn send(&mut self, mem: &Memory, chain: &Chain<'_>) -> Result<u64, &'static str> {
        let b = Buffers::of_chain(chain.head, chain.descs, false)?;
        // A header and an Ethernet header at least.
        if b.len < VNET_HDR_LEN as u64 + 14 {
            return Err("shorter than the virtio-net and Ethernet headers");
        }
        if b.len > self.limit {
            return Err("larger than the MTU (or 64 KiB with segmentation offload) allows");
        }
        self.iov.clear();
        if !b.iovecs(mem, b.len, &mut self.iov) {
            return Err("a buffer is outside driver memory, or there are too many");
        }
        match self.tap.write_frame(&self.iov) {
            Ok(_) => {
                self.logged = None;
                Ok(b.len - VNET_HDR_LEN as u64)
            }
            Err(e) => {
                NetStats::add(&self.stats.tx_errors, 1);
                if self.logged != Some(e.kind()) {
                    tracing::warn!(tap = self.tap.name(), "the TAP refused a frame: {e}");
                    self.logged = Some(e.kind());
                }
                Ok(0)
            }
        }
    }
}

impl QueueHandler for TxQueue {
    fn handle(&mut self, mem: &Memory, chain: Chain<'_>, done: &mut Completions) {
        match self.send(mem, &chain) {
            Ok(0) => {}
            Ok(bytes) => {
                NetStats::add(&self.stats.tx_packets, 1);
                NetStats::add(&self.stats.tx_bytes, bytes);
            }
            Err(why) => {
                NetStats::add(&self.stats.tx_bad_chains, 1);
                tracing::debug!(
                    tap = self.tap.name(),
                    head = chain.head,
                    "transmit chain dropped: {why}"
                );
            }
        }
        // Sent or dropped, the chain goes back to the driver at once.
        done.push(chain.head, 0);
    }
}

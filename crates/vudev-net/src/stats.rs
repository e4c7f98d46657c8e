//! A net device's counters, kept across driver resets.

use std::sync::atomic::{AtomicU64, Ordering};

/// What went through a net device, and what was dropped and why.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames handed to the driver.
    pub rx_packets: AtomicU64,
    /// Their bytes (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Frames from the TAP dropped: larger than the MTU (or 64 KiB with offloads) allows, or
    /// than the driver's buffers hold.
    pub rx_dropped: AtomicU64,
    /// Receive chains refused: a device-readable buffer, shorter than the header, outside
    /// driver memory.
    pub rx_bad_chains: AtomicU64,
    /// Frames the driver sent out through the TAP.
    pub tx_packets: AtomicU64,
    /// Their bytes (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Transmit chains dropped: a device-writable buffer, shorter than the header, larger than
    /// a frame may be, outside driver memory.
    pub tx_bad_chains: AtomicU64,
    /// Frames the TAP refused (a bad header, the interface down).
    pub tx_errors: AtomicU64,
}

impl NetStats {
    /// Adds `n` to counter `c`.
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters by name, for `vudev ctl` and the metrics.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_packets", get(&self.rx_packets)),
            ("rx_bytes", get(&self.rx_bytes)),
            ("rx_dropped", get(&self.rx_dropped)),
            ("rx_bad_chains", get(&self.rx_bad_chains)),
            ("tx_packets", get(&self.tx_packets)),
            ("tx_bytes", get(&self.tx_bytes)),
            ("tx_bad_chains", get(&self.tx_bad_chains)),
            ("tx_errors", get(&self.tx_errors)),
        ]
    }
}

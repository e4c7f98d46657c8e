//! Per-queue request counters and latency histograms, for metrics. Each queue's counters are
//! written by that queue's worker thread only, with plain loads and stores (no locked
//! read-modify-write, nothing shared between queues on the request path), and read by whoever
//! reports them. They live in the device, so they keep counting across driver resets.

use std::sync::atomic::{AtomicU64, Ordering};

/// Request types, as metrics name them.
pub const OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "discard",
    "write_zeroes",
    "get_id",
    "other",
];
/// The types with a latency histogram (those that reach the backend and take time).
pub const TIMED_OPS: usize = 5;
/// Upper bounds (exclusive) of the latency buckets, in microseconds: powers of two from 1 µs
/// to about a second (a last bucket holds the rest), so that a request's bucket is the bit
/// length of its latency, found without a search.
pub const LATENCY_BOUNDS_US: [u64; 21] = {
    let mut b = [0; 21];
    let mut i = 0;
    while i < b.len() {
        b[i] = 1 << i;
        i += 1;
    }
    b
};
/// Error statuses counted: IOERR and UNSUPP.
pub const ERRORS: [&str; 2] = ["ioerr", "unsupp"];

/// A counter with a single writer.
#[derive(Debug, Default)]
struct Counter(AtomicU64);

impl Counter {
    fn add(&self, n: u64) {
        // One writer (the queue's thread): a load and a store, no locked instruction.
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One request type's latency histogram.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [Counter; LATENCY_BOUNDS_US.len() + 1],
    sum_ns: Counter,
}

/// The counters of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    requests: [Counter; OPS.len()],
    bytes: [Counter; OPS.len()],
    errors: [Counter; ERRORS.len()],
    latency: [Histogram; TIMED_OPS],
    in_flight: Counter,
}

/// What a queue's counters say at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// Requests completed, by type (indexes of [`OPS`]).
    pub requests: [u64; OPS.len()],
    /// Bytes read or written, by type (for discard and write-zeroes: the range).
    pub bytes: [u64; OPS.len()],
    /// Requests completed with an error status (indexes of [`ERRORS`]).
    pub errors: [u64; ERRORS.len()],
    /// Per timed type: requests per latency bucket ([`LATENCY_BOUNDS_US`], then the rest),
    /// not cumulative.
    pub latency: [[u64; LATENCY_BOUNDS_US.len() + 1]; TIMED_OPS],
    /// Per timed type: the sum of latencies, in nanoseconds.
    pub latency_sum_ns: [u64; TIMED_OPS],
    /// Requests in the backend now.
    pub in_flight: u64,
}

impl QueueStats {
    /// Counts a completed request of type `op` (an index of [`OPS`]) moving `bytes`, with
    /// status `error` (an index of [`ERRORS`]) if it failed, that took `took_ns` if timed.
    pub(crate) fn complete(
        &self,
        op: usize,
        bytes: u64,
        error: Option<usize>,
        took_ns: Option<u64>,
    ) {
        self.requests[op].add(1);
        self.bytes[op].add(bytes);
        if let Some(e) = error {
            self.errors[e].add(1);
        }
        if let (Some(ns), Some(h)) = (took_ns, self.latency.get(op)) {
            let us = ns / 1000;
            let bucket = ((u64::BITS - us.leading_zeros()) as usize).min(LATENCY_BOUNDS_US.len());
            h.buckets[bucket].add(1);
            h.sum_ns.add(ns);
        }
    }

    /// Sets the in-flight gauge.
    pub(crate) fn set_in_flight(&self, n: usize) {
        self.in_flight.set(n as u64);
    }

    /// The counters now.
    pub fn snapshot(&self) -> QueueSnapshot {
        let mut s = QueueSnapshot::default();
        for i in 0..OPS.len() {
            s.requests[i] = self.requests[i].get();
            s.bytes[i] = self.bytes[i].get();
        }
        for i in 0..ERRORS.len() {
            s.errors[i] = self.errors[i].get();
        }
        for (t, h) in self.latency.iter().enumerate() {
            for (b, c) in h.buckets.iter().enumerate() {
                s.latency[t][b] = c.get();
            }
            s.latency_sum_ns[t] = h.sum_ns.get();
        }
        s.in_flight = self.in_flight.get();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_their_buckets() {
        let q = QueueStats::default();
        q.complete(0, 4096, None, Some(1_000));
        q.complete(0, 4096, None, Some(3_000));
        q.complete(0, 512, Some(0), Some(5_000_000_000));
        q.complete(5, 20, None, None);
        let s = q.snapshot();
        assert_eq!(s.requests[0], 3);
        assert_eq!(s.bytes[0], 8704);
        assert_eq!(s.errors, [1, 0]);
        assert_eq!(s.latency[0][1], 1, "1 µs: under 2");
        assert_eq!(s.latency[0][2], 1, "3 µs: under 4");
        assert_eq!(
            s.latency[0][LATENCY_BOUNDS_US.len()],
            1,
            "5 s: past the last bound"
        );
        assert_eq!(s.latency_sum_ns[0], 5_000_004_000);
        assert_eq!(s.requests[5], 1);
    }
}

//! In-flight request tracking in shared memory, so that a restarted daemon completes what its
//! predecessor had taken off the ring (vhost-user `INFLIGHT_SHMFD`, split rings).
//!
//! The area holds one region per queue, in the layout the vhost-user specification gives
//! ("Inflight I/O tracking"): a 16-byte header (`features: u64, version: u16, desc_num: u16,
//! last_batch_head: u16, used_idx: u16`) and one 16-byte entry per descriptor head
//! (`inflight: u8, padding: [u8; 5], next: u16, counter: u64`), each queue's region rounded up
//! to 64 bytes. The frontend keeps the memfd across our restarts and hands it back.
//!
//! Protocol per request: when a chain is taken off the avail ring, its entry gets
//! `inflight = 1` and the next `counter`; before its used element is written,
//! `last_batch_head = head`; after, `inflight = 0` and `used_idx = used ring index`. On restart,
//! a `used_idx` that differs from the ring's means we died between the used-ring write and
//! clearing the entry: that head is done. Every entry still marked is resubmitted, oldest
//! `counter` first, and the avail ring resumes at `used ring index + entries resubmitted`.
//!
//! The area is written by the frontend too and is not trusted: every index is bounded and a
//! bad area costs at most wrong resubmissions, which go through the usual chain validation.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;

use crate::memory::map_shared_file;

/// Version of the split-ring layout.
pub(crate) const INFLIGHT_VERSION: u16 = 1;
const HEADER: usize = 16;
const ENTRY: usize = 16;
const ALIGN: usize = 64;
/// Largest area accepted from a frontend (bounds what it can make us map).
const MAX_AREA: u64 = 1 << 30;

/// Bytes one queue of `queue_size` descriptors takes in the area.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + ENTRY * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// The shared in-flight area of a device: every queue's region back to back.
#[derive(Debug)]
pub struct InflightArea {
    region: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightArea {
    /// A new, zeroed area in a memfd, for a frontend that asks for one (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
        check_geometry(num_queues, queue_size)?;
        let size = u64::from(num_queues) * queue_region_size(queue_size) as u64;
        // SAFETY: memfd_create with a static NUL-terminated name; the new fd is owned below.
        let fd = unsafe {
            libc::memfd_create(
                c"vudev-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        // Sealed, so that the frontend that keeps it cannot shrink it under us (SIGBUS).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on the memfd just created.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((file, size))
    }

    /// Maps the area a frontend hands us (SET_INFLIGHT_FD), after checking it fits its file.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<Self>> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        check_geometry(num_queues, queue_size)?;
        let need = u64::from(num_queues) * queue_region_size(queue_size) as u64;
        if size < need || size > MAX_AREA {
            return Err(invalid(format!(
                "in-flight area of {size} bytes for {num_queues} queues of {queue_size} (needs {need})"
            )));
        }
        let region = map_shared_file(file, offset, size, "in-flight area")?;
        Ok(Arc::new(InflightArea {
            region,
            num_queues,
            queue_size,
        }))
    }

    /// The region of queue `index` for a ring of `ring_size` descriptors, if the area has one
    /// that large.
    pub fn queue(self: &Arc<Self>, index: u16, ring_size: u16) -> Option<QueueInflight> {
        if index >= self.num_queues || ring_size > self.queue_size {
            return None;
        }
        Some(QueueInflight {
            area: self.clone(),
            offset: usize::from(index) * queue_region_size(self.queue_size),
            size: ring_size,
            counter: 0,
        })
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> io::Result<()> {
    if num_queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("in-flight area for {num_queues} queues of {queue_size} descriptors"),
        ));
    }
    Ok(())
}

/// What a restarted queue must do first.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to resubmit, oldest first.
    pub heads: Vec<u16>,
    /// Where the avail ring resumes.
    pub next_avail: u16,
}

/// One queue's region, used by that queue's worker only.
#[derive(Debug)]
pub struct QueueInflight {
    area: Arc<InflightArea>,
    offset: usize,
    size: u16,
    counter: u64,
}

impl QueueInflight {
    fn ptr(&self, at: usize) -> *mut u8 {
        debug_assert!(self.offset + at < self.area.region.size());
        // SAFETY: callers pass `at` inside this queue's region (header, or an entry of a head
        // below `size <= queue_size`), which lies inside the mapping (checked in `map`).
        unsafe { self.area.region.as_ptr().add(self.offset + at) }
    }

    fn u16_at(&self, at: usize) -> &AtomicU16 {
        // SAFETY: `at` is 2-aligned within a 64-aligned region of a page-aligned mapping that
        // lives as long as `self.area`.
        unsafe { AtomicU16::from_ptr(self.ptr(at).cast()) }
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        // SAFETY: as in `ptr`; a byte needs no alignment.
        unsafe { AtomicU8::from_ptr(self.ptr(HEADER + ENTRY * usize::from(head))) }
    }

    fn counter_of(&self, head: u16) -> &AtomicU64 {
        // SAFETY: the counter is at offset 8 of a 16-aligned entry: 8-aligned.
        unsafe { AtomicU64::from_ptr(self.ptr(HEADER + ENTRY * usize::from(head) + 8).cast()) }
    }

    /// Reads what a previous daemon left, given the used index now in the ring; prepares the
    /// region for this run. A fresh or foreign-looking region is cleared.
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovery {
        let (version, desc_num) = (self.u16_at(8), self.u16_at(10));
        let (last_batch_head, used_idx) = (self.u16_at(12), self.u16_at(14));
        if version.load(Ordering::Acquire) != INFLIGHT_VERSION
            || desc_num.load(Ordering::Acquire) != self.size
        {
            return self.fresh(ring_used_idx);
        }
        if used_idx.load(Ordering::Acquire) != ring_used_idx {
            // Died after writing the used element of `last_batch_head`: it is complete.
            let head = last_batch_head.load(Ordering::Acquire);
            if head < self.size {
                self.inflight(head).store(0, Ordering::Release);
            }
            used_idx.store(ring_used_idx, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.counter_of(h).load(Ordering::Acquire), h))
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Recovery {
            next_avail: ring_used_idx.wrapping_add(pending.len() as u16),
            heads: pending.into_iter().map(|(_, h)| h).collect(),
        }
    }

    /// Forgets whatever the region holds (a new ring: the driver reset the device) and starts
    /// recording from used index `ring_used_idx`.
    pub fn fresh(&mut self, ring_used_idx: u16) -> Recovery {
        for head in 0..self.size {
            self.inflight(head).store(0, Ordering::Relaxed);
            self.counter_of(head).store(0, Ordering::Relaxed);
        }
        self.counter = 0;
        self.u16_at(10).store(self.size, Ordering::Relaxed);
        self.u16_at(14).store(ring_used_idx, Ordering::Relaxed);
        self.u16_at(8).store(INFLIGHT_VERSION, Ordering::Release);
        Recovery {
            heads: Vec::new(),
            next_avail: ring_used_idx,
        }
    }

    /// Chain `head` was taken off the ring.
    pub fn start(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.counter_of(head).store(self.counter, Ordering::Relaxed);
        self.counter = self.counter.wrapping_add(1);
        self.inflight(head).store(1, Ordering::Release);
    }

    /// Chain `head`'s used element is about to be written.
    pub fn before_used(&self, head: u16) {
        if head < self.size {
            self.u16_at(12).store(head, Ordering::Release);
        }
    }

    /// Chain `head`'s used element is written and the used index is now `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        if head >= self.size {
            return;
        }
        self.inflight(head).store(0, Ordering::Release);
        fence(Ordering::SeqCst);
        self.u16_at(14).store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(queues: u16, size: u16) -> Arc<InflightArea> {
        let (file, len) = InflightArea::create(queues, size).unwrap();
        InflightArea::map(file, 0, len, queues, size).unwrap()
    }

    #[test]
    fn layout_matches_the_specification() {
        assert_eq!(queue_region_size(128), 2112); // 16 + 128 * 16 = 2064, rounded up to 64
        assert_eq!(queue_region_size(256), 4160);
        let (f, len) = InflightArea::create(4, 128).unwrap();
        assert_eq!(len, 4 * 2112);
        assert_eq!(f.metadata().unwrap().len(), len);
    }

    #[test]
    fn a_restart_resubmits_what_was_in_flight_in_order() {
        let a = area(2, 8);
        let mut q = a.queue(1, 8).unwrap();
        assert_eq!(q.recover(0), Recovery::default());
        // Take 5, 2, 7 off the ring; 2 completes (used index 1); then 7 is being completed
        // when we die: its used element is written (used index 2) but its entry not cleared.
        for h in [5, 2, 7] {
            q.start(h);
        }
        q.before_used(2);
        q.after_used(2, 1);
        q.before_used(7);
        drop(q);
        let mut again = a.queue(1, 8).unwrap();
        let r = again.recover(2);
        assert_eq!(r.heads, vec![5]);
        assert_eq!(r.next_avail, 3);
        // Without the used-ring write, 7 is still in flight and resubmitted after 5.
        let mut q = a.queue(0, 8).unwrap();
        q.recover(10);
        for h in [5, 7] {
            q.start(h);
        }
        q.before_used(7);
        let r = a.queue(0, 8).unwrap().recover(10);
        assert_eq!(r.heads, vec![5, 7]);
        assert_eq!(r.next_avail, 12);
    }

    #[test]
    fn bad_areas_are_refused_or_cleared() {
        let (file, len) = InflightArea::create(1, 8).unwrap();
        let clone = || file.try_clone().unwrap();
        assert!(InflightArea::map(clone(), 0, len + 4096, 1, 8).is_err());
        assert!(InflightArea::map(clone(), 0, len, 2, 8).is_err());
        assert!(InflightArea::map(clone(), 0, len, 1, 6).is_err());
        assert!(InflightArea::map(clone(), u64::MAX, len, 1, 8).is_err());
        assert!(InflightArea::create(0, 8).is_err());
        let a = InflightArea::map(clone(), 0, len, 1, 8).unwrap();
        assert!(a.queue(1, 8).is_none());
        assert!(a.queue(0, 16).is_none());
        // A region claiming another geometry is cleared, not trusted.
        let mut q = a.queue(0, 8).unwrap();
        q.recover(0);
        q.start(3);
        q.u16_at(10).store(999, Ordering::Relaxed);
        assert_eq!(q.recover(4).heads, Vec::<u16>::new());
        // Out-of-range heads are ignored: the region does not change.
        let snapshot = |q: &QueueInflight| {
            let mut v: Vec<u64> = [8, 10, 12, 14]
                .iter()
                .map(|&o| u64::from(q.u16_at(o).load(Ordering::Relaxed)))
                .collect();
            v.extend((0..8).map(|h| u64::from(q.inflight(h).load(Ordering::Relaxed))));
            v.extend((0..8).map(|h| q.counter_of(h).load(Ordering::Relaxed)));
            v
        };
        q.fresh(4);
        q.start(3);
        let before = snapshot(&q);
        q.start(200);
        q.before_used(200);
        q.after_used(200, 5);
        assert_eq!(snapshot(&q), before);
        assert_eq!(q.recover(4).heads, vec![3]);
    }
}

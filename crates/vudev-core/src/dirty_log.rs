//! Dirty-page logging for live migration (vhost-user `LOG_SHMFD` with `VHOST_F_LOG_ALL`).
//!
//! While a frontend migrates its guest, every byte the device writes into guest memory (data
//! of read requests, status bytes, the used ring) must be reported, or the destination gets a
//! stale copy of that page. The frontend hands us a shared bitmap (`SET_LOG_BASE`): bit `n` set
//! means "guest physical page `n` (4 KiB) changed". Queue workers set bits with atomic ORs; the
//! frontend reads and clears them while it copies memory.
//!
//! The log is shared by the session (which installs the bitmap and switches logging on and off
//! as the frontend acks `LOG_ALL`) and the queue workers (which mark what they wrote).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use vm_memory::mmap::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

use crate::fault_guard::{sealed_against_shrinking, FaultGuard};
use crate::memory::map_shared_file;

/// Guest memory covered by one bit of the log.
pub(crate) const LOG_PAGE: u64 = 4096;

/// Largest log accepted (one bit per 4 KiB page: 256 MiB of log covers 8 TiB of guest memory).
/// Bounds what a frontend can make us map.
pub(crate) const MAX_LOG_SIZE: u64 = 256 << 20;

/// The dirty-page log of one vhost-user session.
#[derive(Debug, Default)]
pub struct DirtyLog {
    active: AtomicBool,
    bitmap: RwLock<Option<MmapRegion<()>>>,
    /// Guards the bitmap's mapping when its file could shrink (see `fault_guard.rs`).
    guard: std::sync::Mutex<Option<FaultGuard>>,
    warned: AtomicBool,
}

impl DirtyLog {
    /// A log with no bitmap, not logging.
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs the frontend's bitmap: `size` bytes at `offset` in `file`, mapped shared.
    /// Replaces (and unmaps) the previous one once no worker is writing to it. With `alarm`,
    /// a file not sealed against shrinking is guarded: a SIGBUS in it raises the alarm.
    pub fn set_bitmap(
        &self,
        file: File,
        offset: u64,
        size: u64,
        alarm: Option<&Arc<EventFd>>,
    ) -> io::Result<()> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        if size == 0 || size > MAX_LOG_SIZE {
            return Err(invalid(format!(
                "log size {size} is not between 1 and {MAX_LOG_SIZE} bytes"
            )));
        }
        let sealed = sealed_against_shrinking(file.as_raw_fd());
        let region = map_shared_file(file, offset, size, "dirty log")?;
        let guard = match alarm {
            Some(alarm) if !sealed => Some(FaultGuard::new(region.as_ptr(), region.size(), alarm)?),
            _ => None,
        };
        *self.bitmap.write().unwrap_or_else(|e| e.into_inner()) = Some(region);
        // The old bitmap is unmapped by now: its guard may go.
        *self.guard.lock().unwrap_or_else(|e| e.into_inner()) = guard;
        Ok(())
    }

    /// Switches logging on (the frontend acked `LOG_ALL`) or off.
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Release);
    }

    /// Drops the bitmap and stops logging.
    pub fn clear(&self) {
        self.set_active(false);
        *self.bitmap.write().unwrap_or_else(|e| e.into_inner()) = None;
        *self.guard.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A writer for one batch of completions, or `None` when nothing is to be logged.
    pub(crate) fn writer(&self) -> Option<LogWriter<'_>> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        let guard = self.bitmap.read().unwrap_or_else(|e| e.into_inner());
        guard.is_some().then_some(LogWriter { log: self, guard })
    }
}

/// Marks pages dirty while holding the bitmap (so it cannot be replaced mid-batch).
pub(crate) struct LogWriter<'a> {
    log: &'a DirtyLog,
    guard: RwLockReadGuard<'a, Option<MmapRegion<()>>>,
}

impl LogWriter<'_> {
    /// Marks every page that `[addr, addr + len)` touches. Pages past the end of the bitmap
    /// are not logged (the frontend sized the log for its memory; one warning is printed).
    pub(crate) fn mark(&self, addr: u64, len: u64) {
        let Some(bitmap) = self.guard.as_ref() else {
            return;
        };
        if len == 0 {
            return;
        }
        let first = addr / LOG_PAGE;
        let last = addr.saturating_add(len - 1) / LOG_PAGE;
        let bits = bitmap.size() as u64 * 8;
        if last >= bits && !self.log.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                addr,
                len,
                "write outside the frontend's dirty log; those pages are not logged"
            );
        }
        let base = bitmap.as_ptr();
        for page in first..=last.min(bits.saturating_sub(1)) {
            // SAFETY: `page / 8 < bitmap.size()` (page < bits), so the byte is inside the live
            // shared mapping, which the read guard keeps mapped; u8 needs no alignment.
            let byte = unsafe { AtomicU8::from_ptr(base.add((page / 8) as usize)) };
            byte.fetch_or(1 << (page % 8), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is ours.
        let fd = unsafe { libc::memfd_create(c"log-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a new descriptor nobody else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn bytes(f: &File, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0; len];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn marks_the_pages_a_write_touches_only_while_active() {
        let f = memfd(16);
        let log = DirtyLog::new();
        log.set_bitmap(f.try_clone().unwrap(), 0, 16, None).unwrap();
        assert!(log.writer().is_none(), "inactive log must not write");
        log.set_active(true);
        let w = log.writer().unwrap();
        w.mark(0x1fff, 2); // pages 1 and 2
        w.mark(9 * LOG_PAGE, 1); // page 9
        w.mark(0, 0); // nothing
        w.mark(1 << 40, 4096); // past the bitmap: ignored
        drop(w);
        let b = bytes(&f, 16);
        assert_eq!(b[0], 0b0000_0110);
        assert_eq!(b[1], 0b0000_0010);
        assert!(b[2..].iter().all(|&x| x == 0));
        log.set_active(false);
        assert!(log.writer().is_none());
    }

    #[test]
    fn refuses_logs_that_do_not_fit_their_file() {
        let log = DirtyLog::new();
        let f = memfd(4096);
        assert!(log.set_bitmap(f.try_clone().unwrap(), 0, 0, None).is_err());
        assert!(log
            .set_bitmap(f.try_clone().unwrap(), 0, 8192, None)
            .is_err());
        assert!(log
            .set_bitmap(f.try_clone().unwrap(), 4096, 1, None)
            .is_err());
        assert!(log
            .set_bitmap(f.try_clone().unwrap(), u64::MAX, 2, None)
            .is_err());
        assert!(log
            .set_bitmap(f.try_clone().unwrap(), 0, MAX_LOG_SIZE + 1, None)
            .is_err());
        log.set_bitmap(f, 0, 4096, None).unwrap();
    }
}

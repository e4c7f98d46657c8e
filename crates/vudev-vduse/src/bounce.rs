//! The VDUSE bounce buffer in our own memory (`VDUSE_IOTLB_REG_UMEM`), with `--bounce-umem`.
//!
//! Off by default: it pins the whole buffer (64 MiB) per device, showed no speed-up on the
//! machines we measure on, and once, in one of about twenty crash-recovery runs on 7.3, fio
//! hung after the last restart with it on, for a cause not yet found.
//!
//! The kernel copies every request's data through a bounce buffer (IOVA `[0, bounce_size)`,
//! 64 MiB by default). Left alone, its pages are the kernel's and we map them through the
//! device's IOTLB fd. Registered, they are ours: a memfd we map like any other region, which a
//! backend can then hand to io_uring or O_DIRECT as ordinary shared memory.
//!
//! What the kernel allows, and what this module therefore does (drivers/vdpa/vdpa_user):
//! - Registration succeeds only while the bounce map exists: after the driver's first
//!   streaming DMA map and until the next device reset. It is tried when a worker first needs
//!   the bounce region in a driver cycle, which is exactly then.
//! - Once registered, faults on the IOTLB fd's bounce mapping give SIGBUS and pages already
//!   mapped through it go stale. So the bounce region is never mapped through the fd in a
//!   cycle where registration succeeded, and registration is not retried in a cycle where it
//!   failed (the fd mapping is then used until the next reset).
//! - Pinning counts against RLIMIT_MEMLOCK, with no exemption for root: the soft limit is
//!   raised to fit the buffer where the hard limit (or privilege) allows.
//! - The kernel deregisters on its own when our device fd closes (a crash included), copying
//!   pages that are in use back into its own; a daemon adopting the device registers again.
//! - A reset keeps the registration, but a re-added vdpa device may get a new bounce domain,
//!   so each driver cycle deregisters the previous registration and registers afresh.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use vduse::VduseDevice;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};

use vudev_core::Mapping;

/// Memory registered as the bounce buffer.
struct Umem {
    file: File,
    size: u64,
    /// The mapping whose pages the kernel pinned; kept for as long as they are registered.
    pinned: MmapRegion<()>,
}

enum State {
    /// Not tried in this driver cycle.
    Untried,
    /// Registered in this cycle.
    Registered(Umem),
    /// Registered in an earlier cycle: deregister before registering again.
    Stale(Umem),
    /// Refused in this cycle: the bounce region is mapped through the IOTLB fd.
    Refused,
}

/// The bounce buffer of one VDUSE device.
pub(crate) struct BounceBuffer {
    dev: Arc<VduseDevice>,
    enabled: bool,
    state: Mutex<State>,
}

impl BounceBuffer {
    /// `enabled`: register at all (`--bounce-umem`); otherwise the bounce buffer stays the
    /// kernel's and is mapped through the IOTLB fd.
    pub(crate) fn new(dev: Arc<VduseDevice>, enabled: bool) -> Self {
        BounceBuffer {
            dev,
            enabled,
            state: Mutex::new(State::Untried),
        }
    }

    /// A device reset ends the driver cycle.
    pub(crate) fn reset(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *st = match std::mem::replace(&mut *st, State::Untried) {
            State::Registered(u) | State::Stale(u) => State::Stale(u),
            State::Untried | State::Refused => State::Untried,
        };
    }

    /// Our memory for the IOTLB range `[start, last]` if it is the bounce buffer and is (or now
    /// gets) registered; `None` to map the range through the IOTLB fd.
    pub(crate) fn mapping(&self, start: u64, last: u64) -> io::Result<Option<Mapping>> {
        if !self.enabled || start != 0 {
            return Ok(None);
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let size = last.wrapping_add(1);
        match &*st {
            State::Registered(u) if u.size == size => return u.mapping().map(Some),
            State::Refused => return Ok(None),
            State::Untried | State::Stale(_) | State::Registered(_) => {}
        }
        // From here on, whatever happens, the region is not registered again in this cycle.
        let old = match std::mem::replace(&mut *st, State::Refused) {
            State::Stale(u) | State::Registered(u) => {
                if let Err(e) = self.dev.dereg_umem(0, u.size) {
                    tracing::debug!("deregistering the previous bounce buffer: {e}");
                }
                Some(u)
            }
            State::Untried | State::Refused => None,
        };
        // Only the bounce region carries the capability, and only while its map exists.
        match self.dev.iova_info(0, 0) {
            Ok(Some(i)) if i.umem && i.start == 0 && i.last == last => {}
            _ => return Ok(None),
        }
        match self.register(old.filter(|u| u.size == size), size) {
            Ok(u) => {
                tracing::info!(
                    "bounce buffer registered: {} MiB of our memory (VDUSE_IOTLB_REG_UMEM)",
                    size >> 20
                );
                let m = u.mapping()?;
                *st = State::Registered(u);
                Ok(Some(m))
            }
            Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
                tracing::warn!(
                    "bounce buffer stays the kernel's until the next reset: {e}; raise \
                     RLIMIT_MEMLOCK (ulimit -l) to at least {} KiB to register it",
                    size >> 10
                );
                Ok(None)
            }
            Err(e) => {
                tracing::warn!("bounce buffer stays the kernel's until the next reset: {e}");
                Ok(None)
            }
        }
    }

    fn register(&self, reuse: Option<Umem>, size: u64) -> io::Result<Umem> {
        let u = match reuse {
            Some(u) => u,
            None => Umem::new(size)?,
        };
        allow_pinning(size);
        let uaddr = u.pinned.as_ptr() as u64;
        self.dev.reg_umem(uaddr, 0, size).map_err(|e| {
            let kind = e.raw_os_error().map_or(io::ErrorKind::Other, |n| {
                io::Error::from_raw_os_error(n).kind()
            });
            io::Error::new(kind, e.to_string())
        })?;
        Ok(u)
    }
}

impl Umem {
    fn new(size: u64) -> io::Result<Umem> {
        // SAFETY: memfd_create with a static, NUL-terminated name; the fd returned is ours.
        let fd = unsafe { libc::memfd_create(c"vudev-bounce".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let pinned = MmapRegionBuilder::new(size as usize)
            .with_file_offset(vm_memory::FileOffset::new(file.try_clone()?, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| io::Error::other(format!("cannot map the bounce memory: {e}")))?;
        Ok(Umem { file, size, pinned })
    }

    fn mapping(&self) -> io::Result<Mapping> {
        Ok(Mapping {
            file: self.file.try_clone()?,
            offset: 0,
            start: 0,
            last: self.size - 1,
            prot: libc::PROT_READ | libc::PROT_WRITE,
        })
    }
}

/// Raises RLIMIT_MEMLOCK's soft limit so that `bytes` (and a little more) can be pinned, as
/// far as the hard limit, or the privilege to raise it, allows.
fn allow_pinning(bytes: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the rlimit it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return;
    }
    let want = bytes.saturating_add(16 << 20);
    if lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= want {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: setrlimit reads the rlimit it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } != 0 {
        let up_to_hard = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above; raising the soft limit up to the hard one needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &up_to_hard) };
    }
}

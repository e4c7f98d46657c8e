//! Peer memory that may vanish: a vhost-user frontend can shrink (ftruncate) the file it gave
//! as guest memory or as its dirty log, and the next access to a page past the new end raises
//! SIGBUS, whose default action would kill the daemon and every export it serves. Each mapping
//! of a peer's file that is not sealed against shrinking is registered here. A SIGBUS inside
//! one is answered by replacing the page that faulted (only that page: it lies past the end
//! of the file, and would have killed us) with a zeroed anonymous one, so that the access
//! completes on zeros, and by signalling the mapping's alarm, an eventfd on which its session
//! disconnects the frontend. A SIGBUS anywhere else is a bug and keeps its default action.
//!
//! The table is fixed and lock-free, since the signal handler reads it: a slot holds a range,
//! an alarm fd and a generation, is taken with a compare-and-swap and given back by
//! [`FaultGuard`]'s drop. A guard may outlive its mapping for a while (its owner drops it once
//! no snapshot of that mapping is left); should the range be mapped again meanwhile, the
//! newest registration covering an address is the one alarmed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use vmm_sys_util::eventfd::EventFd;

/// Mappings guarded at once, process-wide: far more than the memory slots of every session
/// a daemon serves (a frontend has at most 509 regions, and sessions with many are rare).
const SLOTS: usize = 32768;

struct Slot {
    /// Start address; 0: free. Written last on register, first on release.
    start: AtomicUsize,
    len: AtomicUsize,
    alarm: AtomicI32,
    /// When it was registered (higher: newer).
    generation: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    alarm: AtomicI32::new(-1),
    generation: AtomicUsize::new(0),
};
static GENERATION: AtomicUsize = AtomicUsize::new(1);
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// A slot being filled (neither free nor readable by the handler yet).
const CLAIMED: usize = 1;

/// A registered mapping; dropping it unregisters it (drop it after the mapping is unmapped).
#[derive(Debug)]
pub struct FaultGuard {
    slot: usize,
    /// Keeps the alarm's fd open as long as the handler may write to it.
    _alarm: Arc<EventFd>,
}

impl FaultGuard {
    /// Guards `[addr, addr + len)`: a SIGBUS inside it zero-fills the range and makes `alarm`
    /// readable.
    pub fn new(addr: *const u8, len: usize, alarm: &Arc<EventFd>) -> io::Result<FaultGuard> {
        install();
        let start = addr as usize;
        if start <= CLAIMED || len == 0 {
            return Err(io::Error::other("an empty or null range cannot be guarded"));
        }
        for (i, s) in TABLE.iter().enumerate() {
            if s.start
                .compare_exchange(0, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                s.len.store(len, Ordering::Release);
                s.alarm.store(alarm.as_raw_fd(), Ordering::Release);
                s.generation
                    .store(GENERATION.fetch_add(1, Ordering::AcqRel), Ordering::Release);
                s.start.store(start, Ordering::Release);
                return Ok(FaultGuard {
                    slot: i,
                    _alarm: alarm.clone(),
                });
            }
        }
        Err(io::Error::other(format!(
            "more than {SLOTS} peer mappings at once"
        )))
    }
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.start.store(CLAIMED, Ordering::Release);
        s.alarm.store(-1, Ordering::Release);
        s.len.store(0, Ordering::Release);
        s.start.store(0, Ordering::Release);
    }
}

/// True if `file` is a memfd sealed against shrinking: it cannot raise SIGBUS, and needs no
/// guard.
pub fn sealed_against_shrinking(fd: RawFd) -> bool {
    // SAFETY: F_GET_SEALS only reads the fd's seals.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO signature and an empty
        // mask is valid; the handler only does async-signal-safe work.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction =
                on_sigbus as extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                tracing::error!(
                    "cannot catch SIGBUS ({}): a frontend that shrinks its memory file can \
                     kill vudev",
                    io::Error::last_os_error()
                );
            }
        }
    });
}

extern "C" fn on_sigbus(_sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    // The newest registration that covers the address.
    let mut found: Option<(usize, i32)> = None;
    for s in TABLE.iter() {
        let start = s.start.load(Ordering::Acquire);
        if start <= CLAIMED {
            continue;
        }
        let len = s.len.load(Ordering::Acquire);
        if addr < start || addr - start >= len {
            continue;
        }
        let generation = s.generation.load(Ordering::Acquire);
        if found.is_none_or(|(g, _)| generation > g) {
            found = Some((generation, s.alarm.load(Ordering::Acquire)));
        }
    }
    if let Some((_, alarm)) = found {
        // SAFETY: sysconf is a plain query.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        // SAFETY: the page faulted because it lies past the end of a peer's file inside a
        // registered mapping: it can never be read again, and a private zero page in its
        // place (mmap is a plain system call) lets the access complete. Nothing else moves.
        let replaced = unsafe {
            libc::mmap(
                (addr & !(page - 1)) as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if alarm >= 0 {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; the guard keeps the eventfd open.
            unsafe { libc::write(alarm, (&one as *const u64).cast(), 8) };
        }
        if replaced != libc::MAP_FAILED {
            return;
        }
    }
    // Not a peer's memory (or it could not be replaced): the default action; on return the
    // access faults again and the process ends as it would have.
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_shrunk_file_reads_zeros_and_raises_the_alarm_instead_of_killing_us() {
        let file = crate::testkit::memfd(1 << 20);
        let map = crate::MemoryMap::new(None);
        let alarm = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        map.set_fault_alarm(alarm.clone());
        map.replace(vec![crate::Mapping {
            file: file.try_clone().unwrap(),
            offset: 0,
            start: 0,
            last: (1 << 20) - 1,
            prot: libc::PROT_READ | libc::PROT_WRITE,
        }])
        .unwrap();
        let mem = map.memory();
        mem.write_obj(0x5a5a_u16, GuestAddress(0x8000)).unwrap();
        assert!(alarm.read().is_err(), "no alarm before the fault");
        file.set_len(0).unwrap();
        let v: u16 = mem.read_obj(GuestAddress(0x8000)).unwrap();
        assert_eq!(v, 0, "the vanished page reads as zeros");
        assert_eq!(alarm.read().unwrap(), 1);
        // Another page faults on its own, and is replaced the same way.
        mem.write_obj(7u8, GuestAddress(0x10)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10)).unwrap(), 7);
        assert_eq!(alarm.read().unwrap(), 1);
        drop(mem);
        map.clear();
        // A memfd sealed against shrinking needs no guard.
        let sealed = {
            // SAFETY: memfd_create with a valid name; the fd is owned by the File.
            let fd = unsafe { libc::memfd_create(c"sealed".as_ptr(), libc::MFD_ALLOW_SEALING) };
            // SAFETY: as above.
            unsafe { std::fs::File::from_raw_fd(fd) }
        };
        assert!(!sealed_against_shrinking(sealed.as_raw_fd()));
        // SAFETY: F_ADD_SEALS on our own memfd.
        assert_eq!(
            unsafe { libc::fcntl(sealed.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) },
            0
        );
        assert!(sealed_against_shrinking(sealed.as_raw_fd()));
    }
}

//! Peer memory that may vanish: a vhost-user frontend can shrink (ftruncate) the file it gave
//! as guest memory or as its dirty log, and the next access to a page past the new end raises
//! SIGBUS, whose default action would kill the daemon and every export it serves. Each mapping
//! of a peer's file that is not sealed against shrinking is registered here. A SIGBUS inside
//! one is answered by replacing that whole mapping with zeroed anonymous memory (the access
//! that faulted, and any later one, completes on zeros) and by signalling the mapping's
//! alarm, an eventfd on which its session disconnects the frontend. A SIGBUS anywhere else is
//! a bug and keeps its default action.
//!
//! The table is fixed and lock-free, since the signal handler reads it: a slot holds a range
//! and an alarm fd, and is taken with a compare-and-swap and given back by [`FaultGuard`]'s
//! drop, after its mapping is gone.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use vmm_sys_util::eventfd::EventFd;

/// Mappings guarded at once, process-wide: far more than the memory slots of every session
/// a daemon serves (a frontend has at most 509 regions, and sessions with many are rare).
const SLOTS: usize = 8192;

struct Slot {
    /// Start address; 0: free. Written last on register, first on release.
    start: AtomicUsize,
    len: AtomicUsize,
    alarm: AtomicI32,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    alarm: AtomicI32::new(-1),
};
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
    for s in TABLE.iter() {
        let start = s.start.load(Ordering::Acquire);
        if start <= CLAIMED {
            continue;
        }
        let len = s.len.load(Ordering::Acquire);
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: the range is a mapping of ours that its guard keeps registered; replacing
        // it with private zero pages (mmap is a plain system call) lets the faulting access
        // complete. Its owner stops using it on the alarm.
        let replaced = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let alarm = s.alarm.load(Ordering::Acquire);
        if alarm >= 0 {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; the guard keeps the eventfd open.
            unsafe { libc::write(alarm, (&one as *const u64).cast(), 8) };
        }
        if replaced != libc::MAP_FAILED {
            return;
        }
        break;
    }
    // Not a peer's memory (or it could not be replaced): the default action, on return the
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
        // Writes land too (on private zero pages), with no further fault.
        mem.write_obj(7u8, GuestAddress(0x10)).unwrap();
        assert!(alarm.read().is_err());
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

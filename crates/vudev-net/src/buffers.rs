//! The buffers of one descriptor chain, checked for their direction and turned into
//! iovecs over driver memory for one `readv`/`writev` on the TAP.

use smallvec::SmallVec;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vudev_core::memory::{one_slice, write_bytes};
use vudev_core::Memory;

/// At most this many iovecs go to one system call (the kernel's IOV_MAX is 1024; one is
/// kept for the receive path's overflow buffer).
pub const MAX_IOVECS: usize = 1023;

/// A chain's buffers, all of one direction: `(driver address, length)` in chain order.
#[derive(Debug)]
pub struct Buffers {
    /// The chain's head, to complete it with.
    pub head: u16,
    segments: SmallVec<[(u64, u32); 4]>,
    /// Their total length.
    pub len: u64,
    writable: bool,
}

impl Buffers {
    /// The buffers of `descs`, which must all be device-writable (`writable`) or all
    /// device-readable; the reason otherwise.
    pub fn of_chain(
        head: u16,
        descs: &[Descriptor],
        writable: bool,
    ) -> Result<Buffers, &'static str> {
        let mut b = Buffers {
            head,
            segments: SmallVec::new(),
            len: 0,
            writable,
        };
        for d in descs {
            if d.is_write_only() != writable {
                return Err(if writable {
                    "a receive chain holds a device-readable buffer"
                } else {
                    "a transmit chain holds a device-writable buffer"
                });
            }
            if d.len() > 0 {
                b.segments.push((d.addr().0, d.len()));
                b.len += u64::from(d.len());
            }
        }
        Ok(b)
    }

    /// How many buffers (descriptors) the chain has.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Appends iovecs for the first `limit` bytes of these buffers to `out` (at most
    /// [`MAX_IOVECS`] in all): false if a buffer is outside driver memory or there would be
    /// too many.
    pub fn iovecs(&self, mem: &Memory, limit: u64, out: &mut Vec<libc::iovec>) -> bool {
        let access = if self.writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut left = limit;
        for &(addr, len) in &self.segments {
            if left == 0 {
                break;
            }
            let len = u64::from(len).min(left) as usize;
            left -= len as u64;
            if let Some(s) = one_slice(mem, addr, len) {
                if out.len() >= MAX_IOVECS {
                    return false;
                }
                out.push(iovec(s.ptr_guard_mut().as_ptr(), s.len()));
                continue;
            }
            let Ok(slices) = mem.get_slices(GuestAddress(addr), len, access) else {
                return false;
            };
            for s in slices {
                let Ok(s) = s else { return false };
                if out.len() >= MAX_IOVECS {
                    return false;
                }
                out.push(iovec(s.ptr_guard_mut().as_ptr(), s.len()));
            }
        }
        true
    }

    /// Writes `bytes` at byte `offset` of these buffers (which hold them: the caller checks
    /// `len`); false if that is outside driver memory.
    pub fn write_at(&self, mem: &Memory, mut offset: u64, mut bytes: &[u8]) -> bool {
        for &(addr, len) in &self.segments {
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(bytes.len());
            let Some(at) = addr.checked_add(offset) else {
                return false;
            };
            if !write_bytes(mem, at, &bytes[..n]) {
                return false;
            }
            bytes = &bytes[n..];
            offset = 0;
            if bytes.is_empty() {
                return true;
            }
        }
        bytes.is_empty()
    }
}

fn iovec(ptr: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    }
}

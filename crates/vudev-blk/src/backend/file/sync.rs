//! The synchronous engine of the file backend: `preadv`/`pwritev` on the queue's own thread,
//! straight into driver memory, an aligned bounce buffer for O_DIRECT requests whose buffers
//! are not aligned; discard and write-zeroes (fallocate, or the block device ioctls) for both
//! engines.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::VolatileSlice;

use super::{BLKDISCARD, BLKZEROOUT, DIRECT_ALIGN};
use crate::backend::interface::IoOp;
use crate::backend::kit::{check_range, total_len, Capacity, RunNow};

/// One queue's synchronous I/O on the file.
pub(crate) struct FileQueue {
    file: Arc<File>,
    size: Capacity,
    direct: bool,
    block_device: bool,
    iovecs: Vec<libc::iovec>,
}

impl FileQueue {
    /// A queue on `file` of `size` bytes (`direct`: opened O_DIRECT; `block_device`: a block
    /// device, whose discard and zeroing take ioctls).
    pub(crate) fn new(file: Arc<File>, size: Capacity, direct: bool, block_device: bool) -> Self {
        FileQueue {
            file,
            size,
            direct,
            block_device,
            iovecs: Vec::new(),
        }
    }
}

impl RunNow for FileQueue {
    fn run(&mut self, op: IoOp<'_>) -> io::Result<()> {
        match op {
            IoOp::Read { offset, bufs } => {
                check_range(offset, total_len(bufs), self.size.get())?;
                if self.direct && !aligned(offset, bufs) {
                    return self.bounced(offset, bufs, false);
                }
                self.rw(offset, bufs, false)
            }
            IoOp::Write { offset, bufs } => {
                check_range(offset, total_len(bufs), self.size.get())?;
                if self.direct && !aligned(offset, bufs) {
                    return self.bounced(offset, bufs, true);
                }
                self.rw(offset, bufs, true)
            }
            // SAFETY: fdatasync on an fd we own.
            IoOp::Flush => cvt(unsafe { libc::fdatasync(self.fd()) }),
            IoOp::Discard { offset, len } => {
                check_range(offset, len, self.size.get())?;
                if self.block_device {
                    self.range_ioctl(BLKDISCARD, offset, len)
                } else {
                    // Discard is a hint: a file system without hole punching ignores it.
                    match self.fallocate(
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    ) {
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                        r => r,
                    }
                }
            }
            IoOp::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => {
                check_range(offset, len, self.size.get())?;
                if self.block_device {
                    return self.range_ioctl(BLKZEROOUT, offset, len);
                }
                let zero = self.fallocate(
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                );
                match zero {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        if may_unmap {
                            match self.fallocate(
                                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                                offset,
                                len,
                            ) {
                                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                                    self.write_zeroes(offset, len)
                                }
                                r => r,
                            }
                        } else {
                            self.write_zeroes(offset, len)
                        }
                    }
                    r => r,
                }
            }
        }
    }
}

impl FileQueue {
    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The file descriptor (for registering with io_uring).
    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd()
    }

    /// Size of the exported range.
    pub(crate) fn size(&self) -> u64 {
        self.size.get()
    }

    /// A second queue on the same file.
    pub(crate) fn clone_queue(&self) -> FileQueue {
        FileQueue {
            file: self.file.clone(),
            size: self.size.clone(),
            direct: self.direct,
            block_device: self.block_device,
            iovecs: Vec::new(),
        }
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an fd we own; the range was checked against the size.
        cvt(unsafe { libc::fallocate(self.fd(), mode, offset as i64, len as i64) })
    }

    fn range_ioctl(&self, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 from the valid pointer.
        cvt(unsafe { libc::ioctl(self.fd(), req as _, range.as_ptr()) })
    }

    fn write_zeroes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let chunk = 1 << 20;
        let buf = AlignedBuf::new(chunk)?;
        let end = offset + len;
        while offset < end {
            let n = ((end - offset) as usize).min(chunk);
            let iov = [libc::iovec {
                iov_base: buf.ptr as *mut libc::c_void,
                iov_len: n,
            }];
            self.transfer(&iov, offset, true)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn rw(&mut self, offset: u64, bufs: &[VolatileSlice<'_>], write: bool) -> io::Result<()> {
        let mut iovecs = std::mem::take(&mut self.iovecs);
        iovecs.clear();
        iovecs.extend(bufs.iter().map(|b| libc::iovec {
            iov_base: b.ptr_guard_mut().as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }));
        let r = self.transfer(&iovecs, offset, write);
        self.iovecs = iovecs;
        r
    }

    /// preadv/pwritev of the whole iovec list, resuming after short transfers.
    fn transfer(&self, iov: &[libc::iovec], mut offset: u64, write: bool) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = iov.iter().filter(|v| v.iov_len > 0).copied().collect();
        let mut first = 0;
        while first < iov.len() {
            let cnt = (iov.len() - first).min(1024) as i32;
            // SAFETY: the iovecs point into driver memory or our own buffers, which stay
            // mapped for the call (the caller holds the memory snapshot).
            let n = unsafe {
                if write {
                    libc::pwritev(self.fd(), iov[first..].as_ptr(), cnt, offset as i64)
                } else {
                    libc::preadv(self.fd(), iov[first..].as_ptr(), cnt, offset as i64)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the backing file ended early (was it truncated?)",
                ));
            }
            let mut n = n as usize;
            offset += n as u64;
            while first < iov.len() && n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            }
            if n > 0 {
                let v = &mut iov[first];
                // SAFETY: advancing inside the same buffer by fewer bytes than its length.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
            }
        }
        Ok(())
    }

    fn bounced(&self, offset: u64, bufs: &[VolatileSlice<'_>], write: bool) -> io::Result<()> {
        let len = total_len(bufs) as usize;
        if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "O_DIRECT request not aligned to 512 bytes",
            ));
        }
        let buf = AlignedBuf::new(len.max(1))?;
        // SAFETY: `buf` is `len` bytes we own, alive for this function.
        let bounce = unsafe { VolatileSlice::new(buf.ptr, len) };
        let iov = [libc::iovec {
            iov_base: buf.ptr as *mut libc::c_void,
            iov_len: len,
        }];
        let mut pos = 0;
        if write {
            for b in bufs {
                b.copy_to_volatile_slice(bounce.subslice(pos, b.len()).map_err(io::Error::other)?);
                pos += b.len();
            }
            self.transfer(&iov, offset, true)
        } else {
            self.transfer(&iov, offset, false)?;
            for b in bufs {
                bounce
                    .subslice(pos, b.len())
                    .map_err(io::Error::other)?
                    .copy_to_volatile_slice(*b);
                pos += b.len();
            }
            Ok(())
        }
    }
}

/// True if O_DIRECT can take `bufs` at `offset` as they are.
pub(crate) fn aligned(offset: u64, bufs: &[VolatileSlice<'_>]) -> bool {
    offset.is_multiple_of(512)
        && bufs.iter().all(|b| {
            (b.ptr_guard().as_ptr() as usize).is_multiple_of(512) && b.len().is_multiple_of(512)
        })
}

fn cvt(r: i32) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A zeroed, page-aligned heap buffer.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len, DIRECT_ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size (callers pass len >= 1).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(AlignedBuf { ptr, layout })
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

// SAFETY: the raw pointers inside `iovecs` are scratch space rebuilt for every request and
// never dereferenced outside `run`; the queue is used by one thread at a time.
unsafe impl Send for FileQueue {}

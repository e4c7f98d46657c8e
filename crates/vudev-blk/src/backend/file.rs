//! The file backend: a regular file or a block device, buffered or O_DIRECT.
//!
//! Reads and writes go to io_uring (`uring.rs`), or run synchronously on the queue's worker
//! thread with `preadv`/`pwritev`, straight into driver memory either way (no copy), except
//! O_DIRECT requests whose buffers are not aligned, which go through an aligned bounce buffer.
//! [`Aio::Auto`] picks io_uring except on tmpfs-like files where io_uring would punt.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::VolatileSlice;

use super::uring::UringQueue;
use super::{check_range, total_len, BlockBackend, Immediate, IoOp, QueueBackend, RunNow};

/// `BLKGETSIZE64`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKDISCARD`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// Alignment O_DIRECT needs for memory, offsets and lengths (logical block size of most disks).
const DIRECT_ALIGN: usize = 4096;

/// How a file backend submits I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aio {
    /// io_uring, except for a memory-backed file (tmpfs, ramfs) opened buffered on which the
    /// kernel cannot try a read without blocking: there io_uring hands every request to a
    /// kernel worker thread, and a copy on the queue's own thread is several times faster.
    #[default]
    Auto,
    /// io_uring: asynchronous, batched per kick (falls back to `Sync` where unavailable).
    IoUring,
    /// preadv/pwritev on the queue's worker thread.
    Sync,
}

/// What [`Aio::Auto`] picks for `file`, and why when it is not io_uring.
fn choose_aio(file: &File, direct: bool) -> (Aio, Option<&'static str>) {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: fstatfs fills the zeroed statfs it is given.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call; `st` is valid for writes.
    if direct || unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return (Aio::IoUring, None);
    }
    if !matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC) {
        return (Aio::IoUring, None);
    }
    // io_uring tries a request inline only where RWF_NOWAIT is supported; elsewhere it punts.
    let mut byte = [0u8; 1];
    let iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: one iovec naming a valid 1-byte buffer; the fd is open for reading.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
    if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
        (
            Aio::Sync,
            Some("memory-backed file that io_uring would hand to a kernel thread per request"),
        )
    } else {
        (Aio::IoUring, None)
    }
}

/// A file or block device opened for export.
#[derive(Debug)]
pub struct FileBackend {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    direct: bool,
    block_device: bool,
    /// `IoUring` or `Sync`: [`Aio::Auto`] is resolved at open.
    aio: Aio,
    /// Why `Auto` chose `Sync`.
    why: Option<&'static str>,
}

impl FileBackend {
    /// Opens `path`. Errors say what is wrong with the file.
    pub fn open(path: &Path, read_only: bool, direct: bool, aio: Aio) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        opts.custom_flags(flags);
        let file = opts.open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the valid pointer.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size) } < 0 {
                return Err(io::Error::last_os_error());
            }
            size
        } else if meta.file_type().is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        let (aio, why) = match aio {
            // A block device node sits on devtmpfs, which statfs reports as tmpfs.
            Aio::Auto if block_device => (Aio::IoUring, None),
            Aio::Auto => choose_aio(&file, direct),
            chosen => (chosen, None),
        };
        Ok(FileBackend {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            read_only,
            direct,
            block_device,
            aio,
            why,
        })
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn queue(&self) -> io::Result<Box<dyn QueueBackend>> {
        let sync = FileQueue {
            file: self.file.clone(),
            size: self.size,
            direct: self.direct,
            block_device: self.block_device,
            iovecs: Vec::new(),
        };
        if self.aio == Aio::IoUring {
            match UringQueue::new(sync.clone_queue(), self.direct) {
                Ok(q) => return Ok(Box::new(q)),
                Err(e) => tracing::warn!("io_uring unavailable ({e}); using synchronous I/O"),
            }
        }
        Ok(Immediate::boxed(sync))
    }
    fn describe(&self) -> String {
        format!(
            "file {}{}{}, {} bytes",
            self.path.display(),
            if self.direct { ", O_DIRECT" } else { "" },
            match (self.aio, self.why) {
                (Aio::Sync, Some(why)) => format!(", synchronous I/O ({why})"),
                (Aio::Sync, None) => ", synchronous I/O".into(),
                _ => ", io_uring".into(),
            },
            self.size
        )
    }
}

pub(crate) struct FileQueue {
    file: Arc<File>,
    size: u64,
    direct: bool,
    block_device: bool,
    iovecs: Vec<libc::iovec>,
}

impl RunNow for FileQueue {
    fn run(&mut self, op: IoOp<'_>) -> io::Result<()> {
        match op {
            IoOp::Read { offset, bufs } => {
                check_range(offset, total_len(bufs), self.size)?;
                if self.direct && !aligned(offset, bufs) {
                    return self.bounced(offset, bufs, false);
                }
                self.rw(offset, bufs, false)
            }
            IoOp::Write { offset, bufs } => {
                check_range(offset, total_len(bufs), self.size)?;
                if self.direct && !aligned(offset, bufs) {
                    return self.bounced(offset, bufs, true);
                }
                self.rw(offset, bufs, true)
            }
            // SAFETY: fdatasync on an fd we own.
            IoOp::Flush => cvt(unsafe { libc::fdatasync(self.fd()) }),
            IoOp::Discard { offset, len } => {
                check_range(offset, len, self.size)?;
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
                check_range(offset, len, self.size)?;
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
        self.size
    }

    /// A second queue on the same file.
    pub(crate) fn clone_queue(&self) -> FileQueue {
        FileQueue {
            file: self.file.clone(),
            size: self.size,
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

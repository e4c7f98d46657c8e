//! The file backend: a regular file or a block device, buffered or O_DIRECT.
//!
//! Reads and writes go to io_uring ([`uring`]), or run synchronously on the queue's worker
//! thread with `preadv`/`pwritev`, straight into driver memory either way (no copy), except
//! O_DIRECT requests whose buffers are not aligned, which go through an aligned bounce buffer.
//! [`Aio::Auto`] picks io_uring except on tmpfs-like files where io_uring would punt.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::interface::{BlockBackend, QueueBackend};
use super::kit::{Capacity, Immediate};

mod sync;
mod uring;

use sync::FileQueue;
use uring::UringQueue;

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

/// The size of a block device (BLKGETSIZE64).
fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the valid pointer.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// A file or block device opened for export.
#[derive(Debug)]
pub struct FileBackend {
    file: Arc<File>,
    path: PathBuf,
    size: Capacity,
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
        Self::from_file(opts.open(path)?, path, read_only, direct, aio)
    }

    /// [`FileBackend::open`] for a file opened elsewhere (by a privileged helper): `file` must
    /// be `path` opened read-only or read-write as `read_only` says, with O_DIRECT if `direct`.
    pub fn from_file(
        file: File,
        path: &Path,
        read_only: bool,
        direct: bool,
        aio: Aio,
    ) -> io::Result<Self> {
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            block_device_size(&file)?
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
            size: Capacity::new(size),
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
        self.size.get()
    }
    fn resize(&self, bytes: u64) -> io::Result<()> {
        if self.block_device {
            // A block device is resized by its owner (lvresize, a SAN): take its new size.
            let now = block_device_size(&self.file)?;
            if now < bytes {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is {now} bytes: resize the block device itself first",
                        self.path.display()
                    ),
                ));
            }
        } else {
            // Extend a file that is shorter; cut one only when the export shrinks (a grow
            // never cuts what lies past the export's end in a longer file).
            let len = self.file.metadata()?.len();
            let cut = bytes < self.size.get() && len > bytes;
            if len < bytes || cut {
                if self.read_only {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{} is open read-only: it cannot change size",
                            self.path.display()
                        ),
                    ));
                }
                self.file.set_len(bytes)?;
            }
        }
        self.size.set(bytes);
        Ok(())
    }
    fn has_data_beyond(&self, bytes: u64) -> bool {
        if self.block_device {
            return true;
        }
        // SAFETY: lseek on an fd we own; it moves the offset, which no I/O here uses.
        let at =
            unsafe { libc::lseek(self.file.as_raw_fd(), bytes as libc::off_t, libc::SEEK_DATA) };
        !(at < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO))
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn queue(&self) -> io::Result<Box<dyn QueueBackend>> {
        let sync = FileQueue::new(
            self.file.clone(),
            self.size.clone(),
            self.direct,
            self.block_device,
        );
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
            self.size.get()
        )
    }
}

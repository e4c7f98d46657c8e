//! The memory backend: the disk lives in anonymous memory and is lost on exit.

use std::io;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{VolatileMemory, VolatileSlice};

use super::interface::{BlockBackend, IoOp, QueueBackend};
use super::kit::{check_range, total_len, zero_fill, Immediate, RunNow};

/// A RAM disk of a fixed size, shared by every queue.
#[derive(Debug)]
pub struct MemoryBackend {
    region: Arc<MmapRegion<()>>,
    read_only: bool,
}

impl MemoryBackend {
    /// Allocates `size` bytes (pages are only touched when written).
    pub fn new(size: u64, read_only: bool) -> io::Result<Self> {
        let len = usize::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memory size too large"))?;
        let region = MmapRegion::new(len).map_err(|e| {
            io::Error::other(format!("cannot allocate {size} bytes of memory: {e}"))
        })?;
        Ok(MemoryBackend {
            region: Arc::new(region),
            read_only,
        })
    }
}

impl BlockBackend for MemoryBackend {
    fn size(&self) -> u64 {
        self.region.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn queue(&self) -> io::Result<Box<dyn QueueBackend>> {
        Ok(Immediate::boxed(MemoryQueue {
            region: self.region.clone(),
        }))
    }
    fn describe(&self) -> String {
        format!("memory, {} bytes", self.region.len())
    }
}

struct MemoryQueue {
    region: Arc<MmapRegion<()>>,
}

impl MemoryQueue {
    fn disk(&self, offset: u64, len: u64) -> io::Result<VolatileSlice<'_>> {
        check_range(offset, len, self.region.len() as u64)?;
        self.region
            .get_slice(offset as usize, len as usize)
            .map_err(io::Error::other)
    }
}

impl RunNow for MemoryQueue {
    fn run(&mut self, op: IoOp<'_>) -> io::Result<()> {
        match op {
            IoOp::Read { offset, bufs } => {
                let mut pos = offset;
                check_range(offset, total_len(bufs), self.region.len() as u64)?;
                for b in bufs {
                    self.disk(pos, b.len() as u64)?.copy_to_volatile_slice(*b);
                    pos += b.len() as u64;
                }
                Ok(())
            }
            IoOp::Write { offset, bufs } => {
                let mut pos = offset;
                check_range(offset, total_len(bufs), self.region.len() as u64)?;
                for b in bufs {
                    b.copy_to_volatile_slice(self.disk(pos, b.len() as u64)?);
                    pos += b.len() as u64;
                }
                Ok(())
            }
            IoOp::Flush => Ok(()),
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len, .. } => {
                // Discarded ranges read back as zeros, which write-zeroes needs too.
                zero_fill(&self.disk(offset, len)?)
            }
        }
    }
}

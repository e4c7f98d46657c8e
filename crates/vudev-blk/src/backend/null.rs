//! The null backend: reads return zeros, writes are dropped. For tests and benchmarks.

use std::io;

use super::interface::{BlockBackend, IoOp, QueueBackend};
use super::kit::{check_range, total_len, zero_fill, Capacity, Immediate, RunNow};

/// A device of `size` bytes that stores nothing.
#[derive(Debug)]
pub struct NullBackend {
    size: Capacity,
    read_only: bool,
}

impl NullBackend {
    /// A null device of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> Self {
        NullBackend {
            size: Capacity::new(size),
            read_only,
        }
    }
}

impl BlockBackend for NullBackend {
    fn size(&self) -> u64 {
        self.size.get()
    }
    fn resize(&self, bytes: u64) -> io::Result<()> {
        self.size.set(bytes);
        Ok(())
    }
    fn has_data_beyond(&self, _bytes: u64) -> bool {
        false
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn queue(&self) -> io::Result<Box<dyn QueueBackend>> {
        Ok(Immediate::boxed(NullQueue {
            size: self.size.clone(),
        }))
    }
    fn describe(&self) -> String {
        format!("null, {} bytes", self.size.get())
    }
}

struct NullQueue {
    size: Capacity,
}

impl RunNow for NullQueue {
    fn run(&mut self, op: IoOp<'_>) -> io::Result<()> {
        match op {
            IoOp::Read { offset, bufs } => check_range(offset, total_len(bufs), self.size.get())
                .and_then(|_| bufs.iter().try_for_each(zero_fill)),
            IoOp::Write { offset, bufs } => check_range(offset, total_len(bufs), self.size.get()),
            IoOp::Flush => Ok(()),
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len, .. } => {
                check_range(offset, len, self.size.get())
            }
        }
    }
}

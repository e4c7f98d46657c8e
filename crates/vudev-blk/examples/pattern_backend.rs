//! A block backend written outside the `vudev-blk` crate, with only its public interface: a
//! read-only disk whose every byte is computed from its offset (handy to check a client reads
//! the right place). A synchronous queue (`RunNow`) becomes an asynchronous one through
//! `Immediate`; `check_range` bounds each request.
//!
//! Run: `cargo run -p vudev-blk --example pattern_backend` (it reads through its own queue and
//! checks what comes back). To serve it, hand it to `vudev_blk::BlockDevice::new` like any
//! other backend.

use std::io;
use std::sync::Arc;

use vm_memory::{Bytes, VolatileSlice};
use vudev_blk::{check_range, total_len, BlockBackend, Immediate, IoOp, QueueBackend, RunNow};

/// The byte at `offset`.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A read-only disk of `size` bytes holding [`pattern`].
struct PatternBackend {
    size: u64,
}

impl BlockBackend for PatternBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn queue(&self) -> io::Result<Box<dyn QueueBackend>> {
        Ok(Immediate::boxed(PatternQueue { size: self.size }))
    }
    fn describe(&self) -> String {
        format!("pattern disk, {} bytes", self.size)
    }
}

struct PatternQueue {
    size: u64,
}

impl RunNow for PatternQueue {
    fn run(&mut self, op: IoOp<'_>) -> io::Result<()> {
        match op {
            IoOp::Read { offset, bufs } => {
                check_range(offset, total_len(bufs), self.size)?;
                let mut at = offset;
                for b in bufs {
                    let data: Vec<u8> = (at..at + b.len() as u64).map(pattern).collect();
                    b.write_slice(&data, 0).map_err(io::Error::other)?;
                    at += b.len() as u64;
                }
                Ok(())
            }
            IoOp::Flush => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the pattern disk is read-only",
            )),
        }
    }
}

fn main() {
    let backend: Arc<dyn BlockBackend> = Arc::new(PatternBackend { size: 1 << 20 });
    let mut q = backend.queue().expect("a queue");
    let mut buf = vec![0u8; 4096];
    {
        let slice = VolatileSlice::from(&mut buf[..]);
        q.submit(
            1,
            IoOp::Read {
                offset: 8192,
                bufs: &[slice],
            },
        );
        q.submit(
            2,
            IoOp::Write {
                offset: 0,
                bufs: &[slice],
            },
        );
    }
    let mut done = Vec::new();
    q.reap(&mut done);
    assert_eq!(done.len(), 2);
    assert!(done[0].1.is_ok() && done[1].1.is_err(), "{done:?}");
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(8192 + i as u64)));
    println!(
        "{}: a read at 8192 came back right; a write was refused",
        backend.describe()
    );
}

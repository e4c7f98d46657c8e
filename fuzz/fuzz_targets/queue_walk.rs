//! The queue worker over a ring the input writes: descriptor table, avail ring, indirect
//! tables, request headers and buffers all come from the input. A real [`Worker`] (the same
//! one both transports run) walks and bounds the chains and the virtio-blk device handles
//! them against a memory disk. Any panic (on any thread) aborts; a hang trips the timeout.
//! Input: the first 64 bytes set the avail index and ring; the rest is driver memory from
//! address 0 (the descriptor table lives at 0, the avail ring at 0x1000, the used ring at
//! 0x2000).
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vudev_blk::{BlockConfig, BlockDevice, MemoryBackend};
use vudev_core::{Device, Mapping, MemoryMap, Notifier, QueueSetup, Tracking, Worker};

const MEM: u64 = 0x40000;
const QSIZE: u16 = 32;

struct NoIrq;
impl Notifier for NoIrq {
    fn notify(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
}

fn memfd() -> File {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(MEM).unwrap();
    f
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (ring, contents) = data.split_at(data.len().min(2 + 2 * usize::from(QSIZE)));
    let map = Arc::new(MemoryMap::new(None));
    map.replace(vec![Mapping {
        file: memfd(),
        offset: 0,
        start: 0,
        last: MEM - 1,
        prot: libc::PROT_READ | libc::PROT_WRITE,
    }])
    .unwrap();
    let mem = map.memory();
    mem.write_slice(&contents[..contents.len().min(0x1000)], GuestAddress(0))
        .unwrap();
    if contents.len() > 0x1000 {
        let rest = &contents[0x1000..];
        mem.write_slice(
            &rest[..rest.len().min((MEM - 0x3000) as usize)],
            GuestAddress(0x3000),
        )
        .unwrap();
    }
    // avail: flags 0, idx from the input, then the ring entries.
    mem.write_slice(&ring[..2], GuestAddress(0x1002)).unwrap();
    mem.write_slice(&ring[2..], GuestAddress(0x1004)).unwrap();
    drop(mem);
    let cfg = BlockConfig {
        queue_size: QSIZE,
        serial: "fuzz".into(),
        ..BlockConfig::new(1 << 20)
    };
    let dev = BlockDevice::new(cfg, Arc::new(MemoryBackend::new(1 << 20, false).unwrap()));
    let handler = dev.queue_handler(0, dev.features()).unwrap();
    let setup = QueueSetup {
        index: 0,
        size: QSIZE,
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
        next_avail: 0,
        next_used: 0,
        event_idx: data[0] & 1 != 0,
    };
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // The worker looks at the ring as soon as it starts; stopping it waits for that pass.
    let worker = Worker::start(
        setup,
        handler,
        map,
        kick,
        Arc::new(NoIrq),
        Tracking::default(),
        &Default::default(),
    )
    .unwrap();
    worker.stop();
});

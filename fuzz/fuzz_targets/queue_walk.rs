//! The queue worker over a ring the input writes: descriptor table, avail ring, indirect
//! tables, request headers and buffers all come from the input. A real worker (the same
//! one both transports run, over the core test kit's ring) walks and bounds the chains and the virtio-blk device handles
//! them against a memory disk. Any panic (on any thread) aborts; a hang trips the timeout.
//! Input: the first 64 bytes set the avail index and ring; the rest is driver memory from
//! address 0 (the descriptor table lives at 0, the avail ring at 0x1000, the used ring at
//! 0x2000).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vudev_blk::{BlockConfig, BlockDevice, MemoryBackend};
use vudev_core::testkit::RingDriver;
use vudev_core::{Device, Tracking};

const MEM: u64 = 0x40000;
const QSIZE: u16 = 32;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (ring, contents) = data.split_at(data.len().min(2 + 2 * usize::from(QSIZE)));
    let mut driver = RingDriver::new(MEM, QSIZE);
    let mem = driver.map.memory();
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
    // The worker looks at the ring as soon as it starts; stopping it waits for that pass.
    driver.start(handler, Tracking::default(), 0, data[0] & 1 != 0);
    driver.stop();
});

//! virtio-blk request parsing: descriptors and driver memory both come from the input.
//! Input: one byte N (descriptor count, at most 16), N descriptors of 16 bytes (address,
//! length, flags, next, little endian), then the first bytes of a 64 KiB driver memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};
use vudev_blk::request::Request;
use vudev_core::Memory;

const MEM: usize = 0x10000;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 17);
    if rest.len() < n * 16 {
        return;
    }
    let (raw, contents) = rest.split_at(n * 16);
    let descs: Vec<Descriptor> = raw
        .chunks_exact(16)
        .map(|c| {
            let u64_at = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().unwrap());
            let u32_at = |i: usize| u32::from_le_bytes(c[i..i + 4].try_into().unwrap());
            let u16_at = |i: usize| u16::from_le_bytes(c[i..i + 2].try_into().unwrap());
            Descriptor::new(u64_at(0), u32_at(8), u16_at(12), u16_at(14))
        })
        .collect();
    let mem = Memory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(&contents[..contents.len().min(MEM)], GuestAddress(0))
        .unwrap();
    let mut req = Request::default();
    match req.parse(&mem, &descs) {
        // A parsed request has a type and its status byte inside the last buffer.
        Ok(()) => {
            assert!(req.kind.is_some());
            let last = descs.last().unwrap();
            assert!(req.status >= last.addr().0);
        }
        Err(_) => assert!(req.kind.is_none()),
    }
});

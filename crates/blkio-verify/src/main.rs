//! blkio-verify: an independent virtio-blk client for tests. It opens a device through the
//! `blkio` crate (pure-Rust libblkio), writes pseudo-random patterns at several offsets and
//! sizes, flushes, reads them back and compares; then checks write-zeroes. Prints one
//! `PASS`/`FAIL` line per step and exits non-zero on the first failure.
//!
//! Usage: blkio-verify --driver virtio-blk-vhost-vdpa|virtio-blk-vhost-user --path PATH

use std::mem::MaybeUninit;
use std::process::ExitCode;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

struct Args {
    driver: String,
    path: String,
}

fn parse_args() -> Result<Args, String> {
    let mut driver = None;
    let mut path = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--driver" => driver = it.next(),
            "--path" => path = it.next(),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(Args {
        driver: driver.ok_or("--driver is required")?,
        path: path.ok_or("--path is required")?,
    })
}

/// xorshift64: a reproducible byte pattern per (seed, offset).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn wait_one(q: &mut Blkioq, what: &str) -> Result<(), String> {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let n = q
        .do_io(&mut c, 1, None, None)
        .map_err(|e| format!("{what}: do_io: {}", e.message()))?;
    if n != 1 {
        return Err(format!("{what}: no completion"));
    }
    // SAFETY: do_io initialised the first `n` completions.
    let c = unsafe { c[0].assume_init_read() };
    if c.ret != 0 {
        return Err(format!("{what}: failed with errno {}", -c.ret));
    }
    Ok(())
}

fn run(args: &Args) -> Result<(), String> {
    let e = |what: &'static str| move |err: blkio::Error| format!("{what}: {}", err.message());
    let mut b = Blkio::new(&args.driver).map_err(e("new"))?;
    b.set_str("path", &args.path).map_err(e("set path"))?;
    b.connect().map_err(e("connect"))?;
    b.set_i32("num-queues", 1).map_err(e("set num-queues"))?;
    let mut started = b.start().map_err(e("start"))?;
    let capacity = b.get_u64("capacity").map_err(e("capacity"))?;
    println!("PASS connect: capacity {capacity} bytes");
    let len = 1 << 20;
    let region: MemoryRegion = b.alloc_mem_region(2 * len).map_err(e("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(e("map_mem_region"))?;
    let q = &mut started.queues[0];
    // SAFETY: the region is `2 * len` bytes of our mapping, alive until `region` is freed.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, 2 * len) };
    let (wbuf, rbuf) = mem.split_at_mut(len);

    let cases: [(u64, usize); 5] = [
        (0, 4096),
        (16384 + 512, 512),
        (1 << 20, 65536),
        (3 << 20, len),
        (capacity - 8192, 8192),
    ];
    for (i, &(off, n)) in cases.iter().enumerate() {
        if off + n as u64 > capacity {
            continue;
        }
        fill(&mut wbuf[..n], 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1) ^ off);
        q.write(off, wbuf.as_ptr(), n, i, ReqFlags::empty());
        wait_one(q, "write")?;
    }
    q.flush(0, ReqFlags::empty());
    wait_one(q, "flush")?;
    for (i, &(off, n)) in cases.iter().enumerate() {
        if off + n as u64 > capacity {
            continue;
        }
        fill(&mut wbuf[..n], 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1) ^ off);
        rbuf[..n].fill(0xee);
        q.read(off, rbuf.as_mut_ptr(), n, i, ReqFlags::empty());
        wait_one(q, "read")?;
        if wbuf[..n] != rbuf[..n] {
            return Err(format!(
                "read-back of {n} bytes at {off} differs from what was written"
            ));
        }
        println!("PASS write-read {n} bytes at {off}");
    }
    q.write_zeroes(1 << 20, 65536, 0, ReqFlags::empty());
    wait_one(q, "write-zeroes")?;
    q.read(1 << 20, rbuf.as_mut_ptr(), 65536, 0, ReqFlags::empty());
    wait_one(q, "read after write-zeroes")?;
    if rbuf[..65536].iter().any(|&x| x != 0) {
        return Err("write-zeroes range does not read back as zeros".into());
    }
    println!("PASS write-zeroes");
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("blkio-verify: {e}\nusage: blkio-verify --driver DRIVER --path PATH");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => {
            println!("PASS all");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL {e}");
            ExitCode::FAILURE
        }
    }
}

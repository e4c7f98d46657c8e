//! blkio-verify: an independent virtio-blk client for tests. It opens a device through the
//! `blkio` crate (pure-Rust libblkio) and, on every queue it asked for:
//! - writes pseudo-random patterns at several offsets and sizes one at a time, flushes, reads
//!   them back and compares;
//! - submits a batch of writes at once (up to `--depth` in flight), then a batch of reads, and
//!   compares (completions may arrive in any order);
//! - writes and reads with several segments per request (writev/readv) when the device
//!   accepts more than one segment;
//! - checks that write-zeroes reads back as zeros and that a request past the end fails.
//!
//! Prints one `PASS`/`FAIL` line per step and exits non-zero on the first failure. Every wait
//! has a timeout, so a device that never completes a request fails instead of hanging.
//!
//! With `--hold` it only submits `--depth` reads on every queue, prints `HOLD`, and waits
//! without end: a test then has requests in flight on all queues when it kills the client
//! (which resets the device under them).
//!
//! Usage: blkio-verify --driver virtio-blk-vhost-vdpa|virtio-blk-vhost-user --path PATH
//!        [--num-queues N] [--depth N] [--hold]
//!
//! The device needs at least 8 MiB per queue; each queue works on its own 8 MiB area.

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

const USAGE: &str = "usage: blkio-verify --driver virtio-blk-vhost-vdpa|virtio-blk-vhost-user \
                     --path PATH [--num-queues N] [--depth N] [--hold]";

/// How long one wait for completions may take before the device is declared hung.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of the shared buffer: one half for writes, one for reads.
const HALF: usize = 2 << 20;

/// Bytes of the device each queue works on (its tests use offsets up to 8 MiB).
const AREA: u64 = 8 << 20;

struct Args {
    driver: String,
    path: String,
    num_queues: usize,
    depth: usize,
    hold: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut driver = None;
    let mut path = None;
    let mut num_queues = 1;
    let mut depth = 16;
    let mut hold = false;
    let mut it = std::env::args().skip(1);
    let number = |v: Option<String>, what: &str| -> Result<usize, String> {
        v.as_deref()
            .and_then(|s| s.parse().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{what} needs a positive number"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--driver" => driver = it.next(),
            "--path" => path = it.next(),
            "--num-queues" => num_queues = number(it.next(), "--num-queues")?,
            "--depth" => depth = number(it.next(), "--depth")?,
            "--hold" => hold = true,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(Args {
        driver: driver.ok_or("--driver is required")?,
        path: path.ok_or("--path is required")?,
        num_queues,
        depth,
        hold,
    })
}

/// xorshift64: a reproducible byte pattern per seed.
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

fn seed_for(queue: usize, step: &str, off: u64) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64 ^ ((queue as u64) << 56) ^ off;
    for b in step.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Waits for `n` completions and returns them; fails on timeout or an error completion.
fn wait(q: &mut Blkioq, n: usize, what: &str) -> Result<Vec<Completion>, String> {
    let mut got = Vec::with_capacity(n);
    let mut c: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    while got.len() < n {
        let want = n - got.len();
        let mut timeout = IO_TIMEOUT;
        let k = q
            .do_io(&mut c[..want], want, Some(&mut timeout), None)
            .map_err(|e| format!("{what}: waiting for {want} completion(s): {}", e.message()))?;
        if k == 0 {
            return Err(format!("{what}: no completion within {IO_TIMEOUT:?}"));
        }
        for slot in &c[..k] {
            // SAFETY: do_io initialised the first `k` completions.
            got.push(unsafe { slot.assume_init_read() });
        }
    }
    for c in &got {
        if c.ret != 0 {
            return Err(format!(
                "{what} (request {}): failed with errno {}",
                c.user_data, -c.ret
            ));
        }
    }
    Ok(got)
}

/// Waits for one completion and returns its status (0 or -errno) without judging it.
fn wait_status(q: &mut Blkioq, what: &str) -> Result<i32, String> {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut timeout = IO_TIMEOUT;
    let k = q
        .do_io(&mut c, 1, Some(&mut timeout), None)
        .map_err(|e| format!("{what}: {}", e.message()))?;
    if k != 1 {
        return Err(format!("{what}: no completion within {IO_TIMEOUT:?}"));
    }
    // SAFETY: do_io initialised the first completion.
    Ok(unsafe { c[0].assume_init_read() }.ret)
}

fn compare(w: &[u8], r: &[u8], off: u64, what: &str) -> Result<(), String> {
    match w.iter().zip(r).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: read-back of {} bytes at {off} differs from what was written, first at \
             byte {i} (wrote {:#04x}, read {:#04x})",
            w.len(),
            w[i],
            r[i]
        )),
    }
}

struct Ctx<'a> {
    q: &'a mut Blkioq,
    wbuf: &'a mut [u8],
    rbuf: &'a mut [u8],
    /// Where this queue's area starts and how long it is.
    base: u64,
    len: u64,
    qi: usize,
    depth: usize,
    max_segments: usize,
}

/// Single requests of several sizes and alignments, flush, read back one at a time.
fn sequential(cx: &mut Ctx) -> Result<(), String> {
    let cases: [(u64, usize); 5] = [
        (0, 4096),
        (16384 + 512, 512),
        (1 << 20, 65536),
        (2 << 20, 1 << 20),
        (cx.len - 8192, 8192),
    ];
    let cases: Vec<(u64, usize)> = cases
        .into_iter()
        .filter(|&(off, n)| off + n as u64 <= cx.len)
        .map(|(off, n)| (cx.base + off, n))
        .collect();
    for (i, &(off, n)) in cases.iter().enumerate() {
        fill(&mut cx.wbuf[..n], seed_for(cx.qi, "seq", off));
        cx.q.write(off, cx.wbuf.as_ptr(), n, i, ReqFlags::empty());
        wait(cx.q, 1, "write")?;
    }
    cx.q.flush(0, ReqFlags::empty());
    wait(cx.q, 1, "flush")?;
    for (i, &(off, n)) in cases.iter().enumerate() {
        fill(&mut cx.wbuf[..n], seed_for(cx.qi, "seq", off));
        cx.rbuf[..n].fill(0xee);
        cx.q.read(off, cx.rbuf.as_mut_ptr(), n, i, ReqFlags::empty());
        wait(cx.q, 1, "read")?;
        compare(&cx.wbuf[..n], &cx.rbuf[..n], off, "read")?;
    }
    println!(
        "PASS q{}: {} single writes, flush, read-back (512 B to 1 MiB)",
        cx.qi,
        cases.len()
    );
    Ok(())
}

/// `depth` requests in flight at once, writes then reads, sizes 4-32 KiB.
fn batched(cx: &mut Ctx) -> Result<(), String> {
    let mut reqs = Vec::new();
    let (mut off, mut pos) = (cx.base + (4 << 20), 0usize);
    for i in 0..cx.depth {
        let n = 4096 * (1 + i % 8);
        if pos + n > HALF || off + n as u64 > cx.base + cx.len {
            break;
        }
        reqs.push((off, pos, n));
        off += n as u64 + 4096; // leave holes so that neighbours cannot hide misplaced data
        pos += n;
    }
    if reqs.is_empty() {
        return Err("batch: the device is too small for the batch test".into());
    }
    for (i, &(off, pos, n)) in reqs.iter().enumerate() {
        fill(&mut cx.wbuf[pos..pos + n], seed_for(cx.qi, "batch", off));
        cx.q.write(off, cx.wbuf[pos..].as_ptr(), n, i, ReqFlags::empty());
    }
    let done = wait(cx.q, reqs.len(), "batched write")?;
    check_user_data(&done, reqs.len(), "batched write")?;
    cx.rbuf[..pos].fill(0xee);
    for (i, &(off, pos, n)) in reqs.iter().enumerate() {
        cx.q.read(off, cx.rbuf[pos..].as_mut_ptr(), n, i, ReqFlags::empty());
    }
    let done = wait(cx.q, reqs.len(), "batched read")?;
    check_user_data(&done, reqs.len(), "batched read")?;
    for &(off, pos, n) in &reqs {
        compare(
            &cx.wbuf[pos..pos + n],
            &cx.rbuf[pos..pos + n],
            off,
            "batched read",
        )?;
    }
    println!(
        "PASS q{}: {} writes then {} reads in flight at once",
        cx.qi,
        reqs.len(),
        reqs.len()
    );
    Ok(())
}

fn check_user_data(done: &[Completion], n: usize, what: &str) -> Result<(), String> {
    let mut seen = vec![false; n];
    for c in done {
        match seen.get_mut(c.user_data) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(format!(
                    "{what}: unexpected completion for request {}",
                    c.user_data
                ))
            }
        }
    }
    Ok(())
}

/// One request split over several buffers (descriptor chains with several data descriptors).
fn vectored(cx: &mut Ctx) -> Result<(), String> {
    if cx.max_segments < 2 {
        println!(
            "PASS q{}: vectored I/O not tried (max-segments {})",
            cx.qi, cx.max_segments
        );
        return Ok(());
    }
    // Uneven segments, each a multiple of 512, placed apart in the buffer.
    let sizes = [512usize, 3584, 4096, 1024, 7168];
    let nseg = sizes.len().min(cx.max_segments);
    let sizes = &sizes[..nseg];
    let total: usize = sizes.iter().sum();
    let off = cx.base + (3 << 20) + 512;
    fill(&mut cx.wbuf[..total], seed_for(cx.qi, "vec", off));
    let mut wiov = Vec::new();
    let mut riov = Vec::new();
    let (mut src, mut dst) = (0usize, 0usize);
    for &n in sizes {
        // Spread the write segments out: copy each piece to a separate place.
        let at = 65536 + dst;
        cx.wbuf.copy_within(src..src + n, at);
        wiov.push(libc_iovec(cx.wbuf[at..].as_mut_ptr(), n));
        riov.push(libc_iovec(cx.rbuf[at..].as_mut_ptr(), n));
        src += n;
        dst += n + 512;
    }
    cx.q.writev(off, wiov.as_ptr(), wiov.len() as u32, 0, ReqFlags::empty());
    wait(cx.q, 1, "writev")?;
    // Read it back in one plain request and compare with the concatenation.
    cx.rbuf[..total].fill(0xee);
    cx.q.read(off, cx.rbuf.as_mut_ptr(), total, 0, ReqFlags::empty());
    wait(cx.q, 1, "read after writev")?;
    compare(
        &cx.wbuf[..total],
        &cx.rbuf[..total],
        off,
        "read after writev",
    )?;
    // And scattered: readv into the separate pieces.
    cx.rbuf[65536..65536 + dst].fill(0xee);
    cx.q.readv(off, riov.as_ptr(), riov.len() as u32, 0, ReqFlags::empty());
    wait(cx.q, 1, "readv")?;
    let mut src = 0usize;
    let mut at = 65536usize;
    for &n in sizes {
        compare(
            &cx.wbuf[src..src + n],
            &cx.rbuf[at..at + n],
            off + src as u64,
            "readv",
        )?;
        src += n;
        at += n + 512;
    }
    println!(
        "PASS q{}: writev/readv with {} segments ({} bytes)",
        cx.qi, nseg, total
    );
    Ok(())
}

fn libc_iovec(base: *mut u8, len: usize) -> blkio::iovec {
    blkio::iovec {
        iov_base: base.cast(),
        iov_len: len,
    }
}

/// Write-zeroes over written data reads back as zeros.
fn zeroes(cx: &mut Ctx) -> Result<(), String> {
    let off = cx.base + (1 << 20);
    let n = 65536usize;
    if off + n as u64 > cx.base + cx.len {
        return Ok(());
    }
    fill(&mut cx.wbuf[..n], seed_for(cx.qi, "zero", off));
    cx.q.write(off, cx.wbuf.as_ptr(), n, 0, ReqFlags::empty());
    wait(cx.q, 1, "write before write-zeroes")?;
    cx.q.write_zeroes(off, n as u64, 0, ReqFlags::empty());
    wait(cx.q, 1, "write-zeroes")?;
    cx.rbuf[..n].fill(0xee);
    cx.q.read(off, cx.rbuf.as_mut_ptr(), n, 0, ReqFlags::empty());
    wait(cx.q, 1, "read after write-zeroes")?;
    if let Some(i) = cx.rbuf[..n].iter().position(|&x| x != 0) {
        return Err(format!(
            "write-zeroes: byte {i} of the zeroed range reads {:#04x}",
            cx.rbuf[i]
        ));
    }
    println!("PASS q{}: write-zeroes reads back as zeros", cx.qi);
    Ok(())
}

/// A read that ends past the capacity must fail, not return data.
fn out_of_range(q: &mut Blkioq, rbuf: &mut [u8], capacity: u64, qi: usize) -> Result<(), String> {
    q.read(
        capacity - 4096,
        rbuf.as_mut_ptr(),
        8192,
        0,
        ReqFlags::empty(),
    );
    let ret = wait_status(q, "read past the end")?;
    if ret == 0 {
        return Err("read past the end of the device succeeded".into());
    }
    println!("PASS q{qi}: read past the end fails (errno {})", -ret);
    Ok(())
}

fn run(args: &Args) -> Result<(), String> {
    let e = |what: &'static str| move |err: blkio::Error| format!("{what}: {}", err.message());
    let mut b = Blkio::new(&args.driver).map_err(e("new"))?;
    b.set_str("path", &args.path).map_err(e("set path"))?;
    b.connect().map_err(e("connect"))?;
    let max_queues = b.get_i32("max-queues").map_err(e("max-queues"))?;
    if args.num_queues > max_queues.max(0) as usize {
        return Err(format!(
            "connect: the device offers {max_queues} queue(s), {} asked for",
            args.num_queues
        ));
    }
    b.set_i32("num-queues", args.num_queues as i32)
        .map_err(e("set num-queues"))?;
    let mut started = b.start().map_err(e("start"))?;
    let capacity = b.get_u64("capacity").map_err(e("capacity"))?;
    let max_segments = b.get_i32("max-segments").map_err(e("max-segments"))?;
    let read_only = b.get_bool("read-only").map_err(e("read-only"))?;
    println!(
        "PASS connect: capacity {capacity} bytes, max-queues {max_queues}, max-segments \
         {max_segments}, read-only {read_only}"
    );
    if read_only {
        return Err("the device is read-only: nothing to verify by writing".into());
    }
    // Each queue gets its own area; all tests of one queue fit in 8 MiB.
    let area = (capacity / args.num_queues as u64) & !4095;
    if area < AREA {
        return Err(format!(
            "capacity {capacity} is too small: {} queue(s) need {} MiB each",
            args.num_queues,
            AREA >> 20
        ));
    }
    let region: MemoryRegion = b
        .alloc_mem_region(2 * HALF)
        .map_err(e("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(e("map_mem_region"))?;
    // SAFETY: the region is `2 * HALF` bytes of our mapping, alive until it is freed below.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, 2 * HALF) };
    let (wbuf, rbuf) = mem.split_at_mut(HALF);
    if args.hold {
        let n = 4096;
        let depth = args.depth.min(HALF / n);
        for (qi, q) in started.queues.iter_mut().enumerate() {
            for i in 0..depth {
                let off = area * qi as u64 + (i * n) as u64;
                q.read(off, rbuf[i * n..].as_mut_ptr(), n, i, ReqFlags::empty());
            }
            // Hands them to the device without waiting for any.
            let mut none: [MaybeUninit<Completion>; 0] = [];
            let mut zero = Duration::ZERO;
            q.do_io(&mut none, 0, Some(&mut zero), None)
                .map_err(|e| format!("q{qi}: submitting: {}", e.message()))?;
        }
        println!(
            "HOLD {depth} reads submitted on each of {} queues",
            args.num_queues
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
    let mut result = Ok(());
    for (qi, q) in started.queues.iter_mut().enumerate() {
        let mut cx = Ctx {
            q,
            wbuf: &mut *wbuf,
            rbuf: &mut *rbuf,
            base: area * qi as u64,
            len: AREA,
            qi,
            depth: args.depth,
            max_segments: max_segments.max(1) as usize,
        };
        result = sequential(&mut cx)
            .and_then(|()| batched(&mut cx))
            .and_then(|()| vectored(&mut cx))
            .and_then(|()| zeroes(&mut cx))
            .map_err(|err| format!("q{qi}: {err}"));
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = out_of_range(&mut started.queues[0], rbuf, capacity, 0);
    }
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    result
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("blkio-verify: {e}\n{USAGE}");
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

//! The client against scripted servers that break the protocol or stretch its deadlines (the
//! real servers in `crates/vudev/tests/nbd.rs` never do). Each test is one class of
//! misbehaviour: what must come out is an error within the timeout, never wrong data, a hang,
//! or memory that grows.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use super::*;

/// How a scripted server greets a connection.
#[derive(Clone, Copy, PartialEq)]
enum Greeting {
    /// At once.
    Normal,
    /// Never: it accepts and says nothing.
    Never,
    /// One byte every so often.
    Trickle(Duration),
}

/// What a scripted server negotiates.
#[derive(Clone, Copy)]
struct Script {
    /// Structured replies (otherwise simple ones only).
    structured: bool,
    /// Transmission flags besides HAS_FLAGS and SEND_FLUSH.
    flags: u16,
    /// Block size information: minimum and maximum payload.
    block_size: Option<(u32, u32)>,
    /// How connections from number `greet_from` on are greeted (earlier ones: at once).
    greeting: Greeting,
    greet_from: usize,
}

impl Script {
    fn simple() -> Script {
        Script {
            structured: false,
            flags: 0,
            block_size: None,
            greeting: Greeting::Normal,
            greet_from: 0,
        }
    }
    fn structured() -> Script {
        Script {
            structured: true,
            ..Script::simple()
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    cookie: u64,
    cmd: u16,
    offset: u64,
    len: u32,
}

/// A scripted server on a unix socket: each connection (numbered from 0) on its own thread;
/// after the handshake each request goes to `answer(n, stream, request)`. Returns the
/// socket's path and the number of connections accepted so far.
fn server(
    name: &str,
    script: Script,
    answer: impl Fn(usize, &mut UnixStream, Seen) + Send + Sync + 'static,
) -> (PathBuf, Arc<AtomicUsize>) {
    let path = std::env::temp_dir().join(format!("vudev-nbd-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let accepted = count.clone();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for (n, s) in listener.incoming().enumerate() {
            let Ok(mut s) = s else { return };
            accepted.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            std::thread::spawn(move || {
                let greeting = if n >= script.greet_from {
                    script.greeting
                } else {
                    Greeting::Normal
                };
                if handshake(&mut s, &script, greeting).is_err() {
                    return;
                }
                let mut h = [0u8; 28];
                while s.read_exact(&mut h).is_ok() {
                    let seen = Seen {
                        cmd: u16::from_be_bytes([h[6], h[7]]),
                        cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
                        offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
                        len: u32::from_be_bytes(h[24..28].try_into().unwrap()),
                    };
                    if seen.cmd == CMD_WRITE {
                        let mut data = vec![0u8; seen.len as usize];
                        if s.read_exact(&mut data).is_err() {
                            break;
                        }
                    }
                    answer(n, &mut s, seen);
                }
            });
        }
    });
    (path, count)
}

/// The server side of the handshake for a 1 MiB export.
fn handshake(s: &mut UnixStream, script: &Script, greeting: Greeting) -> std::io::Result<()> {
    let mut hello = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    hello.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    hello.extend_from_slice(&3u16.to_be_bytes());
    match greeting {
        Greeting::Normal => s.write_all(&hello)?,
        Greeting::Never => {
            std::thread::sleep(Duration::from_secs(60));
            return Err(std::io::Error::other("never greets"));
        }
        Greeting::Trickle(every) => {
            for b in hello {
                s.write_all(&[b])?;
                std::thread::sleep(every);
            }
        }
    }
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut UnixStream, kind: u32, data: &[u8]| {
            let mut m = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
            m.extend_from_slice(&option.to_be_bytes());
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(data);
            s.write_all(&m)
        };
        match option {
            8 if script.structured => reply(s, 1, &[])?,
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&(1u16 | TF_SEND_FLUSH | script.flags).to_be_bytes());
                reply(s, 3, &info)?;
                if let Some((min, max)) = script.block_size {
                    let mut b = 3u16.to_be_bytes().to_vec();
                    b.extend_from_slice(&min.to_be_bytes());
                    b.extend_from_slice(&min.max(4096).to_be_bytes());
                    b.extend_from_slice(&max.to_be_bytes());
                    reply(s, 3, &b)?;
                }
                return reply(s, 1, &[]);
            }
            _ => reply(s, 0x8000_0001, &[])?, // NBD_REP_ERR_UNSUP
        }
    }
}

fn simple_reply(s: &mut UnixStream, cookie: u64, error: u32, data: &[u8]) {
    let mut m = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(data);
    let _ = s.write_all(&m);
}

/// One structured reply chunk.
fn chunk(cookie: u64, done: bool, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&u16::from(done).to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// An OFFSET_DATA chunk of `len` bytes of `byte` at `offset`.
fn data_chunk(cookie: u64, done: bool, offset: u64, len: usize, byte: u8) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend(std::iter::repeat_n(byte, len));
    chunk(cookie, done, CHUNK_OFFSET_DATA, &p)
}

/// A whole, correct structured answer to a read: its data, `byte` throughout.
fn good_read(s: &mut UnixStream, r: Seen, byte: u8) {
    let _ = s.write_all(&data_chunk(r.cookie, true, r.offset, r.len as usize, byte));
}

fn uri(path: &std::path::Path) -> String {
    format!("nbd+unix:///?socket={}", path.display())
}

/// Waits (at most 30 s) for the results of `n` requests of queue `q`.
fn results(q: &mut Box<dyn QueueBackend>, n: usize) -> Vec<(u64, io::Result<()>)> {
    let t = Instant::now();
    let mut out = Vec::new();
    while out.len() < n && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
        q.reap(&mut out);
    }
    assert_eq!(out.len(), n, "no result within 30 s");
    out
}

/// Does what a queue worker does for `dur`: waits on the queue's fd and reaps.
fn drive_for(q: &mut Box<dyn QueueBackend>, dur: Duration) -> Vec<(u64, io::Result<()>)> {
    let t = Instant::now();
    let mut out = Vec::new();
    while t.elapsed() < dur {
        let mut fd = libc::pollfd {
            fd: q.completion_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut fd, 1, 50) };
        q.reap(&mut out);
    }
    out
}

/// Reads `len` bytes at 0 through queue `q`; the result, the data, and how long it took.
fn read_on(q: &mut Box<dyn QueueBackend>, len: usize) -> (io::Result<()>, Vec<u8>, Duration) {
    let mut buf = vec![0u8; len];
    let t = Instant::now();
    {
        let slice = VolatileSlice::from(&mut buf[..]);
        q.submit(
            7,
            IoOp::Read {
                offset: 0,
                bufs: &[slice],
            },
        );
    }
    let (cookie, res) = results(q, 1).pop().unwrap();
    assert_eq!(cookie, 7);
    (res, buf, t.elapsed())
}

/// Reads 4 KiB at 0 through a new backend for the server at `path`.
fn read_4k(path: &std::path::Path, timeout: Duration) -> (io::Result<()>, Vec<u8>, Duration) {
    let backend = NbdBackend::connect(&uri(path), false, timeout).unwrap();
    let mut q = backend.queue().unwrap();
    read_on(&mut q, 4096)
}

#[test]
fn a_reply_with_a_wrong_cookie_costs_the_connection_not_the_request() {
    let (path, _) = server("cookie", Script::simple(), |n, s, r| {
        // The first connection answers for a request never sent; the next one is correct.
        let c = if n == 0 { r.cookie + 1000 } else { r.cookie };
        simple_reply(s, c, 0, &vec![0xab; r.len as usize]);
    });
    let (res, data, _) = read_4k(&path, Duration::from_secs(5));
    res.unwrap();
    assert!(data.iter().all(|&b| b == 0xab));
}

#[test]
fn a_server_that_sends_garbage_costs_an_io_error_within_the_timeout() {
    let (path, _) = server("garbage", Script::simple(), |_, s, _| {
        let _ = s.write_all(&[0xff; 64]);
    });
    let (res, data, took) = read_4k(&path, Duration::from_secs(1));
    assert_eq!(res.unwrap_err().kind(), io::ErrorKind::TimedOut);
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(data.iter().all(|&b| b == 0), "garbage reached the buffer");
}

#[test]
fn a_server_error_is_an_io_error_and_the_connection_stays() {
    let (path, count) = server("error", Script::simple(), |_, s, r| {
        simple_reply(s, r.cookie, 28, &[]); // ENOSPC, no payload
    });
    let (res, _, took) = read_4k(&path, Duration::from_secs(5));
    let e = res.unwrap_err().to_string();
    assert!(e.contains("ENOSPC"), "{e}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(count.load(Ordering::SeqCst), 1, "the client reconnected");
}

#[test]
fn a_read_reply_that_leaves_part_of_the_range_out_is_an_error_not_zeros() {
    // Done after half the data; done with no data at all; a hole, then nothing.
    for (name, cut) in [("half", 1usize), ("none", 2), ("hole", 3)] {
        let (path, _) = server(
            &format!("gap-{name}"),
            Script::structured(),
            move |_, s, r| {
                let m = match cut {
                    1 => data_chunk(r.cookie, true, r.offset, r.len as usize / 2, 0xcd),
                    2 => chunk(r.cookie, true, CHUNK_NONE, &[]),
                    _ => {
                        let mut p = r.offset.to_be_bytes().to_vec();
                        p.extend_from_slice(&(r.len / 4).to_be_bytes());
                        chunk(r.cookie, true, CHUNK_OFFSET_HOLE, &p)
                    }
                };
                let _ = s.write_all(&m);
            },
        );
        let (res, _, _) = read_4k(&path, Duration::from_secs(5));
        let e = res.expect_err("a read the server did not cover succeeded");
        assert!(e.to_string().contains("covered only"), "{name}: {e}");
    }
}

#[test]
fn overlapping_read_chunks_cost_the_connection_and_the_resend_is_right() {
    let (path, count) = server("overlap", Script::structured(), |n, s, r| {
        if n == 0 {
            // The same 2 KiB twice, which adds up to the length but leaves half uncovered.
            let half = r.len as usize / 2;
            let _ = s.write_all(&data_chunk(r.cookie, false, r.offset, half, 0x11));
            let _ = s.write_all(&data_chunk(r.cookie, true, r.offset, half, 0x22));
        } else {
            good_read(s, r, 0x33);
        }
    });
    let (res, data, _) = read_4k(&path, Duration::from_secs(5));
    res.unwrap();
    assert!(data.iter().all(|&b| b == 0x33));
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[test]
fn a_simple_reply_inside_a_structured_one_costs_the_connection() {
    let (path, count) = server("mixed", Script::structured(), |n, s, r| {
        if n == 0 {
            let _ = s.write_all(&data_chunk(r.cookie, false, r.offset, 512, 0x44));
            simple_reply(s, r.cookie, 0, &[]);
        } else {
            good_read(s, r, 0x55);
        }
    });
    let (res, data, _) = read_4k(&path, Duration::from_secs(5));
    res.unwrap();
    assert!(data.iter().all(|&b| b == 0x55));
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[test]
fn data_without_its_final_chunk_fails_and_holds_no_memory() {
    const LEN: usize = 64 << 10;
    let (path, _) = server("nodone", Script::structured(), |_, s, r| {
        // Everything but the DONE flag, for every read.
        let _ = s.write_all(&data_chunk(r.cookie, false, r.offset, r.len as usize, 0x66));
    });
    let backend = NbdBackend::connect(&uri(&path), false, Duration::from_secs(1)).unwrap();
    let engine = backend.shared.clone().unwrap();
    let held = engine.lock().unwrap().held();
    let mut q = backend.queue().unwrap();
    for round in 0..3 {
        let mut bufs = vec![vec![0u8; LEN]; 16];
        for (i, b) in bufs.iter_mut().enumerate() {
            let slice = VolatileSlice::from(&mut b[..]);
            q.submit(
                i as u64,
                IoOp::Read {
                    offset: 0,
                    bufs: &[slice],
                },
            );
        }
        for (_, res) in results(&mut q, 16) {
            assert_eq!(res.unwrap_err().kind(), io::ErrorKind::TimedOut);
        }
        // Replies are never held: what the engine keeps is its fixed staging buffer and
        // the requests it sends (16 reads: a few hundred bytes).
        let now = engine.lock().unwrap().held();
        assert!(
            now <= held + (64 << 10),
            "round {round}: {held} -> {now} bytes"
        );
    }
}

#[test]
fn a_reply_after_the_timeout_never_reaches_the_buffer() {
    static WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let (path, count) = server("late", Script::simple(), |_, s, r| {
        let reply = move |s: &mut UnixStream| {
            let _one = WRITES.lock().unwrap();
            simple_reply(s, r.cookie, 0, &vec![0x5a; r.len as usize]);
        };
        if r.offset == 0 {
            // The whole reply, well after the request timed out, while others are answered.
            let mut late = s.try_clone().unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(1500));
                reply(&mut late);
            });
        } else {
            reply(s);
        }
    });
    let backend = NbdBackend::connect(&uri(&path), false, Duration::from_secs(1)).unwrap();
    let mut q = backend.queue().unwrap();
    let mut slow = vec![0u8; 4096];
    let mut quick = vec![0u8; 4096];
    let t = Instant::now();
    let mut failed_at = None;
    let mut answered = 0;
    // The slow read, then a quick one at a time for 2.5 s, through the same queue.
    let slice = VolatileSlice::from(&mut slow[..]);
    q.submit(
        1,
        IoOp::Read {
            offset: 0,
            bufs: &[slice],
        },
    );
    while t.elapsed() < Duration::from_millis(2500) {
        let slice = VolatileSlice::from(&mut quick[..]);
        q.submit(
            2,
            IoOp::Read {
                offset: 4096,
                bufs: &[slice],
            },
        );
        let mut got = false;
        while !got {
            for (tag, res) in drive_for(&mut q, Duration::from_millis(10)) {
                match tag {
                    1 => {
                        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::TimedOut);
                        failed_at = Some(t.elapsed());
                    }
                    _ => {
                        res.unwrap();
                        answered += 1;
                        got = true;
                    }
                }
            }
        }
    }
    let failed_at = failed_at.expect("the slow read never failed");
    assert!(failed_at < Duration::from_millis(1400), "{failed_at:?}");
    assert!(answered > 10, "{answered}");
    // The late reply came on the same connection, and was dropped.
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert!(
        slow.iter().all(|&b| b == 0),
        "a late reply was written into the buffer"
    );
}

/// The byte at `offset` of the scripted servers' large reads.
fn byte_at(offset: u64) -> u8 {
    (offset % 251) as u8
}

#[test]
fn large_reads_land_whole_and_in_place() {
    // Two reads at once, within the 1 MiB export.
    const LEN: usize = 512 << 10;
    for script in [Script::simple(), Script::structured()] {
        let structured = script.structured;
        let (path, _) = server("large", script, move |_, s, r| {
            let data: Vec<u8> = (r.offset..r.offset + u64::from(r.len))
                .map(byte_at)
                .collect();
            if !structured {
                simple_reply(s, r.cookie, 0, &data);
                return;
            }
            // Three chunks out of order, each written in two pieces with a pause between.
            let third = data.len() / 3;
            for (i, (from, to)) in [(third, 2 * third), (0, third), (2 * third, data.len())]
                .into_iter()
                .enumerate()
            {
                let mut body = (r.offset + from as u64).to_be_bytes().to_vec();
                body.extend_from_slice(&data[from..to]);
                let m = chunk(r.cookie, i == 2, CHUNK_OFFSET_DATA, &body);
                let (a, b) = m.split_at(m.len() / 2);
                let _ = s.write_all(a);
                std::thread::sleep(Duration::from_millis(5));
                let _ = s.write_all(b);
            }
        });
        let backend = NbdBackend::connect(&uri(&path), false, Duration::from_secs(5)).unwrap();
        let mut q = backend.queue().unwrap();
        // Two reads at once, each over two driver buffers of odd sizes.
        let mut bufs = [vec![0u8; 4096 + 7], vec![0u8; LEN - 4096 - 7]];
        let mut more = [vec![0u8; 100_003], vec![0u8; LEN - 100_003]];
        {
            let [a, b] = &mut bufs;
            let [c, d] = &mut more;
            q.submit(
                1,
                IoOp::Read {
                    offset: 0,
                    bufs: &[
                        VolatileSlice::from(&mut a[..]),
                        VolatileSlice::from(&mut b[..]),
                    ],
                },
            );
            q.submit(
                2,
                IoOp::Read {
                    offset: LEN as u64 / 2,
                    bufs: &[
                        VolatileSlice::from(&mut c[..]),
                        VolatileSlice::from(&mut d[..]),
                    ],
                },
            );
            for (_, res) in results(&mut q, 2) {
                res.unwrap();
            }
        }
        let first = bufs.concat();
        let second = more.concat();
        assert!(first
            .iter()
            .enumerate()
            .all(|(i, &b)| b == byte_at(i as u64)));
        assert!(second
            .iter()
            .enumerate()
            .all(|(i, &b)| b == byte_at((LEN / 2 + i) as u64)));
    }
}

#[test]
fn queues_sharing_a_connection_get_each_their_own_results() {
    let (path, count) = server("shared", Script::simple(), |_, s, r| {
        let byte = (r.offset / 4096) as u8;
        simple_reply(s, r.cookie, 0, &vec![byte; r.len as usize]);
    });
    let backend = NbdBackend::connect(&uri(&path), false, Duration::from_secs(5)).unwrap();
    assert!(
        backend.shared.is_some(),
        "the scripted server has no multi-conn"
    );
    let mut q1 = backend.queue().unwrap();
    let mut q2 = backend.queue().unwrap();
    let mut b1 = vec![0u8; 4096];
    let mut b2 = vec![0u8; 4096];
    q1.submit(
        1,
        IoOp::Read {
            offset: 4096,
            bufs: &[VolatileSlice::from(&mut b1[..])],
        },
    );
    q2.submit(
        2,
        IoOp::Read {
            offset: 8192,
            bufs: &[VolatileSlice::from(&mut b2[..])],
        },
    );
    // Only the first queue drives the connection: it sends both requests and reads both
    // replies, keeps its own result and hands the other over, waking the second queue.
    let engine = backend.shared.clone().unwrap();
    let mut mine = Vec::new();
    let t = Instant::now();
    while !(mine.len() == 1 && engine.lock().unwrap().has_results(1))
        && t.elapsed() < Duration::from_secs(10)
    {
        mine.extend(drive_for(&mut q1, Duration::from_millis(20)));
    }
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].0, 1);
    let mut fd = libc::pollfd {
        fd: q2.completion_fd().unwrap(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    assert_eq!(
        unsafe { libc::poll(&mut fd, 1, 0) },
        1,
        "the second queue was not woken"
    );
    let mut theirs = Vec::new();
    q2.reap(&mut theirs);
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].0, 2);
    theirs.pop().unwrap().1.unwrap();
    assert!(b1.iter().all(|&b| b == 1) && b2.iter().all(|&b| b == 2));
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "one connection for both queues"
    );
}

#[test]
fn a_reply_trickled_a_byte_at_a_time_ends_by_the_timeout() {
    let (path, count) = server("trickle", Script::simple(), |n, s, r| {
        if n == 0 {
            let mut m = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&0u32.to_be_bytes());
            m.extend_from_slice(&r.cookie.to_be_bytes());
            m.extend(std::iter::repeat_n(0x77u8, r.len as usize));
            for b in m {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            simple_reply(s, r.cookie, 0, &vec![0x88; r.len as usize]);
        }
    });
    let backend = NbdBackend::connect(&uri(&path), false, Duration::from_secs(1)).unwrap();
    let mut q = backend.queue().unwrap();
    let (res, _, took) = read_on(&mut q, 4096);
    assert_eq!(res.unwrap_err().kind(), io::ErrorKind::TimedOut);
    assert!(took < Duration::from_millis(1800), "took {took:?}");
    // The connection that trickles is replaced, and the next one serves.
    let (res, data, _) = read_on(&mut q, 4096);
    res.unwrap();
    assert!(data.iter().all(|&b| b == 0x88));
    assert!(count.load(Ordering::SeqCst) >= 2);
    // Metrics count both.
    let events = backend.events();
    assert!(events.contains(&("timeouts", 1)), "{events:?}");
    assert!(
        events.iter().any(|&(e, n)| e == "reconnects" && n >= 1),
        "{events:?}"
    );
}

/// Connects (timeout 1 s) to a server that greets as `greeting`: the error, which must come
/// within 1.5 s and say "timed out" (not EAGAIN's "temporarily unavailable").
fn handshake_times_out(name: &str, greeting: Greeting) -> String {
    let script = Script {
        greeting,
        ..Script::simple()
    };
    let (path, _) = server(name, script, |_, _, _| {});
    let t = Instant::now();
    let e = NbdBackend::connect(&uri(&path), false, Duration::from_secs(1))
        .err()
        .unwrap()
        .to_string();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(e.contains("timed out") && !e.contains("temporarily"), "{e}");
    e
}

#[test]
fn a_handshake_trickled_a_byte_at_a_time_ends_by_the_timeout() {
    handshake_times_out("slowhello", Greeting::Trickle(Duration::from_millis(200)));
}

#[test]
fn a_server_that_never_greets_gets_a_timed_out_error() {
    handshake_times_out("nohello", Greeting::Never);
}

#[test]
fn a_queue_connection_with_a_trickled_handshake_fails_requests_by_their_deadline() {
    // The first connection is quick and allows one connection per queue; the queue's own
    // connection then greets a byte every 700 ms (each wait shorter than the timeout).
    let script = Script {
        flags: TF_CAN_MULTI_CONN,
        greeting: Greeting::Trickle(Duration::from_millis(700)),
        greet_from: 1,
        ..Script::simple()
    };
    let (path, _) = server("slowqueue", script, |_, s, r| {
        simple_reply(s, r.cookie, 0, &vec![0; r.len as usize])
    });
    let (res, _, took) = read_4k(&path, Duration::from_secs(1));
    assert_eq!(res.unwrap_err().kind(), io::ErrorKind::TimedOut);
    assert!(took < Duration::from_millis(1800), "took {took:?}");
}

#[test]
fn a_server_that_stops_reading_never_blocks_the_queue() {
    const LEN: usize = 1 << 20;
    let (path, _) = server("noread", Script::simple(), |_, _, _| {
        // Takes the first request, then reads nothing more.
        std::thread::sleep(Duration::from_secs(30));
    });
    let backend = NbdBackend::connect(&uri(&path), false, Duration::from_secs(1)).unwrap();
    let mut q = backend.queue().unwrap();
    let data = vec![0x99u8; LEN];
    let mut data = data.clone();
    let t = Instant::now();
    // 16 MiB: far more than the socket holds.
    for i in 0..16 {
        let before = Instant::now();
        let slice = VolatileSlice::from(&mut data[..]);
        q.submit(
            i,
            IoOp::Write {
                offset: 0,
                bufs: &[slice],
            },
        );
        assert!(
            before.elapsed() < Duration::from_millis(200),
            "submit {i} waited {:?} for the server",
            before.elapsed()
        );
    }
    for (_, res) in results(&mut q, 16) {
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_server_that_drops_every_connection_is_backed_off() {
    // Handshakes, then hangs up at the first request or at once.
    let (path, count) = server("storm", Script::simple(), |_, s, _| {
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    let backend = NbdBackend::connect(&uri(&path), false, Duration::from_secs(30)).unwrap();
    let mut q = backend.queue().unwrap();
    let mut buf = vec![0u8; 4096];
    let slice = VolatileSlice::from(&mut buf[..]);
    q.submit(
        1,
        IoOp::Read {
            offset: 0,
            bufs: &[slice],
        },
    );
    let t = Instant::now();
    drive_for(&mut q, Duration::from_secs(4));
    let n = count.load(Ordering::SeqCst);
    // 50 ms doubling to 1 s: about 8 attempts in 4 s, not one every few milliseconds.
    assert!(
        (3..=12).contains(&n),
        "{n} connections in {:?}",
        t.elapsed()
    );
    drop(q);
}

#[test]
fn server_messages_reach_us_escaped_and_cut() {
    let (path, _) = server("message", Script::structured(), |_, s, r| {
        let mut msg = b"\x1b[31mred\x1b[0m\r\n".to_vec();
        msg.resize(4000, b'\x07');
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(&msg);
        let _ = s.write_all(&chunk(r.cookie, true, CHUNK_ERROR, &p));
    });
    let (res, _, _) = read_4k(&path, Duration::from_secs(5));
    let e = res.unwrap_err().to_string();
    assert!(!e.chars().any(char::is_control), "{e:?}");
    assert!(
        e.len() < 1000 && e.contains("EIO") && e.contains("red"),
        "{e:?}"
    );
}

#[test]
fn a_small_maximum_payload_is_honoured_and_a_tiny_one_refused() {
    let largest = Arc::new(AtomicU32::new(0));
    let seen = largest.clone();
    let script = Script {
        block_size: Some((512, 1024)),
        ..Script::simple()
    };
    let (path, _) = server("maxpay", script, move |_, s, r| {
        seen.fetch_max(r.len, Ordering::SeqCst);
        simple_reply(s, r.cookie, 0, &vec![0xee; r.len as usize]);
    });
    let (res, data, _) = read_4k(&path, Duration::from_secs(5));
    res.unwrap();
    assert!(data.iter().all(|&b| b == 0xee));
    assert_eq!(largest.load(Ordering::SeqCst), 1024);

    let script = Script {
        block_size: Some((1, 256)),
        ..Script::simple()
    };
    let (path, _) = server("tinypay", script, |_, _, _| {});
    let e = NbdBackend::connect(&uri(&path), false, Duration::from_secs(5))
        .err()
        .unwrap();
    assert!(e.to_string().contains("maximum payload (256 bytes)"), "{e}");
}

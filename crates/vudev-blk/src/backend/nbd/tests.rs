//! The client against a scripted server that breaks the protocol (the real servers in
//! `crates/vudev/tests/nbd.rs` never do).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use super::*;

/// A server on a unix socket that negotiates simple replies, then hands each request of
/// connection number `n` to `answer(n, stream, cookie, cmd, len)`.
fn scripted_server(
    name: &str,
    answer: impl Fn(usize, &mut UnixStream, u64, u16, u32) + Send + 'static,
) -> PathBuf {
    let path = std::env::temp_dir().join(format!("vudev-nbd-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for (n, s) in listener.incoming().enumerate() {
            let Ok(mut s) = s else { return };
            if handshake(&mut s).is_err() {
                continue;
            }
            let mut h = [0u8; 28];
            while s.read_exact(&mut h).is_ok() {
                let cmd = u16::from_be_bytes([h[6], h[7]]);
                let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
                let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
                if cmd == CMD_WRITE {
                    let mut data = vec![0u8; len as usize];
                    if s.read_exact(&mut data).is_err() {
                        break;
                    }
                }
                answer(n, &mut s, cookie, cmd, len);
            }
        }
    });
    path
}

/// The server side of the handshake: no extended headers, no structured replies, a 1 MiB
/// export.
fn handshake(s: &mut UnixStream) -> std::io::Result<()> {
    let mut hello = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    hello.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    hello.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&hello)?;
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
        if option != 7 {
            reply(s, 0x8000_0001, &[])?; // NBD_REP_ERR_UNSUP
            continue;
        }
        let mut info = 0u16.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        info.extend_from_slice(&(1u16 | TF_SEND_FLUSH).to_be_bytes());
        reply(s, 3, &info)?;
        return reply(s, 1, &[]);
    }
}

fn simple_reply(s: &mut UnixStream, cookie: u64, error: u32, data: &[u8]) {
    let mut m = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(data);
    let _ = s.write_all(&m);
}

/// Reads 4 KiB at 0 through a queue of the backend at `path`; the result, the data, and how
/// long it took.
fn read_4k(path: &Path, timeout: Duration) -> (io::Result<()>, Vec<u8>, Duration) {
    let uri = format!("nbd+unix:///?socket={}", path.display());
    let backend = NbdBackend::connect(&uri, false, timeout).unwrap();
    let mut q = backend.queue().unwrap();
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    let mut out = Vec::new();
    {
        let slice = VolatileSlice::from(&mut buf[..]);
        q.submit(
            7,
            IoOp::Read {
                offset: 0,
                bufs: &[slice],
            },
        );
        while out.is_empty() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
            q.reap(&mut out);
        }
    }
    let (cookie, res) = out.pop().expect("no result within 30 s");
    assert_eq!(cookie, 7);
    (res, buf, t.elapsed())
}

#[test]
fn a_reply_with_a_wrong_cookie_costs_the_connection_not_the_request() {
    let path = scripted_server("cookie", |n, s, cookie, _, len| {
        // The first connection answers for a request never sent; the next one is correct.
        let c = if n == 0 { cookie + 1000 } else { cookie };
        simple_reply(s, c, 0, &vec![0xab; len as usize]);
    });
    let (res, data, _) = read_4k(&path, Duration::from_secs(5));
    res.unwrap();
    assert!(data.iter().all(|&b| b == 0xab));
}

#[test]
fn a_server_that_sends_garbage_costs_an_io_error_within_the_timeout() {
    let path = scripted_server("garbage", |_, s, _, _, _| {
        let _ = s.write_all(&[0xff; 64]);
    });
    let (res, data, took) = read_4k(&path, Duration::from_secs(1));
    assert_eq!(res.unwrap_err().kind(), io::ErrorKind::TimedOut);
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(data.iter().all(|&b| b == 0), "garbage reached the buffer");
}

#[test]
fn a_server_error_is_an_io_error_and_the_connection_stays() {
    let path = scripted_server("error", |n, s, cookie, _, _| {
        assert_eq!(n, 0, "the client reconnected after a server error");
        simple_reply(s, cookie, 28, &[]); // ENOSPC, no payload
    });
    let (res, _, took) = read_4k(&path, Duration::from_secs(5));
    let e = res.unwrap_err().to_string();
    assert!(e.contains("ENOSPC"), "{e}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

//! A hostile vhost-user frontend: malformed, oversized, cut-short and out-of-range messages.
//! After each one the export must still be alive and serve the next, well-behaved client.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{scratch, Client, Server};

// vhost-user request codes (docs/interop/vhost-user.rst).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_CONFIG: u32 = 24;
const ADD_MEM_REG: u32 = 37;
const SET_STATUS: u32 = 39;
const GET_STATUS: u32 = 40;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_ENABLE: u32 = 18;
const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
const PROTOCOL_LOG_SHMFD: u64 = 1 << 1;
const PROTOCOL_REPLY_ACK: u64 = 1 << 3;
const PROTOCOL_STATUS: u64 = 1 << 16;
const PROTOCOL_MEM_SLOTS: u64 = 1 << 15;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

fn msg(code: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&(VERSION | flags).to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn u64_body(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// Sends `msgs`, then reads until the server closes or goes quiet; returns what came back.
fn send_raw(sock: &std::path::Path, msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for m in msgs {
        if s.write_all(m).is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Sends a message with SCM_RIGHTS fds attached.
fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[i32]) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr and cmsg built over buffers that live for the call.
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if !fds.is_empty() {
            mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            mh.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, fds.len());
        }
        assert!(libc::sendmsg(s.as_raw_fd(), &mh, 0) >= 0);
    }
}

fn good_client_works(server: &Server) {
    let mut c = Client::connect(&server.socket, 1).expect("a good client after a hostile one");
    assert_eq!(c.read(0, 0, 4096), 0);
}

fn server(name: &str) -> (common::Scratch, Server) {
    let dir = scratch(name);
    let s = Server::vudev(&dir, &["--memory", "16M"]);
    (dir, s)
}

/// Negotiates REPLY_ACK so that refused requests are answered with a non-zero ack.
fn acked_session() -> Vec<Vec<u8>> {
    session_with_protocol(PROTOCOL_REPLY_ACK)
}

/// Negotiates the given protocol features.
fn session_with_protocol(protocol: u64) -> Vec<Vec<u8>> {
    vec![
        msg(SET_OWNER, 0, &[]),
        msg(GET_FEATURES, 0, &[]),
        msg(SET_FEATURES, 0, &u64_body(PROTOCOL_FEATURES_BIT)),
        msg(GET_PROTOCOL_FEATURES, 0, &[]),
        msg(SET_PROTOCOL_FEATURES, 0, &u64_body(protocol)),
    ]
}

/// Connects and sends a session setup negotiating `protocol` (read timeout 300 ms).
fn connect_with(server: &Server, protocol: u64) -> UnixStream {
    let stream = UnixStream::connect(&server.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for m in session_with_protocol(protocol) {
        (&stream).write_all(&m).unwrap();
    }
    stream
}

/// True when the server has closed `stream` (read returns end of file).
fn closed(stream: &UnixStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match (&*stream).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// The bodies of the replies to `code` in a reply stream (each reply: 12-byte header + body).
fn bodies_of(code: u32, replies: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut p = replies;
    while p.len() >= 12 {
        let c = u32::from_le_bytes(p[0..4].try_into().unwrap());
        let size = u32::from_le_bytes(p[8..12].try_into().unwrap()) as usize;
        if p.len() < 12 + size {
            break;
        }
        if c == code {
            out.push(&p[12..12 + size]);
        }
        p = &p[12 + size..];
    }
    out
}

/// The u64 ack values in a reply stream.
fn acks_of(code: u32, replies: &[u8]) -> Vec<u64> {
    bodies_of(code, replies)
        .into_iter()
        .filter_map(|b| Some(u64::from_le_bytes(b.try_into().ok()?)))
        .collect()
}

#[test]
fn garbage_bytes() {
    let (_dir, s) = server("garbage");
    send_raw(&s.socket, &[vec![0xa5; 64]]);
    good_client_works(&s);
}

#[test]
fn oversized_message() {
    let (_dir, s) = server("oversized");
    let mut m = msg(SET_FEATURES, 0, &[]);
    m[8..12].copy_from_slice(&0x1000_0000u32.to_le_bytes());
    send_raw(&s.socket, &[m]);
    good_client_works(&s);
}

#[test]
fn message_cut_short() {
    let (_dir, s) = server("short");
    let m = msg(SET_FEATURES, 0, &u64_body(0));
    send_raw(&s.socket, &[m[..14].to_vec()]);
    send_raw(&s.socket, &[m[..6].to_vec()]);
    good_client_works(&s);
}

#[test]
fn unknown_message() {
    let (_dir, s) = server("unknown");
    send_raw(&s.socket, &[msg(9999, 0, &[1, 2, 3, 4])]);
    good_client_works(&s);
}

#[test]
fn queue_index_and_size_out_of_range() {
    let (_dir, s) = server("vring");
    let mut msgs = acked_session();
    let mut body = Vec::new();
    body.extend_from_slice(&99u32.to_le_bytes());
    body.extend_from_slice(&256u32.to_le_bytes());
    msgs.push(msg(SET_VRING_NUM, NEED_REPLY, &body)); // index 99
    let mut body = Vec::new();
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&65536u32.to_le_bytes());
    msgs.push(msg(SET_VRING_NUM, NEED_REPLY, &body)); // size too large
    let mut body = Vec::new();
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&100u32.to_le_bytes());
    msgs.push(msg(SET_VRING_NUM, NEED_REPLY, &body)); // not a power of two
    let replies = send_raw(&s.socket, &msgs);
    assert_eq!(
        acks_of(SET_VRING_NUM, &replies),
        vec![1, 1, 1],
        "each refused with an error ack"
    );
    // Ring addresses for a queue that does not exist.
    let mut msgs = acked_session();
    let mut body = vec![0u8; 40];
    body[0..4].copy_from_slice(&7u32.to_le_bytes());
    msgs.push(msg(SET_VRING_ADDR, NEED_REPLY, &body));
    let replies = send_raw(&s.socket, &msgs);
    assert_eq!(acks_of(SET_VRING_ADDR, &replies), vec![1]);
    good_client_works(&s);
}

#[test]
fn config_read_out_of_range() {
    let (_dir, s) = server("config");
    let mut body = Vec::new();
    body.extend_from_slice(&4000u32.to_le_bytes()); // offset
    body.extend_from_slice(&64u32.to_le_bytes()); // size
    body.extend_from_slice(&0u32.to_le_bytes()); // flags
    body.extend_from_slice(&[0u8; 64]);
    let mut msgs = acked_session();
    msgs.push(msg(GET_CONFIG, 0, &body));
    send_raw(&s.socket, &msgs);
    good_client_works(&s);
}

fn region(gpa: u64, size: u64, uva: u64, offset: u64) -> Vec<u8> {
    [gpa, size, uva, offset]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn mem_table(regions: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        body.extend_from_slice(r);
    }
    body
}

/// Runs the acked session, then SET_MEM_TABLE with `fds`; returns the ack values.
fn try_mem_table(s: &Server, body: &[u8], fds: &[i32]) -> Vec<u64> {
    let stream = connect_with(s, PROTOCOL_REPLY_ACK);
    send_with_fds(&stream, &msg(SET_MEM_TABLE, NEED_REPLY, body), fds);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = (&stream).read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    acks_of(SET_MEM_TABLE, &out)
}

fn memfd(len: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a static name; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is new and owned.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

#[test]
fn bad_memory_tables() {
    let (_dir, s) = server("memtable");
    let m = memfd(1 << 20);
    let fd = m.as_raw_fd();
    // A region reaching past the end of its fd.
    let acks = try_mem_table(&s, &mem_table(&[region(0, 2 << 20, 0x7000_0000, 0)]), &[fd]);
    assert_ne!(acks, vec![0], "region past its fd accepted");
    // Overlapping regions.
    let body = mem_table(&[
        region(0, 1 << 20, 0x7000_0000, 0),
        region(1 << 19, 1 << 19, 0x8000_0000, 0),
    ]);
    assert_ne!(
        try_mem_table(&s, &body, &[fd, fd]),
        vec![0],
        "overlap accepted"
    );
    // A region whose end wraps the address space.
    let body = mem_table(&[region(u64::MAX - 4095, 1 << 20, 0x7000_0000, 0)]);
    assert_ne!(
        try_mem_table(&s, &body, &[fd]),
        vec![0],
        "wrapping region accepted"
    );
    // More regions than fds, and an empty region.
    let body = mem_table(&[
        region(0, 4096, 0x7000_0000, 0),
        region(8192, 4096, 0x7100_0000, 0),
    ]);
    assert_ne!(
        try_mem_table(&s, &body, &[fd]),
        vec![0],
        "missing fd accepted"
    );
    let body = mem_table(&[region(0, 0, 0x7000_0000, 0)]);
    assert_ne!(
        try_mem_table(&s, &body, &[fd]),
        vec![0],
        "empty region accepted"
    );
    // A region count that does not match the regions sent.
    let mut body = mem_table(&[region(0, 4096, 0x7000_0000, 0)]);
    body[0..4].copy_from_slice(&9u32.to_le_bytes());
    assert_ne!(
        try_mem_table(&s, &body, &[fd]),
        vec![0],
        "region count mismatch accepted"
    );
    // A valid table is still accepted after all that.
    let acks = try_mem_table(&s, &mem_table(&[region(0, 1 << 20, 0x7000_0000, 0)]), &[fd]);
    assert_eq!(acks, vec![0]);
    good_client_works(&s);
}

#[test]
fn too_many_memory_slots() {
    let (_dir, s) = server("slots");
    let m = memfd(4096);
    let stream = UnixStream::connect(&s.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut setup = acked_session();
    setup[4] = msg(
        SET_PROTOCOL_FEATURES,
        0,
        &u64_body(PROTOCOL_REPLY_ACK | PROTOCOL_MEM_SLOTS),
    );
    for x in setup {
        (&stream).write_all(&x).unwrap();
    }
    // 257 one-page regions: the 257th is over the 256 slots advertised.
    for i in 0..257u64 {
        let mut body = vec![0u8; 8];
        body.extend(region(i << 12, 4096, 0x7000_0000 + (i << 12), 0));
        send_with_fds(
            &stream,
            &msg(ADD_MEM_REG, NEED_REPLY, &body),
            &[m.as_raw_fd()],
        );
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = (&stream).read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if acks_of(ADD_MEM_REG, &out).len() == 257 {
            break;
        }
    }
    let acks = acks_of(ADD_MEM_REG, &out);
    assert_eq!(acks.len(), 257, "every ADD_MEM_REG answered");
    assert!(
        acks[..256].iter().all(|&a| a == 0),
        "the first 256 slots are accepted"
    );
    assert_eq!(acks[256], 1, "slot 257 is refused");
    drop(stream);
    good_client_works(&s);
}

/// A session with a valid 1 MiB memory table, for ring tests; returns the stream.
fn session_with_memory(s: &Server, m: &std::fs::File) -> UnixStream {
    let stream = connect_with(s, PROTOCOL_REPLY_ACK);
    let body = mem_table(&[region(0, 1 << 20, 0x7000_0000, 0)]);
    send_with_fds(
        &stream,
        &msg(SET_MEM_TABLE, NEED_REPLY, &body),
        &[m.as_raw_fd()],
    );
    stream
}

fn read_all(stream: &UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = (&*stream).read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Sets ring 0 up (256 entries, the given frontend addresses, a kick) and asks to enable it,
/// with a reply; returns the kick eventfd (the caller closes it).
fn start_ring_0(stream: &UnixStream, desc: u64, used: u64, avail: u64) -> i32 {
    let mut num = Vec::new();
    num.extend_from_slice(&0u32.to_le_bytes());
    num.extend_from_slice(&256u32.to_le_bytes());
    (&*stream).write_all(&msg(SET_VRING_NUM, 0, &num)).unwrap();
    // index, flags, then descriptor/used/available/log addresses.
    let mut addr = vec![0u8; 8];
    for a in [desc, used, avail, 0] {
        addr.extend_from_slice(&a.to_le_bytes());
    }
    (&*stream)
        .write_all(&msg(SET_VRING_ADDR, 0, &addr))
        .unwrap();
    // SAFETY: plain eventfd creation; the caller closes the fd.
    let kick = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    send_with_fds(stream, &msg(SET_VRING_KICK, 0, &u64_body(0)), &[kick]);
    let mut enable = Vec::new();
    enable.extend_from_slice(&0u32.to_le_bytes());
    enable.extend_from_slice(&1u32.to_le_bytes());
    (&*stream)
        .write_all(&msg(SET_VRING_ENABLE, NEED_REPLY, &enable))
        .unwrap();
    kick
}

#[test]
fn vring_addresses_outside_memory() {
    let (_dir, s) = server("ringaddr");
    let m = memfd(1 << 20);
    let stream = session_with_memory(&s, &m);
    // Far outside the table.
    let kick = start_ring_0(&stream, 0x9000_0000, 0x9000_1000, 0x9000_2000);
    let acks = acks_of(SET_VRING_ENABLE, &read_all(&stream));
    assert_eq!(acks, vec![1], "starting a ring outside memory is refused");
    // SAFETY: closing our own fd.
    unsafe { libc::close(kick) };
    drop(stream);
    good_client_works(&s);
}

#[test]
fn a_memory_table_that_cannot_be_mapped_leaves_the_previous_one_in_force() {
    let (_dir, s) = server("unmappable");
    let m = memfd(1 << 20);
    let stream = session_with_memory(&s, &m);
    // A pipe passes every check on the table (it is no regular file, so it has no size to
    // check) but cannot be mapped.
    let mut pipe = [0i32; 2];
    // SAFETY: pipe(2) fills the two-element array; both fds are closed below.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let body = mem_table(&[region(0, 1 << 20, 0x9000_0000, 0)]);
    send_with_fds(&stream, &msg(SET_MEM_TABLE, NEED_REPLY, &body), &[pipe[0]]);
    // Rings inside the first table: they start, so the first table is still the one in force.
    let kick = start_ring_0(&stream, 0x7000_0000, 0x7000_2000, 0x7000_1000);
    let replies = read_all(&stream);
    assert_eq!(
        acks_of(SET_MEM_TABLE, &replies),
        vec![0, 1],
        "the pipe table was accepted"
    );
    assert_eq!(
        acks_of(SET_VRING_ENABLE, &replies),
        vec![0],
        "rings in the old table refused"
    );
    // SAFETY: closing our own fds.
    unsafe {
        libc::close(kick);
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
    drop(stream);
    good_client_works(&s);
}

#[test]
fn missing_and_extra_fds() {
    let (_dir, s) = server("fds");
    // A kick without an fd and without the NOFD flag.
    let mut msgs = acked_session();
    msgs.push(msg(SET_VRING_KICK, 0, &u64_body(0)));
    send_raw(&s.socket, &msgs);
    good_client_works(&s);
    // An fd attached to a message that takes none.
    let stream = UnixStream::connect(&s.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let m = memfd(4096);
    send_with_fds(&stream, &msg(GET_FEATURES, 0, &[]), &[m.as_raw_fd()]);
    read_all(&stream);
    drop(stream);
    good_client_works(&s);
}

#[test]
fn status_messages() {
    let (_dir, s) = server("status");
    let stream = connect_with(&s, PROTOCOL_REPLY_ACK | PROTOCOL_STATUS);
    // ACKNOWLEDGE | DRIVER | FEATURES_OK is kept and read back; a value over a byte is refused.
    let good = msg(SET_STATUS, NEED_REPLY, &u64_body(0x0b));
    let too_big = msg(SET_STATUS, NEED_REPLY, &u64_body(0x1ff));
    for m in [good, msg(GET_STATUS, 0, &[]), too_big] {
        (&stream).write_all(&m).unwrap();
    }
    let replies = read_all(&stream);
    assert_eq!(acks_of(SET_STATUS, &replies), vec![0, 1]);
    assert_eq!(acks_of(GET_STATUS, &replies), vec![0x0b]);
    // A status message with a bad size ends the session; an fd attached to one is dropped.
    (&stream)
        .write_all(&msg(SET_STATUS, 0, &4u32.to_le_bytes()))
        .unwrap();
    assert!(closed(&stream), "a short status message was accepted");
    let mut msgs = session_with_protocol(PROTOCOL_REPLY_ACK | PROTOCOL_STATUS);
    msgs.push(msg(GET_STATUS, 0, &[0; 8]));
    let replies = send_raw(&s.socket, &msgs);
    assert!(
        acks_of(GET_STATUS, &replies).is_empty(),
        "GET_STATUS with a payload was answered"
    );
    let stream = connect_with(&s, PROTOCOL_REPLY_ACK | PROTOCOL_STATUS);
    let m = memfd(4096);
    send_with_fds(&stream, &msg(GET_STATUS, 0, &[]), &[m.as_raw_fd()]);
    let replies = read_all(&stream);
    assert_eq!(acks_of(GET_STATUS, &replies), vec![0]);
    drop(stream);
    // Without the STATUS protocol feature, the messages are unknown: disconnect.
    let mut msgs = acked_session();
    msgs.push(msg(GET_STATUS, 0, &[]));
    let replies = send_raw(&s.socket, &msgs);
    assert!(acks_of(GET_STATUS, &replies).is_empty());
    good_client_works(&s);
}

#[test]
fn bad_dirty_logs() {
    let (_dir, s) = server("dirtylog");
    let m = memfd(4096);
    let log = |size: u64, offset: u64| {
        let mut body = u64_body(size);
        body.extend(u64_body(offset));
        msg(SET_LOG_BASE, 0, &body)
    };
    let try_log = |bytes: Vec<u8>, fds: &[i32]| -> (Vec<u8>, bool) {
        let stream = connect_with(&s, PROTOCOL_REPLY_ACK | PROTOCOL_LOG_SHMFD);
        send_with_fds(&stream, &bytes, fds);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            match (&stream).read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        (out, eof)
    };
    let fd = m.as_raw_fd();
    // Past the end of its file, empty, wrapping, and with no fd: each ends the session.
    for (what, bytes, fds) in [
        ("past its file", log(8192, 0), vec![fd]),
        ("empty", log(0, 0), vec![fd]),
        ("wrapping", log(4096, u64::MAX - 10), vec![fd]),
        ("without an fd", log(4096, 0), vec![]),
    ] {
        let (out, eof) = try_log(bytes, &fds);
        assert!(eof, "a log {what} did not end the session");
        assert!(
            bodies_of(SET_LOG_BASE, &out).is_empty(),
            "a log {what} was answered"
        );
        good_client_works(&s);
    }
    // A good log is answered (with the log description) and the session goes on.
    let (out, eof) = try_log(log(4096, 0), &[fd]);
    assert!(!eof, "a good log ended the session");
    let mut want = u64_body(4096);
    want.extend(u64_body(0));
    assert_eq!(bodies_of(SET_LOG_BASE, &out), vec![&want[..]]);
    good_client_works(&s);
}

/// Waits (at most 10 s) for the server to close `stream`, reading whatever it sends.
fn closed_within_10s(stream: &UnixStream) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if closed(stream) {
            return true;
        }
    }
    false
}

#[test]
fn a_frontend_that_shrinks_its_memory_under_a_running_ring_costs_only_its_session() {
    // Two exports in one process would be the daemon; one export and a second frontend after
    // the hostile one show the same: the process lives, and serves.
    let (_dir, s) = server("sigbus");
    for (round, shrink_log) in [false, true].into_iter().enumerate() {
        let m = memfd(1 << 20);
        let stream = if shrink_log {
            connect_with(&s, PROTOCOL_REPLY_ACK | PROTOCOL_LOG_SHMFD)
        } else {
            session_with_memory(&s, &m)
        };
        if shrink_log {
            // A dirty log in a file that is then shrunk, with logging on and a ring running.
            let log = memfd(4096);
            let mut body = u64_body(4096);
            body.extend(u64_body(0));
            send_with_fds(&stream, &msg(SET_LOG_BASE, 0, &body), &[log.as_raw_fd()]);
            let body = mem_table(&[region(0, 1 << 20, 0x7000_0000, 0)]);
            send_with_fds(
                &stream,
                &msg(SET_MEM_TABLE, NEED_REPLY, &body),
                &[m.as_raw_fd()],
            );
            let log_all = PROTOCOL_FEATURES_BIT | (1 << 26);
            (&stream)
                .write_all(&msg(SET_FEATURES, 0, &u64_body(log_all)))
                .unwrap();
            let kick = start_ring_0(&stream, 0x7000_0000, 0x7000_2000, 0x7000_1000);
            assert_eq!(acks_of(SET_VRING_ENABLE, &read_all(&stream)), vec![0]);
            log.set_len(0).unwrap();
            // One request, so that the device writes and logs: GET_ID into guest memory.
            // (descriptors at 0, avail at 0x1000, used at 0x2000; header 0x3000, id 0x3100,
            // status 0x3200; memory is the memfd itself, which is still whole)
            use std::os::unix::fs::FileExt;
            let d = |addr: u64, len: u32, flags: u16, next: u16| {
                let mut b = addr.to_le_bytes().to_vec();
                b.extend_from_slice(&len.to_le_bytes());
                b.extend_from_slice(&flags.to_le_bytes());
                b.extend_from_slice(&next.to_le_bytes());
                b
            };
            m.write_all_at(&d(0x3000, 16, 1, 1), 0).unwrap();
            m.write_all_at(&d(0x3100, 20, 3, 2), 16).unwrap();
            m.write_all_at(&d(0x3200, 1, 2, 0), 32).unwrap();
            m.write_all_at(&8u32.to_le_bytes(), 0x3000).unwrap(); // VIRTIO_BLK_T_GET_ID
            m.write_all_at(&0u16.to_le_bytes(), 0x1004).unwrap();
            m.write_all_at(&1u16.to_le_bytes(), 0x1002).unwrap();
            // SAFETY: writing to our own eventfd.
            unsafe { libc::eventfd_write(kick, 1) };
            assert!(
                closed_within_10s(&stream),
                "the session outlived its vanished log"
            );
            // SAFETY: closing our own fd.
            unsafe { libc::close(kick) };
        } else {
            let kick = start_ring_0(&stream, 0x7000_0000, 0x7000_2000, 0x7000_1000);
            assert_eq!(acks_of(SET_VRING_ENABLE, &read_all(&stream)), vec![0]);
            // The frontend takes its memory away, then kicks: the worker's next look at the
            // ring touches pages past the end of the file.
            m.set_len(0).unwrap();
            // SAFETY: writing to our own eventfd.
            unsafe { libc::eventfd_write(kick, 1) };
            assert!(
                closed_within_10s(&stream),
                "the session outlived its vanished memory"
            );
            // SAFETY: closing our own fd.
            unsafe { libc::close(kick) };
        }
        let log = std::fs::read_to_string(s.socket.with_file_name("vudev.log")).unwrap();
        assert_eq!(log.matches("SIGBUS caught").count(), round + 1, "{log}");
        good_client_works(&s);
    }
}

//! A raw vhost-user frontend, message by message, for the tests that play a hostile one.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

// vhost-user request codes (docs/interop/vhost-user.rst).
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_CONFIG: u32 = 24;
pub const ADD_MEM_REG: u32 = 37;
pub const SET_STATUS: u32 = 39;
pub const GET_STATUS: u32 = 40;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_ENABLE: u32 = 18;
pub const VERSION: u32 = 0x1;
pub const NEED_REPLY: u32 = 0x8;
pub const PROTOCOL_LOG_SHMFD: u64 = 1 << 1;
pub const PROTOCOL_REPLY_ACK: u64 = 1 << 3;
pub const PROTOCOL_STATUS: u64 = 1 << 16;
pub const PROTOCOL_MEM_SLOTS: u64 = 1 << 15;
pub const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
pub const VERSION_1_BIT: u64 = 1 << 32;

pub fn msg(code: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&(VERSION | flags).to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

pub fn u64_body(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// Sends a message with SCM_RIGHTS fds attached.
pub fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[i32]) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
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

/// Negotiates the given protocol features.
pub fn session_with_protocol(protocol: u64) -> Vec<Vec<u8>> {
    vec![
        msg(SET_OWNER, 0, &[]),
        msg(GET_FEATURES, 0, &[]),
        // VERSION_1 too: a net device takes modern drivers only (the 12-byte header).
        msg(
            SET_FEATURES,
            0,
            &u64_body(PROTOCOL_FEATURES_BIT | VERSION_1_BIT),
        ),
        msg(GET_PROTOCOL_FEATURES, 0, &[]),
        msg(SET_PROTOCOL_FEATURES, 0, &u64_body(protocol)),
    ]
}

/// Connects and sends a session setup negotiating `protocol` (read timeout 300 ms).
pub fn connect_with(socket: &Path, protocol: u64) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for m in session_with_protocol(protocol) {
        (&stream).write_all(&m).unwrap();
    }
    stream
}

/// True when the server has closed `stream` (read returns end of file).
pub fn closed(stream: &UnixStream) -> bool {
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
pub fn bodies_of(code: u32, replies: &[u8]) -> Vec<&[u8]> {
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
pub fn acks_of(code: u32, replies: &[u8]) -> Vec<u64> {
    bodies_of(code, replies)
        .into_iter()
        .filter_map(|b| Some(u64::from_le_bytes(b.try_into().ok()?)))
        .collect()
}

pub fn region(gpa: u64, size: u64, uva: u64, offset: u64) -> Vec<u8> {
    [gpa, size, uva, offset]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

pub fn mem_table(regions: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        body.extend_from_slice(r);
    }
    body
}

pub fn memfd(len: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a static name; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is new and owned.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// A session with a valid 1 MiB memory table, for ring tests; returns the stream.
pub fn session_with_memory(socket: &Path, m: &std::fs::File) -> UnixStream {
    let stream = connect_with(socket, PROTOCOL_REPLY_ACK);
    let body = mem_table(&[region(0, 1 << 20, 0x7000_0000, 0)]);
    send_with_fds(
        &stream,
        &msg(SET_MEM_TABLE, NEED_REPLY, &body),
        &[m.as_raw_fd()],
    );
    stream
}

pub fn read_all(stream: &UnixStream) -> Vec<u8> {
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
pub fn start_ring_0(stream: &UnixStream, desc: u64, used: u64, avail: u64) -> i32 {
    start_ring(stream, 0, desc, used, avail)
}

/// [`start_ring_0`] for ring `index`.
pub fn start_ring(stream: &UnixStream, index: u32, desc: u64, used: u64, avail: u64) -> i32 {
    let mut num = Vec::new();
    num.extend_from_slice(&index.to_le_bytes());
    num.extend_from_slice(&256u32.to_le_bytes());
    (&*stream).write_all(&msg(SET_VRING_NUM, 0, &num)).unwrap();
    // index, flags, then descriptor/used/available/log addresses.
    let mut addr = index.to_le_bytes().to_vec();
    addr.extend_from_slice(&0u32.to_le_bytes());
    for a in [desc, used, avail, 0] {
        addr.extend_from_slice(&a.to_le_bytes());
    }
    (&*stream)
        .write_all(&msg(SET_VRING_ADDR, 0, &addr))
        .unwrap();
    // SAFETY: plain eventfd creation; the caller closes the fd.
    let kick = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    send_with_fds(
        stream,
        &msg(SET_VRING_KICK, 0, &u64_body(u64::from(index))),
        &[kick],
    );
    let mut enable = Vec::new();
    enable.extend_from_slice(&index.to_le_bytes());
    enable.extend_from_slice(&1u32.to_le_bytes());
    (&*stream)
        .write_all(&msg(SET_VRING_ENABLE, NEED_REPLY, &enable))
        .unwrap();
    kick
}

/// A frontend sets up the transmit ring (1) and puts one frame on it (a virtio-net header
/// and a 60-byte broadcast Ethernet frame, in one descriptor): it must come back on the used
/// ring within 10 s.
pub fn transmit_one_frame(socket: &Path) {
    use std::os::unix::fs::FileExt;
    let m = memfd(1 << 20);
    // Descriptors at 0, available ring at 0x1000, used ring at 0x2000, the frame at 0x3000.
    let mut desc = 0x3000u64.to_le_bytes().to_vec();
    desc.extend_from_slice(&72u32.to_le_bytes());
    desc.extend_from_slice(&[0; 4]);
    m.write_all_at(&desc, 0).unwrap();
    let mut frame = vec![0u8; 12]; // the header: nothing offloaded
    frame.extend_from_slice(&[0xff; 6]); // to everyone
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0x88, 0xb5]); // an experimental EtherType
    frame.resize(72, 0x5a);
    m.write_all_at(&frame, 0x3000).unwrap();
    m.write_all_at(&0u16.to_le_bytes(), 0x1004).unwrap();
    m.write_all_at(&1u16.to_le_bytes(), 0x1002).unwrap();
    let stream = session_with_memory(socket, &m);
    let kick = start_ring(&stream, 1, 0x7000_0000, 0x7000_2000, 0x7000_1000);
    let replies = read_all(&stream);
    assert_eq!(
        acks_of(SET_VRING_ENABLE, &replies),
        vec![0],
        "the transmit ring was refused"
    );
    // SAFETY: writing to our own eventfd.
    unsafe { libc::eventfd_write(kick, 1) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut used = [0u8; 2];
    loop {
        m.read_exact_at(&mut used, 0x2002).unwrap();
        if u16::from_le_bytes(used) == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the frame was not sent within 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: closing our own fd.
    unsafe { libc::close(kick) };
}

//! A hostile vhost-user frontend: malformed, oversized, cut-short and out-of-range messages.
//! After each one the export must still be alive and serve the next, well-behaved client.
//! Every case runs against a disk and against a NIC (the message handling is shared, the
//! queues are not).

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::frontend::*;
use common::{scratch, Client, Server};

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

/// An export under attack: a disk (`--memory`), or a NIC (`--net-tap`, over a TAP it makes).
struct Export {
    server: Server,
    net: bool,
    _dir: common::Scratch,
}

impl std::ops::Deref for Export {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// The disk export of case `name`.
fn disk(name: &str) -> Export {
    let dir = scratch(name);
    let server = Server::vudev(&dir, &["--memory", "16M"]);
    Export {
        server,
        net: false,
        _dir: dir,
    }
}

/// The NIC export of case `name`, over a TAP of its own (made by vudev, gone with it).
fn nic(name: &str) -> Export {
    static TAPS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    common::require_root("a net export makes a TAP");
    let n = TAPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tap = format!("vuh{}x{n}", std::process::id() % 100_000);
    let dir = scratch(&format!("{name}-net"));
    let server = Server::vudev(&dir, &["--net-tap", &tap]);
    Export {
        server,
        net: true,
        _dir: dir,
    }
}

/// Both exports of case `name`, one after the other.
fn exports(name: &str) -> impl Iterator<Item = Export> + '_ {
    [false, true]
        .into_iter()
        .map(move |net| if net { nic(name) } else { disk(name) })
}

/// A well-behaved client is served: a disk's read, or a NIC's transmitted frame, completes.
fn good_client_works(export: &Export) {
    if export.net {
        return transmit_one_frame(&export.socket);
    }
    let mut c = Client::connect(&export.socket, 1).expect("a good client after a hostile one");
    assert_eq!(c.read(0, 0, 4096), 0);
}

/// Negotiates REPLY_ACK so that refused requests are answered with a non-zero ack.
fn acked_session() -> Vec<Vec<u8>> {
    session_with_protocol(PROTOCOL_REPLY_ACK)
}

#[test]
fn garbage_bytes() {
    for s in exports("garbage") {
        send_raw(&s.socket, &[vec![0xa5; 64]]);
        good_client_works(&s);
    }
}

#[test]
fn oversized_message() {
    for s in exports("oversized") {
        let mut m = msg(SET_FEATURES, 0, &[]);
        m[8..12].copy_from_slice(&0x1000_0000u32.to_le_bytes());
        send_raw(&s.socket, &[m]);
        good_client_works(&s);
    }
}

#[test]
fn message_cut_short() {
    for s in exports("short") {
        let m = msg(SET_FEATURES, 0, &u64_body(0));
        send_raw(&s.socket, &[m[..14].to_vec()]);
        send_raw(&s.socket, &[m[..6].to_vec()]);
        good_client_works(&s);
    }
}

#[test]
fn unknown_message() {
    for s in exports("unknown") {
        send_raw(&s.socket, &[msg(9999, 0, &[1, 2, 3, 4])]);
        good_client_works(&s);
    }
}

#[test]
fn queue_index_and_size_out_of_range() {
    for s in exports("vring") {
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
}

#[test]
fn config_read_out_of_range() {
    for s in exports("config") {
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
}

/// Runs the acked session, then SET_MEM_TABLE with `fds`; returns the ack values.
fn try_mem_table(s: &Server, body: &[u8], fds: &[i32]) -> Vec<u64> {
    let stream = connect_with(&s.socket, PROTOCOL_REPLY_ACK);
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

#[test]
fn bad_memory_tables() {
    for s in exports("memtable") {
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
}

#[test]
fn too_many_memory_slots() {
    for s in exports("slots") {
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
}

#[test]
fn vring_addresses_outside_memory() {
    for s in exports("ringaddr") {
        let m = memfd(1 << 20);
        let stream = session_with_memory(&s.socket, &m);
        // Far outside the table.
        let kick = start_ring_0(&stream, 0x9000_0000, 0x9000_1000, 0x9000_2000);
        let acks = acks_of(SET_VRING_ENABLE, &read_all(&stream));
        assert_eq!(acks, vec![1], "starting a ring outside memory is refused");
        // SAFETY: closing our own fd.
        unsafe { libc::close(kick) };
        drop(stream);
        good_client_works(&s);
    }
}

#[test]
fn a_memory_table_that_cannot_be_mapped_leaves_the_previous_one_in_force() {
    for s in exports("unmappable") {
        let m = memfd(1 << 20);
        let stream = session_with_memory(&s.socket, &m);
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
}

#[test]
fn missing_and_extra_fds() {
    for s in exports("fds") {
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
}

#[test]
fn status_messages() {
    for s in exports("status") {
        let stream = connect_with(&s.socket, PROTOCOL_REPLY_ACK | PROTOCOL_STATUS);
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
        let stream = connect_with(&s.socket, PROTOCOL_REPLY_ACK | PROTOCOL_STATUS);
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
}

#[test]
fn bad_dirty_logs() {
    for s in exports("dirtylog") {
        let m = memfd(4096);
        let log = |size: u64, offset: u64| {
            let mut body = u64_body(size);
            body.extend(u64_body(offset));
            msg(SET_LOG_BASE, 0, &body)
        };
        let try_log = |bytes: Vec<u8>, fds: &[i32]| -> (Vec<u8>, bool) {
            let stream = connect_with(&s.socket, PROTOCOL_REPLY_ACK | PROTOCOL_LOG_SHMFD);
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
    for s in [disk("sigbus"), nic("sigbus")] {
        // The dirty-log round needs a request that writes guest memory: a disk's.
        let rounds = if s.net {
            &[false][..]
        } else {
            &[false, true][..]
        };
        for (round, &shrink_log) in rounds.iter().enumerate() {
            let m = memfd(1 << 20);
            let stream = if shrink_log {
                connect_with(&s.socket, PROTOCOL_REPLY_ACK | PROTOCOL_LOG_SHMFD)
            } else {
                session_with_memory(&s.socket, &m)
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
}

#[test]
fn a_message_cut_short_and_left_so_costs_the_session_within_seconds() {
    for s in exports("stall") {
        let stream = connect_with(&s.socket, PROTOCOL_REPLY_ACK);
        // SET_FEATURES announces 8 bytes of payload; none follow.
        let header = &msg(SET_FEATURES, 0, &u64_body(0))[..12];
        (&stream).write_all(header).unwrap();
        let t = std::time::Instant::now();
        while !closed(&stream) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "a stalled message held the session"
            );
        }
        good_client_works(&s);
        // Server's drop: SIGTERM must still end it within its bound.
    }
}

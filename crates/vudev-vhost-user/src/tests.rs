//! The session's message handling, driven directly (no socket) with the core's mock device:
//! a frontend's whole setup, a request served through the real worker, and the refusals that
//! must leave the session as it was.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vudev_core::testkit::{memfd, MockDevice};
use vudev_core::WorkerOptions;

use crate::session::Session;

/// The frontend's view of its memory: 1 MiB at guest address 0, its own address `UVA`.
const UVA: u64 = 0x7000_0000;
const MEM: u64 = 1 << 20;

fn session(queues: u16) -> (Session, Arc<MockDevice>) {
    let dev = Arc::new(MockDevice::new(queues));
    (
        Session::new(
            dev.clone(),
            256,
            WorkerOptions::default(),
            Default::default(),
        )
        .unwrap(),
        dev,
    )
}

fn region(gpa: u64, size: u64, uva: u64) -> VhostUserMemoryRegion {
    VhostUserMemoryRegion::new(gpa, size, uva, 0)
}

fn dup(f: &File) -> File {
    f.try_clone().unwrap()
}

/// A session with the memory table of `mem` and features acked (no protocol features, so a
/// ring starts once it has its size, addresses and kick).
fn ready(queues: u16, mem: &File) -> (Session, Arc<MockDevice>) {
    let (mut s, dev) = session(queues);
    s.set_owner().unwrap();
    let offered = s.get_features().unwrap();
    s.set_features(offered & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    s.set_mem_table(&[region(0, MEM, UVA)], vec![dup(mem)], None)
        .unwrap();
    (s, dev)
}

#[test]
fn a_request_goes_through_the_session_to_the_device_and_back() {
    let mem = memfd(MEM);
    let (mut s, dev) = ready(1, &mem);
    let (desc, avail, used) = (0x0u64, 0x1000u64, 0x2000u64);
    // One chain: a readable buffer, then a writable one; avail idx 1.
    let write = |addr: u64, bytes: &[u8]| {
        use std::os::unix::fs::FileExt;
        mem.write_all_at(bytes, addr).unwrap();
    };
    let d = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut b = addr.to_le_bytes().to_vec();
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        b
    };
    write(desc, &d(0x10000, 16, 1, 1));
    write(desc + 16, &d(0x20000, 512, 2, 0));
    write(avail + 2, &1u16.to_le_bytes());
    write(avail + 4, &0u16.to_le_bytes());
    s.set_vring_num(0, 64).unwrap();
    s.set_vring_addr(
        0,
        VhostUserVringAddrFlags::empty(),
        UVA + desc,
        UVA + used,
        UVA + avail,
        0,
    )
    .unwrap();
    s.set_vring_base(0, 0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // SAFETY: a dup of our eventfd, owned by the File from here on.
    let call_file =
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(call.as_raw_fd())) };
    s.set_vring_call(0, Some(call_file)).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // SAFETY: as above.
    let kick_file =
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(kick.as_raw_fd())) };
    s.set_vring_kick(0, Some(kick_file)).unwrap();
    // The worker takes the chain (it looks at the ring as it starts) and the mock completes
    // it: used idx 1, id 0, all 512 writable bytes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let used_idx = || {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 2];
        mem.read_exact_at(&mut b, used + 2).unwrap();
        u16::from_le_bytes(b)
    };
    while used_idx() != 1 {
        assert!(Instant::now() < deadline, "the request was not completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    let seen = dev.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(0, vec![(0x10000, 16, false), (0x20000, 512, true)])]
    );
    assert!(call.read().unwrap() >= 1, "the frontend was not called");
    // GET_VRING_BASE stops the ring and reports where it stands.
    let base = s.get_vring_base(0).unwrap();
    let num = base.num;
    assert_eq!(num, 1);
}

#[test]
fn refused_memory_tables_leave_the_previous_one_in_force() {
    let mem = memfd(MEM);
    let (mut s, _) = ready(1, &mem);
    let other = memfd(MEM);
    // Overlapping regions; a region past its file; a file that cannot be mapped (a pipe).
    assert!(s
        .set_mem_table(
            &[
                region(0, MEM, 0x9000_0000),
                region(MEM / 2, MEM, 0xa000_0000)
            ],
            vec![dup(&other), dup(&other)],
            None
        )
        .is_err());
    assert!(s
        .set_mem_table(&[region(0, 2 * MEM, 0x9000_0000)], vec![dup(&other)], None)
        .is_err());
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the array; the read end is owned by the File below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: as above; the write end is closed below.
    let pipe = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    assert!(s
        .set_mem_table(&[region(0, MEM, 0x9000_0000)], vec![pipe], None)
        .is_err());
    // SAFETY: closing our own fd.
    unsafe { libc::close(fds[1]) };
    // The first table is still the one in force, for the region list and the map alike.
    assert_eq!(s.uva_to_gpa(UVA + 0x1000, 16), Some(0x1000));
    assert_eq!(s.uva_to_gpa(0x9000_0000, 16), None);
    assert!(s.map.memory().read_obj::<u8>(GuestAddress(MEM - 1)).is_ok());
    // Removing a region that is not there changes nothing either.
    assert!(s
        .remove_mem_region(
            &vhost::vhost_user::message::VhostUserSingleMemoryRegion::new(0x5000_0000, 4096, 0, 0)
        )
        .is_err());
    assert_eq!(s.uva_to_gpa(UVA, 1), Some(0));
}

#[test]
fn bad_queue_numbers_features_and_config_reads_are_refused() {
    let (mut s, dev) = session(2);
    let offered = s.get_features().unwrap();
    assert!(
        s.set_features(offered | 1 << 63).is_err(),
        "unoffered feature acked"
    );
    assert!(s.set_vring_num(2, 64).is_err(), "queue past the device's");
    assert!(s.set_vring_num(0, 0).is_err());
    assert!(s.set_vring_num(0, 100).is_err(), "not a power of two");
    assert!(
        s.set_vring_num(0, 512).is_err(),
        "above the queue size offered"
    );
    assert!(s.set_vring_base(0, 1 << 16).is_err());
    let flags = VhostUserConfigFlags::empty();
    assert_eq!(s.get_config(0, 16, flags).unwrap(), dev.config);
    // Past the device's fields: zeros up to 256 bytes; beyond: refused.
    assert_eq!(s.get_config(16, 8, flags).unwrap(), vec![0; 8]);
    assert!(s.get_config(250, 16, flags).is_err());
    assert!(s.get_config(u32::MAX, 2, flags).is_err());
}

/// A raw frontend message: header (request, flags, size) and payload, with `fds` attached.
fn send_msg(
    sock: &std::os::unix::net::UnixStream,
    code: u32,
    flags: u32,
    payload: &[u8],
    fds: &[i32],
) {
    let mut msg = code.to_le_bytes().to_vec();
    msg.extend_from_slice(&(0x1 | flags).to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    let mut iov = libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: msg.len(),
    };
    let mut control = vec![0u8; 64];
    // SAFETY: an all-zero msghdr is valid; the buffers outlive the call; the control
    // message is written within `control`.
    unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        if !fds.is_empty() {
            m.msg_control = control.as_mut_ptr().cast();
            m.msg_controllen = libc::CMSG_SPACE((fds.len() * 4) as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
        assert_eq!(libc::sendmsg(sock.as_raw_fd(), &m, 0), msg.len() as isize);
    }
}

fn read_exact(sock: &std::os::unix::net::UnixStream, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    (&*sock).read_exact(&mut b).unwrap();
    b
}

#[test]
fn the_backend_channel_carries_config_changes_and_a_bad_one_costs_the_session() {
    use std::os::unix::net::UnixStream;
    let dev: Arc<dyn vudev_core::Device> = Arc::new(MockDevice::new(1));
    for case in ["good", "pipe", "none"] {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let channel = crate::FrontendChannel::default();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (dev, chan2) = (dev.clone(), channel.clone());
        let served = std::thread::spawn(move || {
            crate::serve_frontend(
                dev,
                256,
                &WorkerOptions::default(),
                theirs,
                &stop,
                None,
                &chan2,
            )
        });
        send_msg(&ours, 3, 0, &[], &[]); // SET_OWNER
        let features = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        send_msg(&ours, 2, 0, &features.to_le_bytes(), &[]); // SET_FEATURES
        let protocol: u64 = (1 << 3) | (1 << 5); // REPLY_ACK | BACKEND_REQ
        send_msg(&ours, 16, 0, &protocol.to_le_bytes(), &[]); // SET_PROTOCOL_FEATURES
        let (front, back) = UnixStream::pair().unwrap();
        let mut pipe = [0; 2];
        // SAFETY: pipe(2) fills the array; both ends are closed below.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        let fds: Vec<i32> = match case {
            "good" => vec![back.as_raw_fd()],
            "pipe" => vec![pipe[0]],
            _ => vec![],
        };
        send_msg(&ours, 21, 0x8, &[], &fds); // SET_BACKEND_REQ_FD, reply wanted
                                             // SAFETY: closing our own pipe ends (the session got a copy of one).
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        drop(back);
        match case {
            "good" => {
                let ack = read_exact(&ours, 20);
                assert_eq!(u32::from_le_bytes(ack[0..4].try_into().unwrap()), 21);
                assert_eq!(u64::from_le_bytes(ack[12..20].try_into().unwrap()), 0);
                assert!(channel.config_changed().unwrap());
                front
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let msg = read_exact(&front, 12);
                assert_eq!(
                    u32::from_le_bytes(msg[0..4].try_into().unwrap()),
                    2,
                    "CONFIG_CHANGE_MSG"
                );
                assert_eq!(u32::from_le_bytes(msg[8..12].try_into().unwrap()), 0);
                drop(ours);
                served.join().unwrap();
                assert!(
                    !channel.config_changed().unwrap(),
                    "the channel outlived its session"
                );
            }
            _ => {
                // Refused: the session ends, and there is no channel to send on.
                served.join().unwrap();
                assert!(!channel.config_changed().unwrap());
            }
        }
    }
}

/// QEMU's virtio-net order: SET_VRING_ENABLE before any SET_FEATURES. Each gets its ack
/// (0 done, 1 refused: a queue that does not exist, a value other than 0 or 1), the session
/// carries on, and after SET_FEATURES the same request is answered as before.
#[test]
fn vring_enable_before_set_features_is_answered() {
    use std::os::unix::net::UnixStream;
    let dev: Arc<dyn vudev_core::Device> = Arc::new(MockDevice::new(2));
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let served = std::thread::spawn(move || {
        crate::serve_frontend(
            dev,
            256,
            &WorkerOptions::default(),
            theirs,
            &stop,
            None,
            &crate::FrontendChannel::default(),
        )
    });
    let ack_of = |index: u32, num: u32| {
        let mut state = index.to_le_bytes().to_vec();
        state.extend_from_slice(&num.to_le_bytes());
        send_msg(&ours, 18, 0x8, &state, &[]); // SET_VRING_ENABLE, reply wanted
        let ack = read_exact(&ours, 20);
        assert_eq!(u32::from_le_bytes(ack[0..4].try_into().unwrap()), 18);
        u64::from_le_bytes(ack[12..20].try_into().unwrap())
    };
    send_msg(&ours, 3, 0, &[], &[]); // SET_OWNER
    send_msg(&ours, 1, 0, &[], &[]); // GET_FEATURES
    let offered = u64::from_le_bytes(read_exact(&ours, 20)[12..20].try_into().unwrap());
    let protocol: u64 = 1 << 3; // REPLY_ACK
    send_msg(&ours, 16, 0, &protocol.to_le_bytes(), &[]); // SET_PROTOCOL_FEATURES
    assert_eq!(ack_of(0, 1), 0, "queue 0 enabled");
    assert_eq!(ack_of(1, 0), 0, "queue 1 disabled");
    assert_eq!(ack_of(2, 1), 1, "no queue 2");
    assert_eq!(ack_of(0, 7), 1, "7 is neither on nor off");
    send_msg(&ours, 2, 0, &offered.to_le_bytes(), &[]); // SET_FEATURES
    assert_eq!(
        ack_of(1, 1),
        0,
        "after SET_FEATURES, the crate's own handling"
    );
    drop(ours);
    served.join().unwrap();
}

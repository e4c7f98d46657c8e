//! The net queues against a real TAP (these tests run as root, as the suite does): a raw
//! packet socket on the TAP's interface plays the host's network, the test kit's
//! [`RingDriver`] plays the driver.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vudev_core::testkit::RingDriver;
use vudev_core::{Device, Tracking};

use crate::{MacAddress, NetConfig, NetDevice, Tap};

/// VIRTIO_F_VERSION_1, which the transports add to what a device offers.
const VERSION_1: u64 = 1 << 32;

/// The EtherType of the tests' frames (IEEE's "local experimental"): anything else the
/// kernel sends on the interface is skipped.
const ETHERTYPE: u16 = 0x88b5;
const BUF: u64 = 0x10000;

/// A TAP of its own for one test, up, with IPv6 off (so that the kernel sends little on it),
/// and a packet socket on it.
struct Rig {
    dev: NetDevice,
    sock: OwnedFd,
    ifindex: i32,
}

fn run(cmd: &[&str]) {
    let st = Command::new(cmd[0]).args(&cmd[1..]).status().expect(cmd[0]);
    assert!(st.success(), "{cmd:?} failed");
}

impl Rig {
    fn new(mtu: u32) -> Rig {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vdt{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let tap = Tap::open(&name).expect("open a TAP (the tests run as root)");
        let cfg = NetConfig {
            mac: MacAddress::derived(&name),
            mtu,
            queue_size: 256,
            queue_pairs: 1,
        };
        let dev = NetDevice::new(cfg, vec![tap]).expect("the net device");
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        run(&["ip", "link", "set", &name, "up"]);
        let cname = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        assert!(ifindex > 0);
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new fd.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data, valid all zeros.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        Rig { dev, sock, ifindex }
    }

    /// A frame of the tests' kind with `len` bytes in all, its payload `fill`.
    fn frame(&self, len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        f[..6].copy_from_slice(&self.dev.config().mac.0);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        f
    }

    /// Sends `frame` out of the interface: the TAP's reader (the device) gets it.
    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for its length.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame of the tests' kind that came in on the interface (from the device).
    fn receive(&self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 70000];
        loop {
            assert!(
                Instant::now() < deadline,
                "no frame from the device within 5 s"
            );
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data, valid all zeros.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `sll` are valid for the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut sl,
                )
            };
            assert!(n >= 0);
            let n = n as usize;
            if sll.sll_pkttype == libc::PACKET_OUTGOING
                || n < 14
                || buf[12..14] != ETHERTYPE.to_be_bytes()
            {
                continue;
            }
            assert_eq!(sll.sll_ifindex, self.ifindex);
            return buf[..n].to_vec();
        }
    }

    /// A driver of queue `index` with the device's handler for `features`.
    fn driver(&self, index: u16, features: u64) -> RingDriver {
        let mut d = RingDriver::new(1 << 20, 256);
        let h = self
            .dev
            .queue_handler(index, features | VERSION_1)
            .expect("queue handler");
        d.start(h, Tracking::default(), 0, false);
        d
    }

    fn stat(&self, name: &str) -> u64 {
        self.dev
            .stats()
            .snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    }
}

fn num_buffers(d: &RingDriver, addr: u64) -> u16 {
    let b = d.bytes(addr + 10, 2);
    u16::from_le_bytes([b[0], b[1]])
}

#[test]
fn a_frame_from_the_tap_lands_in_a_receive_chain_with_its_header() {
    let rig = Rig::new(1500);
    let mut d = rig.driver(0, 0);
    let head = d.chain(&[(BUF, 12, true), (BUF + 0x1000, 1518, true)]);
    let f = rig.frame(600, 0x5a);
    rig.send(&f);
    let (id, len) = d.wait_used();
    assert_eq!((id, len), (u32::from(head), 12 + 600));
    assert_eq!(num_buffers(&d, BUF), 1);
    assert_eq!(d.bytes(BUF + 0x1000, 600), f);
    assert_eq!(rig.stat("rx_packets"), 1);
}

#[test]
fn frames_that_came_before_any_buffer_wait_for_one() {
    let rig = Rig::new(1500);
    let mut d = rig.driver(0, 0);
    let (a, b) = (rig.frame(100, 1), rig.frame(200, 2));
    rig.send(&a);
    rig.send(&b);
    // The TAP is readable and there is no buffer: nothing can complete.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used_idx(), 0);
    d.chain(&[(BUF, 2048, true)]);
    assert_eq!(d.wait_used().1, 12 + 100);
    d.chain(&[(BUF + 0x1000, 2048, true)]);
    assert_eq!(d.wait_used().1, 12 + 200);
    assert_eq!(d.bytes(BUF + 0x1000 + 12, 200), b);
}

#[test]
fn a_large_frame_spreads_over_mergeable_buffers() {
    let rig = Rig::new(9000);
    let mut d = rig.driver(0, 1 << VIRTIO_NET_F_MRG_RXBUF);
    let heads: Vec<u16> = (0..12)
        .map(|i| d.chain(&[(BUF + i * 0x1000, 1024, true)]))
        .collect();
    let f = rig.frame(3000, 7);
    rig.send(&f);
    let used: Vec<(u32, u32)> = (0..3).map(|_| d.wait_used()).collect();
    assert_eq!(
        used,
        [
            (u32::from(heads[0]), 1024),
            (u32::from(heads[1]), 1024),
            (u32::from(heads[2]), 3012 - 2048)
        ]
    );
    assert_eq!(num_buffers(&d, BUF), 3);
    let mut got = d.bytes(BUF + 12, 1012);
    got.extend(d.bytes(BUF + 0x1000, 1024));
    got.extend(d.bytes(BUF + 0x2000, 3012 - 2048));
    assert_eq!(got, f);
}

#[test]
fn a_frame_waits_aside_until_few_mergeable_buffers_grow_enough() {
    let rig = Rig::new(9000);
    let mut d = rig.driver(0, 1 << VIRTIO_NET_F_MRG_RXBUF);
    // 2 KiB held: less than a 9000-byte frame needs, so frames are read aside.
    d.chain(&[(BUF, 1024, true)]);
    d.chain(&[(BUF + 0x1000, 1024, true)]);
    let small = rig.frame(1500, 3);
    rig.send(&small);
    assert_eq!(d.wait_used(), (0, 1024));
    assert_eq!(d.wait_used(), (1, 1512 - 1024));
    let big = rig.frame(3000, 4);
    rig.send(&big);
    d.chain(&[(BUF + 0x2000, 1024, true)]);
    d.chain(&[(BUF + 0x3000, 1024, true)]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        d.used_idx(),
        2,
        "3012 bytes do not fit in 2 KiB: the frame waits"
    );
    d.chain(&[(BUF + 0x4000, 1024, true)]);
    let used: Vec<u32> = (0..3).map(|_| d.wait_used().1).collect();
    assert_eq!(used, [1024, 1024, 3012 - 2048]);
    assert_eq!(num_buffers(&d, BUF + 0x2000), 3);
    assert_eq!(d.bytes(BUF + 0x4000, 3012 - 2048), big[2048 - 12..]);
    assert_eq!(rig.stat("rx_dropped"), 0);
}

#[test]
fn a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
    let rig = Rig::new(1500);
    let mut d = rig.driver(0, 0);
    let head = d.chain(&[(BUF, 112, true)]);
    rig.send(&rig.frame(500, 1));
    let fits = rig.frame(80, 2);
    rig.send(&fits);
    assert_eq!(d.wait_used(), (u32::from(head), 92));
    assert_eq!(d.bytes(BUF + 12, 80), fits);
    assert_eq!(rig.stat("rx_dropped"), 1);
}

#[test]
fn bad_receive_chains_are_given_back_empty_and_counted() {
    let rig = Rig::new(1500);
    let mut d = rig.driver(0, 0);
    // Device-readable; shorter than the header; outside driver memory.
    let a = d.chain(&[(BUF, 2048, false)]);
    let b = d.chain(&[(BUF, 8, true)]);
    let c = d.chain(&[(1 << 30, 2048, true)]);
    assert_eq!(d.wait_used(), (u32::from(a), 0));
    assert_eq!(d.wait_used(), (u32::from(b), 0));
    rig.send(&rig.frame(100, 1));
    assert_eq!(d.wait_used(), (u32::from(c), 0));
    let good = d.chain(&[(BUF, 2048, true)]);
    assert_eq!(d.wait_used(), (u32::from(good), 112));
    assert_eq!(rig.stat("rx_bad_chains"), 3);
}

#[test]
fn a_transmit_chain_goes_out_of_the_tap() {
    let rig = Rig::new(1500);
    let mut d = rig.driver(1, 0);
    let f = rig.frame(1000, 9);
    d.fill(BUF, 12, 0);
    for (i, chunk) in f.chunks(400).enumerate() {
        let at = BUF + 0x1000 * (i as u64 + 1);
        for (k, byte) in chunk.iter().enumerate() {
            d.write(at + k as u64, *byte);
        }
    }
    let head = d.chain(&[
        (BUF, 12, false),
        (BUF + 0x1000, 400, false),
        (BUF + 0x2000, 400, false),
        (BUF + 0x3000, 200, false),
    ]);
    assert_eq!(d.wait_used(), (u32::from(head), 0));
    assert_eq!(rig.receive(), f);
    assert_eq!((rig.stat("tx_packets"), rig.stat("tx_bytes")), (1, 1000));
}

#[test]
fn bad_transmit_chains_are_dropped_and_counted_and_the_queue_goes_on() {
    let rig = Rig::new(1500);
    let mut d = rig.driver(1, 0);
    let f = rig.frame(60, 1);
    for (k, byte) in f.iter().enumerate() {
        d.write(BUF + 12 + k as u64, *byte);
    }
    // A writable buffer; shorter than the headers; larger than a frame may be (no
    // segmentation offload negotiated, so the MTU and an Ethernet header with a VLAN tag);
    // outside driver memory.
    d.chain(&[(BUF, 72, true)]);
    d.chain(&[(BUF, 20, false)]);
    d.chain(&[(BUF, 12 + 1500 + 18 + 1, false)]);
    d.chain(&[(1 << 30, 72, false)]);
    for _ in 0..4 {
        assert_eq!(d.wait_used().1, 0);
    }
    assert_eq!(rig.stat("tx_bad_chains"), 4);
    d.chain(&[(BUF, 72, false)]);
    d.wait_used();
    assert_eq!(rig.receive(), f);
    assert_eq!(rig.stat("tx_packets"), 1);
}

/// Two queue pairs over a two-queue TAP: four queues, receive on the even ones, each pair on
/// its own TAP queue; a fifth queue, or a TAP queue count that does not match, is refused.
#[test]
fn queue_pairs_take_a_tap_queue_each() {
    let name = format!("vdq{}", std::process::id() % 100_000);
    let taps = Tap::open_queues(&name, 2).expect("a two-queue TAP (the tests run as root)");
    assert_eq!(taps.len(), 2);
    let cfg = NetConfig {
        mac: MacAddress::derived(&name),
        mtu: 1500,
        queue_size: 256,
        queue_pairs: 2,
    };
    let one = Tap::open_queues(&name, 2).expect("more queues of the same TAP");
    assert!(NetDevice::new(cfg.clone(), one.into_iter().take(1).collect()).is_err());
    let dev = NetDevice::new(cfg, taps).expect("the net device");
    assert_eq!(dev.num_queues(), 4);
    assert!(
        dev.queue_handler(0, dev.features()).is_err(),
        "a legacy driver (no VERSION_1) is refused"
    );
    let f = dev.features() | VERSION_1;
    assert_ne!(f & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ), 0);
    for q in 0..4 {
        assert!(dev.queue_handler(q, f).is_ok(), "queue {q}");
    }
    assert!(dev.queue_handler(4, f).is_err());
    // A single-queue open of a multi-queue TAP says what it is.
    let e = Tap::open(&name).unwrap_err().to_string();
    assert!(e.contains("multi-queue TAP"), "{e}");
}

/// A driver that posts the same receive buffer under the same head again and again, with no
/// frame coming: the device holds at most MAX_HELD_CHAINS of them and gives back the rest
/// empty (counted as bad chains), instead of growing without bound.
#[test]
fn receive_buffers_posted_again_and_again_are_held_to_a_bound() {
    let rig = Rig::new(1500);
    let mut d = rig.driver(0, 0);
    let head = d.chain(&[(0x10000, 2048, true)]);
    let posts: u32 = 32768 + 300;
    let mut posted = 1u32;
    while posted < posts {
        // At most a ring's worth ahead of the device.
        let deadline = Instant::now() + Duration::from_secs(10);
        while (posted as u16).wrapping_sub(d.worker().position().next_avail) > 128 {
            assert!(
                Instant::now() < deadline,
                "the device stopped taking chains"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        d.publish(head);
        posted += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while u32::from(d.used_idx()) < posts - 32768 {
        assert!(
            Instant::now() < deadline,
            "only {} chains given back",
            d.used_idx()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        u32::from(d.used_idx()),
        posts - 32768,
        "held: 32768, no more"
    );
    assert_eq!(rig.stat("rx_bad_chains"), u64::from(posts - 32768));
}

//! The core's queue worker driving the virtio-blk device over real split rings in shared
//! memory (the core's test kit), including what a hostile driver can put on the ring.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vudev_blk::{BlockConfig, BlockDevice, MemoryBackend};
use vudev_core::testkit::{memfd, RingDriver, AVAIL, DESC, USED};
use vudev_core::{Device, DirtyLog, InflightArea, Tracking};

const MEM_SIZE: u64 = 16 << 20;
const QSIZE: u16 = 64;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x100000;
const STATUS: u64 = 0x20000;
const DISK: u64 = 1 << 20;

/// The test kit's ring driver with the block device's requests on top.
struct Rig(RingDriver);

impl std::ops::Deref for Rig {
    type Target = RingDriver;
    fn deref(&self) -> &RingDriver {
        &self.0
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut RingDriver {
        &mut self.0
    }
}

impl Rig {
    fn new(read_only: bool) -> Rig {
        Rig::with_backend(
            read_only,
            Arc::new(MemoryBackend::new(DISK, read_only).unwrap()),
        )
    }

    fn with_backend(read_only: bool, backend: Arc<dyn vudev_blk::BlockBackend>) -> Rig {
        let mut r = Rig::stopped();
        r.start_blk(read_only, backend, Tracking::default(), 0);
        r
    }

    /// A device on `backend` kept by the caller (to resize it, to read its counters), and a
    /// worker serving its queue 0.
    fn on_device(backend: Arc<dyn vudev_blk::BlockBackend>) -> (BlockDevice, Rig) {
        let cfg = BlockConfig {
            queue_size: QSIZE,
            ..BlockConfig::new(DISK)
        };
        let dev = BlockDevice::new(cfg, backend);
        let mut r = Rig::stopped();
        let handler = dev.queue_handler(0, dev.features()).unwrap();
        r.0.start(handler, Tracking::default(), 0, false);
        (dev, r)
    }

    /// Driver memory and rings with no worker yet.
    fn stopped() -> Rig {
        Rig(RingDriver::new(MEM_SIZE, QSIZE))
    }

    /// Starts the worker, with a virtio-blk device on `backend`, at avail index `next_avail`.
    fn start_blk(
        &mut self,
        read_only: bool,
        backend: Arc<dyn vudev_blk::BlockBackend>,
        tracking: Tracking,
        next_avail: u16,
    ) {
        let cfg = BlockConfig {
            queue_size: QSIZE,
            read_only,
            serial: "test-serial".into(),
            ..BlockConfig::new(DISK)
        };
        let dev = BlockDevice::new(cfg, backend);
        let handler = dev.queue_handler(0, dev.features()).unwrap();
        self.0.start(handler, tracking, next_avail, false);
    }

    fn header(&self, at: u64, t: u32, sector: u64) {
        self.write(at, t);
        self.write(at + 4, 0u32);
        self.write(at + 8, sector);
    }

    /// Runs a request with one data buffer and returns (status, used len).
    fn request(&mut self, t: u32, sector: u64, data: Option<(u64, u32, bool)>) -> (u8, u32) {
        self.header(HDR, t, sector);
        self.write(STATUS, 0xffu8);
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend(data);
        bufs.push((STATUS, 1, true));
        let head = self.chain(&bufs);
        let (id, len) = self.wait_used();
        assert_eq!(id, u32::from(head));
        (self.read(STATUS), len)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn write_read_flush_get_id() {
    let mut r = Rig::new(false);
    r.fill(DATA, 4096, 0xab);
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 8, Some((DATA, 4096, false))),
        (OK, 1)
    );
    r.fill(DATA + 0x10000, 4096, 0);
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 8, Some((DATA + 0x10000, 4096, true))),
        (OK, 4097)
    );
    assert!(r.bytes(DATA + 0x10000, 4096) == vec![0xab; 4096]);
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1));
    let (s, len) = r.request(VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20, true)));
    assert_eq!((s, len), (OK, 21));
    assert_eq!(&r.bytes(DATA, 11), b"test-serial");
    r.stop();
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let mut r = Rig::new(false);
    r.fill(DATA, 8192, 0x5a);
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, Some((DATA, 8192, false))),
        (OK, 1)
    );
    for (t, flags) in [(VIRTIO_BLK_T_DISCARD, 0u32), (VIRTIO_BLK_T_WRITE_ZEROES, 1)] {
        r.write(DATA + 0x20000, 0u64);
        r.write(DATA + 0x20008, 16u32);
        r.write(DATA + 0x2000c, flags);
        assert_eq!(r.request(t, 0, Some((DATA + 0x20000, 16, false))), (OK, 1));
    }
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, Some((DATA, 8192, true))),
        (OK, 8193)
    );
    assert!(r.bytes(DATA, 8192) == vec![0; 8192]);
    // Discard with a flag set is unsupported; past the end is an error.
    r.write(DATA + 0x2000c, 1u32);
    assert_eq!(
        r.request(VIRTIO_BLK_T_DISCARD, 0, Some((DATA + 0x20000, 16, false)))
            .0,
        UNSUPP
    );
    r.write(DATA + 0x20000, DISK / 512);
    r.write(DATA + 0x2000c, 0u32);
    assert_eq!(
        r.request(VIRTIO_BLK_T_DISCARD, 0, Some((DATA + 0x20000, 16, false)))
            .0,
        IOERR
    );
    r.stop();
}

#[test]
fn bad_requests_get_error_statuses() {
    let mut r = Rig::new(false);
    // Past the end, overflowing sector, not a multiple of 512, unknown type.
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, DISK / 512, Some((DATA, 512, true)))
            .0,
        IOERR
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, u64::MAX / 256, Some((DATA, 512, true)))
            .0,
        IOERR
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, Some((DATA, 100, false))).0,
        IOERR
    );
    assert_eq!(r.request(0x1234, 0, None).0, UNSUPP);
    // A data buffer outside driver memory, and one wrapping the address space.
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, Some((MEM_SIZE - 256, 512, true)))
            .0,
        IOERR
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, Some((u64::MAX - 100, 512, false)))
            .0,
        IOERR
    );
    // Short header.
    r.write(STATUS, 0xffu8);
    let head = r.chain(&[(HDR, 8, false), (STATUS, 1, true)]);
    assert_eq!(r.wait_used(), (u32::from(head), 1));
    assert_eq!(r.read::<u8>(STATUS), IOERR);
    // Wrong direction: a read whose data buffer is driver-readable.
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    let head = r.chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(r.wait_used(), (u32::from(head), 1));
    assert_eq!(r.read::<u8>(STATUS), IOERR);
    // No status byte at all: completed with nothing written.
    let head = r.chain(&[(HDR, 16, false)]);
    assert_eq!(r.wait_used(), (u32::from(head), 0));
    // The queue still works.
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1));
    r.stop();
}

#[test]
fn read_only_refuses_writes() {
    let mut r = Rig::new(true);
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, Some((DATA, 512, false))).0,
        IOERR
    );
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, Some((DATA, 512, true))).0, OK);
    r.stop();
}

#[test]
fn descriptor_loops_and_bad_indirect_tables_do_not_hang() {
    let mut r = Rig::new(false);
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    // A two-descriptor loop: 40 -> 41 -> 40.
    r.put_desc(DESC, 40, HDR, 16, VRING_DESC_F_NEXT, 41);
    r.put_desc(
        DESC,
        41,
        DATA,
        512,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        40,
    );
    r.publish(40);
    assert_eq!(r.wait_used(), (40, 0));
    // A next index past the queue size.
    r.put_desc(DESC, 42, HDR, 16, VRING_DESC_F_NEXT, 1000);
    r.publish(42);
    assert_eq!(r.wait_used(), (42, 0));
    // An indirect table whose length is not a multiple of 16.
    let table = 0x30000;
    r.put_desc(DESC, 43, table, 17, VRING_DESC_F_INDIRECT, 0);
    r.publish(43);
    assert_eq!(r.wait_used(), (43, 0));
    // An indirect table holding another indirect descriptor.
    r.put_desc(table, 0, table + 0x100, 32, VRING_DESC_F_INDIRECT, 0);
    r.put_desc(DESC, 44, table, 16, VRING_DESC_F_INDIRECT, 0);
    r.publish(44);
    assert_eq!(r.wait_used(), (44, 0));
    // An indirect table outside memory.
    r.put_desc(DESC, 45, MEM_SIZE + 0x1000, 32, VRING_DESC_F_INDIRECT, 0);
    r.publish(45);
    assert_eq!(r.wait_used(), (45, 0));
    // A good indirect request still works.
    r.fill(DATA, 512, 0x77);
    r.put_desc(table, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
    r.put_desc(
        table,
        1,
        DATA,
        512,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        2,
    );
    r.put_desc(table, 2, STATUS, 1, VRING_DESC_F_WRITE, 0);
    r.put_desc(DESC, 46, table, 48, VRING_DESC_F_INDIRECT, 0);
    r.publish(46);
    assert_eq!(r.wait_used(), (46, 513));
    assert_eq!(r.read::<u8>(STATUS), OK);
    assert!(r.bytes(DATA, 512) == vec![0; 512]);
    r.stop();
}

#[test]
fn a_broken_avail_ring_stops_the_queue_not_the_process() {
    let mut r = Rig::new(false);
    // The avail index jumps by more than the queue size.
    r.write(AVAIL + 2, QSIZE + 5);
    r.kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !r.worker().is_broken() {
        assert!(
            Instant::now() < deadline,
            "the queue did not notice the bad index"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let used: u16 = r.read(USED + 2);
    assert_eq!(used, 0);
    // Stopping still works (no hang, no panic).
    r.stop();
}

#[test]
fn an_avail_entry_with_a_head_past_the_queue_size_is_skipped() {
    let mut r = Rig::new(false);
    r.publish(QSIZE + 3);
    // The valid request after it is served, and it is the only used element.
    r.fill(DATA, 512, 0x5a);
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, Some((DATA, 512, false))),
        (OK, 1)
    );
    assert_eq!(r.read::<u16>(USED + 2), 1);
    assert!(!r.worker().is_broken());
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, Some((DATA + 4096, 512, true)))
            .0,
        OK
    );
    assert_eq!(r.bytes(DATA + 4096, 512), vec![0x5a; 512]);
    r.stop();
}

#[test]
fn auto_aio_copies_on_the_queue_thread_where_io_uring_would_punt() {
    use std::os::fd::AsRawFd;
    use vudev_blk::BlockBackend;
    // /dev/shm is tmpfs on Debian. Whether io_uring can serve it inline is the kernel's
    // answer to a non-blocking read; auto must follow it.
    let path = format!("/dev/shm/vudev-auto-{}", std::process::id());
    File::create(&path).unwrap().set_len(DISK).unwrap();
    let probe = File::open(&path).unwrap();
    let mut b = [0u8; 1];
    let iov = libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: one iovec naming a valid 1-byte buffer.
    let n = unsafe { libc::preadv2(probe.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
    let punts = n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP);
    let auto =
        vudev_blk::FileBackend::open(path.as_ref(), false, false, vudev_blk::Aio::Auto).unwrap();
    assert_eq!(auto.queue().unwrap().completion_fd().is_none(), punts);
    assert_eq!(
        auto.describe().contains("synchronous I/O (memory-backed"),
        punts
    );
    // Asked for by name, io_uring is used all the same.
    let named =
        vudev_blk::FileBackend::open(path.as_ref(), false, false, vudev_blk::Aio::IoUring).unwrap();
    assert!(named.queue().unwrap().completion_fd().is_some());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn file_backend_with_io_uring_and_synchronous_io() {
    for aio in [vudev_blk::Aio::IoUring, vudev_blk::Aio::Sync] {
        let path = std::env::temp_dir().join(format!("vudev-file-{}-{aio:?}", std::process::id()));
        File::create(&path).unwrap().set_len(DISK).unwrap();
        let backend = vudev_blk::FileBackend::open(&path, false, false, aio).unwrap();
        // io_uring is really in use (not the fallback): its queues complete through an fd.
        use vudev_blk::BlockBackend;
        assert_eq!(
            backend.queue().unwrap().completion_fd().is_some(),
            aio == vudev_blk::Aio::IoUring
        );
        let mut r = Rig::with_backend(false, Arc::new(backend));
        // Many requests in flight at once (3 descriptors each, within the 64-entry table),
        // then their completions.
        for i in 0..21u64 {
            r.fill(DATA + i * 4096, 4096, i as u8 + 1);
        }
        for i in 0..21u64 {
            r.header(HDR + i * 16, VIRTIO_BLK_T_OUT, i * 8);
            r.chain(&[
                (HDR + i * 16, 16, false),
                (DATA + i * 4096, 4096, false),
                (STATUS + i, 1, true),
            ]);
        }
        let mut heads: Vec<u32> = (0..21)
            .map(|_| r.wait_used())
            .map(|(id, len)| {
                assert_eq!(len, 1);
                id
            })
            .collect();
        heads.sort();
        heads.dedup();
        assert_eq!(heads.len(), 21);
        for i in 0..21u64 {
            assert_eq!(r.read::<u8>(STATUS + i), OK, "{aio:?} write {i}");
        }
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1), "{aio:?}");
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 8, Some((DATA + 0x40000, 4096, true))),
            (OK, 4097),
            "{aio:?}"
        );
        assert!(
            r.bytes(DATA + 0x40000, 4096) == vec![2; 4096],
            "{aio:?} read-back"
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, DISK / 512, Some((DATA, 512, true)))
                .0,
            IOERR
        );
        r.write(DATA + 0x20000, 0u64);
        r.write(DATA + 0x20008, 8u32);
        r.write(DATA + 0x2000c, 1u32);
        assert_eq!(
            r.request(
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                Some((DATA + 0x20000, 16, false))
            ),
            (OK, 1)
        );
        r.stop();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0), "{aio:?}: zeroed");
        for i in 1..21usize {
            let chunk = &data[i * 4096..(i + 1) * 4096];
            let want = i as u8 + 1;
            assert!(chunk.iter().all(|&b| b == want), "{aio:?}: chunk {i}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}

/// The dirty pages a log file holds, as page numbers.
fn dirty_pages(log: &File) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let mut bits = vec![0u8; (MEM_SIZE / 4096 / 8) as usize];
    log.read_exact_at(&mut bits, 0).unwrap();
    let mut pages = Vec::new();
    for (i, b) in bits.iter().enumerate() {
        for k in 0..8 {
            if b & (1 << k) != 0 {
                pages.push(i as u64 * 8 + k);
            }
        }
    }
    pages
}

#[test]
fn dirty_log_records_what_the_device_writes() {
    let log_file = memfd(MEM_SIZE);
    let log = Arc::new(DirtyLog::new());
    log.set_bitmap(log_file.try_clone().unwrap(), 0, MEM_SIZE / 4096 / 8, None)
        .unwrap();
    let backend = Arc::new(MemoryBackend::new(DISK, false).unwrap());
    let mut r = Rig::stopped();
    let tracking = Tracking {
        log: Some(log.clone()),
        ..Tracking::default()
    };
    r.start_blk(false, backend, tracking, 0);
    let page = |a: u64| a / 4096;
    // Logging off: nothing is marked.
    r.request(VIRTIO_BLK_T_IN, 0, Some((DATA, 4096, true)));
    assert!(dirty_pages(&log_file).is_empty());
    // Logging on: a read marks its data buffer (two pages here), its status byte and the
    // used ring; a write marks no data page, since the device only reads it.
    log.set_active(true);
    let (st, _) = r.request(VIRTIO_BLK_T_IN, 0, Some((DATA + 0x800, 4096, true)));
    assert_eq!(st, OK);
    let mut want = vec![page(USED), page(STATUS), page(DATA), page(DATA) + 1];
    want.sort();
    let mut got = dirty_pages(&log_file);
    got.sort();
    assert_eq!(got, want);
    log_file.set_len(0).unwrap();
    log_file.set_len(MEM_SIZE).unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, Some((DATA + 0x40000, 4096, false)))
            .0,
        OK
    );
    let mut got = dirty_pages(&log_file);
    got.sort();
    assert_eq!(got, vec![page(USED), page(STATUS)]);
    r.stop();
}

#[test]
fn requests_left_in_flight_are_resubmitted_after_a_restart() {
    let (file, len) = InflightArea::create(1, QSIZE).unwrap();
    let area = InflightArea::map(file, 0, len, 1, QSIZE).unwrap();
    let backend = Arc::new(MemoryBackend::new(DISK, false).unwrap());
    let mut r = Rig::stopped();
    // A first daemon takes three writes off the ring (the driver kicked; no worker ran the
    // ring here, so we play the dead daemon's part) and completes only the second.
    let mut dead = area.queue(0, QSIZE).unwrap();
    assert!(dead.recover(0).heads.is_empty());
    let mut heads = Vec::new();
    for (k, byte) in [(0u64, 0x11u8), (1, 0x22), (2, 0x33)] {
        let (hdr, data, status) = (HDR + 16 * k, DATA + 0x1000 * k, STATUS + k);
        r.header(hdr, VIRTIO_BLK_T_OUT, 8 * k);
        r.fill(data, 4096, byte);
        r.write(status, 0xffu8);
        heads.push(r.chain(&[(hdr, 16, false), (data, 4096, false), (status, 1, true)]));
    }
    for &h in &heads {
        dead.start(h);
    }
    dead.before_used(heads[1]);
    r.write(USED + 4, u32::from(heads[1]));
    r.write(USED + 8, 4097u32);
    r.write(USED + 2, 1u16);
    dead.after_used(heads[1], 1);
    r.write(STATUS + 1, 0u8);
    drop(dead);
    // The next daemon resumes at avail index 3 and finishes the first and third, in order.
    let mut q = area.queue(0, QSIZE).unwrap();
    let rec = q.recover(1);
    assert_eq!(rec.heads, vec![heads[0], heads[2]]);
    assert_eq!(rec.next_avail, 3);
    let tracking = Tracking {
        inflight: Some(q),
        resubmit: rec.heads,
        ..Tracking::default()
    };
    r.seen_up_to(1);
    r.start_blk(false, backend.clone(), tracking, rec.next_avail);
    let done: Vec<u32> = (0..2).map(|_| r.wait_used().0).collect();
    assert_eq!(done, vec![u32::from(heads[0]), u32::from(heads[2])]);
    assert_eq!(r.bytes(STATUS, 3), vec![OK, OK, OK]);
    // The data of every write is on the disk, and new requests go on from where the ring is.
    for (k, byte) in [(0u64, 0x11u8), (2, 0x33)] {
        let st = r.request(VIRTIO_BLK_T_IN, 8 * k, Some((DATA + 0x10000, 4096, true)));
        assert_eq!(st, (OK, 4097));
        assert!(r.bytes(DATA + 0x10000, 4096) == vec![byte; 4096]);
    }
    r.stop();
    // Everything completed: a further restart has nothing to redo.
    let again = area.queue(0, QSIZE).unwrap().recover(r.read(USED + 2));
    assert!(again.heads.is_empty());
    assert_eq!(again.next_avail, 5);
}

#[test]
fn a_resumed_ring_notifies_the_driver_of_what_was_published_before() {
    // The previous daemon published a completion (used idx 1) and died before it notified
    // the driver: the next one must notify at once, with no kick and nothing to resubmit.
    let mut r = Rig::stopped();
    let backend = Arc::new(MemoryBackend::new(DISK, false).unwrap());
    r.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    let head = r.chain(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    r.write(USED + 4, u32::from(head));
    r.write(USED + 8, 21u32);
    r.write(USED + 2, 1u16);
    r.start_blk(false, backend.clone(), Tracking::default(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.notifications() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.notifications(), 1);
    r.stop();
    // A fresh ring (nothing published) gets no interrupt it did not ask for.
    let mut fresh = Rig::stopped();
    fresh.start_blk(false, backend, Tracking::default(), 0);
    let st = fresh.request(VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20, true)));
    assert_eq!(st.0, OK);
    assert_eq!(
        fresh.notifications(),
        1,
        "one for the request, none before it"
    );
    fresh.stop();
}

#[test]
fn an_online_resize_moves_the_end_of_the_disk_under_running_queues() {
    for aio in [vudev_blk::Aio::IoUring, vudev_blk::Aio::Sync] {
        let path =
            std::env::temp_dir().join(format!("vudev-resize-{}-{aio:?}", std::process::id()));
        File::create(&path).unwrap().set_len(DISK).unwrap();
        let backend = Arc::new(vudev_blk::FileBackend::open(&path, false, false, aio).unwrap());
        let cfg = BlockConfig {
            queue_size: QSIZE,
            ..BlockConfig::new(DISK)
        };
        let dev = BlockDevice::new(cfg, backend);
        let mut r = Rig::stopped();
        r.0.start(
            dev.queue_handler(0, dev.features()).unwrap(),
            Tracking::default(),
            0,
            false,
        );
        let capacity =
            |dev: &BlockDevice| u64::from_le_bytes(Device::config(dev)[0..8].try_into().unwrap());
        let past_end = DISK / 512;
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, past_end, Some((DATA, 4096, true)))
                .0,
            IOERR
        );
        // Grown: the file, the config space and the requests' bound follow, queues running.
        dev.resize(2 * DISK, false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * DISK);
        assert_eq!(capacity(&dev), 2 * DISK / 512);
        r.fill(DATA, 4096, 0x5a);
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, past_end, Some((DATA, 4096, false)))
                .0,
            OK
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, past_end, Some((DATA + 0x8000, 4096, true)))
                .0,
            OK
        );
        assert_eq!(r.bytes(DATA + 0x8000, 4096), vec![0x5a; 4096]);
        // Shrinking would cut the data just written: refused, nothing changes...
        let e = dev.resize(DISK, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(dev.size(), 2 * DISK);
        assert!(
            dev.resize(DISK + 100, false).is_err(),
            "not a multiple of the block size"
        );
        // ... unless forced; then the end is where it was.
        dev.resize(DISK, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), DISK);
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, past_end, Some((DATA, 4096, true)))
                .0,
            IOERR
        );
        // A grow never cuts: a file already longer than the new size keeps its length.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8 * DISK)
            .unwrap();
        dev.resize(2 * DISK, false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * DISK);
        dev.resize(DISK, true).unwrap();
        // A shrink over holes only loses nothing: no force needed.
        dev.resize(4 * DISK, false).unwrap();
        dev.resize(2 * DISK, false).unwrap();
        r.stop();
        let _ = std::fs::remove_file(&path);
    }
    // A backend that cannot change size says so.
    let dev = BlockDevice::new(
        BlockConfig::new(DISK),
        Arc::new(MemoryBackend::new(DISK, false).unwrap()),
    );
    let e = dev.resize(2 * DISK, false).unwrap_err();
    assert!(e.to_string().contains("cannot change size"), "{e}");
    assert_eq!(dev.size(), DISK);
}

#[test]
fn every_request_is_counted_by_type_status_and_latency() {
    let backend = Arc::new(MemoryBackend::new(DISK, false).unwrap());
    let (dev, mut r) = Rig::on_device(backend);
    for _ in 0..3 {
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 8, Some((DATA, 4096, false))).0,
            OK
        );
    }
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 8, Some((DATA, 4096, true))).0,
        OK
    );
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, None).0, OK);
    assert_eq!(
        r.request(VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20, true))).0,
        OK
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, DISK / 512, Some((DATA, 4096, true)))
            .0,
        IOERR
    );
    assert_eq!(r.request(77, 0, None).0, VIRTIO_BLK_S_UNSUPP as u8);
    r.stop();
    let s = dev.stats()[0].snapshot();
    let ops = vudev_blk::stats::OPS;
    let n = |op: &str| s.requests[ops.iter().position(|o| *o == op).unwrap()];
    assert_eq!(
        (n("write"), n("read"), n("flush"), n("get_id"), n("other")),
        (3, 2, 1, 1, 1)
    );
    assert_eq!(s.bytes[1], 3 * 4096);
    assert_eq!(s.bytes[0], 4096, "the refused read moved nothing");
    assert_eq!(s.errors, [1, 1], "one IOERR, one UNSUPP");
    // The three writes, the read and the flush that reached the backend are timed.
    assert_eq!(s.latency[1].iter().sum::<u64>(), 3);
    assert_eq!(s.latency[0].iter().sum::<u64>(), 1);
    assert_eq!(s.latency[2].iter().sum::<u64>(), 1);
    assert_eq!(s.in_flight, 0);
}

#[test]
fn more_segments_than_seg_max_get_ioerr() {
    let mut r = Rig::new(false);
    let table = 0x30000;
    // seg_max is the queue size less 2 (62 here): one header, N data segments, one status.
    for (segments, want) in [(63u16, IOERR), (62, OK)] {
        r.header(HDR, VIRTIO_BLK_T_IN, 0);
        r.write(STATUS, 0xffu8);
        r.put_desc(table, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
        for k in 1..=segments {
            let flags = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
            r.put_desc(table, k, DATA + 512 * u64::from(k), 512, flags, k + 1);
        }
        r.put_desc(table, segments + 1, STATUS, 1, VRING_DESC_F_WRITE, 0);
        let len = 16 * (u32::from(segments) + 2);
        r.put_desc(DESC, 50, table, len, VRING_DESC_F_INDIRECT, 0);
        r.publish(50);
        r.wait_used();
        assert_eq!(r.read::<u8>(STATUS), want, "{segments} segments");
    }
    r.stop();
}

/// A backend whose requests never finish (a server that stopped answering); it counts what
/// is dropped while still in flight.
struct Stalled(Arc<AtomicUsize>);

struct StalledQueue {
    held: usize,
    dropped: Arc<AtomicUsize>,
}

impl vudev_blk::BlockBackend for Stalled {
    fn size(&self) -> u64 {
        DISK
    }
    fn read_only(&self) -> bool {
        false
    }
    fn queue(&self) -> std::io::Result<Box<dyn vudev_blk::QueueBackend>> {
        Ok(Box::new(StalledQueue {
            held: 0,
            dropped: self.0.clone(),
        }))
    }
    fn describe(&self) -> String {
        "stalled".into()
    }
}

impl vudev_blk::QueueBackend for StalledQueue {
    fn submit(&mut self, _: u64, _: vudev_blk::IoOp<'_>) {
        self.held += 1;
    }
    fn reap(&mut self, _: &mut Vec<vudev_blk::IoDone>) {}
    fn in_flight(&self) -> usize {
        self.held
    }
}

impl Drop for StalledQueue {
    fn drop(&mut self) {
        self.dropped.fetch_add(self.held, Ordering::SeqCst);
    }
}

#[test]
fn queues_stalled_on_their_backend_stop_together_within_the_drain_bound() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut rigs: Vec<Rig> = (0..3)
        .map(|_| Rig::with_backend(false, Arc::new(Stalled(dropped.clone()))))
        .collect();
    for r in &mut rigs {
        r.header(HDR, VIRTIO_BLK_T_IN, 0);
        r.chain(&[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)]);
    }
    // Every queue has taken its request (the backend holds it).
    let deadline = Instant::now() + Duration::from_secs(5);
    while rigs.iter().any(|r| r.worker().position().next_avail == 0) {
        assert!(
            Instant::now() < deadline,
            "a worker did not take its request"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = Instant::now();
    let positions = vudev_core::stop_all(rigs.iter_mut().map(|r| r.take_worker()).collect());
    let took = t.elapsed();
    // One after another, three queues would take three drain bounds.
    assert!(
        took >= vudev_core::DRAIN_TIMEOUT && took < vudev_core::DRAIN_TIMEOUT * 3 / 2,
        "stopping 3 stalled queues took {took:?}"
    );
    assert!(positions.iter().all(|p| p.next_avail == 1));
    // The requests were detached from the queues (the backend let go of them), and none was
    // put on a used ring.
    assert_eq!(dropped.load(Ordering::SeqCst), 3);
    for r in &rigs {
        assert_eq!(r.read::<u16>(USED + 2), 0);
    }
}

/// A backend that holds every request and, when its queue is dropped, reads the first byte
/// of the last buffer it was given: that memory must still be mapped then.
struct Holding(Arc<std::sync::Mutex<Option<u8>>>, Arc<AtomicUsize>);

struct HoldingQueue {
    /// Never signalled; having one makes the queue asynchronous.
    efd: File,
    buf: Option<(usize, usize)>,
    seen: Arc<std::sync::Mutex<Option<u8>>>,
    submitted: Arc<AtomicUsize>,
}

impl vudev_blk::BlockBackend for Holding {
    fn size(&self) -> u64 {
        DISK
    }
    fn read_only(&self) -> bool {
        false
    }
    fn queue(&self) -> std::io::Result<Box<dyn vudev_blk::QueueBackend>> {
        Ok(Box::new(HoldingQueue {
            efd: vudev_blk::eventfd()?,
            buf: None,
            seen: self.0.clone(),
            submitted: self.1.clone(),
        }))
    }
    fn describe(&self) -> String {
        "holding".into()
    }
}

impl vudev_blk::QueueBackend for HoldingQueue {
    fn submit(&mut self, _: u64, op: vudev_blk::IoOp<'_>) {
        if let vudev_blk::IoOp::Read { bufs, .. } = op {
            self.buf = Some((bufs[0].ptr_guard_mut().as_ptr() as usize, bufs[0].len()));
        }
        self.submitted.fetch_add(1, Ordering::SeqCst);
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.efd.as_raw_fd())
    }
    fn reap(&mut self, _: &mut Vec<vudev_blk::IoDone>) {}
    fn in_flight(&self) -> usize {
        usize::from(self.buf.is_some())
    }
}

impl Drop for HoldingQueue {
    fn drop(&mut self) {
        if let Some((addr, len)) = self.buf {
            // SAFETY: the device keeps the memory of a request mapped until its backend is
            // gone, which is what this test checks (a fault here fails it).
            let s = unsafe { vm_memory::VolatileSlice::new(addr as *mut u8, len) };
            let mut first = [0u8];
            s.copy_to(&mut first[..]);
            *self.seen.lock().unwrap() = Some(first[0]);
        }
    }
}

#[test]
fn a_queue_lets_go_of_its_backend_before_the_memory_of_requests_in_flight() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let submitted = Arc::new(AtomicUsize::new(0));
    let mut r = Rig::with_backend(false, Arc::new(Holding(seen.clone(), submitted.clone())));
    r.fill(DATA, 4096, 0x5a);
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    r.chain(&[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while submitted.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the backend"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The driver's memory goes away from the map: only the request's own snapshot keeps it.
    r.map
        .replace(vec![vudev_core::Mapping {
            file: memfd(MEM_SIZE),
            offset: 0,
            start: 0,
            last: MEM_SIZE - 1,
            prot: libc::PROT_READ | libc::PROT_WRITE,
        }])
        .unwrap();
    r.stop();
    assert_eq!(*seen.lock().unwrap(), Some(0x5a));
}

//! A test kit for devices built on the core (feature `test-utils`): driver memory in a memfd
//! with a split ring at fixed addresses, a [`RingDriver`] that plays the driver (puts chains
//! on the ring, kicks, waits for used elements) over a real [`Worker`], and a [`MockDevice`]
//! whose handler completes every chain at once. The block tests, the fuzz targets and a new
//! device's tests use it instead of a rig of their own.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    Chain, Completions, Device, Mapping, Memory, MemoryMap, Notifier, QueueHandler, QueuePosition,
    QueueSetup, Tracking, Worker, WorkerOptions,
};

/// Where the descriptor table is.
pub const DESC: u64 = 0;
/// Where the avail ring is.
pub const AVAIL: u64 = 0x1000;
/// Where the used ring is.
pub const USED: u64 = 0x2000;
/// How long [`RingDriver::wait_used`] waits.
pub const WAIT: Duration = Duration::from_secs(5);

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vudev-testkit".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size the memfd");
    f
}

/// Counts the driver notifications a worker sends.
#[derive(Debug, Default)]
pub struct CountingNotifier(pub AtomicUsize);

impl Notifier for CountingNotifier {
    fn notify(&self, _index: u16) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The driver's side of one split ring in memory of its own, served by a real [`Worker`].
pub struct RingDriver {
    /// Driver memory, as the worker sees it.
    pub map: Arc<MemoryMap>,
    /// The queue's kick eventfd.
    pub kick: EventFd,
    worker: Option<Worker>,
    notifier: Arc<CountingNotifier>,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl RingDriver {
    /// `len` bytes of zeroed driver memory from address 0 and a ring of `size` entries (the
    /// rings at [`DESC`], [`AVAIL`] and [`USED`]); no worker yet.
    pub fn new(len: u64, size: u16) -> RingDriver {
        let map = Arc::new(MemoryMap::new(None));
        map.replace(vec![Mapping {
            file: memfd(len),
            offset: 0,
            start: 0,
            last: len - 1,
            prot: libc::PROT_READ | libc::PROT_WRITE,
        }])
        .expect("map the driver memory");
        RingDriver {
            map,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            worker: None,
            notifier: Arc::default(),
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Starts a worker with `handler`, resuming at avail index `next_avail` and at the used
    /// index the ring holds.
    pub fn start(
        &mut self,
        handler: Box<dyn QueueHandler>,
        tracking: Tracking,
        next_avail: u16,
        event_idx: bool,
    ) {
        let setup = QueueSetup {
            index: 0,
            size: self.size,
            desc: DESC,
            avail: AVAIL,
            used: USED,
            next_avail,
            next_used: self.used_idx(),
            event_idx,
        };
        let worker = Worker::start(
            setup,
            handler,
            self.map.clone(),
            self.kick.try_clone().expect("eventfd"),
            self.notifier.clone(),
            tracking,
            &WorkerOptions::default(),
        )
        .expect("start the worker");
        self.worker = Some(worker);
    }

    /// The running worker.
    pub fn worker(&self) -> &Worker {
        self.worker.as_ref().expect("no worker started")
    }

    /// Takes the running worker (to stop it some other way).
    pub fn take_worker(&mut self) -> Worker {
        self.worker.take().expect("no worker started")
    }

    /// Stops the worker and returns where the queue stands.
    pub fn stop(&mut self) -> QueuePosition {
        self.take_worker().stop()
    }

    /// Driver notifications sent so far.
    pub fn notifications(&self) -> usize {
        self.notifier.0.load(Ordering::SeqCst)
    }

    /// Writes `v` at `addr`.
    pub fn write<T: ByteValued>(&self, addr: u64, v: T) {
        self.map
            .memory()
            .write_obj(v, GuestAddress(addr))
            .expect("write driver memory");
    }

    /// Reads a `T` at `addr`.
    pub fn read<T: ByteValued>(&self, addr: u64) -> T {
        self.map
            .memory()
            .read_obj(GuestAddress(addr))
            .expect("read driver memory")
    }

    /// Fills `len` bytes at `addr` with `byte`.
    pub fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.map
            .memory()
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .expect("write driver memory");
    }

    /// The `len` bytes at `addr`.
    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.map
            .memory()
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read driver memory");
        v
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn put_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let at = table + u64::from(i) * 16;
        self.write(at, addr);
        self.write(at + 8, len);
        self.write(at + 12, flags as u16);
        self.write(at + 14, next);
    }

    /// Puts a chain of `(addr, len, device-writable)` buffers on the ring, kicks, and returns
    /// its head.
    pub fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let last = k + 1 == bufs.len();
            let flags =
                if w { VRING_DESC_F_WRITE } else { 0 } | if last { 0 } else { VRING_DESC_F_NEXT };
            self.put_desc(DESC, i, addr, len, flags, (i + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Makes `head` available (whatever it is) and kicks.
    pub fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.write(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write(AVAIL + 2, self.avail_idx);
        self.kick.write(1).expect("kick");
    }

    /// The used index the device has written.
    pub fn used_idx(&self) -> u16 {
        self.read(USED + 2)
    }

    /// The driver has seen the used elements before index `used_idx` (as after a restart).
    pub fn seen_up_to(&mut self, used_idx: u16) {
        self.used_seen = used_idx;
    }

    /// Waits (at most [`WAIT`]) for the next used element: its `(id, len)`.
    pub fn wait_used(&mut self) -> (u32, u32) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.used_idx() != self.used_seen {
                let slot = USED + 4 + 8 * u64::from(self.used_seen % self.size);
                self.used_seen = self.used_seen.wrapping_add(1);
                return (self.read(slot), self.read(slot + 4));
            }
            assert!(Instant::now() < deadline, "no completion within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// What a [`MockDevice`]'s handlers saw: per chain, its head and `(addr, len, writable)`
/// buffers.
pub type Seen = Arc<Mutex<Vec<(u16, Vec<(u64, u32, bool)>)>>>;

/// A device with `queues` queues whose handlers complete every chain at once, reporting all
/// its device-writable bytes as written, and record what they saw.
pub struct MockDevice {
    /// Number of queues.
    pub queues: u16,
    /// Config space.
    pub config: Vec<u8>,
    /// Device feature bits offered.
    pub features: u64,
    /// The chains the handlers saw.
    pub seen: Seen,
}

impl MockDevice {
    /// `queues` queues, 16 bytes of config space counting up, no feature of its own.
    pub fn new(queues: u16) -> MockDevice {
        MockDevice {
            queues,
            config: (0..16).collect(),
            features: 0,
            seen: Arc::default(),
        }
    }
}

impl Device for MockDevice {
    fn device_id(&self) -> u32 {
        // virtio's "reserved" id: no real driver binds it.
        0
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn config(&self) -> Vec<u8> {
        self.config.clone()
    }
    fn num_queues(&self) -> u16 {
        self.queues
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn queue_handler(&self, _index: u16, _features: u64) -> io::Result<Box<dyn QueueHandler>> {
        Ok(Box::new(MockHandler(self.seen.clone())))
    }
}

/// The handler of a [`MockDevice`] queue.
pub struct MockHandler(pub Seen);

impl QueueHandler for MockHandler {
    fn handle(&mut self, _mem: &Memory, chain: Chain<'_>, done: &mut Completions) {
        let bufs: Vec<(u64, u32, bool)> = chain
            .descs
            .iter()
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        let written = bufs.iter().filter(|b| b.2).map(|b| b.1).sum();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((chain.head, bufs));
        done.push(chain.head, written);
    }
}

//! One thread per queue: waits for kicks, walks and bounds descriptor chains, hands them to
//! the device's [`QueueHandler`], puts completions on the used ring and notifies the driver.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Chain, Completions, QueueHandler};
use crate::dirty_log::DirtyLog;
use crate::inflight::QueueInflight;
use crate::memory::{in_memory, Memory, MemoryGuard, MemoryMap, RingMemory};
use crate::polling::{Budget, Polling};
use crate::readiness::pollfd;

/// Tells the driver that the used ring moved (VDUSE: an ioctl; vhost-user: the call eventfd).
pub trait Notifier: Send + Sync {
    /// Interrupts the driver for queue `index`.
    fn notify(&self, index: u16) -> io::Result<()>;
}

/// Where a queue's rings are and where processing resumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSetup {
    /// Queue index.
    pub index: u16,
    /// Queue size the driver chose.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (avail) ring address.
    pub avail: u64,
    /// Device (used) ring address.
    pub used: u64,
    /// Next avail index to process.
    pub next_avail: u16,
    /// Next used index to write.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx: bool,
}

/// Position of a stopped queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueuePosition {
    /// Next avail index the device would process.
    pub next_avail: u16,
    /// Next used index the device would write.
    pub next_used: u16,
}

/// What a worker records besides the ring, and what it must redo first.
#[derive(Debug, Default)]
pub struct Tracking {
    /// Dirty-page log: everything the worker writes into driver memory is marked in it while
    /// it is active (vhost-user live migration).
    pub log: Option<Arc<DirtyLog>>,
    /// In-flight log: every chain taken off the ring is recorded until its used element is
    /// written, so a restarted daemon can finish it (crash recovery).
    pub inflight: Option<QueueInflight>,
    /// Heads a previous daemon had taken off the ring and not completed, oldest first: handled
    /// before anything new.
    pub resubmit: Vec<u16>,
}

/// How a queue's worker runs: the export's choice, not the device's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Whether and how long a worker busy-polls the ring and the completions after the last
    /// activity before it sleeps (adaptive by default). While it polls, the driver need not
    /// notify it.
    pub poll: Polling,
    /// CPUs to pin the workers to: queue `i` runs on `cpus[i % len]` (empty: not pinned).
    pub cpus: Vec<usize>,
}

impl WorkerOptions {
    /// The CPU queue `index`'s worker runs on, if pinned.
    pub fn cpu_of(&self, index: u16) -> Option<usize> {
        (!self.cpus.is_empty()).then(|| self.cpus[usize::from(index) % self.cpus.len()])
    }
}

/// A running queue worker.
#[derive(Debug)]
pub struct Worker {
    thread: Option<JoinHandle<QueuePosition>>,
    stop: EventFd,
    position: Arc<AtomicU32>,
    /// Set when the worker did not stop in time: it must not touch the rings any more.
    abandoned: Arc<AtomicBool>,
    /// Set when the queue stopped on a ring it cannot use (until the driver resets it).
    broken: Arc<AtomicBool>,
}

/// How long a stopping worker waits for asynchronous requests to finish. A VDUSE reset waits
/// for this (all queues at once) before it is answered, and the kernel breaks a device whose
/// messages stay unanswered for `msg_timeout` (30 s by default): keep it far below that.
/// Requests still in the backend then are detached from the queue: a late completion never
/// touches driver memory.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stop waits for a worker thread beyond [`DRAIN_TIMEOUT`] before it abandons it
/// (a backend call that blocks): the thread then ends without touching the rings.
const JOIN_GRACE: Duration = Duration::from_secs(1);

/// Stops every worker of `workers` at once (their drains run side by side, so stopping many
/// queues takes no longer than stopping one) and returns their final positions, in order.
pub fn stop_all(workers: Vec<Worker>) -> Vec<QueuePosition> {
    for w in &workers {
        let _ = w.stop.write(1);
    }
    workers.into_iter().map(Worker::stop).collect()
}

impl Worker {
    /// Validates `setup` against the memory map and starts the worker thread.
    pub fn start(
        setup: QueueSetup,
        handler: Box<dyn QueueHandler>,
        map: Arc<MemoryMap>,
        kick: EventFd,
        notifier: Arc<dyn Notifier>,
        tracking: Tracking,
        opts: &WorkerOptions,
    ) -> io::Result<Worker> {
        let queue = make_queue(&setup, &map)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let position = Arc::new(AtomicU32::new(pack(setup.next_avail, setup.next_used)));
        let abandoned = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(AtomicBool::new(false));
        let mut state = WorkerState {
            abandoned: abandoned.clone(),
            stopped: broken.clone(),
            index: setup.index,
            queue,
            handler,
            map,
            notifier,
            descs: Vec::with_capacity(usize::from(setup.size)),
            writable: match tracking.log {
                Some(_) => vec![Vec::new(); usize::from(setup.size)],
                None => Vec::new(),
            },
            log: tracking.log,
            inflight: tracking.inflight,
            done: Completions::default(),
            broken: false,
            bad_chains: 0,
            seen_avail: setup.next_avail,
            position: position.clone(),
        };
        let stop_fd = stop.try_clone()?;
        let (polling, cpu) = (opts.poll, opts.cpu_of(setup.index));
        let thread = std::thread::Builder::new()
            .name(format!("vq{}", setup.index))
            .spawn(move || state.run(&kick, &stop_fd, &tracking.resubmit, polling, cpu))?;
        Ok(Worker {
            thread: Some(thread),
            stop,
            position,
            abandoned,
            broken,
        })
    }

    /// True once the queue has stopped on a ring it cannot use (it takes nothing more until
    /// the driver resets the device).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// The queue position as of the last processed batch.
    pub fn position(&self) -> QueuePosition {
        unpack(self.position.load(Ordering::Acquire))
    }

    /// Stops taking requests, waits for in-flight ones, and returns the final position.
    pub fn stop(mut self) -> QueuePosition {
        self.join()
    }

    fn join(&mut self) -> QueuePosition {
        let _ = self.stop.write(1);
        let last = || unpack(self.position.load(Ordering::Acquire));
        let Some(t) = self.thread.take() else {
            return last();
        };
        let deadline = Instant::now() + DRAIN_TIMEOUT + JOIN_GRACE;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if !t.is_finished() {
            self.abandoned.store(true, Ordering::Release);
            tracing::error!(
                "a queue worker did not stop within {:?} (its backend blocks); leaving it \
                 behind: it ends without touching the rings",
                DRAIN_TIMEOUT + JOIN_GRACE
            );
            return last();
        }
        t.join().unwrap_or_else(|_| {
            tracing::error!("a queue worker panicked");
            last()
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.join();
    }
}

fn pack(avail: u16, used: u16) -> u32 {
    u32::from(avail) | (u32::from(used) << 16)
}

fn unpack(v: u32) -> QueuePosition {
    QueuePosition {
        next_avail: v as u16,
        next_used: (v >> 16) as u16,
    }
}

/// Builds a rust-vmm queue for `setup`, mapping its rings first.
pub(crate) fn make_queue(setup: &QueueSetup, map: &MemoryMap) -> io::Result<Queue> {
    let size = u64::from(setup.size);
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    if setup.size == 0 || !setup.size.is_power_of_two() {
        return Err(invalid("queue size is not a power of two"));
    }
    let event = if setup.event_idx { 2 } else { 0 };
    let rings = [
        (setup.desc, 16 * size, "descriptor table"),
        (setup.avail, 4 + 2 * size + event, "avail ring"),
        (setup.used, 4 + 8 * size + event, "used ring"),
    ];
    for (addr, len, what) in rings {
        if !map.fault_in(addr, len) {
            return Err(invalid(&format!(
                "{what} at {addr:#x}+{len} is outside the driver's memory"
            )));
        }
    }
    let mut q = Queue::new(setup.size).map_err(|e| invalid(&format!("{e:?}")))?;
    q.try_set_desc_table_address(GuestAddress(setup.desc))
        .and_then(|_| q.try_set_avail_ring_address(GuestAddress(setup.avail)))
        .and_then(|_| q.try_set_used_ring_address(GuestAddress(setup.used)))
        .map_err(|e| invalid(&format!("ring address: {e:?}")))?;
    q.set_event_idx(setup.event_idx);
    q.set_next_avail(setup.next_avail);
    q.set_next_used(setup.next_used);
    q.set_ready(true);
    if !q.is_valid(&*map.memory()) {
        return Err(invalid("queue rings are misaligned or outside memory"));
    }
    Ok(q)
}

struct WorkerState {
    /// Its stopper gave up waiting: leave the rings alone and end.
    abandoned: Arc<AtomicBool>,
    /// Mirrors `broken` for [`Worker::is_broken`].
    stopped: Arc<AtomicBool>,
    index: u16,
    queue: Queue,
    handler: Box<dyn QueueHandler>,
    map: Arc<MemoryMap>,
    notifier: Arc<dyn Notifier>,
    descs: Vec<Descriptor>,
    /// With a dirty log: the device-writable buffers of each in-flight chain, by head index,
    /// recorded whether or not logging is on yet (it may start while they are in flight).
    writable: Vec<Vec<(u64, u32)>>,
    log: Option<Arc<DirtyLog>>,
    inflight: Option<QueueInflight>,
    done: Completions,
    broken: bool,
    bad_chains: u64,
    /// The avail index as last read: the chains before it are taken with a memory snapshot
    /// loaded after that read (see [`WorkerState::pop_one`]).
    seen_avail: u16,
    position: Arc<AtomicU32>,
}

impl WorkerState {
    fn run(
        &mut self,
        kick: &EventFd,
        stop: &EventFd,
        resubmit: &[u16],
        polling: Polling,
        cpu: Option<usize>,
    ) -> QueuePosition {
        if !resubmit.is_empty() {
            self.resubmit(resubmit);
        }
        if let Some(cpu) = cpu {
            pin_to(cpu, self.index);
        }
        let resumed = self.queue.next_used() != 0;
        // A kick may have arrived before the thread started.
        self.process();
        if resumed {
            // A resumed ring (an adopted device, a reconnected frontend): the previous daemon
            // may have published completions and died before it notified the driver, which
            // would then wait for them forever. One interrupt more is harmless.
            if let Err(e) = self.notifier.notify(self.index) {
                tracing::warn!(queue = self.index, "notify failed: {e}");
            }
        }
        let mut budget = Budget::new(polling);
        loop {
            // How long the queue stays idle until its next event tells the adaptive budget
            // whether polling would have paid.
            let mut idle = Instant::now();
            if !budget.now().is_zero() {
                match self.spin(budget.now(), kick, stop) {
                    Some(last_activity) => idle = last_activity,
                    None => break,
                }
            }
            let mut fds = [
                pollfd(kick.as_raw_fd()),
                pollfd(stop.as_raw_fd()),
                pollfd(self.handler.completion_fd().unwrap_or(-1)),
            ];
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(queue = self.index, "poll failed: {e}");
                break;
            }
            budget.waited(idle.elapsed());
            if fds[2].revents != 0 {
                self.complete();
            }
            if fds[0].revents != 0 {
                let _ = kick.read();
                self.process();
            }
            if fds[1].revents != 0 {
                break;
            }
        }
        self.drain();
        self.publish_position();
        unpack(self.position.load(Ordering::Acquire))
    }

    fn drain(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.handler.in_flight() > 0
            && Instant::now() < deadline
            && !self.abandoned.load(Ordering::Acquire)
        {
            let mut fds = [pollfd(self.handler.completion_fd().unwrap_or(-1))];
            // SAFETY: as in `run`.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
            self.complete();
        }
        if self.handler.in_flight() > 0 {
            tracing::error!(
                queue = self.index,
                in_flight = self.handler.in_flight(),
                "requests still in flight after {DRAIN_TIMEOUT:?}; giving up on them"
            );
        }
    }

    fn publish_position(&self) {
        self.position.store(
            pack(self.queue.next_avail(), self.queue.next_used()),
            Ordering::Release,
        );
    }

    /// Busy-polls the avail ring and the completions, with driver notifications left off,
    /// until `budget` has passed with nothing to do; then turns notifications back on (and
    /// takes what raced with that). Returns when it last found work, or `None` if asked to
    /// stop meanwhile. The ring and the completions are checked in memory; the stop and kick
    /// fds only every 64 rounds.
    fn spin(&mut self, budget: Duration, kick: &EventFd, stop: &EventFd) -> Option<Instant> {
        let mut idle_since = Instant::now();
        let mut round = 0u32;
        self.handler.set_polling(true);
        while !self.broken && idle_since.elapsed() < budget {
            round = round.wrapping_add(1);
            if round.is_multiple_of(64) {
                let mut fds = [pollfd(kick.as_raw_fd()), pollfd(stop.as_raw_fd())];
                // SAFETY: `fds` is a valid array of pollfd; a zero timeout never blocks.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
                if fds[1].revents != 0 {
                    self.handler.set_polling(false);
                    return None;
                }
                if fds[0].revents != 0 {
                    let _ = kick.read();
                }
            }
            let before = (self.queue.next_avail(), self.queue.next_used());
            if self.ring_has_work() {
                self.take_available();
                self.publish_position();
            } else if self.handler.has_completions() {
                self.complete();
            }
            if (self.queue.next_avail(), self.queue.next_used()) != before {
                idle_since = Instant::now();
            }
            std::hint::spin_loop();
        }
        // Completions that came while the backend's signal was off are taken here.
        self.handler.set_polling(false);
        self.process();
        Some(idle_since)
    }

    /// True if the driver has made chains available that we have not taken.
    fn ring_has_work(&self) -> bool {
        let mem = self.map.memory();
        self.queue
            .avail_idx(&RingMemory(&mem), Ordering::Acquire)
            .is_ok_and(|i| i.0 != self.queue.next_avail())
    }

    /// Turns driver notifications off, takes every available chain and completes what has
    /// finished. False if the queue broke.
    fn take_available(&mut self) -> bool {
        let mem = self.map.memory();
        if let Err(e) = self.queue.disable_notification(&RingMemory(&mem)) {
            self.mark_broken(&format!("cannot write the used ring: {e:?}"));
            return false;
        }
        drop(mem);
        while self.pop_one() {}
        if self.broken {
            return false;
        }
        self.complete();
        true
    }

    /// Takes every available chain, then re-enables notifications and looks again (the
    /// standard race-free loop).
    fn process(&mut self) {
        if self.broken {
            return;
        }
        loop {
            if !self.take_available() {
                return;
            }
            let mem = self.map.memory();
            match self.queue.enable_notification(&RingMemory(&mem)) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.mark_broken(&format!("cannot write the used ring: {e:?}"));
                    return;
                }
            }
        }
        // Notification suppression wrote into the used ring (flags or avail_event).
        self.log_used_ring();
        self.publish_position();
    }

    /// Marks the whole used ring dirty (it is at most a few pages) when logging.
    fn log_used_ring(&self) {
        if let Some(w) = self.log.as_ref().and_then(|l| l.writer()) {
            let size = u64::from(self.queue.size());
            w.mark(self.queue.used_ring(), 4 + 8 * size + 2);
        }
    }

    /// Records the device-writable buffers of the chain in `self.descs` under `head`.
    fn record_writable(&mut self, head: u16) {
        if let Some(rec) = self.writable.get_mut(usize::from(head)) {
            rec.clear();
            rec.extend(
                self.descs
                    .iter()
                    .filter(|d| d.is_write_only())
                    .map(|d| (d.addr().0, d.len())),
            );
        }
    }

    /// Pops and handles one chain; false when the ring is empty or broken.
    ///
    /// A frontend adds memory, waits for our ack, then makes chains available that use it.
    /// So a chain is only taken with a memory snapshot loaded after the avail index that
    /// showed it was read: a snapshot loaded first could predate the new memory while the
    /// index read a moment later (the thread preempted in between) already shows the chain,
    /// whose buffers would then look outside driver memory.
    fn pop_one(&mut self) -> bool {
        if self.queue.next_avail() == self.seen_avail {
            let mem = self.map.memory();
            #[cfg(test)]
            tests::before_avail_read(&self.map);
            let read = match self.queue.avail_idx(&RingMemory(&mem), Ordering::Acquire) {
                // An IOTLB update may have just taken the ring's mapping away (it is mapped
                // again once the update's message is answered): look it up once more.
                Err(_) if self.fault_in_rings() => {
                    let mem = self.map.memory();
                    self.queue.avail_idx(&RingMemory(&mem), Ordering::Acquire)
                }
                read => read,
            };
            match read {
                Ok(idx) if idx.0 != self.seen_avail => self.seen_avail = idx.0,
                Ok(_) => return false,
                Err(e) => {
                    self.mark_broken(&format!("bad avail ring: {e:?}"));
                    return false;
                }
            }
        }
        let mut mem = self.map.memory();
        // One retry each: of the ring (its mapping taken away by an IOTLB update), and of an
        // indirect table not mapped yet.
        let (mut ring_retried, mut retried) = (false, false);
        let head = loop {
            let ring = RingMemory(&mem);
            let next = self.queue.iter(&ring).map(|mut it| it.next());
            let chain = match next {
                Ok(Some(c)) => c,
                Ok(None) => return false,
                // As above: the ring's mapping may have just been taken away.
                Err(_) if !ring_retried && self.fault_in_rings() => {
                    mem = self.map.memory();
                    ring_retried = true;
                    continue;
                }
                Err(e) => {
                    self.mark_broken(&format!("bad avail ring: {e:?}"));
                    return false;
                }
            };
            let head = chain.head_index();
            if head >= self.queue.size() {
                // No used element can name it: skip the entry, and the queue goes on with the
                // requests after it (the driver that wrote it never gets it back).
                self.bad_head(head);
                return true;
            }
            let complete = collect(chain, &mut self.descs);
            if !complete && !retried {
                // Maybe an indirect table is not mapped yet: fault it in and walk again.
                if let Some((addr, len)) = self.indirect_of(&mem, head) {
                    if self.map.fault_in(addr, len) {
                        self.queue.go_to_previous_position();
                        mem = self.map.memory();
                        retried = true;
                        continue;
                    }
                }
            }
            if let Some(q) = &mut self.inflight {
                q.start(head);
            }
            if !complete {
                self.bad_chain(head, MALFORMED);
                return true;
            }
            break head;
        };
        self.handle(mem, head);
        true
    }

    /// Hands the chain in `self.descs` to the device, mapping its buffers first where the
    /// transport maps on demand.
    fn handle(&mut self, mut mem: MemoryGuard, head: u16) {
        // Map every buffer the chain names; the device rejects what stays unmapped. Without
        // a source (vhost-user) there is nothing to map, and the device's own checks suffice.
        let mut faulted = false;
        for d in self.descs.iter().filter(|_| self.map.maps_on_demand()) {
            if !in_memory(&mem, d.addr().0, d.len() as usize) {
                faulted |= self.map.fault_in(d.addr().0, u64::from(d.len()));
            }
        }
        if faulted {
            mem = self.map.memory();
        }
        if self.log.is_some() {
            self.record_writable(head);
        }
        self.handler.handle(
            &mem,
            Chain {
                head,
                descs: &self.descs,
            },
            &mut self.done,
        );
    }

    /// Handles the chains a previous daemon left in flight, oldest first. virtio-queue walks
    /// chains only from an avail ring, so the heads go on a private one, in a scratch region
    /// placed after the driver's memory; the chains themselves are read from the driver's
    /// descriptor table and bounded as usual.
    fn resubmit(&mut self, heads: &[u16]) {
        let mem = self.map.memory();
        let Some((scratch_mem, mut queue)) = scratch_ring(&mem, &self.queue, heads) else {
            self.mark_broken("cannot build the ring to resubmit in-flight requests on");
            return;
        };
        drop(mem);
        tracing::info!(
            queue = self.index,
            count = heads.len(),
            "resubmitting requests left in flight by the previous daemon"
        );
        let Ok(iter) = queue.iter(&scratch_mem) else {
            return;
        };
        for chain in iter {
            let head = chain.head_index();
            let complete = collect(chain, &mut self.descs);
            if let Some(q) = &mut self.inflight {
                q.start(head);
            }
            if complete {
                self.handle(self.map.memory(), head);
            } else {
                self.bad_chain(head, MALFORMED);
            }
        }
        self.complete();
    }

    fn indirect_of(&self, mem: &Memory, head: u16) -> Option<(u64, u64)> {
        let table = self.queue.desc_table();
        let addr = table.checked_add(u64::from(head) * 16)?;
        let d: Descriptor = mem.read_obj(GuestAddress(addr)).ok()?;
        d.refers_to_indirect_table()
            .then(|| (d.addr().0, u64::from(d.len())))
    }

    fn bad_head(&mut self, head: u16) {
        self.bad_chains += 1;
        let why = "an avail entry names a head past the queue size; skipping it";
        if self.bad_chains == 1 {
            tracing::warn!(
                queue = self.index,
                head,
                "{why} (further ones logged at debug level)"
            );
        } else {
            tracing::debug!(queue = self.index, head, "{why}");
        }
    }

    fn bad_chain(&mut self, head: u16, why: &str) {
        self.bad_chains += 1;
        if self.bad_chains == 1 {
            tracing::warn!(
                queue = self.index,
                head,
                "{why}; completing it with no data (further ones logged at debug level)"
            );
        } else {
            tracing::debug!(queue = self.index, head, "{why}");
        }
        // Nothing is written into a malformed chain's buffers.
        if let Some(rec) = self.writable.get_mut(usize::from(head)) {
            rec.clear();
        }
        self.done.push(head, 0);
    }

    /// Looks the rings' mappings up again where they are missing: true if all are mapped.
    fn fault_in_rings(&self) -> bool {
        let size = u64::from(self.queue.size());
        [
            (self.queue.desc_table(), 16 * size),
            (self.queue.avail_ring(), 6 + 2 * size),
            (self.queue.used_ring(), 6 + 8 * size),
        ]
        .iter()
        .all(|&(addr, len)| self.map.fault_in(addr, len))
    }

    fn mark_broken(&mut self, why: &str) {
        if !self.broken {
            tracing::error!(
                queue = self.index,
                "queue stopped: {why}; it resumes after the driver resets the device"
            );
        }
        self.broken = true;
        self.stopped.store(true, Ordering::Release);
    }

    /// Moves finished requests to the used ring and notifies the driver if it wants that.
    fn complete(&mut self) {
        let mem = self.map.memory();
        self.handler.poll(&mem, &mut self.done);
        if self.done.is_empty() {
            return;
        }
        if self.abandoned.load(Ordering::Acquire) {
            // The rings may belong to a new driver by now.
            self.done.drain().for_each(drop);
            return;
        }
        let log = self.log.as_ref().and_then(|l| l.writer());
        for (head, len) in self.done.drain() {
            if let (Some(w), Some(rec)) = (&log, self.writable.get(usize::from(head))) {
                for &(addr, len) in rec {
                    w.mark(addr, u64::from(len));
                }
            }
            if let Some(q) = &self.inflight {
                q.before_used(head);
            }
            if let Err(e) = self.queue.add_used(&RingMemory(&mem), head, len) {
                tracing::error!(queue = self.index, "cannot complete request {head}: {e:?}");
                self.broken = true;
                self.stopped.store(true, Ordering::Release);
            }
            if let Some(q) = &self.inflight {
                q.after_used(head, self.queue.next_used());
            }
        }
        drop(log);
        self.log_used_ring();
        match self.queue.needs_notification(&RingMemory(&mem)) {
            Ok(false) => {}
            _ => {
                if let Err(e) = self.notifier.notify(self.index) {
                    tracing::warn!(queue = self.index, "notify failed: {e}");
                }
            }
        }
        self.publish_position();
    }
}

const MALFORMED: &str =
    "descriptor chain is malformed (loop, bad indirect table, bad index or over 4 GiB)";

/// Copies a chain's descriptors into `descs`; false if the walk stopped early (a loop, a bad
/// index or indirect table, or the 4 GiB bound) or found nothing.
fn collect<M>(chain: DescriptorChain<M>, descs: &mut Vec<Descriptor>) -> bool
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    descs.clear();
    let mut truncated = false;
    for d in chain {
        truncated = d.has_next();
        descs.push(d);
    }
    !descs.is_empty() && !truncated
}

/// A copy of `mem` with one more region, after the last one, holding an avail ring with
/// `heads` on it; and a queue on the real descriptor table that pops from that ring.
fn scratch_ring(mem: &Memory, real: &Queue, heads: &[u16]) -> Option<(Memory, Queue)> {
    let size = real.size();
    let end = mem.last_addr().0.checked_add(1)?;
    let base = end.checked_next_multiple_of(4096)?;
    // avail ring (flags, idx, ring, used_event), then a used ring nobody reads.
    let avail_len = 6 + 2 * u64::from(size);
    let used = (base + avail_len).checked_next_multiple_of(4)?;
    let len = (used - base + 6 + 8 * u64::from(size)).checked_next_multiple_of(4096)?;
    base.checked_add(len)?;
    let region = GuestRegionMmap::from_range(GuestAddress(base), len as usize, None).ok()?;
    let scratch = mem.insert_region(Arc::new(region)).ok()?;
    for (i, h) in heads.iter().enumerate() {
        scratch
            .write_obj(*h, GuestAddress(base + 4 + 2 * i as u64))
            .ok()?;
    }
    scratch
        .write_obj(heads.len() as u16, GuestAddress(base + 2))
        .ok()?;
    let mut q = Queue::new(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(real.desc_table()))
        .ok()?;
    q.try_set_avail_ring_address(GuestAddress(base)).ok()?;
    q.try_set_used_ring_address(GuestAddress(used)).ok()?;
    q.set_ready(true);
    Some((scratch, q))
}

/// Pins the calling thread (queue `index`'s worker) to `cpu`; a failure is logged, not fatal.
fn pin_to(cpu: usize, index: u16) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it for
    // cpu < CPU_SETSIZE, checked first.
    let res = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            -1
        } else {
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        }
    };
    if res == 0 {
        tracing::info!(queue = index, cpu, "queue worker pinned");
    } else {
        tracing::warn!(
            queue = index,
            cpu,
            "cannot pin the queue worker to CPU {cpu}: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    use crate::testkit::{memfd, RingDriver, AVAIL, DESC, USED};
    use crate::{Mapping, Tracking};

    type Hook = (usize, Box<dyn FnOnce() + Send>);

    /// Run once by the worker serving the map at the given address, just before it reads the
    /// avail index: where a preempted worker would stand.
    static BEFORE_AVAIL_READ: Mutex<Vec<Hook>> = Mutex::new(Vec::new());

    pub(super) fn before_avail_read(map: &Arc<MemoryMap>) {
        let key = Arc::as_ptr(map) as usize;
        let hook = {
            let mut hooks = BEFORE_AVAIL_READ.lock().unwrap();
            let at = hooks.iter().position(|(k, _)| *k == key);
            at.map(|i| hooks.swap_remove(i).1)
        };
        if let Some(hook) = hook {
            hook();
        }
    }

    /// Puts one writable 512-byte buffer at `buf` on the ring as avail entry 0.
    fn post_one_chain(mem: &Memory, buf: u64) {
        let desc = [buf, 512u64 | (u64::from(VRING_DESC_F_WRITE) << 32)];
        mem.write_obj(desc, GuestAddress(DESC)).unwrap();
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// Has the worker serving `map` run `hook` just before it reads the avail index.
    fn before_the_avail_read(map: &Arc<MemoryMap>, hook: impl FnOnce() + Send + 'static) {
        let key = Arc::as_ptr(map) as usize;
        BEFORE_AVAIL_READ
            .lock()
            .unwrap()
            .push((key, Box::new(hook)));
    }

    /// Completes each chain with length 1 if all its buffers are in the memory it was handed,
    /// 0 if not.
    struct InMemory;

    impl QueueHandler for InMemory {
        fn handle(&mut self, mem: &Memory, chain: Chain<'_>, done: &mut Completions) {
            let ok = chain
                .descs
                .iter()
                .all(|d| in_memory(mem, d.addr().0, d.len() as usize));
            done.push(chain.head, u32::from(ok));
        }
    }

    fn mapping(file: &std::fs::File, start: u64, len: u64) -> Mapping {
        Mapping {
            file: file.try_clone().unwrap(),
            offset: 0,
            start,
            last: start + len - 1,
            prot: libc::PROT_READ | libc::PROT_WRITE,
        }
    }

    /// Hands out one file as all of driver memory, like VDUSE's IOTLB_GET_FD.
    struct WholeFile(std::fs::File, u64);

    impl crate::MappingSource for WholeFile {
        fn lookup(&self, _: u64, _: u64) -> std::io::Result<Option<Mapping>> {
            Ok(Some(mapping(&self.0, 0, self.1)))
        }
    }

    #[test]
    fn a_ring_unmapped_by_an_iotlb_update_is_looked_up_again_not_declared_broken() {
        const LEN: u64 = 1 << 20;
        let mut drv = RingDriver::new(LEN, 16);
        let file = memfd(LEN);
        let map = Arc::new(MemoryMap::new(Some(Box::new(WholeFile(
            file.try_clone().unwrap(),
            LEN,
        )))));
        map.replace(vec![mapping(&file, 0, LEN)]).unwrap();
        drv.map = map.clone();
        // As the worker is about to read the avail index, an IOTLB update takes all of the
        // memory away (VDUSE: UPDATE_IOTLB invalidates before it maps again) and a chain is
        // made available.
        before_the_avail_read(&drv.map, move || {
            post_one_chain(&map.memory(), 512);
            map.invalidate(0, LEN - 1);
        });
        drv.start(Box::new(InMemory), Tracking::default(), 0, false);
        // Until the worker looks the memory up again, it is not ours to read either.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let used = |m: &Arc<MemoryMap>| m.memory().read_obj::<u16>(GuestAddress(USED + 2));
        while used(&drv.map).ok() != Some(1) {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue did not serve the chain"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(drv.wait_used(), (0, 1));
        drv.stop();
    }

    #[test]
    fn a_chain_made_available_after_memory_was_added_is_read_with_that_memory() {
        const LEN: u64 = 1 << 20;
        let mut drv = RingDriver::new(LEN, 16);
        let (low, high) = (memfd(LEN), memfd(LEN));
        drv.map.replace(vec![mapping(&low, 0, LEN)]).unwrap();
        // As the worker is about to read the avail index, a frontend adds memory (its ack
        // comes back at once) and makes a chain available whose buffer is in it.
        let map = drv.map.clone();
        before_the_avail_read(&drv.map, move || {
            map.replace(vec![mapping(&low, 0, LEN), mapping(&high, LEN, LEN)])
                .unwrap();
            post_one_chain(&map.memory(), LEN + 512);
        });
        drv.start(Box::new(InMemory), Tracking::default(), 0, false);
        assert_eq!(drv.wait_used(), (0, 1), "the buffer looked outside memory");
        drv.stop();
    }
}

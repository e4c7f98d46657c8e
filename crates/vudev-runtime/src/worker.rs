//! One thread per queue: waits for kicks, walks and bounds descriptor chains, hands them to
//! the device's [`QueueHandler`], puts completions on the used ring and notifies the driver.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Chain, Completions, QueueHandler};
use crate::memory::{Memory, MemoryMap};

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

/// A running queue worker.
#[derive(Debug)]
pub struct Worker {
    thread: Option<JoinHandle<QueuePosition>>,
    stop: EventFd,
    position: Arc<AtomicU32>,
}

/// How long a stopping worker waits for asynchronous requests to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

impl Worker {
    /// Validates `setup` against the memory map and starts the worker thread.
    pub fn start(
        setup: QueueSetup,
        handler: Box<dyn QueueHandler>,
        map: Arc<MemoryMap>,
        kick: EventFd,
        notifier: Arc<dyn Notifier>,
    ) -> io::Result<Worker> {
        let queue = make_queue(&setup, &map)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let position = Arc::new(AtomicU32::new(pack(setup.next_avail, setup.next_used)));
        let mut state = WorkerState {
            index: setup.index,
            queue,
            handler,
            map,
            notifier,
            descs: Vec::with_capacity(usize::from(setup.size)),
            done: Completions::default(),
            broken: false,
            bad_chains: 0,
            position: position.clone(),
        };
        let stop_fd = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(format!("vq{}", setup.index))
            .spawn(move || state.run(&kick, &stop_fd))?;
        Ok(Worker {
            thread: Some(thread),
            stop,
            position,
        })
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
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                tracing::error!("a queue worker panicked");
                unpack(self.position.load(Ordering::Acquire))
            }),
            None => unpack(self.position.load(Ordering::Acquire)),
        }
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
pub fn make_queue(setup: &QueueSetup, map: &MemoryMap) -> io::Result<Queue> {
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
    index: u16,
    queue: Queue,
    handler: Box<dyn QueueHandler>,
    map: Arc<MemoryMap>,
    notifier: Arc<dyn Notifier>,
    descs: Vec<Descriptor>,
    done: Completions,
    broken: bool,
    bad_chains: u64,
    position: Arc<AtomicU32>,
}

impl WorkerState {
    fn run(&mut self, kick: &EventFd, stop: &EventFd) -> QueuePosition {
        // A kick may have arrived before the thread started.
        self.process();
        loop {
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
        while self.handler.in_flight() > 0 && Instant::now() < deadline {
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

    /// Takes every available chain, then re-enables notifications and looks again (the
    /// standard race-free loop).
    fn process(&mut self) {
        if self.broken {
            return;
        }
        loop {
            let mem = self.map.memory();
            if let Err(e) = self.queue.disable_notification(&*mem) {
                self.mark_broken(&format!("cannot write the used ring: {e:?}"));
                return;
            }
            drop(mem);
            while self.pop_one() {}
            if self.broken {
                return;
            }
            self.complete();
            let mem = self.map.memory();
            match self.queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.mark_broken(&format!("cannot write the used ring: {e:?}"));
                    return;
                }
            }
        }
        self.publish_position();
    }

    /// Pops and handles one chain; false when the ring is empty or broken.
    fn pop_one(&mut self) -> bool {
        let mut mem = self.map.memory();
        let mut retried = false;
        let head = loop {
            let chain = match self.queue.iter(&*mem) {
                Ok(mut it) => match it.next() {
                    Some(c) => c,
                    None => return false,
                },
                Err(e) => {
                    self.mark_broken(&format!("bad avail ring: {e:?}"));
                    return false;
                }
            };
            let head = chain.head_index();
            self.descs.clear();
            let mut truncated = false;
            for d in chain {
                truncated = d.has_next();
                self.descs.push(d);
            }
            if (self.descs.is_empty() || truncated) && !retried {
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
            if self.descs.is_empty() || truncated {
                self.bad_chain(head, "descriptor chain is malformed (loop, bad indirect table, bad index or over 4 GiB)");
                return true;
            }
            break head;
        };
        // Map every buffer the chain names; the device rejects what stays unmapped.
        let mut faulted = false;
        for d in &self.descs {
            let access = if d.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(d.addr(), d.len() as usize, access) {
                faulted |= self.map.fault_in(d.addr().0, u64::from(d.len()));
            }
        }
        if faulted {
            mem = self.map.memory();
        }
        self.handler.handle(
            &mem,
            Chain {
                head,
                descs: &self.descs,
            },
            &mut self.done,
        );
        true
    }

    fn indirect_of(&self, mem: &Memory, head: u16) -> Option<(u64, u64)> {
        let table = self.queue.desc_table();
        let addr = table.checked_add(u64::from(head) * 16)?;
        let d: Descriptor = mem.read_obj(GuestAddress(addr)).ok()?;
        d.refers_to_indirect_table()
            .then(|| (d.addr().0, u64::from(d.len())))
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
        self.done.push(head, 0);
    }

    fn mark_broken(&mut self, why: &str) {
        if !self.broken {
            tracing::error!(
                queue = self.index,
                "queue stopped: {why}; it resumes after the driver resets the device"
            );
        }
        self.broken = true;
    }

    /// Moves finished requests to the used ring and notifies the driver if it wants that.
    fn complete(&mut self) {
        let mem = self.map.memory();
        self.handler.poll(&mem, &mut self.done);
        if self.done.is_empty() {
            return;
        }
        for (head, len) in self.done.drain() {
            if let Err(e) = self.queue.add_used(&*mem, head, len) {
                tracing::error!(queue = self.index, "cannot complete request {head}: {e:?}");
                self.broken = true;
            }
        }
        match self.queue.needs_notification(&*mem) {
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

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

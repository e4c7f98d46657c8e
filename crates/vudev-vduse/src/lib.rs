//! The VDUSE transport of vudev: creates the kernel device for a [`Device`] (or adopts the one a
//! previous daemon left), answers the kernel's control messages on a thread of its own (it
//! never waits on I/O: the kernel marks a device broken when a message goes unanswered for
//! `msg_timeout`), and starts and stops the queue workers as the driver sets the device status.
//!
//! Crash recovery: every request taken off a ring is recorded in the device's state file
//! ([`StateFile`]) until its completion is on the used ring. The kernel keeps the device, its
//! rings and the driver's buffers when the daemon dies; the next daemon started for the same
//! name adopts the device, resumes each ring after what was taken, and resubmits what had not
//! completed.
#![deny(missing_docs)]

pub mod authority;
mod bounce;
mod error;
pub mod lifecycle;
mod state_file;

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vduse::{DeviceConfig, Reply, Request, VduseDevice, VduseError};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use vudev_core::readiness::{poll, pollfd};
use vudev_core::{
    stop_all, Device, InflightArea, Mapping, MappingSource, MemoryMap, Notifier, QueuePosition,
    QueueSetup, Tracking, Worker, WorkerOptions, TRANSPORT_FEATURES,
};

pub use crate::error::TransportError;

use crate::authority::Authority;
use crate::bounce::BounceBuffer;
use crate::state_file::{DeviceShape, StateFile};

/// Options of a VDUSE export that are not the device's.
#[derive(Clone, Debug)]
pub struct VduseOptions {
    /// Device name (`/dev/vduse/NAME`, vdpa device name).
    pub name: String,
    /// Queue size offered to the driver (power of two, at most 32768).
    pub queue_size: u16,
    /// Where the device's state file lives (in-flight records for crash recovery); `None`
    /// keeps no records, and a restarted daemon then cannot finish what was in flight.
    pub state_dir: Option<PathBuf>,
    /// Register our own memory as the bounce buffer (`VDUSE_IOTLB_REG_UMEM`) where the kernel
    /// allows it. Off by default: it pins 64 MiB per device and showed no speed-up here.
    pub bounce_umem: bool,
    /// How the queue workers run (polling, pinning).
    pub workers: WorkerOptions,
}

/// A created VDUSE device and its control state. Destroyed by [`VduseExport::shutdown`] (or,
/// best effort, on drop).
pub struct VduseExport {
    name: String,
    authority: Arc<dyn Authority>,
    inner: Option<Arc<Inner>>,
    state: Option<StateFile>,
}

struct Inner {
    dev: Arc<VduseDevice>,
    device: Arc<dyn Device>,
    map: Arc<MemoryMap>,
    bounce: Arc<BounceBuffer>,
    api_version: u64,
    queue_size: u16,
    workers: WorkerOptions,
    /// In-flight records (from the state file), if kept.
    inflight: Option<Arc<InflightArea>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    status: u8,
    workers: Vec<Option<Worker>>,
    positions: Vec<QueuePosition>,
}

/// Mappings looked up in the kernel's IOTLB; the bounce buffer is our own memory where the
/// kernel lets us register it.
struct IotlbSource {
    dev: Arc<VduseDevice>,
    bounce: Arc<BounceBuffer>,
}

impl MappingSource for IotlbSource {
    fn lookup(&self, start: u64, last: u64) -> io::Result<Option<Mapping>> {
        let m = self
            .dev
            .iotlb_get_fd(start, last)
            .map_err(io::Error::other)?;
        if let Some(m) = &m {
            if let Some(ours) = self.bounce.mapping(m.start, m.last)? {
                return Ok(Some(ours));
            }
        }
        Ok(m.map(|m| Mapping {
            file: m.file,
            offset: m.offset,
            start: m.start,
            last: m.last,
            prot: m.access.prot(),
        }))
    }
}

struct IrqNotifier(Arc<VduseDevice>);

impl Notifier for IrqNotifier {
    fn notify(&self, index: u16) -> io::Result<()> {
        self.0
            .inject_irq(u32::from(index))
            .map_err(io::Error::other)
    }
}

impl VduseExport {
    /// Creates `/dev/vduse/NAME` for `device` and declares its queues; or, when a device of
    /// that name exists and no process serves it (its daemon died), adopts it: checks it is the
    /// same device, and if its driver is running, resumes its queues and finishes what was in
    /// flight. A new device is not on the vdpa bus yet: start
    /// [`VduseExport::spawn_message_loop`] first, then attach it. `authority` does what needs
    /// privileges (see [`authority`]).
    pub fn create(
        device: Arc<dyn Device>,
        opts: &VduseOptions,
        authority: Arc<dyn Authority>,
    ) -> Result<Self, TransportError> {
        let cfg = DeviceConfig {
            name: opts.name.clone(),
            vendor_id: 0,
            device_id: device.device_id(),
            features: device.features() | TRANSPORT_FEATURES,
            num_queues: u32::from(device.num_queues()),
            vq_align: 4096,
            config: device.config(),
        };
        let shape = DeviceShape {
            device_id: cfg.device_id,
            features: cfg.features,
            num_queues: device.num_queues(),
            queue_size: opts.queue_size,
            config: cfg.config.clone(),
        };
        let (dev, state, adopted) = match authority.create_device(&cfg) {
            Ok(()) => {
                // From here on the device exists: destroy it again on any error.
                match Self::open_new(&*authority, &opts.name, &shape, opts) {
                    Ok((dev, state)) => (dev, state, false),
                    Err(e) => {
                        let _ = authority.destroy_device(&opts.name);
                        return Err(e);
                    }
                }
            }
            Err(TransportError::Vduse(VduseError::NameTaken(_))) => {
                let (dev, state) = Self::open_existing(&*authority, &opts.name, &shape, opts)?;
                (dev, state, true)
            }
            Err(e) => return Err(e),
        };
        tracing::info!(
            name = %opts.name,
            api_version = authority.api_version(),
            vduse_features = authority.vduse_features(),
            "VDUSE device {}", if adopted { "adopted" } else { "created" }
        );
        let bounce = Arc::new(BounceBuffer::new(dev.clone(), opts.bounce_umem));
        let map = Arc::new(MemoryMap::new(Some(Box::new(IotlbSource {
            dev: dev.clone(),
            bounce: bounce.clone(),
        }))));
        let n = usize::from(device.num_queues());
        let inner = Arc::new(Inner {
            dev,
            device,
            map,
            bounce,
            api_version: authority.api_version(),
            queue_size: opts.queue_size,
            workers: opts.workers.clone(),
            inflight: state.as_ref().map(|s| s.area().clone()),
            state: Mutex::new(State {
                status: 0,
                workers: (0..n).map(|_| None).collect(),
                positions: vec![QueuePosition::default(); n],
            }),
        });
        if adopted {
            inner.resume().map_err(TransportError::Resume)?;
        }
        Ok(VduseExport {
            name: opts.name.clone(),
            authority,
            inner: Some(inner),
            state,
        })
    }

    /// Opens a device just created, declares its queues and creates its state file.
    fn open_new(
        authority: &dyn Authority,
        name: &str,
        shape: &DeviceShape,
        opts: &VduseOptions,
    ) -> Result<(Arc<VduseDevice>, Option<StateFile>), TransportError> {
        let dev = Arc::new(authority.open_device(name)?);
        for q in 0..u32::from(shape.num_queues) {
            dev.setup_vq(q, opts.queue_size)?;
        }
        let state = match &opts.state_dir {
            Some(dir) => {
                let opened = authority.open_state_file(dir, name)?;
                Some(
                    StateFile::create(dir, name, shape, opened.as_ref())
                        .map_err(TransportError::StateFile)?,
                )
            }
            None => None,
        };
        Ok((dev, state))
    }

    /// Opens a device a previous daemon left and checks that it is the one asked for.
    fn open_existing(
        authority: &dyn Authority,
        name: &str,
        shape: &DeviceShape,
        opts: &VduseOptions,
    ) -> Result<(Arc<VduseDevice>, Option<StateFile>), TransportError> {
        let dev = match authority.open_device(name) {
            Ok(d) => Arc::new(d),
            // One process at a time may hold the device: another daemon serves it.
            Err(TransportError::Vduse(VduseError::Io { source, .. }))
                if source.kind() == io::ErrorKind::ResourceBusy =>
            {
                return Err(VduseError::NameTaken(name.into()).into())
            }
            Err(e) => return Err(e),
        };
        // The kernel tells the queue count (VQ_GET_INFO fails past the last queue).
        let queues = (0..=u32::from(u16::MAX))
            .find(|&q| dev.vq_info(q).is_err())
            .unwrap_or(0);
        if queues != u32::from(shape.num_queues) {
            return Err(TransportError::Mismatch(
                name.into(),
                format!("{queues} queues, not {}", shape.num_queues),
            ));
        }
        let Some(dir) = &opts.state_dir else {
            tracing::warn!("adopting {name} without a state dir: requests in flight when the previous daemon stopped are not finished");
            return Ok((dev, None));
        };
        let opened = authority.open_state_file(dir, name)?;
        let state = match StateFile::open(dir, name, opened.as_ref()) {
            Ok(Some((state, old))) if old == *shape => state,
            Ok(Some((_, old))) => {
                return Err(TransportError::Mismatch(
                    name.into(),
                    describe_difference(&old, shape),
                ))
            }
            Ok(None) | Err(_) => {
                tracing::warn!("no usable state file for {name} in {}: requests in flight when the previous daemon stopped are not finished", dir.display());
                StateFile::create(dir, name, shape, opened.as_ref())
                    .map_err(TransportError::StateFile)?
            }
        };
        Ok((dev, Some(state)))
    }

    fn inner(&self) -> &Arc<Inner> {
        self.inner.as_ref().expect("used after shutdown")
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the driver that the device's config space changed (an online resize): the
    /// state file records it (so that a restarted daemon adopts the device as it is now), the
    /// kernel's copy is replaced, and a running driver gets the config interrupt.
    pub fn config_changed(&self) -> Result<(), TransportError> {
        let inner = self.inner();
        let config = inner.device.config();
        if let Some(state) = &self.state {
            state
                .set_config(&config)
                .map_err(TransportError::StateFile)?;
        }
        inner.dev.set_config(0, &config)?;
        if inner.lock().status & VIRTIO_CONFIG_S_DRIVER_OK as u8 != 0 {
            inner.dev.inject_config_irq()?;
        }
        Ok(())
    }

    /// Starts the control-message thread. It runs until the returned handle is stopped.
    pub fn spawn_message_loop(&self) -> Result<MessageLoop, TransportError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(TransportError::MessageThread)?;
        let stop2 = stop.try_clone().map_err(TransportError::MessageThread)?;
        let inner = self.inner().clone();
        let thread = std::thread::Builder::new()
            .name(format!("vduse-{}", self.name))
            .spawn(move || inner.message_loop(&stop2))
            .map_err(TransportError::MessageThread)?;
        Ok(MessageLoop {
            thread: Some(thread),
            stop,
        })
    }

    /// Closes the device node and leaves the device and its state file as they are, for
    /// another process to serve (`vudev vduse create`). Nothing must be serving yet.
    pub fn leave(mut self) {
        if let Some(inner) = self.inner.take() {
            inner.stop_workers();
        }
        self.state.take();
    }

    /// Stops every worker, closes the device node and destroys the device. The device must be
    /// off the vdpa bus (the kernel refuses with EBUSY otherwise).
    pub fn shutdown(mut self) -> Result<(), TransportError> {
        self.destroy()
    }

    fn destroy(&mut self) -> Result<(), TransportError> {
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };
        let state = self.state.take();
        inner.stop_workers();
        // Our device fd must be closed before DESTROY_DEV succeeds: wait for the message
        // thread (if the caller did not stop it) to let go of its reference.
        let mut inner = Some(inner);
        for _ in 0..100 {
            match inner.take().map(Arc::try_unwrap) {
                Some(Ok(i)) => {
                    drop(i);
                    break;
                }
                Some(Err(shared)) => {
                    inner = Some(shared);
                    std::thread::sleep(Duration::from_millis(20));
                }
                None => break,
            }
        }
        if inner.is_some() {
            return Err(TransportError::StillServed);
        }
        let mut last_err = None;
        for attempt in 0..50 {
            match self.authority.destroy_device(&self.name) {
                Ok(true) => {
                    tracing::info!(name = %self.name, "VDUSE device destroyed");
                    if let Some(s) = state {
                        s.remove();
                    }
                    return Ok(());
                }
                Ok(false) => {
                    tracing::info!(
                        name = %self.name,
                        "VDUSE device left as it is, for its creator to destroy \
                         (`vudev vduse destroy {}`) or another vudev to serve",
                        self.name
                    );
                    return Ok(());
                }
                Err(TransportError::Vduse(e)) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tracing::debug!(attempt, "destroy: device busy, retrying");
                    last_err = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
        // Fifty tries, each refused with EBUSY.
        Err(TransportError::from(last_err.unwrap_or_else(|| {
            VduseError::NameTaken(self.name.clone())
        })))
    }
}

/// What differs between the device that exists and the one asked for, for the operator.
fn describe_difference(old: &DeviceShape, new: &DeviceShape) -> String {
    let mut d = Vec::new();
    if old.device_id != new.device_id {
        d.push(format!(
            "device id {} instead of {}",
            old.device_id, new.device_id
        ));
    }
    if old.features != new.features {
        d.push(format!(
            "features {:#x} instead of {:#x} (--readonly, backend capabilities)",
            old.features, new.features
        ));
    }
    if old.queue_size != new.queue_size {
        d.push(format!(
            "--queue-size {} instead of {}",
            old.queue_size, new.queue_size
        ));
    }
    if old.config != new.config {
        d.push("a different configuration space (capacity, block size, queue count)".into());
    }
    d.join(", ")
}

impl Drop for VduseExport {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            tracing::error!(name = %self.name, "could not destroy the VDUSE device: {e}");
        }
    }
}

/// The running control-message thread of an export.
pub struct MessageLoop {
    thread: Option<JoinHandle<()>>,
    stop: EventFd,
}

impl MessageLoop {
    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.join();
    }

    fn join(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MessageLoop {
    fn drop(&mut self) {
        self.join();
    }
}

impl Inner {
    fn message_loop(&self, stop: &EventFd) {
        loop {
            let mut fds = [pollfd(self.dev.as_raw_fd()), pollfd(stop.as_raw_fd())];
            if let Err(e) = poll(&mut fds, None) {
                tracing::error!("poll on the VDUSE device failed: {e}");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                match self.dev.read_request(self.api_version) {
                    Ok(Some(req)) => {
                        let reply = self.handle(req);
                        tracing::debug!(?req, ?reply, "VDUSE message");
                        if let Err(e) = self.dev.reply(req.id(), reply) {
                            tracing::error!("{e}");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!("{e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            } else if fds[0].revents != 0 {
                tracing::error!("VDUSE device fd reported an error; message loop ends");
                return;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, req: Request) -> Reply {
        match req {
            Request::GetVqState { index, .. } => {
                let st = self.lock();
                let i = index as usize;
                let pos = match st.workers.get(i) {
                    Some(Some(w)) => w.position(),
                    Some(None) => st.positions[i],
                    None => return Reply::Failed,
                };
                Reply::VqState {
                    index,
                    avail_index: pos.next_avail,
                }
            }
            Request::SetStatus { status, .. } => self.set_status(status),
            Request::UpdateIotlb { start, last, .. } => {
                self.map.invalidate(start, last);
                if self.lock().status & VIRTIO_CONFIG_S_DRIVER_OK as u8 != 0 {
                    self.map.populate(start, last);
                }
                Reply::Ok
            }
            Request::SetVqGroupAsid { group, asid, .. } => {
                // One group and one address space are declared: only (0, 0) is valid.
                if group == 0 && asid == 0 {
                    Reply::Ok
                } else {
                    tracing::warn!(
                        group,
                        asid,
                        "refusing an address space this device did not declare"
                    );
                    Reply::Failed
                }
            }
            Request::SetVqReady { index, ready, .. } => {
                let mut st = self.lock();
                let i = index as usize;
                if i >= st.workers.len() {
                    return Reply::Failed;
                }
                if !ready {
                    if let Some(w) = st.workers[i].take() {
                        // Not under the lock: the drain may take a while.
                        drop(st);
                        let pos = w.stop();
                        self.lock().positions[i] = pos;
                    }
                } else if st.status & VIRTIO_CONFIG_S_DRIVER_OK as u8 != 0
                    && st.workers[i].is_none()
                {
                    let features = self.dev.negotiated_features().unwrap_or(0);
                    if let Err(e) = self.start_queue(&mut st, index, features, false) {
                        tracing::error!(queue = index, "cannot start queue: {e}");
                        return Reply::Failed;
                    }
                }
                Reply::Ok
            }
            Request::Suspend { .. } => {
                self.stop_workers();
                Reply::Ok
            }
            Request::Unknown { kind, .. } => {
                tracing::warn!(kind, "unknown VDUSE message type; answering FAILED");
                Reply::Failed
            }
        }
    }

    fn set_status(&self, status: u8) -> Reply {
        let driver_ok = VIRTIO_CONFIG_S_DRIVER_OK as u8;
        let old = self.lock().status;
        if status == 0 {
            self.stop_workers();
            let mut st = self.lock();
            for p in st.positions.iter_mut() {
                *p = QueuePosition::default();
            }
            for q in 0..st.workers.len() {
                let _ = self.dev.set_kickfd(q as u32, None);
            }
            st.status = 0;
            drop(st);
            self.map.clear();
            self.bounce.reset();
            tracing::info!("driver reset the device");
            return Reply::Ok;
        }
        if status & driver_ok != 0 && old & driver_ok == 0 {
            if let Err(e) = self.start(false) {
                tracing::error!("cannot start the device: {e}");
                self.stop_workers();
                return Reply::Failed;
            }
            tracing::info!("driver started the device");
        } else if status & driver_ok == 0 && old & driver_ok != 0 {
            self.stop_workers();
        }
        self.lock().status = status;
        Reply::Ok
    }

    /// An adopted device: if its driver had started it, start the queues again where the
    /// previous daemon left them.
    fn resume(&self) -> io::Result<()> {
        let features = self.dev.negotiated_features().map_err(io::Error::other)?;
        let n = self.lock().workers.len() as u32;
        let running = (0..n).any(|q| self.dev.vq_info(q).is_ok_and(|i| i.ready));
        if features == 0 || !running {
            tracing::info!("the adopted device's driver has not started it; waiting");
            return Ok(());
        }
        self.start(true)?;
        // ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK: what a running driver has set.
        self.lock().status = 0x0f;
        tracing::info!("resumed the adopted device's queues");
        Ok(())
    }

    /// Starts every ready queue; `recover`: resume from the in-flight records (adoption)
    /// instead of starting them afresh.
    fn start(&self, recover: bool) -> io::Result<()> {
        let features = self.dev.negotiated_features().map_err(io::Error::other)?;
        self.map.clear();
        self.map.populate(0, u64::MAX);
        match self.dev.iova_info(0, u64::MAX) {
            Ok(Some(i)) => tracing::debug!(
                start = i.start,
                last = i.last,
                umem = i.umem,
                regions = self.map.memory().num_regions(),
                "first IOVA region"
            ),
            Ok(None) => tracing::debug!("no IOVA region"),
            Err(e) => tracing::debug!("{e}"),
        }
        let mut st = self.lock();
        for q in 0..st.workers.len() as u32 {
            let info = self.dev.vq_info(q).map_err(io::Error::other)?;
            if info.ready {
                self.start_queue(&mut st, q, features, recover)?;
            }
        }
        Ok(())
    }

    fn start_queue(&self, st: &mut State, q: u32, features: u64, recover: bool) -> io::Result<()> {
        let info = self.dev.vq_info(q).map_err(io::Error::other)?;
        let size = u16::try_from(info.num)
            .ok()
            .filter(|s| *s > 0 && *s <= self.queue_size)
            .ok_or_else(|| {
                io::Error::other(format!("queue {q}: driver chose size {}", info.num))
            })?;
        let mut setup = QueueSetup {
            index: q as u16,
            size,
            desc: info.desc_addr,
            avail: info.driver_addr,
            used: info.device_addr,
            next_avail: info.avail_index,
            next_used: 0,
            event_idx: features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
        };
        // Resume where the used ring stands (zero on a fresh ring).
        if self.map.fault_in(setup.used, 4) {
            if let Ok(idx) = self
                .map
                .memory()
                .read_obj::<u16>(GuestAddress(setup.used + 2))
            {
                setup.next_used = idx;
            }
        }
        let mut tracking = Tracking::default();
        if let Some(mut rec) = self.inflight.as_ref().and_then(|a| a.queue(q as u16, size)) {
            if recover {
                let r = rec.recover(setup.next_used);
                tracing::info!(
                    queue = q,
                    next_avail = r.next_avail,
                    resubmit = r.heads.len(),
                    "resuming from the in-flight records"
                );
                setup.next_avail = r.next_avail;
                tracking.resubmit = r.heads;
            } else {
                rec.fresh(setup.next_used);
            }
            tracking.inflight = Some(rec);
        }
        let handler = self.device.queue_handler(q as u16, features)?;
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let notifier: Arc<dyn Notifier> = Arc::new(IrqNotifier(self.dev.clone()));
        // The kick fd first, then the worker (whose first act is to look at the ring): a kick
        // in between reaches the new fd. (After a crash the kernel still signals the dead
        // daemon's eventfd until it is replaced; a kick lost there would hang the driver.)
        self.dev
            .set_kickfd(q, Some(kick.as_raw_fd()))
            .map_err(io::Error::other)?;
        let worker = Worker::start(
            setup,
            handler,
            self.map.clone(),
            kick.try_clone()?,
            notifier,
            tracking,
            &self.workers,
        )
        .inspect_err(|_| {
            let _ = self.dev.set_kickfd(q, None);
        })?;
        st.workers[q as usize] = Some(worker);
        tracing::debug!(queue = q, size, "queue started");
        Ok(())
    }

    /// Stops every queue at once: however many queues wait on a stalled backend, this ends
    /// within the workers' drain bound, so the message that asked for it is answered in time.
    fn stop_workers(&self) {
        let (indices, workers): (Vec<usize>, Vec<Worker>) = {
            let mut st = self.lock();
            st.workers
                .iter_mut()
                .enumerate()
                .filter_map(|(i, w)| w.take().map(|w| (i, w)))
                .unzip()
        };
        let positions = stop_all(workers);
        let mut st = self.lock();
        for (i, pos) in indices.into_iter().zip(positions) {
            st.positions[i] = pos;
        }
    }
}

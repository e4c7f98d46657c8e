//! One frontend's session: its memory table, rings and queue workers.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::{Arc, Mutex, RwLock};

use vhost::vhost_user::message::{
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Error as VuError, Result as VuResult};

use crate::frontend_channel::FrontendChannel;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use vudev_core::{
    stop_all, Device, DirtyLog, InflightArea, Mapping, MemoryMap, Notifier, QueueSetup, Tracking,
    Worker, WorkerOptions,
};

/// Largest config space a frontend may read (VHOST_USER_MAX_CONFIG_SIZE).
pub(crate) const MAX_CONFIG_SIZE: u32 = 256;

/// One memory region of the frontend.
pub(crate) struct Region {
    pub(crate) gpa: u64,
    pub(crate) size: u64,
    pub(crate) uva: u64,
    pub(crate) mmap_offset: u64,
    pub(crate) file: File,
}

/// The call eventfd of a ring; replaceable while the ring runs.
#[derive(Default)]
pub(crate) struct CallFd(pub(crate) RwLock<Option<File>>);

impl Notifier for CallFd {
    fn notify(&self, _index: u16) -> io::Result<()> {
        match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            Some(f) => match (&*f).write(&1u64.to_ne_bytes()) {
                Ok(_) => Ok(()),
                // The counter is saturated: the frontend will see the interrupt anyway.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(e) => Err(e),
            },
            None => Ok(()),
        }
    }
}

#[derive(Default)]
pub(crate) struct Vring {
    pub(crate) size: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    pub(crate) addr_set: bool,
    pub(crate) base: u16,
    pub(crate) kick: Option<File>,
    pub(crate) call: Arc<CallFd>,
    pub(crate) enabled: bool,
    pub(crate) worker: Option<Worker>,
}

/// State of one frontend connection.
pub(crate) struct Session {
    pub(crate) device: Arc<dyn Device>,
    pub(crate) map: Arc<MemoryMap>,
    pub(crate) regions: Vec<Region>,
    pub(crate) vrings: Vec<Vring>,
    pub(crate) offered: u64,
    pub(crate) acked: u64,
    pub(crate) protocol: VhostUserProtocolFeatures,
    pub(crate) max_queue_size: u16,
    /// How the queue workers run.
    pub(crate) workers: WorkerOptions,
    /// Dirty-page log for live migration (LOG_SHMFD), shared with the workers.
    pub(crate) log: Arc<DirtyLog>,
    /// Device status byte (protocol feature STATUS).
    pub(crate) status: u8,
    /// In-flight area the frontend keeps for us across restarts (INFLIGHT_SHMFD).
    pub(crate) inflight: Option<Arc<InflightArea>>,
    /// The backend-to-frontend channel (BACKEND_REQ), kept open for the session (closing it
    /// makes QEMU report an unexpected end of file), and shared with the server.
    pub(crate) backend_req: FrontendChannel,
    /// Readable once the frontend's memory (or dirty log) vanished under an access (it
    /// shrank the file: SIGBUS, caught): the session then ends.
    pub(crate) fault: Arc<EventFd>,
}

pub(crate) fn invalid(what: &'static str) -> VuError {
    tracing::warn!("frontend request refused: {what}");
    VuError::InvalidParam
}

impl Session {
    pub(crate) fn new(
        device: Arc<dyn Device>,
        max_queue_size: u16,
        workers: WorkerOptions,
        backend_req: FrontendChannel,
    ) -> io::Result<Self> {
        let offered = device.features()
            | (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let n = usize::from(device.num_queues());
        let fault = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        let map = Arc::new(MemoryMap::new(None));
        map.set_fault_alarm(fault.clone());
        Ok(Session {
            device,
            map,
            regions: Vec::new(),
            vrings: (0..n).map(|_| Vring::default()).collect(),
            offered,
            acked: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            max_queue_size,
            workers,
            log: Arc::new(DirtyLog::new()),
            status: 0,
            inflight: None,
            backend_req,
            fault,
        })
    }

    /// Stops every ring and returns rings and features to their initial state. The memory
    /// table stays: a frontend resetting the device (RESET_DEVICE) does not send it again.
    pub(crate) fn reset_rings(&mut self) {
        stop_all(
            self.vrings
                .iter_mut()
                .filter_map(|v| v.worker.take())
                .collect(),
        );
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        self.acked = 0;
        self.status = 0;
        self.log.set_active(false);
    }

    /// Everything a disconnected frontend leaves behind: rings, features and memory.
    pub(crate) fn reset(&mut self) {
        self.reset_rings();
        self.regions.clear();
        self.map.clear();
        self.log.clear();
        self.inflight = None;
    }

    pub(crate) fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| invalid("queue index out of range"))
    }

    /// Frontend virtual address → guest physical address, for ring addresses.
    pub(crate) fn uva_to_gpa(&self, uva: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = uva.checked_sub(r.uva)?;
            (off.checked_add(len)? <= r.size).then(|| r.gpa + off)
        })
    }

    pub(crate) fn remap(&mut self) -> VuResult<()> {
        let mut mappings = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            mappings.push(Mapping {
                file: r.file.try_clone().map_err(VuError::ReqHandlerError)?,
                offset: r.mmap_offset,
                start: r.gpa,
                last: r.gpa + r.size - 1,
                prot: libc::PROT_READ | libc::PROT_WRITE,
            });
        }
        self.map.replace(mappings).map_err(|e| {
            tracing::warn!("frontend memory table refused: {e}");
            VuError::InvalidParam
        })
    }

    pub(crate) fn add_region(&mut self, r: &VhostUserMemoryRegion, file: File) -> VuResult<()> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(invalid("too many memory regions"));
        }
        if r.memory_size == 0 {
            return Err(invalid("empty memory region"));
        }
        let gpa_end = r.guest_phys_addr.checked_add(r.memory_size);
        let uva_end = r.user_addr.checked_add(r.memory_size);
        let file_end = r.mmap_offset.checked_add(r.memory_size);
        let (Some(gpa_end), Some(_), Some(file_end)) = (gpa_end, uva_end, file_end) else {
            return Err(invalid("memory region wraps the address space"));
        };
        let meta = file.metadata().map_err(VuError::ReqHandlerError)?;
        if meta.file_type().is_file() && file_end > meta.len() {
            return Err(invalid("memory region reaches past the end of its file"));
        }
        if self
            .regions
            .iter()
            .any(|o| r.guest_phys_addr < o.gpa + o.size && o.gpa < gpa_end)
        {
            return Err(invalid("memory regions overlap"));
        }
        let (gpa, size, uva, offset) =
            (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
        tracing::debug!(gpa, size, uva, offset, "memory region");
        self.regions.push(Region {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            uva: r.user_addr,
            mmap_offset: r.mmap_offset,
            file,
        });
        Ok(())
    }

    /// Starts ring `index` if it has everything it needs and is not running.
    pub(crate) fn maybe_start(&mut self, index: usize) -> VuResult<()> {
        let protocol_acked = self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let event_idx = self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let v = &self.vrings[index];
        if v.worker.is_some() || v.kick.is_none() || !v.addr_set || v.size == 0 {
            return Ok(());
        }
        if protocol_acked && !v.enabled {
            return Ok(());
        }
        let (Some(desc), Some(avail), Some(used)) = (
            self.uva_to_gpa(v.desc, 16 * u64::from(v.size)),
            self.uva_to_gpa(v.avail, 6 + 2 * u64::from(v.size)),
            self.uva_to_gpa(v.used, 6 + 8 * u64::from(v.size)),
        ) else {
            return Err(invalid("ring addresses outside the memory table"));
        };
        let next_used = self
            .map
            .memory()
            .read_obj::<u16>(GuestAddress(used + 2))
            .unwrap_or(0);
        let mut setup = QueueSetup {
            index: index as u16,
            size: v.size,
            desc,
            avail,
            used,
            next_avail: v.base,
            next_used,
            event_idx,
        };
        let mut tracking = Tracking {
            log: self
                .protocol
                .contains(VhostUserProtocolFeatures::LOG_SHMFD)
                .then(|| self.log.clone()),
            ..Tracking::default()
        };
        // With an in-flight area, the ring resumes where our records say, not at the base the
        // frontend read back from the used ring after we died.
        if let Some(area) = &self.inflight {
            match area.queue(index as u16, v.size) {
                Some(mut q) => {
                    let r = q.recover(next_used);
                    if r.next_avail != v.base || !r.heads.is_empty() {
                        tracing::info!(
                            queue = index,
                            base = v.base,
                            next_avail = r.next_avail,
                            resubmit = r.heads.len(),
                            "resuming from the in-flight area"
                        );
                    }
                    setup.next_avail = r.next_avail;
                    tracking.inflight = Some(q);
                    tracking.resubmit = r.heads;
                }
                None => tracing::warn!(
                    queue = index,
                    "the in-flight area does not cover this ring; requests are not tracked"
                ),
            }
        }
        let kick = v
            .kick
            .as_ref()
            .map(|f| f.try_clone())
            .transpose()
            .map_err(VuError::ReqHandlerError)?
            .ok_or(VuError::InvalidParam)?;
        // SAFETY: `kick` is a fresh duplicate of the frontend's eventfd that we own.
        let kick = unsafe { EventFd::from_raw_fd(kick.into_raw_fd()) };
        let handler = self
            .device
            .queue_handler(index as u16, self.acked)
            .map_err(VuError::ReqHandlerError)?;
        let notifier: Arc<dyn Notifier> = self.vrings[index].call.clone();
        let worker = Worker::start(
            setup,
            handler,
            self.map.clone(),
            kick,
            notifier,
            tracking,
            &self.workers,
        )
        .map_err(|e| {
            tracing::warn!(queue = index, "cannot start ring: {e}");
            VuError::InvalidParam
        })?;
        self.vrings[index].worker = Some(worker);
        tracing::debug!(queue = index, "ring started");
        Ok(())
    }

    /// SET_STATUS: records the driver's status byte; 0 resets the device. False if refused.
    pub(crate) fn set_status(&mut self, value: u64) -> bool {
        let Ok(status) = u8::try_from(value) else {
            tracing::warn!("frontend request refused: status {value:#x} is not a byte");
            return false;
        };
        tracing::debug!(status, "SET_STATUS");
        if status == 0 {
            self.reset_rings();
        }
        self.status = status;
        true
    }

    pub(crate) fn stop_ring(&mut self, index: usize) -> u16 {
        let v = &mut self.vrings[index];
        if let Some(w) = v.worker.take() {
            v.base = w.stop().next_avail;
        }
        v.base
    }
}

/// Most memory regions a frontend may hand us (SET_MEM_TABLE or ADD_MEM_REG).
pub const MAX_MEM_SLOTS: usize = 256;

/// Locks `m`, even if a thread panicked holding it (the state stays usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

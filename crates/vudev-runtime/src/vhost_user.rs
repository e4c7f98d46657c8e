//! The vhost-user transport: serves the same [`Device`] on a unix socket to one frontend at a
//! time (QEMU, cloud-hypervisor, libblkio). Protocol parsing and message validation come from
//! rust-vmm's `vhost` crate; this module holds the session state: the memory table, the rings,
//! and the queue workers, which are the same [`Worker`]s the VDUSE transport runs.
//!
//! A frontend that disconnects ends its session: workers stop, memory is unmapped, and the
//! next frontend starts from a reset device. A second frontend connecting while one is served
//! is refused, unless the first one goes within a second (then it is served next).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::device::Device;
use crate::dirty_log::DirtyLog;
use crate::inflight::InflightArea;
use crate::memory::{Mapping, MemoryMap};
use crate::worker::{stop_all, Notifier, QueueSetup, Tracking, Worker, WorkerOptions};

/// Largest config space a frontend may read (VHOST_USER_MAX_CONFIG_SIZE).
const MAX_CONFIG_SIZE: u32 = 256;

/// Most memory regions a frontend may hand us (SET_MEM_TABLE or ADD_MEM_REG).
pub const MAX_MEM_SLOTS: usize = 256;

/// Options of a vhost-user export that are not the device's.
#[derive(Clone, Debug)]
pub struct VhostUserOptions {
    /// Socket path.
    pub socket: PathBuf,
    /// Mode of the socket file (e.g. 0o600).
    pub socket_mode: u32,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// How the queue workers run (polling, pinning).
    pub workers: WorkerOptions,
}

/// A listening vhost-user export. The socket file is removed on drop.
pub struct VhostUserServer {
    listener: UnixListener,
    path: PathBuf,
    device: Arc<dyn Device>,
    opts: VhostUserOptions,
}

impl VhostUserServer {
    /// Creates the socket (replacing a stale one nobody listens on) with the requested mode.
    pub fn bind(device: Arc<dyn Device>, opts: &VhostUserOptions) -> io::Result<Self> {
        let path = opts.socket.clone();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another process is serving this socket", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        // Bind under a temporary name, set the mode, then rename into place: the socket
        // appears listening and with its final permissions, never before.
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let placed =
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(opts.socket_mode))
                .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
        }
        Ok(VhostUserServer {
            listener,
            path,
            device,
            opts: opts.clone(),
        })
    }

    /// Serves frontends one after another until `stop` becomes readable.
    pub fn serve(&self, stop: &EventFd) -> io::Result<()> {
        let mut next = None;
        loop {
            let stream = match next.take() {
                Some(s) => s,
                None => {
                    let mut fds = [pollfd(self.listener.as_raw_fd()), pollfd(stop.as_raw_fd())];
                    if poll(&mut fds, None)? == 0 {
                        continue;
                    }
                    if fds[1].revents != 0 {
                        return Ok(());
                    }
                    match self.listener.accept() {
                        Ok((s, _)) => s,
                        Err(e) => {
                            tracing::warn!("accept on {}: {e}", self.path.display());
                            continue;
                        }
                    }
                }
            };
            tracing::info!("frontend connected");
            let ended = serve_frontend(
                self.device.clone(),
                self.opts.queue_size,
                &self.opts.workers,
                stream,
                stop,
                Some(&self.listener),
            );
            tracing::info!("frontend disconnected; device reset, waiting for the next one");
            if ended.stopped {
                return Ok(());
            }
            next = ended.waiting;
        }
    }
}

/// How long a connection that arrives while a frontend is served waits for that frontend to
/// go before it is refused. A frontend that disconnects and at once reconnects can be seen in
/// the other order: its old socket stays open while any process still holds a copy of it
/// (a child between fork and exec, for one).
const SECOND_FRONTEND_GRACE: Duration = Duration::from_secs(1);

/// How a frontend's session ended.
pub struct SessionEnd {
    /// `stop` became readable: the server is to exit.
    pub stopped: bool,
    /// A connection that arrived in the session's last [`SECOND_FRONTEND_GRACE`]: the next
    /// frontend, to be served now.
    pub waiting: Option<UnixStream>,
}

/// Serves one connected frontend until it disconnects or `stop` becomes readable, and resets
/// the device. A connection arriving on `listener` meanwhile is held for
/// [`SECOND_FRONTEND_GRACE`]: if the session ends by then it is handed back as the next
/// frontend, otherwise it is refused (closed, with a log line).
/// This is what [`VhostUserServer::serve`] runs per frontend; a fuzz target drives it directly.
pub fn serve_frontend(
    device: Arc<dyn Device>,
    max_queue_size: u16,
    workers: &WorkerOptions,
    stream: UnixStream,
    stop: &EventFd,
    listener: Option<&UnixListener>,
) -> SessionEnd {
    let state = Arc::new(Mutex::new(Session::new(
        device,
        max_queue_size,
        workers.clone(),
    )));
    let sock = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot duplicate the frontend socket: {e}");
            return SessionEnd {
                stopped: false,
                waiting: None,
            };
        }
    };
    let mut handler = BackendReqHandler::from_stream(stream, state.clone());
    let mut waiting: Option<(UnixStream, Instant)> = None;
    let stopped = loop {
        let mut fds = [
            pollfd(handler.as_raw_fd()),
            pollfd(stop.as_raw_fd()),
            pollfd(listener.map_or(-1, |l| l.as_raw_fd())),
        ];
        let timeout = waiting
            .as_ref()
            .map(|(_, deadline)| deadline.saturating_duration_since(Instant::now()));
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(e) => {
                tracing::error!("poll: {e}");
                break false;
            }
        }
        if fds[1].revents != 0 {
            break true;
        }
        if fds[0].revents != 0 {
            let request = match status_message(&sock, &state) {
                Ok(true) => Ok(()),
                Ok(false) => handler.handle_request(),
                Err(e) => {
                    tracing::warn!("frontend sent a bad status message ({e}); disconnecting it");
                    break false;
                }
            };
            match request {
                Ok(()) => {}
                Err(e) if is_fatal(&e) => {
                    if !matches!(e, VuError::Disconnected | VuError::PartialMessage) {
                        tracing::warn!("frontend sent a bad message ({e}); disconnecting it");
                    }
                    break false;
                }
                Err(e) => tracing::warn!("frontend request failed: {e}"),
            }
        }
        if waiting
            .as_ref()
            .is_some_and(|(_, deadline)| Instant::now() >= *deadline)
        {
            tracing::warn!("refusing a second frontend: one is already connected");
            waiting = None;
        }
        if fds[2].revents != 0 {
            if let Some(Ok((s, _))) = listener.map(|l| l.accept()) {
                if waiting.is_some() {
                    tracing::warn!("refusing a third frontend: one is connected, one waits");
                } else {
                    waiting = Some((s, Instant::now() + SECOND_FRONTEND_GRACE));
                }
            }
        }
    };
    lock(&state).reset();
    SessionEnd {
        stopped,
        waiting: waiting.map(|(s, _)| s),
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Frontend requests the `vhost` crate (0.18) does not dispatch; this transport answers them.
const SET_STATUS: u32 = 39;
const GET_STATUS: u32 = 40;
/// Header flags: protocol version 1, "this is a reply", "reply wanted" (REPLY_ACK).
const HDR_VERSION: u32 = 0x1;
const HDR_REPLY: u32 = 0x4;
const HDR_NEED_REPLY: u32 = 0x8;
/// A message header: request, flags, payload size.
const HDR_LEN: usize = 12;
/// A header and a u64 payload (SET_STATUS, and the reply to either status message).
const STATUS_MSG_LEN: usize = 20;

/// Answers SET_STATUS / GET_STATUS (protocol feature STATUS) when that is the next message on
/// `sock`. Returns false, consuming nothing, when the next message is anything else or not
/// complete, so the `vhost` crate's handler takes it (and refuses what it does not know).
fn status_message(sock: &UnixStream, session: &Mutex<Session>) -> io::Result<bool> {
    let mut msg = [0u8; STATUS_MSG_LEN];
    let recv = |buf: &mut [u8], flags: i32| {
        // SAFETY: `buf` is valid for writes of its length; the fd is the frontend's socket.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    };
    let n = match recv(&mut msg, libc::MSG_PEEK) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(e),
    };
    let word = |i: usize| u32::from_le_bytes(msg[i..i + 4].try_into().unwrap_or_default());
    let (code, flags, size) = (word(0), word(4), word(8));
    // GET_STATUS has no payload; SET_STATUS carries the status as a u64.
    let len = match code {
        GET_STATUS => HDR_LEN,
        SET_STATUS => STATUS_MSG_LEN,
        _ => return Ok(false),
    };
    let mut s = lock(session);
    if n < len || !s.protocol.contains(VhostUserProtocolFeatures::STATUS) {
        return Ok(false);
    }
    // Take the message off the socket (fds sent with it, which it must not carry, are closed
    // by the kernel since we receive no control data).
    if recv(&mut msg[..len], 0)? != len {
        return Err(io::Error::other("status message cut short"));
    }
    if flags & 0x3 != HDR_VERSION || flags & HDR_REPLY != 0 || size as usize != len - HDR_LEN {
        return Err(io::Error::other("malformed header"));
    }
    let value = u64::from_le_bytes(msg[12..20].try_into().unwrap_or_default());
    let reply = if code == GET_STATUS {
        Some(u64::from(s.status))
    } else {
        let ok = s.set_status(value);
        let ack = flags & HDR_NEED_REPLY != 0
            && s.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        ack.then_some(u64::from(!ok))
    };
    drop(s);
    if let Some(v) = reply {
        let mut out = [0u8; STATUS_MSG_LEN];
        out[0..4].copy_from_slice(&code.to_le_bytes());
        out[4..8].copy_from_slice(&(HDR_VERSION | HDR_REPLY).to_le_bytes());
        out[8..12].copy_from_slice(&8u32.to_le_bytes());
        out[12..20].copy_from_slice(&v.to_le_bytes());
        // SAFETY: `out` is valid for reads of its length; the fd is the frontend's socket.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if usize::try_from(n).ok() != Some(out.len()) {
            return Err(io::Error::other("cannot send the reply"));
        }
    }
    Ok(true)
}

/// Errors after which the connection cannot be trusted to be in sync.
fn is_fatal(e: &VuError) -> bool {
    matches!(
        e,
        VuError::Disconnected
            | VuError::PartialMessage
            | VuError::InvalidMessage
            | VuError::OversizedMsg
            | VuError::IncorrectFds
            | VuError::SocketError(_)
            | VuError::SocketBroken(_)
            | VuError::SocketRetry(_)
            | VuError::InvalidSocketFd(_)
            | VuError::FeatureMismatch
    )
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits for one of `fds` (forever when `timeout` is `None`); 0 when interrupted or timed out.
fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<i32> {
    // Rounded up, so that a deadline is never polled for 0 ms before it has passed.
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    });
    // SAFETY: `fds` is a valid, exclusively borrowed pollfd array.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One memory region of the frontend.
struct Region {
    gpa: u64,
    size: u64,
    uva: u64,
    mmap_offset: u64,
    file: File,
}

/// The call eventfd of a ring; replaceable while the ring runs.
#[derive(Default)]
struct CallFd(RwLock<Option<File>>);

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
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    addr_set: bool,
    base: u16,
    kick: Option<File>,
    call: Arc<CallFd>,
    enabled: bool,
    worker: Option<Worker>,
}

/// State of one frontend connection.
struct Session {
    device: Arc<dyn Device>,
    map: Arc<MemoryMap>,
    regions: Vec<Region>,
    vrings: Vec<Vring>,
    offered: u64,
    acked: u64,
    protocol: VhostUserProtocolFeatures,
    max_queue_size: u16,
    /// How the queue workers run.
    workers: WorkerOptions,
    /// Dirty-page log for live migration (LOG_SHMFD), shared with the workers.
    log: Arc<DirtyLog>,
    /// Device status byte (protocol feature STATUS).
    status: u8,
    /// In-flight area the frontend keeps for us across restarts (INFLIGHT_SHMFD).
    inflight: Option<Arc<InflightArea>>,
    /// The backend-to-frontend channel (BACKEND_REQ), kept open for the session: closing it
    /// makes QEMU report an unexpected end of file.
    backend_req: Option<Backend>,
}

fn invalid(what: &'static str) -> VuError {
    tracing::warn!("frontend request refused: {what}");
    VuError::InvalidParam
}

impl Session {
    fn new(device: Arc<dyn Device>, max_queue_size: u16, workers: WorkerOptions) -> Self {
        let offered = device.features()
            | (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let n = usize::from(device.num_queues());
        Session {
            device,
            map: Arc::new(MemoryMap::new(None)),
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
            backend_req: None,
        }
    }

    /// Stops every ring and returns rings and features to their initial state. The memory
    /// table stays: a frontend resetting the device (RESET_DEVICE) does not send it again.
    fn reset_rings(&mut self) {
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
    fn reset(&mut self) {
        self.reset_rings();
        self.regions.clear();
        self.map.clear();
        self.log.clear();
        self.inflight = None;
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| invalid("queue index out of range"))
    }

    /// Frontend virtual address → guest physical address, for ring addresses.
    fn uva_to_gpa(&self, uva: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = uva.checked_sub(r.uva)?;
            (off.checked_add(len)? <= r.size).then(|| r.gpa + off)
        })
    }

    fn remap(&mut self) -> VuResult<()> {
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

    fn add_region(&mut self, r: &VhostUserMemoryRegion, file: File) -> VuResult<()> {
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
    fn maybe_start(&mut self, index: usize) -> VuResult<()> {
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
    fn set_status(&mut self, value: u64) -> bool {
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

    fn stop_ring(&mut self, index: usize) -> u16 {
        let v = &mut self.vrings[index];
        if let Some(w) = v.worker.take() {
            v.base = w.stop().next_avail;
        }
        v.base
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_rings();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset_rings();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered != 0 {
            return Err(invalid("frontend acked features that were not offered"));
        }
        self.acked = features;
        // The frontend turns LOG_ALL on (and off) around a migration, with the rings running.
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if log_all {
            tracing::info!("dirty-page logging on (live migration)");
        }
        self.log.set_active(log_all);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() {
            return Err(invalid("memory table and fds differ in number"));
        }
        // All or nothing: the region list and the memory map must never disagree.
        let old = std::mem::take(&mut self.regions);
        let added = ctx
            .iter()
            .zip(files)
            .try_for_each(|(r, f)| self.add_region(r, f))
            .and_then(|()| self.remap());
        if let Err(e) = added {
            self.regions = old;
            return Err(e);
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.max_queue_size;
        let v = self.vring(index)?;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(invalid("queue size out of range"));
        }
        v.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        tracing::debug!(index, descriptor, used, available, log, "SET_VRING_ADDR");
        // Used-ring writes are logged at the ring's guest address: without a vIOMMU (which
        // vhost-user here does not offer) that is the log address a frontend gives.
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            && self.uva_to_gpa(used, 1).is_some_and(|gpa| gpa != log)
        {
            return Err(invalid(
                "used ring log address is not the ring's guest address",
            ));
        }
        let v = self.vring(index)?;
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        v.addr_set = true;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let v = self.vring(index)?;
        v.base = u16::try_from(base).map_err(|_| invalid("ring base out of range"))?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let base = self.stop_ring(index as usize);
        let v = &mut self.vrings[index as usize];
        v.kick = None;
        v.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = u32::from(index);
        let Some(fd) = fd else {
            return Err(invalid("polling rings (no kick fd) are not supported"));
        };
        let protocol_acked = self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let v = self.vring(i)?;
        v.kick = Some(fd);
        if !protocol_acked {
            v.enabled = true;
        }
        self.maybe_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.vring(u32::from(index))?;
        *v.call.0.write().unwrap_or_else(|e| e.into_inner()) = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::STATUS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.protocol = VhostUserProtocolFeatures::from_bits_truncate(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.device.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring(index)?.enabled = enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            self.stop_ring(index as usize);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // Fields past the device's config (newer virtio-blk fields a frontend may ask for) read
        // as zero, up to the protocol's 256-byte limit.
        let end = offset
            .checked_add(size)
            .filter(|e| *e <= MAX_CONFIG_SIZE)
            .ok_or_else(|| invalid("config read out of range"))?;
        let mut config = self.device.config();
        config.resize(MAX_CONFIG_SIZE as usize, 0);
        Ok(config[offset as usize..end as usize].to_vec())
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        Err(invalid("the configuration space is read-only"))
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.backend_req = Some(backend);
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation(
            "shared objects are not supported",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let (queues, size) = (inflight.num_queues, inflight.queue_size);
        if queues > self.device.num_queues() || size > self.max_queue_size {
            return Err(invalid(
                "in-flight area for more queues or descriptors than offered",
            ));
        }
        let (file, mmap_size) = InflightArea::create(queues, size).map_err(|e| {
            tracing::warn!("frontend request refused: {e}");
            VuError::InvalidParam
        })?;
        tracing::debug!(queues, size, mmap_size, "GET_INFLIGHT_FD");
        let reply = VhostUserInflight {
            mmap_size,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let (queues, size) = (inflight.num_queues, inflight.queue_size);
        if queues > self.device.num_queues() || size > self.max_queue_size {
            return Err(invalid(
                "in-flight area for more queues or descriptors than offered",
            ));
        }
        let (len, offset) = (inflight.mmap_size, inflight.mmap_offset);
        tracing::debug!(queues, size, len, offset, "SET_INFLIGHT_FD");
        let area = InflightArea::map(file, offset, len, queues, size).map_err(|e| {
            tracing::warn!("frontend in-flight area refused: {e}");
            VuError::InvalidParam
        })?;
        self.inflight = Some(area);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        self.add_region(region, fd)?;
        if let Err(e) = self.remap() {
            self.regions.pop();
            return Err(e);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let Some(at) = self
            .regions
            .iter()
            .position(|r| r.gpa == region.guest_phys_addr && r.size == region.memory_size)
        else {
            return Err(invalid("no such memory region"));
        };
        let removed = self.regions.remove(at);
        if let Err(e) = self.remap() {
            self.regions.insert(at, removed);
            return Err(e);
        }
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        tracing::debug!(size, offset, "SET_LOG_BASE");
        self.log.set_bitmap(file, offset, size).map_err(|e| {
            // The frontend waits for a reply the protocol has no error form for: disconnect
            // it rather than leave it waiting.
            tracing::warn!("frontend dirty log refused: {e}; disconnecting it");
            VuError::InvalidMessage
        })
    }
}

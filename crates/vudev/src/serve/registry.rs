//! The daemon's exports by name: added, removed and listed at run time, each independent of
//! the others. Nothing slow happens under the lock: a backend is opened, and an export set up
//! or taken down, while its name is held by a `Starting`/`Stopping` slot.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use vudev_blk::stats::QueueSnapshot;
use vudev_blk::BlockDevice;
use vudev_vduse::authority::{Authority, HandedOver};
use vudev_vduse::lifecycle::Attached;

use super::record::Record;
use super::spec::{ExportArgs, Spec};
use crate::device::{self, Exported};
use crate::rpc::{ApiError, Code};
use crate::sandbox;
use crate::sandbox::helper::{in_use, Client};
use crate::serving::{VduseServing, VhostUserServing};
use crate::size::parse_size;

/// An export's counters: its name, size and each queue's snapshot.
pub struct ExportStats {
    /// Export name.
    pub name: String,
    /// Capacity in bytes.
    pub size: u64,
    /// Per queue.
    pub queues: Vec<QueueSnapshot>,
    /// The backend's event counts (an NBD client's reconnects and timeouts).
    pub backend: Vec<(&'static str, u64)>,
    /// A net export's counters (frames and bytes each way, drops); empty for a disk.
    pub net: Vec<(&'static str, u64)>,
}

/// How long a stopping daemon waits for adds and removes under way.
const IN_PROGRESS_WAIT: Duration = Duration::from_secs(60);

/// An export as `list` and `show` give it.
#[derive(Clone, Debug, Serialize)]
pub struct ExportInfo {
    /// Its name.
    pub name: String,
    /// `vduse` or `vhost-user`.
    pub transport: String,
    /// `starting`, `serving` (VDUSE), `waiting` or `connected` (vhost-user: whether a frontend
    /// is), `stopping`, or `failed` (see `error`).
    pub state: &'static str,
    /// The backend, e.g. `file /srv/disk.img (io_uring)`.
    pub backend: Option<String>,
    /// Capacity in bytes.
    pub size: Option<u64>,
    /// A VDUSE export's block device on this host (`/dev/vda`).
    pub device: Option<String>,
    /// The vdpa driver a VDUSE export is bound to, when not a block device of this host.
    pub driver: Option<String>,
    /// A vhost-user export's socket.
    pub socket: Option<PathBuf>,
    /// Why the export failed.
    pub error: Option<String>,
    /// Added at run time (kept in the daemon's record), not from the config file.
    pub runtime: bool,
    /// A VDUSE device handed over with the request (`device-fd`): its creator attaches,
    /// detaches and destroys it, and it is not in the record (the descriptor does not
    /// outlive the daemon).
    pub handed_over: bool,
    /// The spec it was added with.
    pub options: Spec,
}

enum Serving {
    Vduse(VduseServing),
    VhostUser(VhostUserServing),
}

struct Export {
    /// A regular file behind the export, whose growth the daemon follows.
    file: Option<PathBuf>,
    device: Exported,
    serving: Serving,
}

enum State {
    Starting,
    Serving(Box<Export>),
    Stopping,
    /// Could not be started at daemon start; listed until removed.
    Failed(String),
}

struct Slot {
    spec: Spec,
    transport: &'static str,
    socket: Option<PathBuf>,
    runtime: bool,
    handed_over: bool,
    state: State,
    /// A resize is under way (outside the lock: the storage may take its time).
    resizing: bool,
}

struct Inner {
    slots: BTreeMap<String, Slot>,
    closing: bool,
}

/// The exports.
pub struct Registry {
    inner: Mutex<Inner>,
    record: Record,
    /// Resizes running outside the lock; shutdown waits for them.
    resizes: AtomicUsize,
    /// The daemon's privileged helper, when it serves as a user; else this process has the
    /// privileges.
    helper: Option<Arc<Client>>,
    /// Where the state files are: with a helper, every VDUSE export's.
    state_dir: PathBuf,
}

impl Registry {
    /// No exports yet; the record of run-time exports lives in `state_dir`, as do the VDUSE
    /// exports' state files unless an export names another directory; `helper` does what
    /// needs privileges when the daemon serves as a user (the uid).
    pub fn new(state_dir: &Path, helper: Option<(Arc<Client>, u32)>) -> Registry {
        Registry {
            inner: Mutex::new(Inner {
                slots: BTreeMap::new(),
                closing: false,
            }),
            record: Record::new(state_dir, helper.clone()),
            resizes: AtomicUsize::new(0),
            helper: helper.map(|(h, _)| h),
            state_dir: state_dir.to_path_buf(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The daemon's start: the config's exports, then those added at run time before a
    /// restart (unless the config now has one of that name). One that cannot be started is
    /// listed as failed, and the others are served. `files` are the config exports' files,
    /// opened by root, by export name: for those exports only (the record is not trusted
    /// with them), and closed once they started.
    pub fn start(&self, config: Vec<(Spec, ExportArgs)>, mut files: HashMap<String, File>) {
        let recorded = self.record.load();
        let configured: Vec<String> = config.iter().map(|(_, a)| a.name()).collect();
        let mut all: Vec<(Spec, bool, Option<File>)> = config
            .into_iter()
            .map(|(s, a)| (s, false, files.remove(&a.name())))
            .collect();
        drop(files);
        let mut invalid = false;
        for spec in recorded {
            match ExportArgs::parse(&spec) {
                Ok(a) if configured.contains(&a.name()) => tracing::warn!(
                    "the config now defines {}: its run-time definition is dropped",
                    a.name()
                ),
                Ok(_) => all.push((spec, true, None)),
                Err(e) => {
                    tracing::error!("a recorded export is no longer valid: {e}");
                    invalid = true;
                }
            }
        }
        if invalid {
            self.record
                .set_aside("it holds exports that are no longer valid");
        }
        // Side by side: one export slow to start (an NBD server away) delays no other.
        std::thread::scope(|s| {
            for (spec, runtime, file) in all {
                s.spawn(move || self.start_one(spec, runtime, file));
            }
        });
        self.save_record(&self.lock());
    }

    /// Starts one export of the daemon's start; one that fails is listed as failed.
    fn start_one(&self, spec: Spec, runtime: bool, file: Option<File>) {
        if let Err(e) = self.add_as(spec.clone(), runtime, None, file) {
            let name = ExportArgs::parse(&spec).map(|a| a.name());
            tracing::error!("{}: {}", name.as_deref().unwrap_or("?"), e.message);
            if let Ok(args) = ExportArgs::parse(&spec) {
                let mut inner = self.lock();
                if e.code != Code::Exists {
                    inner.slots.insert(
                        args.name(),
                        Slot {
                            transport: args.transport(),
                            socket: args.socket().map(Path::to_path_buf),
                            spec,
                            runtime,
                            handed_over: false,
                            resizing: false,
                            state: State::Failed(e.message),
                        },
                    );
                }
            }
        }
    }

    /// Adds an export at run time (kept in the record, unless it serves `device`: a VDUSE
    /// device's node, handed over).
    pub fn add(&self, spec: Spec, device: Option<File>) -> Result<ExportInfo, ApiError> {
        self.add_as(spec, true, device, None)
    }

    /// `file`: the export's `--file`, opened already.
    fn add_as(
        &self,
        spec: Spec,
        runtime: bool,
        device: Option<File>,
        file: Option<File>,
    ) -> Result<ExportInfo, ApiError> {
        let mut args =
            ExportArgs::parse(&spec).map_err(|e| ApiError::new(Code::InvalidParams, e.message))?;
        let name = args.name();
        if let ExportArgs::Vduse(a) = &mut args {
            if !spec.contains_key("state-dir") {
                a.state_dir = self.state_dir.clone();
            }
        }
        if let Some(file) = &device {
            let checked = match &args {
                ExportArgs::Vduse(_) => sandbox::check_device_node(file, &name),
                ExportArgs::VhostUser(_) => Err("only a VDUSE export serves a device".into()),
            };
            checked.map_err(|e| ApiError::new(Code::InvalidParams, format!("device-fd: {e}")))?;
        }
        let handed_over = device.is_some();
        let socket = args.socket().map(Path::to_path_buf);
        match &args {
            ExportArgs::Vduse(a)
                if self.helper.is_some()
                    && a.state_dir.canonicalize().ok().as_ref() != Some(&self.state_dir) =>
            {
                return Err(ApiError::new(
                    Code::InvalidParams,
                    format!(
                        "{name}: state-dir {}: a daemon that serves as a user keeps every VDUSE \
                         export's state in its own --state-dir ({}): drop state-dir to use it",
                        a.state_dir.display(),
                        self.state_dir.display()
                    ),
                ))
            }
            _ => {}
        }
        {
            let mut inner = self.lock();
            if inner.closing {
                return Err(shutting_down());
            }
            if inner.slots.contains_key(&name) {
                return Err(ApiError::new(
                    Code::Exists,
                    format!("an export named {name} exists: remove it first, or pick another name"),
                ));
            }
            if let Some((other, _)) = inner
                .slots
                .iter()
                .find(|(_, s)| socket.is_some() && s.socket == socket)
            {
                return Err(ApiError::new(
                    Code::Exists,
                    format!(
                        "export {other} already serves {}: pick another socket",
                        socket.as_deref().unwrap_or(Path::new("")).display()
                    ),
                ));
            }
            inner.slots.insert(
                name.clone(),
                Slot {
                    spec,
                    transport: args.transport(),
                    socket,
                    runtime,
                    handed_over,
                    resizing: false,
                    state: State::Starting,
                },
            );
        }
        let started = start(&args, self.helper.as_ref(), device, file);
        let mut inner = self.lock();
        match started {
            Ok(export) if inner.closing => {
                inner.slots.remove(&name);
                drop(inner);
                let _ = stop(*export);
                Err(shutting_down())
            }
            Ok(export) => {
                tracing::info!("added {name}");
                let slot = inner.slots.get_mut(&name).expect("held by Starting");
                slot.state = State::Serving(export);
                let info = info(&name, slot);
                if runtime {
                    self.save_record(&inner);
                }
                Ok(info)
            }
            Err(e) => {
                inner.slots.remove(&name);
                Err(e)
            }
        }
    }

    /// Removes an export: its driver or frontend is disconnected and its device taken away.
    /// A VDUSE export whose block device is in use (mounted) is refused unless `force`.
    pub fn remove(&self, name: &str, force: bool) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let slot = inner.slots.get_mut(name).ok_or_else(|| not_found(name))?;
        if slot.resizing {
            return Err(ApiError::new(
                Code::Busy,
                format!("{name} is being resized: remove it once that is done"),
            ));
        }
        let export = match std::mem::replace(&mut slot.state, State::Stopping) {
            State::Serving(export) => {
                let busy = match (&export.serving, force) {
                    (Serving::Vduse(v), false) => match v.attached() {
                        Some(Attached::Block(blk)) if self.in_use(name, blk) => Some(blk.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(blk) = busy {
                    slot.state = State::Serving(export);
                    return Err(ApiError::new(
                        Code::Busy,
                        format!(
                            "{name} is /dev/{blk}, which is in use (mounted, or held open \
                             exclusively): unmount it first, or pass --force"
                        ),
                    ));
                }
                Some(export)
            }
            State::Failed(_) => None,
            busy @ (State::Starting | State::Stopping) => {
                slot.state = busy;
                return Err(ApiError::new(
                    Code::Busy,
                    format!("{name} is starting or stopping: try again in a moment"),
                ));
            }
        };
        let runtime = slot.runtime;
        if export.is_none() {
            inner.slots.remove(name);
        }
        if runtime {
            self.save_record(&inner);
        }
        drop(inner);
        let Some(export) = export else {
            return Ok(());
        };
        let stopped = stop(*export);
        self.lock().slots.remove(name);
        tracing::info!("removed {name}");
        stopped.map_err(|e| ApiError::new(Code::Transport, format!("{name} was removed, but: {e}")))
    }

    /// Changes an export's capacity while it serves, and tells its driver or frontend. `size`
    /// `None` takes a file backend's size as it is now (a file grown with truncate, a block
    /// device its owner resized). A shrink that would cut data the backend holds is refused
    /// unless `force`.
    pub fn resize(
        &self,
        name: &str,
        size: Option<&str>,
        force: bool,
    ) -> Result<ExportInfo, ApiError> {
        let (device, bytes) = {
            let mut inner = self.lock();
            let slot = inner.slots.get_mut(name).ok_or_else(|| not_found(name))?;
            let State::Serving(export) = &slot.state else {
                return Err(ApiError::new(
                    Code::Busy,
                    format!("{name} is not serving: resize it once `vudev ctl show` says it is"),
                ));
            };
            if slot.resizing {
                return Err(ApiError::new(
                    Code::Busy,
                    format!("{name} is being resized: try again once that is done"),
                ));
            }
            let Some(block) = export.device.block().cloned() else {
                return Err(ApiError::new(
                    Code::InvalidParams,
                    format!("{name} is a network interface: only disks are resized"),
                ));
            };
            let args = ExportArgs::parse(&slot.spec)
                .map_err(|e| ApiError::new(Code::InvalidParams, e.message))?;
            let (backend, _, _) = args.parts();
            let bytes = match (size, &backend.file) {
                (Some(s), _) => parse_size(s).map_err(|e| ApiError::new(Code::InvalidParams, e))?,
                (None, Some(path)) => file_size(path).map_err(|e| {
                    ApiError::new(Code::Backend, format!("{}: {e}", path.display()))
                })?,
                (None, None) => {
                    return Err(ApiError::new(
                        Code::InvalidParams,
                        "give the new size: only a file backend can be asked for its own",
                    ))
                }
            };
            slot.resizing = true;
            self.resizes.fetch_add(1, Ordering::SeqCst);
            (block, bytes)
        };
        // Outside the lock: the storage may take its time (an RBD image: up to its timeout),
        // and the other exports' calls must not wait for it. A panic must not leave the
        // export marked as resizing for good.
        let was = device.size();
        let resized = std::panic::catch_unwind(AssertUnwindSafe(|| device.resize(bytes, force)))
            .unwrap_or_else(|_| {
                Err(std::io::Error::other(
                    "the resize failed (a bug: see the log)",
                ))
            });
        let mut inner = self.lock();
        self.resizes.fetch_sub(1, Ordering::SeqCst);
        // The export resized, if it is still there (not removed, nor removed and added again).
        let mut slot = inner
            .slots
            .get_mut(name)
            .filter(|s| matches!(&s.state, State::Serving(e) if is(e, &device)));
        if let Some(s) = slot.as_mut() {
            s.resizing = false;
        }
        resized.map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::InvalidInput => Code::InvalidParams,
                _ => Code::Backend,
            };
            ApiError::new(code, format!("cannot resize {name}: {e}"))
        })?;
        let Some(slot) = slot else {
            return Err(ApiError::new(
                Code::ShuttingDown,
                format!("{name} was resized ({bytes} bytes), but it stopped meanwhile"),
            ));
        };
        let told = match &slot.state {
            State::Serving(export) => tell(export),
            _ => Err("it stopped serving".into()),
        };
        tracing::info!(
            "resized {name} from {was} to {bytes} bytes: {}",
            told.as_deref().unwrap_or("but the driver was not told")
        );
        // A null or memory disk's size is its option: a restart serves the new one.
        for key in ["null", "memory"] {
            if slot.spec.contains_key(key) {
                slot.spec.insert(key.into(), bytes.to_string().into());
            }
        }
        let info = info(name, slot);
        if slot.runtime {
            self.save_record(&inner);
        }
        told.map_err(|e| ApiError::new(Code::Transport, format!("{name} was resized, but: {e}")))?;
        Ok(info)
    }

    /// The counters of the serving exports (of `name` only, if given).
    pub fn stats(&self, name: Option<&str>) -> Vec<ExportStats> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .filter(|(n, _)| name.is_none_or(|want| want == n.as_str()))
            .filter_map(|(n, s)| match &s.state {
                State::Serving(e) => Some(match &e.device {
                    Exported::Block(b) => ExportStats {
                        name: n.clone(),
                        size: b.size(),
                        queues: b.stats().iter().map(|q| q.snapshot()).collect(),
                        backend: b.backend_events(),
                        net: Vec::new(),
                    },
                    Exported::Net(d) => ExportStats {
                        name: n.clone(),
                        size: 0,
                        queues: Vec::new(),
                        backend: Vec::new(),
                        net: d.stats().snapshot(),
                    },
                }),
                _ => None,
            })
            .collect()
    }

    /// Grows the exports whose file has grown (`truncate -s`, a copy tool), as `resize`
    /// without a size would; a file that shrank is left to `resize --force`. Takes on the
    /// size of storage resized elsewhere (an RBD image, seen by its watch). Called every few
    /// seconds by the daemon: one stat per file export.
    pub fn follow_grown_files(&self) {
        // The files and sizes under the lock; the stats (which may be slow) outside it.
        let files: Vec<(String, PathBuf, u64, u64)> = {
            let inner = self.lock();
            inner
                .slots
                .iter()
                .filter_map(|(n, s)| match &s.state {
                    State::Serving(e) => {
                        let b = e.device.block()?;
                        Some((
                            n.clone(),
                            e.file.clone()?,
                            b.size(),
                            u64::from(b.config().logical_block_size),
                        ))
                    }
                    _ => None,
                })
                .collect()
        };
        let grown = files.into_iter().filter_map(|(name, path, size, block)| {
            let len = path.metadata().ok()?.len();
            (len > size && len.is_multiple_of(block)).then_some(name)
        });
        for name in grown {
            tracing::info!("the file of {name} grew: resizing it");
            if let Err(e) = self.resize(&name, None, false) {
                tracing::warn!("{}", e.message);
            }
        }
        // Storage resized by other hands (`rbd resize`), as its backend saw it.
        let devices: Vec<(String, Arc<BlockDevice>)> = {
            let inner = self.lock();
            inner
                .slots
                .iter()
                .filter_map(|(n, s)| match &s.state {
                    State::Serving(e) => Some((n.clone(), e.device.block()?.clone())),
                    _ => None,
                })
                .collect()
        };
        for (name, device) in devices {
            let was = device.size();
            // Outside the lock: the backend may ask its storage (a network round trip).
            let Some(bytes) = device.adopt_changed_size() else {
                continue;
            };
            let inner = self.lock();
            let told = match inner.slots.get(&name).map(|s| &s.state) {
                Some(State::Serving(e)) if is(e, &device) => tell(e),
                _ => continue, // removed meanwhile
            };
            match told {
                Ok(told) => tracing::info!(
                    "the storage of {name} was resized from {was} to {bytes} bytes: {told}"
                ),
                Err(e) => {
                    tracing::warn!("the storage of {name} was resized to {bytes} bytes, but {e}")
                }
            }
        }
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<ExportInfo> {
        let inner = self.lock();
        inner.slots.iter().map(|(n, s)| info(n, s)).collect()
    }

    /// One export.
    pub fn show(&self, name: &str) -> Result<ExportInfo, ApiError> {
        let inner = self.lock();
        inner
            .slots
            .get(name)
            .map(|s| info(name, s))
            .ok_or_else(|| not_found(name))
    }

    /// Takes every export down (in parallel) and refuses new ones. The record is kept: a
    /// restarted daemon serves the run-time exports again.
    pub fn shutdown(&self) {
        let exports: Vec<(String, Box<Export>)> = {
            let mut inner = self.lock();
            inner.closing = true;
            let names: Vec<String> = inner.slots.keys().cloned().collect();
            names
                .into_iter()
                .filter_map(|n| {
                    let slot = inner.slots.get_mut(&n)?;
                    match std::mem::replace(&mut slot.state, State::Stopping) {
                        State::Serving(e) => Some((n, e)),
                        other => {
                            slot.state = other;
                            None
                        }
                    }
                })
                .collect()
        };
        std::thread::scope(|s| {
            for (name, export) in exports {
                s.spawn(move || {
                    if let Err(e) = stop(*export) {
                        tracing::error!("{name}: {e}");
                    }
                    self.lock().slots.remove(&name);
                });
            }
        });
        // An add, a remove or a resize still under way (on a control client's thread)
        // finishes first: a VDUSE device half taken down would be left in the kernel, and a
        // storage call still running when the process exits races its library's teardown.
        let deadline = Instant::now() + IN_PROGRESS_WAIT;
        let busy = |inner: &Inner| {
            self.resizes.load(Ordering::SeqCst) > 0
                || inner
                    .slots
                    .values()
                    .any(|s| matches!(s.state, State::Starting | State::Stopping))
        };
        while busy(&self.lock()) {
            if Instant::now() > deadline {
                tracing::warn!("exiting with an add, a remove or a resize still under way");
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True if `blk`, the block device of export `name`, is in use (asked of the helper,
    /// which may open it; a helper that cannot be asked counts as in use).
    fn in_use(&self, name: &str, blk: &str) -> bool {
        match &self.helper {
            Some(helper) => helper.in_use(name).unwrap_or_else(|e| {
                tracing::warn!("{name}: cannot tell whether /dev/{blk} is in use: {e}");
                true
            }),
            None => in_use(blk),
        }
    }

    fn save_record(&self, inner: &Inner) {
        let specs = inner
            .slots
            .values()
            .filter(|s| s.runtime && !s.handed_over && !matches!(s.state, State::Stopping))
            .map(|s| &s.spec);
        if let Err(e) = self.record.save(specs) {
            tracing::error!(
                "cannot write the record of run-time exports: {e}: they will not be served \
                 again after a restart"
            );
        }
    }
}

/// True if `export` serves the disk `device` (not one added since under the same name).
fn is(export: &Export, device: &Arc<BlockDevice>) -> bool {
    export
        .device
        .block()
        .is_some_and(|b| Arc::ptr_eq(b, device))
}

/// Opens the backend and sets the transport up; a VDUSE device's privileged half is done by
/// `helper`, if there is one, else here, unless the device was handed over (`device`).
fn start(
    args: &ExportArgs,
    helper: Option<&Arc<Client>>,
    device: Option<File>,
    file: Option<File>,
) -> Result<Box<Export>, ApiError> {
    let (backend, opts, dev) = args.parts();
    let built =
        device::build(backend, opts, dev, file).map_err(|e| ApiError::new(Code::Backend, e))?;
    let serving = match args {
        ExportArgs::Vduse(a) => match (device, helper) {
            (Some(node), _) => Ok(Arc::new(HandedOver::new(&a.name, node)) as Arc<dyn Authority>),
            (None, Some(helper)) => Ok(helper.clone() as Arc<dyn Authority>),
            (None, None) => vudev_vduse::authority::Local::open()
                .map(|local| Arc::new(local) as Arc<dyn Authority>)
                .map_err(|e| e.to_string()),
        }
        .and_then(|authority| VduseServing::start(a, &built, authority))
        .map(Serving::Vduse),
        ExportArgs::VhostUser(a) => {
            VhostUserServing::start(a, &built, || {}).map(Serving::VhostUser)
        }
    }
    .map_err(|e| ApiError::new(Code::Transport, e))?;
    let file = backend
        .file
        .clone()
        .filter(|p| p.metadata().is_ok_and(|m| m.is_file()));
    Ok(Box::new(Export {
        file,
        device: built.device.clone(),
        serving,
    }))
}

fn stop(export: Export) -> Result<(), String> {
    match export.serving {
        Serving::Vduse(v) => v.stop(),
        Serving::VhostUser(v) => v.stop(),
    }
}

fn info(name: &str, slot: &Slot) -> ExportInfo {
    let mut i = ExportInfo {
        name: name.to_string(),
        transport: slot.transport.to_string(),
        state: "starting",
        backend: None,
        size: None,
        device: None,
        driver: None,
        socket: slot.socket.clone(),
        error: None,
        runtime: slot.runtime,
        handed_over: slot.handed_over,
        options: slot.spec.clone(),
    };
    match &slot.state {
        State::Starting => {}
        State::Stopping => i.state = "stopping",
        State::Failed(e) => {
            i.state = "failed";
            i.error = Some(e.clone());
        }
        State::Serving(export) => {
            match &export.device {
                Exported::Block(b) => {
                    i.backend = Some(b.describe());
                    i.size = Some(b.size());
                }
                Exported::Net(n) => i.backend = Some(n.describe()),
            }
            match &export.serving {
                Serving::Vduse(v) => {
                    i.state = "serving";
                    match v.attached() {
                        Some(Attached::Block(b)) => i.device = Some(format!("/dev/{b}")),
                        Some(Attached::Net(n)) => i.device = Some(n.clone()),
                        Some(Attached::Driver(d)) => i.driver = Some(d.clone()),
                        _ => {}
                    }
                }
                Serving::VhostUser(v) => {
                    i.state = if v.connected() {
                        "connected"
                    } else {
                        "waiting"
                    };
                    if let Some(e) = v.failure() {
                        i.state = "failed";
                        i.error = Some(e);
                    }
                }
            }
        }
    }
    i
}

/// A file's size, or a block device's (the end of either). A regular file this process may
/// not open (root opened a config export's for a daemon serving as a user) is asked for its
/// size without opening it.
fn file_size(path: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    match std::fs::File::open(path) {
        Ok(mut f) => f.seek(std::io::SeekFrom::End(0)),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let meta = std::fs::metadata(path)?;
            if meta.is_file() {
                Ok(meta.len())
            } else {
                Err(e)
            }
        }
        Err(e) => Err(e),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        Code::NotFound,
        format!("no export named {name}: `vudev ctl list` shows them"),
    )
}

fn shutting_down() -> ApiError {
    ApiError::new(Code::ShuttingDown, "the daemon is shutting down")
}

/// Tells an export's driver (or vhost-user frontend) that its capacity changed: what was
/// done, or why it could not be.
fn tell(export: &Export) -> Result<String, String> {
    match &export.serving {
        Serving::Vduse(v) => v
            .config_changed()
            .map(|()| "the driver was told".to_string()),
        Serving::VhostUser(v) => v.config_changed().map(|told| match told {
            true => "the frontend was told".to_string(),
            false => "no frontend to tell (the next one sees the new size)".to_string(),
        }),
    }
}

//! The privileged helper of a sandboxed process. `vudev export vduse --user U` and
//! `vudev serve` with a `user` start as root and fork before any thread exists: the parent
//! stays root and becomes this helper, the child gives up its privileges and serves the data.
//! The helper does only what needs privileges, when the child asks over a socket pair (one
//! request per packet, files passed with SCM_RIGHTS):
//!
//! create a device (for an export: the one its command line names; for the daemon: any, of
//! a name fit for a file name), of the device type served; open its node; put it on the vdpa
//! bus, take it off, tell whether its block device is in use, destroy it — and the last four
//! only for a device it created or opened. It opens only a device this export names, or (for
//! the daemon) one on its own list of the devices it created, which survives a restart. Once
//! a device is the child's, and only then, the helper opens its state file for the child and
//! passes it as an fd (the file stays root's). For the daemon, it also writes
//! the record of run-time exports, which the user may not write in the root-owned state
//! directory, and passes the daemon's notifications on to the service manager (which takes
//! them from its main process only). Anything else is refused and logged. No path is opened
//! on the child's behalf: files are opened before the fork, once, so that no path the child
//! could tamper with is ever opened by root for it.
//! The helper forwards SIGINT/SIGTERM to the child and
//! exits with the child's status; if it dies, the kernel kills the child (PDEATHSIG), and the
//! devices stay for the next vudev to adopt, as after any crash.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vduse::{DeviceConfig, VduseDevice, VduseError};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vudev_vduse::authority::Authority;
use vudev_vduse::TransportError;

/// The largest request or reply, in bytes: a config space is at most a few hundred, the
/// daemon's record of run-time exports some hundred per export (a packet socket's buffer
/// takes about 200 KiB).
const MAX_MESSAGE: usize = 192 << 10;

/// The most devices a daemon's helper creates.
const MAX_DEVICES: usize = 1024;

/// What the serving child asks of the helper.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Create the VDUSE device.
    Create {
        /// Device name.
        name: String,
        /// Virtio device id.
        device_id: u32,
        /// Virtio vendor id.
        vendor_id: u32,
        /// Offered features.
        features: u64,
        /// Number of queues.
        num_queues: u32,
        /// Queue alignment.
        vq_align: u32,
        /// Config space.
        config: Vec<u8>,
    },
    /// Open `/dev/vduse/NAME` (the reply carries the fd).
    Open {
        /// Device name.
        name: String,
    },
    /// Destroy the device and remove its state file.
    Destroy {
        /// Device name.
        name: String,
    },
    /// Put the device on the vdpa bus.
    Attach {
        /// Device name.
        name: String,
    },
    /// Take the device off the vdpa bus.
    Detach {
        /// Device name.
        name: String,
    },
    /// Open the device's state file (the reply carries the fd; the file stays root's).
    StateFile {
        /// Device name.
        name: String,
    },
    /// Is the device's block device in use (mounted, or held open exclusively)?
    InUse {
        /// Device name.
        name: String,
    },
    /// The daemon: replace its record of run-time exports with `text` (a JSON list).
    SaveRecord {
        /// The record.
        text: String,
    },
    /// The daemon: set its record aside (as `.json.bad`), for a person to look at.
    SetAsideRecord,
    /// The daemon: pass `state` on to the service manager (sd_notify).
    Notify {
        /// `KEY=VALUE` lines; only READY, STATUS, STOPPING and WATCHDOG go on.
        state: String,
    },
}

/// The helper's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// Done; the device node comes with the reply to `Open`.
    Done,
    /// `Create`: a device of that name exists.
    NameTaken,
    /// `Open`: another process holds the device.
    Busy,
    /// `InUse`: whether it is.
    Answer(bool),
    /// The request is not one this helper grants.
    Refused(String),
    /// Granted, but it failed: the errno if there is one, and what failed.
    Failed(Option<i32>, String),
}

/// Whose devices the helper may create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `vudev export`: the one device named on its command line.
    Export(String),
    /// `vudev serve`: the devices the daemon is asked for; and the daemon's record of its
    /// run-time exports, at this path.
    Daemon {
        /// The record's file.
        record: PathBuf,
        /// The helper's own list of the devices it created (JSON), the only existing ones
        /// a restarted daemon may take over.
        devices: PathBuf,
        /// Where the device nodes are (`/dev/vduse`).
        nodes: PathBuf,
    },
}

/// What the helper may do: decided from the command line (or the config) before the fork.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The devices it may create.
    pub scope: Scope,
    /// The virtio device ids they may be created with.
    pub device_ids: Vec<u32>,
    /// Where the devices' state files are (`NAME.state`), opened for the child once a device
    /// is its, and removed with the device.
    pub state_dir: PathBuf,
    /// Whom the serving process runs as.
    pub owner: super::Identity,
}

/// The helper's side: grants or refuses requests, and has `authority` do what it grants.
pub struct Helper<A: Authority> {
    policy: Policy,
    authority: A,
    /// The devices this helper created or opened: only those may it attach, detach or
    /// destroy.
    holds: BTreeSet<String>,
    /// Every device it created or opened: their state files go with them, at the end.
    seen: BTreeSet<String>,
    /// A daemon's: the devices it created and has not destroyed, across restarts (its
    /// list's contents), each with its node's identity when it was created.
    ours: BTreeMap<String, Option<NodeId>>,
}

/// A device node's inode and device numbers: a device destroyed and made again by someone
/// else under the same name has another node.
type NodeId = (u64, u64);

fn node_id(nodes: &Path, name: &str) -> Option<NodeId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(nodes.join(name))
        .ok()
        .map(|m| (m.ino(), m.rdev()))
}

impl<A: Authority> Helper<A> {
    /// A helper granting `policy`, doing the work with `authority`.
    pub fn new(policy: Policy, authority: A) -> Self {
        let mut helper = Helper {
            policy,
            authority,
            holds: BTreeSet::new(),
            seen: BTreeSet::new(),
            ours: BTreeMap::new(),
        };
        let Scope::Daemon { devices, nodes, .. } = &helper.policy.scope else {
            return helper;
        };
        let listed: BTreeMap<String, Option<NodeId>> = match std::fs::read(devices) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                let aside = devices.with_extension("json.bad");
                let _ = std::fs::rename(devices, &aside);
                tracing::warn!(
                    "helper: {} is not a list of devices ({e}): kept as {}; the devices of \
                     the daemon before this one are not taken over",
                    devices.display(),
                    aside.display()
                );
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        // Devices gone since (destroyed, or a reboot) are no longer ours, whoever makes one
        // of that name next.
        let before = listed.len();
        let ours: BTreeMap<String, Option<NodeId>> = listed
            .into_iter()
            .filter(|(name, _)| node_id(nodes, name).is_some())
            .collect();
        helper.ours = ours;
        if helper.ours.len() != before {
            let _ = helper.save_list();
        }
        helper
    }

    /// Writes a daemon's list of its devices.
    fn save_list(&self) -> io::Result<()> {
        let Scope::Daemon { devices, .. } = &self.policy.scope else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&self.ours).map_err(io::Error::other)?;
        crate::durable::replace_file(devices, &bytes).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot write {}: {e}", devices.display()))
        })
    }

    /// A daemon's helper lists a device before it creates it (a crash in between leaves a
    /// device the next daemon may take over), with its node once created (`Some(id)`); and
    /// unlists it (`None`) once destroyed, or when it could not be created.
    fn list(&mut self, name: &str, node: Option<Option<NodeId>>) -> io::Result<()> {
        if !matches!(self.policy.scope, Scope::Daemon { .. }) {
            return Ok(());
        }
        match node {
            Some(id) => self.ours.insert(name.to_string(), id),
            None => self.ours.remove(name),
        };
        self.save_list()
    }

    fn nodes(&self) -> &Path {
        match &self.policy.scope {
            Scope::Daemon { nodes, .. } => nodes,
            Scope::Export(_) => Path::new("/dev/vduse"),
        }
    }

    fn state_file(&self, name: &str) -> PathBuf {
        self.policy.state_dir.join(format!("{name}.state"))
    }

    /// Why `name` is not a device this helper may create or open, if it is not.
    fn not_grantable(&self, name: &str, open: bool) -> Option<String> {
        match &self.policy.scope {
            Scope::Export(mine) if name == mine => None,
            Scope::Export(mine) => {
                Some(format!("device '{name}': this export's device is '{mine}'"))
            }
            Scope::Daemon { .. } => {
                if let Err(why) = fit_for_a_file_name(name) {
                    return Some(format!("device {name:?}: {why}"));
                }
                if !open && self.ours.len() >= MAX_DEVICES {
                    return Some(format!(
                        "device {name}: {MAX_DEVICES} devices exist already"
                    ));
                }
                // Listed, with the node it had then (one made again by someone else under
                // that name has another).
                let listed = self
                    .ours
                    .get(name)
                    .is_some_and(|id| id.is_none() || *id == node_id(self.nodes(), name));
                if !open || self.holds.contains(name) || listed {
                    return None;
                }
                // Only a device this daemon's helper created (before a restart): not one of
                // another process, served or waiting to be handed over.
                Some(format!(
                    "open /dev/vduse/{name}: not a device this daemon created (its helper's list \
                     in {} does not have it)",
                    self.policy.state_dir.display()
                ))
            }
        }
    }

    /// Answers one request: the reply, and a file to pass with it.
    pub fn answer(&mut self, req: Request) -> (Reply, Option<File>) {
        let refused = |why: String| {
            tracing::warn!("helper: refused a request of the serving process: {why}");
            (Reply::Refused(why), None)
        };
        let failed = |e: TransportError| {
            let errno = match &e {
                TransportError::Vduse(v) => v.raw_os_error(),
                _ => None,
            };
            (Reply::Failed(errno, e.to_string()), None)
        };
        let record = match &self.policy.scope {
            Scope::Daemon { record, .. } => Some(record.clone()),
            Scope::Export(_) => None,
        };
        match req {
            Request::Create {
                name,
                device_id,
                vendor_id,
                features,
                num_queues,
                vq_align,
                config,
            } => {
                if let Some(why) = self.not_grantable(&name, false) {
                    return refused(format!("create {why}"));
                }
                if !self.policy.device_ids.contains(&device_id) {
                    return refused(format!(
                        "create '{name}' as virtio device {device_id}: only {:?} are granted",
                        self.policy.device_ids
                    ));
                }
                let cfg = DeviceConfig {
                    name,
                    vendor_id,
                    device_id,
                    features,
                    num_queues,
                    vq_align,
                    config,
                };
                let listed_before = self.ours.contains_key(&cfg.name);
                if !listed_before {
                    if let Err(e) = self.list(&cfg.name, Some(None)) {
                        let _ = self.list(&cfg.name, None);
                        return (Reply::Failed(e.raw_os_error(), e.to_string()), None);
                    }
                }
                let created = self.authority.create_device(&cfg);
                if created.is_err() && !listed_before {
                    let _ = self.list(&cfg.name, None);
                }
                match created {
                    Ok(()) => {
                        let node = node_id(self.nodes(), &cfg.name);
                        if let Err(e) = self.list(&cfg.name, Some(node)) {
                            tracing::warn!("helper: {e}");
                        }
                        self.holds.insert(cfg.name.clone());
                        self.seen.insert(cfg.name);
                        (Reply::Done, None)
                    }
                    Err(TransportError::Vduse(VduseError::NameTaken(_))) => {
                        (Reply::NameTaken, None)
                    }
                    Err(e) => failed(e),
                }
            }
            Request::Open { name } => {
                if let Some(why) = self.not_grantable(&name, true) {
                    return refused(format!("open {why}"));
                }
                match self.authority.open_device(&name) {
                    Ok(dev) => {
                        self.holds.insert(name.clone());
                        self.seen.insert(name);
                        (Reply::Done, Some(dev.into_file()))
                    }
                    Err(TransportError::Vduse(VduseError::Io { source, .. }))
                        if source.kind() == io::ErrorKind::ResourceBusy =>
                    {
                        (Reply::Busy, None)
                    }
                    Err(e) => failed(e),
                }
            }
            Request::Destroy { ref name }
            | Request::Attach { ref name }
            | Request::Detach { ref name }
            | Request::InUse { ref name }
            | Request::StateFile { ref name }
                if !self.holds.contains(name) =>
            {
                refused(format!(
                    "{req:?}: not a device this helper created or opened"
                ))
            }
            Request::SaveRecord { .. } | Request::SetAsideRecord | Request::Notify { .. }
                if record.is_none() =>
            {
                refused(format!(
                    "{req:?}: only the daemon has a record and a service manager"
                ))
            }
            Request::Destroy { name } => match self.authority.destroy_device(&name) {
                Ok(_) => {
                    let _ = std::fs::remove_file(self.state_file(&name));
                    self.holds.remove(&name);
                    self.seen.remove(&name);
                    if let Err(e) = self.list(&name, None) {
                        tracing::warn!("helper: {e}");
                    }
                    (Reply::Done, None)
                }
                // The caller retries while the kernel says busy (the errno goes with the reply).
                Err(e) => failed(e),
            },
            Request::Attach { name } => match self.authority.attach(&name) {
                Ok(()) => (Reply::Done, None),
                Err(e) => failed(e),
            },
            Request::Detach { name } => match self.authority.detach(&name) {
                Ok(()) => (Reply::Done, None),
                Err(e) => failed(e),
            },
            Request::StateFile { name } => {
                let path = self.state_file(&name);
                let opened = super::open_state_file(&path, self.policy.owner.uid).and_then(|f| {
                    // One the user was given once (`vudev vduse create --user`) is root's
                    // again: no other process of the user may write its records.
                    // SAFETY: fchown and fchmod on the fd `f` owns.
                    let root = unsafe {
                        libc::fchown(f.as_raw_fd(), 0, 0) == 0
                            && libc::fchmod(f.as_raw_fd(), 0o600) == 0
                    };
                    match root {
                        true => Ok(f),
                        false => Err(format!(
                            "cannot make {} root's: {}",
                            path.display(),
                            io::Error::last_os_error()
                        )),
                    }
                });
                match opened {
                    Ok(file) => (Reply::Done, Some(file)),
                    Err(e) => (Reply::Failed(None, e), None),
                }
            }
            Request::InUse { name } => {
                let busy = vdpa::sysfs::block_device_of(&name).is_some_and(|b| in_use(&b));
                (Reply::Answer(busy), None)
            }
            Request::SaveRecord { text } => {
                if serde_json::from_str::<Vec<serde_json::Map<String, serde_json::Value>>>(&text)
                    .is_err()
                {
                    return refused("a record that is not a list of exports".into());
                }
                let path = record.unwrap_or_default();
                match crate::durable::replace_file(&path, text.as_bytes()) {
                    Ok(()) => (Reply::Done, None),
                    Err(e) => (
                        Reply::Failed(e.raw_os_error(), format!("{}: {e}", path.display())),
                        None,
                    ),
                }
            }
            Request::SetAsideRecord => {
                let path = record.unwrap_or_default();
                match std::fs::rename(&path, path.with_extension("json.bad")) {
                    Ok(()) => (Reply::Done, None),
                    Err(e) => (Reply::Failed(e.raw_os_error(), e.to_string()), None),
                }
            }
            Request::Notify { state } => {
                let passed: Vec<&str> = state
                    .lines()
                    .filter(|l| {
                        ["READY=1", "STOPPING=1", "WATCHDOG=1"].contains(l)
                            || l.starts_with("STATUS=")
                    })
                    .collect();
                if !passed.is_empty() {
                    crate::notify::notify(&passed.join("\n"));
                }
                (Reply::Done, None)
            }
        }
    }

    /// The child is gone: a state file made for it goes too if its device does not exist
    /// (the export failed before creating it, or destroyed it).
    pub fn finish(&self) {
        let mut names: BTreeSet<&String> = self.seen.iter().collect();
        if let Scope::Export(mine) = &self.policy.scope {
            names.insert(mine);
        }
        for name in names {
            let node = Path::new(vduse::CONTROL_PATH).with_file_name(name);
            if !node.exists() {
                let _ = std::fs::remove_file(self.state_file(name));
            }
        }
    }

    /// Serves requests on `sock` until the child closes it.
    pub fn serve(&mut self, sock: &UnixDatagram) -> io::Result<()> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let n = match sock.recv(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let (reply, file) = match serde_json::from_slice::<Request>(&buf[..n]) {
                Ok(req) if n < MAX_MESSAGE => self.answer(req),
                _ => (Reply::Refused("a request that does not parse".into()), None),
            };
            let bytes = serde_json::to_vec(&reply).map_err(io::Error::other)?;
            let fds: Vec<RawFd> = file.iter().map(|f| f.as_raw_fd()).collect();
            sock.send_with_fds(&[&bytes[..]], &fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        }
    }
}

/// The child's side: the helper as an [`Authority`].
pub struct Client {
    sock: Mutex<UnixDatagram>,
    api_version: u64,
    features: u64,
}

impl Client {
    /// The client of the helper at the other end of `sock`.
    pub fn new(sock: UnixDatagram, api_version: u64, features: u64) -> Self {
        Client {
            sock: Mutex::new(sock),
            api_version,
            features,
        }
    }

    fn ask(&self, req: &Request) -> Result<(Reply, Option<File>), String> {
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        sock.send(&bytes)
            .map_err(|e| format!("cannot reach the privileged helper: {e}"))?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, file) = sock
            .recv_with_fd(&mut buf)
            .map_err(|e| format!("no answer from the privileged helper: {e}"))?;
        if n == 0 {
            return Err("the privileged helper has gone".into());
        }
        let reply = serde_json::from_slice(&buf[..n])
            .map_err(|e| format!("an answer of the privileged helper that does not parse: {e}"))?;
        Ok((reply, file))
    }

    fn done(&self, req: Request) -> Result<Option<File>, TransportError> {
        match self.ask(&req).map_err(TransportError::Helper)? {
            (Reply::Done, file) => Ok(file),
            (Reply::NameTaken, _) => Err(VduseError::NameTaken(name_of(&req)).into()),
            (Reply::Busy, _) => Err(VduseError::Io {
                op: format!("open /dev/vduse/{}", name_of(&req)),
                source: io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "another process is serving this device",
                ),
            }
            .into()),
            (Reply::Refused(why), _) => Err(TransportError::Helper(format!(
                "the privileged helper refused: {why}"
            ))),
            (Reply::Failed(Some(errno), why), _) => {
                let source = io::Error::from_raw_os_error(errno);
                let op = why.strip_suffix(&format!(": {source}")).unwrap_or(&why);
                Err(VduseError::Io {
                    op: op.to_string(),
                    source,
                }
                .into())
            }
            (Reply::Failed(None, why), _) => Err(TransportError::Helper(why)),
            (Reply::Answer(_), _) => Err(TransportError::Helper(
                "the privileged helper answered another question".into(),
            )),
        }
    }
}

fn name_of(req: &Request) -> String {
    match req {
        Request::Create { name, .. }
        | Request::Open { name }
        | Request::Destroy { name }
        | Request::Attach { name }
        | Request::Detach { name }
        | Request::InUse { name }
        | Request::StateFile { name } => name.clone(),
        Request::SaveRecord { .. } | Request::SetAsideRecord | Request::Notify { .. } => {
            String::new()
        }
    }
}

/// A device name the daemon's helper accepts: it names a file (`NAME.state`) in the state
/// directory, so nothing that could reach outside it.
fn fit_for_a_file_name(name: &str) -> Result<(), &'static str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    // NAME.state must fit in a file name (255 bytes).
    if name.is_empty() || name.len() > 249 || name.starts_with('.') || !name.chars().all(ok) {
        return Err("a device name is 1 to 249 of A-Z a-z 0-9 . _ - and does not start with '.'");
    }
    if name == "control" {
        return Err("/dev/vduse/control is VDUSE's own node");
    }
    Ok(())
}

/// True if a block device is held exclusively: mounted, or opened with O_EXCL.
pub fn in_use(blk: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_NONBLOCK)
        .open(format!("/dev/{blk}"))
        .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
}

impl Client {
    /// Whether the block device of `name` (a device the helper holds) is in use.
    pub fn in_use(&self, name: &str) -> Result<bool, String> {
        match self.ask(&Request::InUse { name: name.into() })? {
            (Reply::Answer(busy), _) => Ok(busy),
            (other, _) => Err(format!("the privileged helper answered {other:?}")),
        }
    }

    /// Has the helper replace the daemon's record with `text`.
    pub fn save_record(&self, text: String) -> io::Result<()> {
        self.plain(Request::SaveRecord { text })
    }

    /// Has the helper set the daemon's record aside.
    pub fn set_aside_record(&self) -> io::Result<()> {
        self.plain(Request::SetAsideRecord)
    }

    /// Has the helper pass `state` on to the service manager.
    pub fn notify(&self, state: &str) {
        if let Err(e) = self.plain(Request::Notify {
            state: state.into(),
        }) {
            tracing::warn!("cannot notify the service manager through the helper: {e}");
        }
    }

    fn plain(&self, req: Request) -> io::Result<()> {
        match self.ask(&req).map_err(io::Error::other)? {
            (Reply::Done, _) => Ok(()),
            (Reply::Failed(Some(errno), why), _) => Err(io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                why,
            )),
            (other, _) => Err(io::Error::other(format!(
                "the privileged helper answered {other:?}"
            ))),
        }
    }
}

impl Authority for Client {
    fn api_version(&self) -> u64 {
        self.api_version
    }

    fn vduse_features(&self) -> u64 {
        self.features
    }

    fn create_device(&self, cfg: &DeviceConfig) -> Result<(), TransportError> {
        self.done(Request::Create {
            name: cfg.name.clone(),
            device_id: cfg.device_id,
            vendor_id: cfg.vendor_id,
            features: cfg.features,
            num_queues: cfg.num_queues,
            vq_align: cfg.vq_align,
            config: cfg.config.clone(),
        })
        .map(drop)
    }

    fn open_device(&self, name: &str) -> Result<VduseDevice, TransportError> {
        match self.done(Request::Open { name: name.into() })? {
            Some(file) => Ok(VduseDevice::from_file(name, file)),
            None => Err(TransportError::Helper(
                "the privileged helper sent no device node".into(),
            )),
        }
    }

    fn destroy_device(&self, name: &str) -> Result<bool, TransportError> {
        // EBUSY comes back as an errno, for the caller's retries.
        self.done(Request::Destroy { name: name.into() })
            .map(|_| true)
    }

    fn attach(&self, name: &str) -> Result<(), TransportError> {
        self.done(Request::Attach { name: name.into() }).map(drop)
    }

    fn detach(&self, name: &str) -> Result<(), TransportError> {
        self.done(Request::Detach { name: name.into() }).map(drop)
    }

    /// The helper opens it in its own state directory, whatever `dir` the export has (the
    /// command line's, the same).
    fn open_state_file(&self, _dir: &Path, name: &str) -> Result<Option<File>, TransportError> {
        match self.done(Request::StateFile { name: name.into() })? {
            Some(file) => Ok(Some(file)),
            None => Err(TransportError::Helper(
                "the privileged helper sent no state file".into(),
            )),
        }
    }
}

/// A connected pair of packet sockets (SOCK_SEQPACKET: message boundaries kept, and end of
/// file when the other side closes), close-on-exec.
pub fn socket_pair() -> io::Result<(UnixDatagram, UnixDatagram)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array on success.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nobody else; UnixDatagram's calls (send, recv)
    // work on any connected unix socket.
    Ok(unsafe {
        (
            UnixDatagram::from_raw_fd(fds[0]),
            UnixDatagram::from_raw_fd(fds[1]),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use crate::sandbox::Identity;

    /// Counts what reaches it; creates and opens succeed (the node is /dev/null); a destroy
    /// is refused with EBUSY while `busy` is set.
    #[derive(Clone, Default)]
    struct Counting(Arc<AtomicUsize>, Arc<AtomicBool>);

    impl Counting {
        fn count(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Authority for Counting {
        fn api_version(&self) -> u64 {
            1
        }
        fn create_device(&self, _: &DeviceConfig) -> Result<(), TransportError> {
            self.count();
            Ok(())
        }
        fn open_device(&self, name: &str) -> Result<VduseDevice, TransportError> {
            self.count();
            Ok(VduseDevice::from_file(
                name,
                File::open("/dev/null").unwrap(),
            ))
        }
        fn destroy_device(&self, name: &str) -> Result<bool, TransportError> {
            self.count();
            if self.1.load(Ordering::SeqCst) {
                return Err(VduseError::Io {
                    op: format!("VDUSE_DESTROY_DEV '{name}'"),
                    source: io::Error::from_raw_os_error(libc::EBUSY),
                }
                .into());
            }
            Ok(true)
        }
        fn attach(&self, _: &str) -> Result<(), TransportError> {
            self.count();
            Ok(())
        }
        fn detach(&self, _: &str) -> Result<(), TransportError> {
            self.count();
            Ok(())
        }
    }

    fn me() -> Identity {
        // SAFETY: getuid/getgid have no preconditions.
        unsafe {
            Identity {
                uid: libc::getuid(),
                gid: libc::getgid(),
            }
        }
    }

    /// The helper of export "mine", whose state file is `state_file`.
    fn helper(state_file: &Path) -> (Helper<Counting>, Counting) {
        let authority = Counting::default();
        let helper = Helper::new(
            Policy {
                scope: Scope::Export("mine".into()),
                device_ids: vec![2],
                state_dir: state_file.parent().unwrap().to_path_buf(),
                owner: me(),
            },
            authority.clone(),
        );
        (helper, authority)
    }

    /// A daemon's helper, its state directory `dir`.
    fn daemon(dir: &Path) -> (Helper<Counting>, Counting) {
        let authority = Counting::default();
        let helper = Helper::new(
            Policy {
                scope: Scope::Daemon {
                    record: dir.join("record.json"),
                    devices: dir.join("devices.json"),
                    nodes: dir.join("nodes"),
                },
                device_ids: vec![2],
                state_dir: dir.to_path_buf(),
                owner: me(),
            },
            authority.clone(),
        );
        (helper, authority)
    }

    fn create(name: &str, device_id: u32) -> Request {
        Request::Create {
            name: name.into(),
            device_id,
            vendor_id: 0,
            features: 0,
            num_queues: 1,
            vq_align: 4096,
            config: vec![0; 60],
        }
    }

    fn refused(r: (Reply, Option<File>)) -> bool {
        matches!(r, (Reply::Refused(_), None))
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vudev-helper-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn what_the_command_line_did_not_name_is_refused() {
        let dir = scratch("policy");
        let state = dir.join("mine.state");
        let (mut h, authority) = helper(&state);
        let name = |n: &str| n.to_string();

        // Nothing created yet: no device to attach, detach or destroy.
        for req in [
            Request::Destroy { name: name("mine") },
            Request::Attach { name: name("mine") },
            Request::Detach { name: name("mine") },
        ] {
            assert!(refused(h.answer(req)));
        }
        // Another name, another device type.
        assert!(refused(h.answer(create("other", 2))));
        assert!(refused(h.answer(create("mine", 1))));
        assert!(refused(h.answer(Request::Open {
            name: name("vduse0")
        })));
        assert_eq!(
            authority.0.load(Ordering::SeqCst),
            0,
            "a refused request reached the kernel"
        );
        // No state file for a device not created or opened yet.
        assert!(refused(h.answer(Request::StateFile { name: name("mine") })));
        assert!(
            !state.exists(),
            "a state file made before the device was ours"
        );

        // What it was told to do is done; its state file is passed open, and stays root's.
        assert!(matches!(h.answer(create("mine", 2)), (Reply::Done, None)));
        assert!(matches!(
            h.answer(Request::StateFile { name: name("mine") }),
            (Reply::Done, Some(_))
        ));
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&state).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (me().uid, 0o600));
        assert!(matches!(
            h.answer(Request::Open { name: name("mine") }),
            (Reply::Done, Some(_))
        ));
        // Still only its own device.
        assert!(refused(h.answer(Request::Destroy {
            name: name("other")
        })));
        assert!(matches!(
            h.answer(Request::Destroy { name: name("mine") }),
            (Reply::Done, None)
        ));
        assert!(!state.exists(), "the state file outlived its device");
        // Destroyed: it holds nothing any more.
        assert!(refused(h.answer(Request::Attach { name: name("mine") })));
        assert_eq!(authority.0.load(Ordering::SeqCst), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_daemon_helper_grants_its_own_devices_only() {
        let dir = scratch("daemon");
        // The kernel's nodes (here plain files): one of another process's, one of the helper
        // before this one, and those this one will create.
        let nodes = dir.join("nodes");
        std::fs::create_dir(&nodes).unwrap();
        for n in ["theirs", "before", "disk1", "disk2"] {
            std::fs::write(nodes.join(n), b"").unwrap();
        }
        // What the helper before this one created (its list); "gone" was destroyed since.
        std::fs::write(
            dir.join("devices.json"),
            b"{\"before\": null, \"gone\": null}",
        )
        .unwrap();
        let (mut h, authority) = daemon(&dir);
        assert!(!std::fs::read_to_string(dir.join("devices.json"))
            .unwrap()
            .contains("gone"));
        let name = |n: &str| n.to_string();
        // Names that would put the state file outside the state directory, or none.
        for bad in ["../escape", "a/b", ".hidden", "", "x y", &"n".repeat(256)] {
            assert!(refused(h.answer(create(bad, 2))), "{bad:?}");
        }
        assert!(refused(h.answer(create("disk", 1))), "another device type");
        // An existing device is opened only if this daemon created it: not another's, even
        // with a root state file (a device waiting to be handed over, say).
        std::fs::write(dir.join("theirs.state"), b"").unwrap();
        assert!(refused(h.answer(Request::Open {
            name: name("theirs")
        })));
        assert!(refused(h.answer(Request::Open {
            name: name("control")
        })));
        assert_eq!(authority.0.load(Ordering::SeqCst), 0);
        assert!(matches!(
            h.answer(Request::Open {
                name: name("before")
            }),
            (Reply::Done, Some(_))
        ));
        // Any number of devices, each its own.
        for n in ["disk1", "disk2"] {
            assert!(matches!(h.answer(create(n, 2)), (Reply::Done, None)));
            // Its state file is root's again, even one given to a user before.
            std::fs::write(dir.join(format!("{n}.state")), b"").unwrap();
            std::os::unix::fs::chown(dir.join(format!("{n}.state")), Some(me().uid), None).unwrap();
            assert!(matches!(
                h.answer(Request::StateFile { name: name(n) }),
                (Reply::Done, Some(_))
            ));
            assert!(dir.join(format!("{n}.state")).exists());
        }
        assert!(refused(h.answer(Request::StateFile {
            name: name("theirs")
        })));
        assert!(matches!(
            h.answer(Request::InUse {
                name: name("disk1")
            }),
            (Reply::Answer(false), None)
        ));
        for req in [
            Request::InUse {
                name: name("theirs"),
            },
            Request::Attach {
                name: name("theirs"),
            },
            Request::Destroy {
                name: name("theirs"),
            },
        ] {
            assert!(refused(h.answer(req)));
        }
        assert!(matches!(
            h.answer(Request::Destroy {
                name: name("disk1")
            }),
            (Reply::Done, None)
        ));
        assert!(!dir.join("disk1.state").exists());
        assert!(refused(h.answer(Request::Attach {
            name: name("disk1")
        })));
        // The next daemon's helper takes over what this one created and did not destroy.
        let (mut next, _) = daemon(&dir);
        assert!(matches!(
            next.answer(Request::Open {
                name: name("disk2")
            }),
            (Reply::Done, Some(_))
        ));
        for gone in ["disk1", "theirs", "gone"] {
            assert!(refused(next.answer(Request::Open { name: name(gone) })));
        }
        // Destroyed by someone else and made again under that name: not ours.
        // (A file made while the old one exists has another inode.)
        std::fs::write(nodes.join("new"), b"").unwrap();
        std::fs::rename(nodes.join("new"), nodes.join("disk2")).unwrap();
        let (mut third, _) = daemon(&dir);
        assert!(refused(third.answer(Request::Open {
            name: name("disk2")
        })));
        // A list that does not parse is set aside, not trusted.
        std::fs::write(dir.join("devices.json"), b"[\"before\"]").unwrap();
        let (mut fourth, _) = daemon(&dir);
        assert!(refused(fourth.answer(Request::Open {
            name: name("before")
        })));
        assert!(dir.join("devices.json.bad").exists());

        // The record: a list of exports, nothing else, at the one path.
        assert!(refused(h.answer(Request::SaveRecord {
            text: "{\"not\": \"a list\"}".into()
        })));
        assert!(matches!(
            h.answer(Request::SaveRecord {
                text: "[{\"name\": \"a\"}]".into()
            }),
            (Reply::Done, None)
        ));
        assert_eq!(
            std::fs::read_to_string(dir.join("record.json")).unwrap(),
            "[{\"name\": \"a\"}]"
        );
        assert!(matches!(
            h.answer(Request::SetAsideRecord),
            (Reply::Done, None)
        ));
        assert!(dir.join("record.json.bad").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_export_helper_keeps_no_record_and_tells_no_manager() {
        let dir = scratch("norecord");
        let (mut h, _) = helper(&dir.join("mine.state"));
        for req in [
            Request::SaveRecord { text: "[]".into() },
            Request::SetAsideRecord,
            Request::Notify {
                state: "READY=1".into(),
            },
        ] {
            assert!(refused(h.answer(req)));
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_file_someone_planted_is_not_given_away() {
        let dir = scratch("planted");
        let target = dir.join("precious");
        std::fs::write(&target, b"root's").unwrap();
        // A symlink, and a hard link, where the state file goes.
        let state = dir.join("mine.state");
        std::os::unix::fs::symlink(&target, &state).unwrap();
        let (mut h, _) = helper(&state);
        let state_file = || Request::StateFile {
            name: "mine".into(),
        };
        assert!(matches!(h.answer(create("mine", 2)), (Reply::Done, None)));
        assert!(matches!(
            h.answer(state_file()),
            (Reply::Failed(None, _), None)
        ));
        std::fs::remove_file(&state).unwrap();
        std::fs::hard_link(&target, &state).unwrap();
        match h.answer(state_file()) {
            (Reply::Failed(None, why), None) => assert!(why.contains("one link"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"root's");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_child_asks_over_a_socket() {
        let dir = scratch("sock");
        let (ours, theirs) = socket_pair().unwrap();
        let (mut h, authority) = helper(&dir.join("mine.state"));
        let served = std::thread::spawn(move || h.serve(&theirs));

        // Garbage is refused, and the helper goes on.
        ours.send(b"{not json").unwrap();
        let mut buf = [0u8; 256];
        let n = ours.recv(&mut buf).unwrap();
        assert!(matches!(
            serde_json::from_slice(&buf[..n]).unwrap(),
            Reply::Refused(_)
        ));

        let client = Client::new(ours, 1, 0);
        let cfg = |name: &str| DeviceConfig {
            name: name.into(),
            vendor_id: 0,
            device_id: 2,
            features: 0,
            num_queues: 1,
            vq_align: 4096,
            config: vec![],
        };
        let e = client.create_device(&cfg("theirs")).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        client.create_device(&cfg("mine")).unwrap();
        client.open_device("mine").unwrap();
        // The kernel's EBUSY comes back as an errno, for the caller to retry on.
        authority.1.store(true, Ordering::SeqCst);
        let e = client.destroy_device("mine").unwrap_err();
        assert!(
            matches!(&e, TransportError::Vduse(v) if v.raw_os_error() == Some(libc::EBUSY)),
            "{e}"
        );
        authority.1.store(false, Ordering::SeqCst);
        assert!(client.destroy_device("mine").unwrap());
        // Closing our end ends the helper's loop.
        drop(client);
        served.join().unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

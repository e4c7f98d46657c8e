//! The privileged helper of a sandboxed VDUSE export. `vudev export vduse --user U` starts as
//! root and forks before any thread exists: the parent stays root and becomes this helper, the
//! child gives up its privileges and serves the data. The helper does only what needs
//! privileges, for the one export named on the command line, when the child asks over a
//! socket pair (one request per packet, files passed with SCM_RIGHTS):
//!
//! create that device (of the device type the command exports), open its node, put it on the
//! vdpa bus, take it off, destroy it — nothing else, and not before it created or opened it.
//! Once it did, and only then (it is then this export's device, not another's), it gives the
//! device's state file to the user. Anything else is refused and logged. The `--file` is not
//! the helper's business: it is opened before the fork, once, so that no path the child
//! could tamper with is ever opened by root on its behalf.
//! The helper forwards SIGINT/SIGTERM to the child and
//! exits with the child's status; if it dies, the kernel kills the child (PDEATHSIG), and the
//! device stays for the next vudev to adopt, as after any crash.

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

/// The largest request or reply, in bytes (a config space is at most a few hundred).
const MAX_MESSAGE: usize = 64 << 10;

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
    /// The request is not one this helper grants.
    Refused(String),
    /// Granted, but it failed: the errno if there is one, and what failed.
    Failed(Option<i32>, String),
}

/// What the helper may do: decided from the command line before the fork.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The one device name.
    pub name: String,
    /// The virtio device id it may be created with.
    pub device_id: u32,
    /// The device's state file, given to `owner` once the device is this export's, and
    /// removed with the device.
    pub state_file: Option<PathBuf>,
    /// Whom the serving process runs as.
    pub owner: super::Identity,
}

/// The helper's side: grants or refuses requests, and has `authority` do what it grants.
pub struct Helper<A: Authority> {
    policy: Policy,
    authority: A,
    /// True once this helper created or opened the device: only then may it attach, detach
    /// or destroy it.
    holds: bool,
}

impl<A: Authority> Helper<A> {
    /// A helper granting `policy`, doing the work with `authority`.
    pub fn new(policy: Policy, authority: A) -> Self {
        Helper {
            policy,
            authority,
            holds: false,
        }
    }

    /// Answers one request: the reply, and a file to pass with it.
    pub fn answer(&mut self, req: Request) -> (Reply, Option<File>) {
        let refused = |why: String| {
            tracing::warn!("helper: refused a request of the serving process: {why}");
            (Reply::Refused(why), None)
        };
        let name_ok = |name: &str| name == self.policy.name;
        let failed = |e: TransportError| {
            let errno = match &e {
                TransportError::Vduse(v) => v.raw_os_error(),
                _ => None,
            };
            (Reply::Failed(errno, e.to_string()), None)
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
                if !name_ok(&name) {
                    return refused(format!(
                        "create '{name}': this export's device is '{}'",
                        self.policy.name
                    ));
                }
                if device_id != self.policy.device_id {
                    return refused(format!(
                        "create '{name}' as virtio device {device_id}: this export is device {}",
                        self.policy.device_id
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
                match self.authority.create_device(&cfg) {
                    Ok(()) => match self.give_state_file() {
                        (Reply::Done, _) => {
                            self.holds = true;
                            (Reply::Done, None)
                        }
                        failed => {
                            // Not left created and unserved: the child gives up on it.
                            let _ = self.authority.destroy_device(&cfg.name);
                            failed
                        }
                    },
                    Err(TransportError::Vduse(VduseError::NameTaken(_))) => {
                        (Reply::NameTaken, None)
                    }
                    Err(e) => failed(e),
                }
            }
            Request::Open { name } => {
                if !name_ok(&name) {
                    return refused(format!(
                        "open /dev/vduse/{name}: this export's device is '{}'",
                        self.policy.name
                    ));
                }
                match self.authority.open_device(&name) {
                    Ok(dev) => {
                        self.holds = true;
                        match self.give_state_file() {
                            (Reply::Done, _) => (Reply::Done, Some(dev.into_file())),
                            refused => refused,
                        }
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
                if !name_ok(name) || !self.holds =>
            {
                refused(format!(
                    "{req:?}: not a device this helper created or opened"
                ))
            }
            Request::Destroy { name } => match self.authority.destroy_device(&name) {
                Ok(_) => {
                    if let Some(state) = &self.policy.state_file {
                        let _ = std::fs::remove_file(state);
                    }
                    self.holds = false;
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
        }
    }

    /// The state file made the user's, now that the device is this export's (created by it,
    /// or opened: which succeeds only when no other process serves it).
    fn give_state_file(&self) -> (Reply, Option<File>) {
        let Some(path) = &self.policy.state_file else {
            return (Reply::Done, None);
        };
        match super::give_state_file(path, self.policy.owner) {
            Ok(()) => (Reply::Done, None),
            Err(e) => (Reply::Failed(None, e), None),
        }
    }

    /// The child is gone: the state file made for it goes too if its device does not exist
    /// (the export failed before creating it, or destroyed it).
    pub fn finish(&self) {
        let node = Path::new(vduse::CONTROL_PATH).with_file_name(&self.policy.name);
        if let Some(state) = &self.policy.state_file {
            if !node.exists() {
                let _ = std::fs::remove_file(state);
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
        }
    }
}

fn name_of(req: &Request) -> String {
    match req {
        Request::Create { name, .. }
        | Request::Open { name }
        | Request::Destroy { name }
        | Request::Attach { name }
        | Request::Detach { name } => name.clone(),
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

    fn helper(state_file: &Path) -> (Helper<Counting>, Counting) {
        let authority = Counting::default();
        let helper = Helper::new(
            Policy {
                name: "mine".into(),
                device_id: 2,
                state_file: Some(state_file.to_path_buf()),
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
        assert!(
            !state.exists(),
            "the state file was given away before the device was ours"
        );

        // What it was told to do is done; the state file is the user's from then on.
        assert!(matches!(h.answer(create("mine", 2)), (Reply::Done, None)));
        assert!(state.exists());
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
    fn a_state_file_someone_planted_is_not_given_away() {
        let dir = scratch("planted");
        let target = dir.join("precious");
        std::fs::write(&target, b"root's").unwrap();
        // A symlink, and a hard link, where the state file goes.
        let state = dir.join("mine.state");
        std::os::unix::fs::symlink(&target, &state).unwrap();
        let (mut h, authority) = helper(&state);
        assert!(matches!(
            h.answer(create("mine", 2)),
            (Reply::Failed(None, _), None)
        ));
        // The device it created for nothing is destroyed again, and it holds nothing.
        assert_eq!(authority.0.load(Ordering::SeqCst), 2);
        assert!(refused(h.answer(Request::Attach {
            name: "mine".into()
        })));
        std::fs::remove_file(&state).unwrap();
        std::fs::hard_link(&target, &state).unwrap();
        let (mut h, _) = helper(&state);
        match h.answer(create("mine", 2)) {
            (Reply::Failed(None, why), None) => assert!(why.contains("one link"), "{why}"),
            other => panic!("{other:?}"),
        }
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

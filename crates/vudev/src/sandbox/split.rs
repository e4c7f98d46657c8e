//! Splitting a process that runs as `--user` (`vudev export vduse`, `vudev serve`) into the
//! privileged helper (the parent, which stays root) and the serving child (which gives its
//! privileges up). Done before any thread exists, so that the child's sandbox covers every
//! thread it will have.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use vudev_vduse::authority::{Authority, Local};
use vudev_vduse::TransportError;

use super::helper::{socket_pair, Client, Helper, Policy, Scope};
use super::{before_dropping, confine, Identity};
use crate::cli::{Switch, VduseArgs};

/// `vudev export vduse --user U`: the helper grants this export's device only. The child
/// gets the helper's client and `--file` (or `--net-tap`), opened by root.
pub fn fork_export(
    args: &VduseArgs,
    local: Local,
    id: Identity,
    sandbox: Switch,
) -> Result<(Client, Option<std::fs::File>), String> {
    let state_dir = super::state_dir(&args.state_dir)?;
    // The file is opened now, once, by root: not on the child's request later.
    let file = before_dropping(id, &args.backend, &args.backend_options, &args.device)?;
    if args.bounce_umem {
        raise_memlock();
    }
    let policy = Policy {
        scope: Scope::Export(args.name.clone()),
        device_ids: vec![match args.backend.net_tap {
            Some(_) => virtio_bindings::virtio_ids::VIRTIO_ID_NET,
            None => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
        }],
        state_dir,
        owner: id,
    };
    Ok((fork(policy, local, sandbox, Vec::new(), Vec::new())?, file))
}

/// The daemon's helper on a host without VDUSE: every device refused, saying why (its
/// vhost-user exports need none).
pub struct Unavailable(pub String);

impl Authority for Unavailable {
    fn api_version(&self) -> u64 {
        0
    }
    fn create_device(&self, _: &vduse::DeviceConfig) -> Result<(), TransportError> {
        Err(TransportError::Helper(self.0.clone()))
    }
    fn open_device(&self, _: &str) -> Result<vduse::VduseDevice, TransportError> {
        Err(TransportError::Helper(self.0.clone()))
    }
    fn destroy_device(&self, _: &str) -> Result<bool, TransportError> {
        Err(TransportError::Helper(self.0.clone()))
    }
    fn attach(&self, _: &str) -> Result<(), TransportError> {
        Err(TransportError::Helper(self.0.clone()))
    }
    fn detach(&self, _: &str) -> Result<(), TransportError> {
        Err(TransportError::Helper(self.0.clone()))
    }
}

/// Registering a bounce buffer (`--bounce-umem`) pins memory; only root may raise the hard
/// limit, so it is raised before the fork.
pub fn raise_memlock() {
    let inf = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) } != 0 {
        tracing::warn!(
            "cannot raise RLIMIT_MEMLOCK for --bounce-umem: {}",
            io::Error::last_os_error()
        );
    }
}

/// Forks. In the parent, closes `listeners` (the child's to serve: a client of a dead child
/// is refused rather than left waiting), serves the child's requests as `policy` grants until
/// the child exits, removes the unix sockets at `sockets` (bound before the fork, in a
/// directory the child may not write to) if they are still the ones bound, and exits with the
/// child's status (never returns). In the child, confines it as `policy.owner` and returns
/// the helper's client.
pub fn fork<A: Authority>(
    policy: Policy,
    local: A,
    sandbox: Switch,
    sockets: Vec<PathBuf>,
    listeners: Vec<RawFd>,
) -> Result<Client, String> {
    let id = policy.owner;
    let bound: Vec<(PathBuf, u64, u64)> = sockets
        .into_iter()
        .filter_map(|p| {
            let m = std::fs::symlink_metadata(&p).ok()?;
            Some((p, m.dev(), m.ino()))
        })
        .collect();
    let (api_version, features) = (local.api_version(), local.vduse_features());
    let (parent_end, child_end) = socket_pair().map_err(|e| format!("socketpair: {e}"))?;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    super::one_thread()?;
    // SAFETY: the process has one thread (checked just above), so the child may run any code.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", io::Error::last_os_error())),
        0 => {
            drop(parent_end);
            drop(local);
            detach_from_terminal()?;
            confine(Some(id), sandbox)?;
            // After the change of user, which clears it: die with the helper.
            // SAFETY: prctl with integer arguments; getppid has no preconditions.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
            }
            Ok(Client::new(child_end, api_version, features))
        }
        child => {
            drop(child_end);
            for fd in listeners {
                // SAFETY: the objects that own these fds live on the stack of a caller this
                // process never returns to (it exits below), so nothing uses them again.
                unsafe { libc::close(fd) };
            }
            let code = run_helper(Helper::new(policy, local), &parent_end, child);
            for (path, dev, ino) in bound {
                let same = std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| m.dev() == dev && m.ino() == ino);
                if same {
                    let _ = std::fs::remove_file(&path);
                }
            }
            std::process::exit(code)
        }
    }
}

/// A session of its own and stdin from /dev/null: the serving process cannot reach the
/// terminal of the root shell that started vudev (to type into it, TIOCSTI). Ctrl-C reaches
/// the helper, which passes it on.
fn detach_from_terminal() -> Result<(), String> {
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    // SAFETY: dup2 onto fd 0 and setsid, with plain integers; the File closes its own fd.
    unsafe {
        if libc::dup2(null.as_raw_fd(), 0) < 0 {
            return Err(format!("stdin: {}", io::Error::last_os_error()));
        }
        if libc::setsid() < 0 {
            return Err(format!("setsid: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The helper's life: requests answered until the child closes its end, SIGINT/SIGTERM passed
/// on to it; then the child's exit status as ours.
fn run_helper<A: Authority>(
    mut helper: Helper<A>,
    sock: &std::os::unix::net::UnixDatagram,
    child: i32,
) -> i32 {
    // SIGINT/SIGTERM are blocked (inherited mask): a thread of the helper's own takes them
    // and passes them on to the child, through a pidfd, which names that very process even
    // after it is reaped (no signal to a recycled pid).
    // SAFETY: pidfd_open with a pid and no flags.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child, 0) } as i32;
    let pidfd_error = io::Error::last_os_error();
    let forwarder = std::thread::Builder::new()
        .name("vudev-helper-signals".into())
        .spawn(move || loop {
            match crate::signals::wait_termination_for(std::time::Duration::from_secs(3600)) {
                Ok(Some(sig)) => {
                    // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
                    let sent = unsafe {
                        libc::syscall(libc::SYS_pidfd_send_signal, pidfd, sig, 0usize, 0)
                    };
                    if sent != 0 {
                        return;
                    }
                }
                Ok(None) => {}
                Err(_) => return,
            }
        });
    if pidfd < 0 || forwarder.is_err() {
        let why = match forwarder {
            Err(e) => e,
            Ok(_) => pidfd_error,
        };
        tracing::error!(
            "helper: cannot pass signals on to the serving process ({why}): stopping it"
        );
        // SAFETY: kill(2) to our own child, not reaped yet.
        unsafe { libc::kill(child, libc::SIGTERM) };
    }
    if let Err(e) = helper.serve(sock) {
        tracing::error!("helper: the socket to the serving process failed: {e}");
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child, writing an int we own.
    while unsafe { libc::waitpid(child, &mut status, 0) } < 0 {
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
    helper.finish();
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        let sig = libc::WTERMSIG(status);
        tracing::error!(
            "the serving process died of signal {sig}{}: the device stays, and running the same \
             command again adopts it",
            if sig == libc::SIGSYS {
                " (a system call outside the sandbox's allowlist; --sandbox off to debug)"
            } else {
                ""
            }
        );
        128 + sig
    }
}

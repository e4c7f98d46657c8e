//! Least privilege for the process that serves data: everything that reads a peer's input (a
//! driver's rings, a vhost-user frontend, an NBD server, a Ceph cluster) runs as `--user`,
//! with no capabilities, no_new_privs and a seccomp allowlist. What needs privileges stays
//! with a helper process ([`helper`]), or with whoever handed the device over
//! (`--device-fd`).

pub mod helper;
mod seccomp;
pub mod split;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vudev_vduse::authority::{Authority, Local};

use crate::cli::{BackendArgs, BackendOptions, DeviceArgs, SandboxArgs, Switch, VduseArgs};

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Whom to become.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl SandboxArgs {
    /// The identity `--user`/`--group` name, if any.
    pub fn identity(&self) -> Result<Option<Identity>, String> {
        let Some((uid, primary)) = self.user else {
            return Ok(None);
        };
        let gid = self.group.or(primary).ok_or_else(|| {
            format!("user {uid} has no entry in the user database: name its group with --group")
        })?;
        Ok(Some(Identity { uid, gid }))
    }
}

/// Makes this process the confined one: becomes `identity` (with no supplementary groups and
/// no capabilities left in any set), then, with `--sandbox on`, sets no_new_privs and the
/// seccomp allowlist. Must run while the process has one thread: threads started later
/// inherit all of it, threads started earlier would not.
pub fn confine(identity: Option<Identity>, sandbox: Switch) -> Result<(), String> {
    one_thread()?;
    if let Some(id) = identity {
        become_user(id)?;
        // Whatever --sandbox says: no exec of a set-user-ID program gives root back.
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(format!("no_new_privs: {}", io::Error::last_os_error()));
        }
    }
    if sandbox == Switch::On {
        seccomp::apply()?;
    }
    if let Some(id) = identity {
        tracing::info!(
            uid = id.uid,
            gid = id.gid,
            seccomp = sandbox == Switch::On,
            "serving as an unprivileged user"
        );
    }
    Ok(())
}

/// Fails unless this process has a single thread.
pub fn one_thread() -> Result<(), String> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .map_err(|e| format!("cannot count this process's threads in /proc/self/task: {e}"))?;
    if threads != 1 {
        return Err(format!(
            "internal error: the sandbox must be entered with one thread, not {threads}"
        ));
    }
    Ok(())
}

fn become_user(id: Identity) -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // Empty the bounding set first (needs CAP_SETPCAP, which we still have as root): nothing
    // run later could regain a capability even without no_new_privs.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break; // past the last capability this kernel knows
            }
            return Err(format!(
                "--user needs vudev started as root (dropping capability {cap}: {e})"
            ));
        }
    }
    // SAFETY: setgroups with an empty list, then set*id with plain integers.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os("setgroups"));
        }
        if libc::setresgid(id.gid, id.gid, id.gid) != 0 {
            return Err(os("setresgid"));
        }
        // Leaving uid 0 clears the permitted, effective and ambient capabilities...
        if libc::setresuid(id.uid, id.uid, id.uid) != 0 {
            return Err(os("setresuid"));
        }
    }
    // ...but not the inheritable ones: cleared too (lowering needs no privilege).
    let mut header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two data structs, as version 3 defines them.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(os("capset"));
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let left = status
        .lines()
        .filter(|l| {
            ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:", "CapBnd:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|v| !v.trim_start_matches('0').is_empty())
        });
    if left {
        return Err("capabilities are left after changing user: refusing to serve".into());
    }
    Ok(())
}

/// How a VDUSE export gets its privileged work done, and this process confined: with
/// `--device-fd` the device is handed over and nothing is privileged; with `--user` a helper
/// process is forked (this function returns only in the child); otherwise this process does it
/// itself.
/// Also returns `--file`, if root opened it for the user.
pub fn vduse_authority(
    args: &VduseArgs,
    device_fd: Option<i32>,
    sandbox: &SandboxArgs,
) -> Result<(Arc<dyn Authority>, Option<File>), String> {
    let identity = sandbox.identity()?;
    if let Some(fd) = device_fd {
        let node = handed_over(fd, &args.name)?;
        let file = match identity {
            Some(id) => before_dropping(id, &args.backend, &args.backend_options, &args.device)?,
            None => None,
        };
        confine(identity, sandbox.sandbox)?;
        let a = vudev_vduse::authority::HandedOver::new(&args.name, node);
        return Ok((Arc::new(a), file));
    }
    let local = Local::open().map_err(|e| e.to_string())?;
    let Some(id) = identity else {
        confine(None, sandbox.sandbox)?;
        return Ok((Arc::new(local), None));
    };
    let (client, file) = split::fork_export(args, local, id, sandbox.sandbox)?;
    Ok((Arc::new(client), file))
}

/// Takes `fd` as `/dev/vduse/NAME`: it must be that node.
fn handed_over(fd: i32, name: &str) -> Result<std::fs::File, String> {
    if std::fs::read_link(format!("/proc/self/fd/{fd}")).is_err() {
        return Err(format!("--device-fd {fd}: no such open file descriptor"));
    }
    // SAFETY: the fd is open (its /proc link exists) and the command line gives it to us;
    // nothing else in this process uses it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    // Not inherited by anything this process might start.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    check_device_node(&file, name).map_err(|e| format!("--device-fd {fd}: {e}"))?;
    Ok(file)
}

/// Checks that `file` is `/dev/vduse/NAME`, open for reading and writing: a device handed
/// over (`--device-fd`, or with the API's `add`).
pub fn check_device_node(file: &std::fs::File, name: &str) -> Result<(), String> {
    let fd = file.as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|e| e.to_string())?;
    let want = format!("/dev/vduse/{name}");
    if link != Path::new(&want) {
        return Err(format!(
            "{} is not {want}: hand over the node of the device named by --name",
            link.display()
        ));
    }
    // The path is the kernel's name for it, which another mount namespace can imitate: the
    // node must also be a character device of VDUSE's (the control node's major).
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let vduse_major = std::fs::metadata(vduse::CONTROL_PATH)
        .map(|m| libc::major(m.rdev()))
        .map_err(|e| format!("{}: {e}", vduse::CONTROL_PATH))?;
    if !meta.file_type().is_char_device() || libc::major(meta.rdev()) != vduse_major {
        return Err(format!("{want} is not a VDUSE device node"));
    }
    // SAFETY: fcntl on an fd `file` owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDWR {
        return Err(format!(
            "{want} must be open for reading and writing (e.g. `3<>{want}`)"
        ));
    }
    Ok(())
}

/// What root does for a process about to become `id`, which it could not do itself: opens
/// `--file` (now, once, as the export will use it: the file is returned, for the backend),
/// or opens `--net-tap` and gives it its MTU (both need CAP_NET_ADMIN for a TAP that is not
/// the user's: the open TAP is returned), and makes the user's RBD record directory.
pub fn before_dropping(
    id: Identity,
    backend: &BackendArgs,
    opts: &BackendOptions,
    dev: &DeviceArgs,
) -> Result<Option<File>, String> {
    if backend.rbd.is_some() {
        give_rbd_records(id)?;
    }
    if let Some(name) = &backend.net_tap {
        // A multi-queue TAP needs an fd per queue: the user's own TAP, opened by the user.
        if dev.num_queues > 1 {
            return Ok(None);
        }
        return open_tap(name, opts, dev).map(Some);
    }
    Ok(open_file_first(backend, opts, dev))
}

/// Opens the TAP `name` now, as root, and gives it the export's MTU: both need
/// CAP_NET_ADMIN for a TAP that is not the serving user's.
fn open_tap(name: &str, opts: &BackendOptions, dev: &DeviceArgs) -> Result<File, String> {
    let cfg = crate::device::net_config(name, opts, dev)?;
    let tap = vudev_net::tap::Tap::open(name).map_err(|e| e.to_string())?;
    if tap.mtu().map_err(|e| e.to_string())? != cfg.mtu {
        tap.set_mtu(cfg.mtu).map_err(|e| e.to_string())?;
    }
    Ok(tap.into_file())
}

/// Opens a backend's `--file` (or `--net-tap`) now, as root, as the export will use it.
/// `None` if there is none, or it cannot be opened now: the backend then opens it itself,
/// as the serving user, whose error the export reports.
pub fn open_file_first(
    backend: &BackendArgs,
    opts: &BackendOptions,
    dev: &DeviceArgs,
) -> Option<File> {
    if let Some(name) = &backend.net_tap {
        return (dev.num_queues == 1)
            .then(|| open_tap(name, opts, dev).ok())
            .flatten();
    }
    let path = backend.file.as_ref()?;
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!dev.readonly);
    let direct = if opts.direct { libc::O_DIRECT } else { 0 };
    o.custom_flags(libc::O_CLOEXEC | direct);
    o.open(path).ok()
}

/// Makes `dir` (the state directory) if it is missing, root's and 0755 whatever the umask,
/// and checks that only root can change what is in it: it and every directory above it are
/// root's and writable by nobody else (or sticky, as /tmp is, above it). The root helper
/// works in it by path for a process that may be hostile, which must not be able to swap a
/// directory or plant a file there. Returns the path with its symlinks resolved, to be used
/// from then on.
pub fn state_dir(dir: &Path) -> Result<PathBuf, String> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| format!("cannot make {} 0755: {e}", dir.display()))?;
    }
    let real = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    use std::os::unix::fs::MetadataExt;
    for (i, d) in real.ancestors().enumerate() {
        let m = std::fs::symlink_metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        let shared = m.mode() & 0o022 != 0 && (i == 0 || m.mode() & 0o1000 == 0);
        if m.uid() != 0 || shared {
            return Err(format!(
                "{}: the state directory {} must be root's and writable by root only, as \
                 must every directory above it (this one is uid {}, mode {:o}): the user \
                 could otherwise swap it or plant files in it; pass another --state-dir",
                d.display(),
                real.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(real)
}

/// Opens (making it if missing, root's and 0600) a device's state file for the process that
/// serves it. Refused for anything but a regular file of one link belonging to root or to
/// `uid` (served before by that user, or handed to it by `vudev vduse create --user`): never
/// a file someone planted or linked there.
pub fn open_state_file(path: &Path, uid: u32) -> Result<std::fs::File, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    use std::os::unix::fs::MetadataExt;
    if !meta.is_file() || meta.nlink() != 1 || (meta.uid() != 0 && meta.uid() != uid) {
        return Err(format!(
            "{} is not a state file vudev made for uid {uid} (a regular file of one link owned \
             by root or by that uid; this one is owned by uid {}: served before with another \
             --user? then serve it as that user, or remove the file, losing its records)",
            path.display(),
            meta.uid()
        ));
    }
    Ok(file)
}

/// Gives a device's state file to the user that serves it (making it if missing), for a
/// device handed over (`vudev vduse create --user`): the user opens it by path, in a
/// directory it may not write to. Refused as [`open_state_file`] refuses.
pub fn give_state_file(path: &Path, id: Identity) -> Result<(), String> {
    let file = open_state_file(path, id.uid)?;
    // SAFETY: fchown on an fd we own.
    if unsafe { libc::fchown(file.as_raw_fd(), id.uid, id.gid) } != 0 {
        return Err(format!(
            "cannot give {} to uid {}: {}",
            path.display(),
            id.uid,
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Makes the user's RBD record directory (`vudev_blk::rbd_records_dir`), which it cannot make
/// itself under the root-owned /run/vudev: without it, a restarted vudev would wait for the
/// cluster to drop its dead predecessor's lock.
pub fn give_rbd_records(id: Identity) -> Result<(), String> {
    let dir = vudev_blk::rbd_records_dir(id.uid);
    if let Some(parent) = dir.parent() {
        state_dir(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory: remove it", dir.display()));
    }
    std::os::unix::fs::lchown(&dir, Some(id.uid), Some(id.gid))
        .map_err(|e| format!("cannot give {} to uid {}: {e}", dir.display(), id.uid))
}

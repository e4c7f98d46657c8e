//! Placing a listening unix socket: the vhost-user sockets and the daemon's control socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Who may connect to a listening socket: its file mode and, if given, its owner and group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// The file mode (0600: the owner only).
    pub mode: u32,
    /// The owning user's id (`None`: the process's).
    pub uid: Option<u32>,
    /// The owning group's id (`None`: the process's).
    pub gid: Option<u32>,
}

impl Access {
    /// `mode`, owned by this process.
    pub fn mode(mode: u32) -> Access {
        Access {
            mode,
            ..Access::default()
        }
    }
}

/// Listens on `path` with the file mode, owner and group of `access`. A stale socket that nobody listens on (left by a
/// process that died) is replaced; a live one, or a file that is not a socket, is refused. A
/// missing parent directory (`/run/vudev` on a fresh host) is made, as a tmpfiles entry would.
/// The socket appears already listening and with its final mode, never before. Errors say
/// what to do; the caller says which socket they are about.
pub fn bind_listener(path: &Path, access: Access) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "it exists and is not a socket: remove it or pick another path",
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is serving this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create its directory {}: {e}: create it (mkdir -p {}) or pick \
                         another path",
                        dir.display(),
                        dir.display()
                    ),
                )
            })?;
            tracing::info!("created {} for the socket", dir.display());
        }
    }
    // Bind under a temporary name, set the owner and mode, then rename into place.
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let owned = match (access.uid, access.gid) {
        (None, None) => Ok(()),
        (uid, gid) => std::os::unix::fs::lchown(&tmp, uid, gid),
    };
    let placed = owned
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(access.mode)))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// A user's id, by name or number.
pub fn user_id(user: &str) -> Result<u32, String> {
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(uid);
    }
    let name = std::ffi::CString::new(user).map_err(|_| format!("invalid user name '{user}'"))?;
    // SAFETY: a zeroed `passwd` is a valid out value for getpwnam_r to fill.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16384];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `pwd`.
    let r = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 || found.is_null() {
        return Err(format!(
            "no such user '{user}': create it (useradd --system {user}) or name another"
        ));
    }
    Ok(pwd.pw_uid)
}

/// A group's id, by name or number.
pub fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name =
        std::ffi::CString::new(group).map_err(|_| format!("invalid group name '{group}'"))?;
    // SAFETY: a zeroed `group` is a valid out value for getgrnam_r to fill.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16384];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `grp`.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 || found.is_null() {
        return Err(format!(
            "no such group '{group}': create it (groupadd {group}) or name another"
        ));
    }
    Ok(grp.gr_gid)
}

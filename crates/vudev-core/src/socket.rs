//! Placing a listening unix socket: the vhost-user sockets and the daemon's control socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Who may connect to a listening socket: its file mode and, if given, its owner and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
            uid: None,
            gid: None,
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
    // Bind inside a private directory (0700, ours) next to it, set the owner and mode
    // there, then rename into place: nobody can connect before the final mode is set, nor
    // swap the socket for a symlink that chmod would follow.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = PrivateDir::new(dir)?;
    let tmp = private.0.join("s");
    let listener = UnixListener::bind(&tmp)?;
    if access.uid.is_some() || access.gid.is_some() {
        std::os::unix::fs::lchown(&tmp, access.uid, access.gid).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot give it to {}{}: {e}: run vudev as root (CAP_CHOWN), or name a \
                     group vudev's user is in",
                    access.uid.map_or(String::new(), |u| format!("uid {u} ")),
                    access.gid.map_or(String::new(), |g| format!("gid {g}")),
                ),
            )
        })?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(access.mode))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

/// A directory of our own (mkdtemp: mode 0700), removed with what is left in it on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new(parent: &Path) -> io::Result<PrivateDir> {
        let template = parent.join(".vuXXXXXX");
        let mut bytes = template.into_os_string().into_encoded_bytes();
        bytes.push(0);
        // SAFETY: `bytes` is a NUL-terminated template ending in XXXXXX, which mkdtemp
        // rewrites in place.
        if unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) }.is_null() {
            return Err(io::Error::last_os_error());
        }
        bytes.pop();
        // SAFETY: the bytes came from an OsString, with ASCII replaced by ASCII.
        let path = unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(bytes) };
        Ok(PrivateDir(PathBuf::from(path)))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join("s"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `name` for the C library: refused if it holds a NUL.
fn c_name(name: &str) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(name).map_err(|_| format!("invalid name '{name}': it holds a NUL"))
}

/// Looks an entry up with a getpwnam_r-style call (the key captured by `call`), growing the
/// buffer while it is too small. `Ok(None)`: no such entry.
fn lookup<T, I>(
    call: impl Fn(*mut T, *mut libc::c_char, usize, *mut *mut T) -> i32,
    id: impl Fn(&T) -> I,
) -> io::Result<Option<I>> {
    let mut len = 16 << 10;
    loop {
        // SAFETY: a zeroed passwd or group is a valid out value for the call to fill.
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut buf = vec![0u8; len];
        let mut found: *mut T = std::ptr::null_mut();
        let r = call(&mut entry, buf.as_mut_ptr().cast(), len, &mut found);
        match r {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some(id(&entry))),
            libc::ERANGE if len < 4 << 20 => len *= 4,
            r => return Err(io::Error::from_raw_os_error(r)),
        }
    }
}

/// An id given as a number: any but the -1 that chown takes as "leave it".
fn number(s: &str) -> Option<u32> {
    s.parse::<u32>().ok().filter(|&n| n != u32::MAX)
}

/// A user's id, by name or number.
pub fn user_id(user: &str) -> Result<u32, String> {
    user_and_group(user).map(|(uid, _)| uid)
}

/// A user's id and, if the user has an entry in the user database, its primary group.
pub fn user_and_group(user: &str) -> Result<(u32, Option<u32>), String> {
    let name = c_name(user)?;
    let found = lookup(
        |e, b, l, f| {
            // SAFETY: `lookup` passes pointers valid for the call, and a buffer that
            // outlives the entry it fills; `name` is NUL-terminated.
            unsafe { libc::getpwnam_r(name.as_ptr(), e, b, l, f) }
        },
        |p: &libc::passwd| (p.pw_uid, Some(p.pw_gid)),
    );
    match found {
        Ok(Some(ids)) => Ok(ids),
        Ok(None) => match number(user) {
            // A uid: its entry, if it has one, gives the primary group.
            Some(uid) => Ok((uid, primary_group_of(uid))),
            None => Err(format!(
                "no such user '{user}': create it (useradd --system '{user}') or name another"
            )),
        },
        Err(e) => Err(format!("cannot look up user '{user}': {e}")),
    }
}

/// The primary group of the user with id `uid`, if the user database has it.
fn primary_group_of(uid: u32) -> Option<u32> {
    lookup(
        |e, b, l, f| {
            // SAFETY: `lookup` passes pointers valid for the call, and a buffer that
            // outlives the entry it fills.
            unsafe { libc::getpwuid_r(uid, e, b, l, f) }
        },
        |p: &libc::passwd| p.pw_gid,
    )
    .ok()
    .flatten()
}

/// A group's id, by name or number.
pub fn group_id(group: &str) -> Result<u32, String> {
    let name = c_name(group)?;
    let found = lookup(
        |e, b, l, f| {
            // SAFETY: as in `user_and_group`.
            unsafe { libc::getgrnam_r(name.as_ptr(), e, b, l, f) }
        },
        |g: &libc::group| g.gr_gid,
    );
    match found {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => number(group).ok_or_else(|| {
            format!("no such group '{group}': create it (groupadd '{group}') or name another")
        }),
        Err(e) => Err(format!("cannot look up group '{group}': {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_by_name_and_by_number_with_their_group() {
        assert_eq!(user_and_group("root"), Ok((0, Some(0))));
        // A uid that has an entry gives its primary group too.
        assert_eq!(user_and_group("0"), Ok((0, Some(0))));
        // One that has none is still a uid, with no group to take.
        assert_eq!(user_and_group("4000000"), Ok((4000000, None)));
        assert!(user_and_group("no-such-user-here").is_err());
        assert_eq!(group_id("0"), Ok(0));
    }
}

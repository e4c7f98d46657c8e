//! Placing a listening unix socket: the vhost-user sockets and the daemon's control socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Listens on `path` with file mode `mode`. A stale socket that nobody listens on (left by a
/// process that died) is replaced; a live one, or a file that is not a socket, is refused. A
/// missing parent directory (`/run/vudev` on a fresh host) is made, as a tmpfiles entry would.
/// The socket appears already listening and with its final mode, never before. Errors say
/// what to do; the caller says which socket they are about.
pub fn bind_listener(path: &Path, mode: u32) -> io::Result<UnixListener> {
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
    // Bind under a temporary name, set the mode, then rename into place.
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

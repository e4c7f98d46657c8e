//! The listening socket: frontends served one after another, each in a session of its own.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use vmm_sys_util::eventfd::EventFd;

use vudev_core::{Device, WorkerOptions};

use crate::session::{lock, Session};
use crate::status::status_message;

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
        // Errors name what to do; the caller says which socket they are about.
        let path = opts.socket.clone();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "it exists and is not a socket: remove it or pick another path",
                ));
            }
            if UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is serving this socket",
                ));
            }
            std::fs::remove_file(&path)?;
        }
        // A directory that does not exist yet (/run/vudev on a fresh host) is made, as the
        // daemon's tmpfiles entry would.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "cannot create its directory {}: {e}: create it (mkdir -p {}) or \
                             pick another path",
                            dir.display(),
                            dir.display()
                        ),
                    )
                })?;
                tracing::info!("created {} for the socket", dir.display());
            }
        }
        // Bind under a temporary name, set the mode, then rename into place: the socket
        // appears listening and with its final permissions, never before.
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let placed =
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(opts.socket_mode))
                .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
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

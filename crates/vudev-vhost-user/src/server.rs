//! The listening socket: frontends served one after another, each in a session of its own.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use vmm_sys_util::eventfd::EventFd;

use vudev_core::readiness::{poll, pollfd};
use vudev_core::socket::{bind_listener, Access};
use vudev_core::{Device, WorkerOptions};

use crate::backend_channel::take_channel;
use crate::frontend_channel::FrontendChannel;
use crate::session::{lock, Session};
use crate::status::status_message;
use crate::vring_enable::early_vring_enable;

/// Options of a vhost-user export that are not the device's.
#[derive(Clone, Debug)]
pub struct VhostUserOptions {
    /// Socket path.
    pub socket: PathBuf,
    /// Mode, owner and group of the socket file.
    pub socket_access: Access,
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
    connected: AtomicBool,
    channel: FrontendChannel,
}

impl VhostUserServer {
    /// Listens on the socket (see [`bind_listener`]: a stale one is replaced) with the
    /// requested mode.
    pub fn bind(device: Arc<dyn Device>, opts: &VhostUserOptions) -> io::Result<Self> {
        let path = opts.socket.clone();
        let listener = bind_listener(&path, opts.socket_access)?;
        Ok(VhostUserServer {
            listener,
            path,
            device,
            opts: opts.clone(),
            connected: AtomicBool::new(false),
            channel: FrontendChannel::default(),
        })
    }

    /// Tells the connected frontend that the device's config space changed (an online
    /// resize): false if no frontend is connected or it gave no channel for that.
    pub fn config_changed(&self) -> io::Result<bool> {
        self.channel.config_changed()
    }

    /// True while a frontend is being served.
    pub fn frontend_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
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
            self.connected.store(true, Ordering::Relaxed);
            let ended = serve_frontend(
                self.device.clone(),
                self.opts.queue_size,
                &self.opts.workers,
                stream,
                stop,
                Some(&self.listener),
                &self.channel,
            );
            self.connected.store(false, Ordering::Relaxed);
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

/// How long one message may take to arrive whole, or one reply to be taken.
const MESSAGE_DEADLINE: Duration = Duration::from_secs(5);

/// How a frontend's session ended.
pub struct SessionEnd {
    /// `stop` became readable: the server is to exit.
    pub stopped: bool,
    /// A connection that arrived in the session's last [`SECOND_FRONTEND_GRACE`]: the next
    /// frontend, to be served now.
    pub waiting: Option<UnixStream>,
}

impl SessionEnd {
    /// The frontend went (or could not be served), nobody waits.
    fn disconnected() -> SessionEnd {
        SessionEnd {
            stopped: false,
            waiting: None,
        }
    }
}

/// Serves one connected frontend until it disconnects or `stop` becomes readable, and resets
/// the device. A connection arriving on `listener` meanwhile is held for
/// [`SECOND_FRONTEND_GRACE`]: if the session ends by then it is handed back as the next
/// frontend, otherwise it is refused (closed, with a log line). The frontend's channel for
/// backend requests, if it gives one, is put in `channel` for the session.
/// This is what [`VhostUserServer::serve`] runs per frontend; a fuzz target drives it directly.
pub fn serve_frontend(
    device: Arc<dyn Device>,
    max_queue_size: u16,
    workers: &WorkerOptions,
    stream: UnixStream,
    stop: &EventFd,
    listener: Option<&UnixListener>,
    channel: &FrontendChannel,
) -> SessionEnd {
    let session = match Session::new(device, max_queue_size, workers.clone(), channel.clone()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot set up a session for the frontend: {e}");
            return SessionEnd::disconnected();
        }
    };
    let fault = session.fault.clone();
    let state = Arc::new(Mutex::new(session));
    let sock = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot duplicate the frontend socket: {e}");
            return SessionEnd::disconnected();
        }
    };
    // A message is read once poll says it has begun: a frontend that stops halfway through
    // one (or stops taking replies) is disconnected after this, instead of holding the
    // session, and whoever waits to stop it, forever.
    let _ = stream.set_read_timeout(Some(MESSAGE_DEADLINE));
    let _ = stream.set_write_timeout(Some(MESSAGE_DEADLINE));
    let mut handler = BackendReqHandler::from_stream(stream, state.clone());
    let mut waiting: Option<(UnixStream, Instant)> = None;
    let stopped = loop {
        let mut fds = [
            pollfd(handler.as_raw_fd()),
            pollfd(stop.as_raw_fd()),
            pollfd(listener.map_or(-1, |l| l.as_raw_fd())),
            pollfd(fault.as_raw_fd()),
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
        if fds[3].revents != 0 {
            tracing::warn!(
                "the frontend's memory vanished under a request (it shrank the file it \
                 shared; SIGBUS caught): disconnecting it"
            );
            break false;
        }
        if fds[0].revents != 0 {
            let taken = status_message(&sock, &state)
                .and_then(|taken| Ok(taken || take_channel(&sock, &state)?))
                .and_then(|taken| Ok(taken || early_vring_enable(&sock, &state)?));
            let request = match taken {
                Ok(true) => Ok(()),
                Ok(false) => handler.handle_request(),
                Err(e) => {
                    tracing::warn!("frontend sent a bad message ({e}); disconnecting it");
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
    channel.set(None);
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

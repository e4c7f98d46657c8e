//! The control socket: JSON-RPC 2.0 requests, one per line, from clients that are not
//! trusted to be well-formed. Each client has a thread; a request line is read with a bound
//! ([`MAX_REQUEST`]) and a deadline, and whatever it holds gets an error reply, never a
//! change to the daemon.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vudev_core::readiness::{poll, pollfd};
use vudev_core::socket::{group_id, Access};

use super::registry::Registry;
use crate::rpc::{failure, success, ApiError, Code, MAX_REQUEST};

/// Clients served at once; one more is answered with [`Code::TooManyClients`].
const MAX_CLIENTS: usize = 16;
/// A client that sends nothing for this long is disconnected.
const IDLE: Duration = Duration::from_secs(60);
/// A reply that cannot be written within this is dropped with its client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests in one batch at most (each gets a reply, which may be large).
const MAX_BATCH: usize = 64;

/// The methods, for the error that names them.
const METHODS: &str = "add, list, remove, resize, show, stats, version";

/// The listening control socket; its file is removed on drop.
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
}

impl Control {
    /// Listens on `path`, mode 0600, or 0660 and owned by `group` if one is given.
    pub fn bind(path: &Path, group: Option<&str>) -> Result<Control, String> {
        let gid = group
            .map(|g| group_id(g).map_err(|e| format!("--control-group: {e}")))
            .transpose()?;
        let access = Access {
            mode: if gid.is_some() { 0o660 } else { 0o600 },
            uid: None,
            gid,
        };
        let listener = vudev_core::socket::bind_listener(path, access).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                format!(
                    "{}: another vudev serve is running there: stop it, or pass another --control",
                    path.display()
                )
            } else {
                format!("cannot listen on {}: {e}", path.display())
            }
        })?;
        let control = Control {
            listener,
            path: path.to_path_buf(),
        };
        Ok(control)
    }

    /// Serves clients until `stop` becomes readable.
    pub fn serve(&self, registry: &Arc<Registry>, stop: &EventFd) {
        let clients = Arc::new(AtomicUsize::new(0));
        loop {
            let mut fds = [pollfd(self.listener.as_raw_fd()), pollfd(stop.as_raw_fd())];
            if poll(&mut fds, None).is_err() || fds[0].revents == 0 {
                if fds[1].revents != 0 {
                    return;
                }
                continue;
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of fds, say: wait a little rather than spin on a readable listener.
                    tracing::warn!("accept on the control socket: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                clients.fetch_sub(1, Ordering::SeqCst);
                let e = ApiError::new(
                    Code::TooManyClients,
                    format!("{MAX_CLIENTS} clients are connected: try again when one has gone"),
                );
                let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
                let _ = writeln!(&stream, "{}", failure(Value::Null, &e));
                continue;
            }
            let (registry, clients2) = (registry.clone(), clients.clone());
            let spawned = std::thread::Builder::new()
                .name("vudev-control".into())
                .spawn(move || {
                    client(stream, &registry);
                    clients2.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                clients.fetch_sub(1, Ordering::SeqCst);
                tracing::error!("cannot start a control client thread: {e}");
            }
        }
    }
}

impl AsRawFd for Control {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves one client: request lines until it closes, goes idle, or sends too much.
fn client(stream: UnixStream, registry: &Registry) {
    let _ = stream.set_read_timeout(Some(IDLE));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(Incoming {
        stream: reader,
        passed: None,
    });
    let mut writer = stream;
    loop {
        let mut line = Vec::new();
        let read = reader
            .by_ref()
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line);
        if read.is_err() || line.is_empty() {
            return;
        }
        let complete = line.ends_with(b"\n");
        if !complete && line.len() > MAX_REQUEST {
            let e = ApiError::new(
                Code::InvalidRequest,
                format!(
                    "the request is larger than {MAX_REQUEST} bytes: send one request per line"
                ),
            );
            let _ = writeln!(writer, "{}", failure(Value::Null, &e));
            return;
        }
        // A descriptor that came with this request is its, and closed after it.
        let mut passed = reader.get_mut().passed.take();
        if let Some(reply) = handle(registry, &line, &mut passed) {
            if writeln!(writer, "{reply}").is_err() {
                return;
            }
        }
        if !complete {
            return;
        }
    }
}

/// A client's stream, read with recvmsg: a file descriptor sent with a request (SCM_RIGHTS:
/// `add` with `device-fd`) is kept for the request being read. One at a time: another sent
/// meanwhile is closed; a message with more than one fails the read, which ends the client.
struct Incoming {
    stream: UnixStream,
    passed: Option<File>,
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, file) = self
            .stream
            .recv_with_fd(buf)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if let Some(file) = file {
            // SAFETY: fcntl on the fd `file` owns.
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            self.passed.get_or_insert(file);
        }
        Ok(n)
    }
}

/// The reply to one request line, or `None` when it holds notifications only; `passed` is the
/// file descriptor that came with it, for the `add` that asks for it.
fn handle(registry: &Registry, line: &[u8], passed: &mut Option<File>) -> Option<Value> {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            let e = ApiError::new(Code::Parse, format!("the request is not JSON: {e}"));
            return Some(failure(Value::Null, &e));
        }
    };
    match request {
        Value::Array(batch) if batch.is_empty() => Some(failure(
            Value::Null,
            &ApiError::new(Code::InvalidRequest, "an empty batch"),
        )),
        Value::Array(batch) if batch.len() > MAX_BATCH => Some(failure(
            Value::Null,
            &ApiError::new(
                Code::InvalidRequest,
                format!("a batch of more than {MAX_BATCH} requests: send it in parts"),
            ),
        )),
        Value::Array(batch) => {
            let replies: Vec<Value> = batch
                .into_iter()
                .filter_map(|r| call(registry, r, passed))
                .collect();
            (!replies.is_empty()).then_some(Value::Array(replies))
        }
        one => call(registry, one, passed),
    }
}

/// One request: its reply, or `None` for a notification (a request without an id).
fn call(registry: &Registry, request: Value, passed: &mut Option<File>) -> Option<Value> {
    let Value::Object(mut request) = request else {
        let e = ApiError::new(Code::InvalidRequest, "a request is a JSON object");
        return Some(failure(Value::Null, &e));
    };
    let id = request.remove("id");
    let id_ok = matches!(
        id,
        None | Some(Value::Null | Value::String(_) | Value::Number(_))
    );
    let reply_id = id.clone().filter(|_| id_ok).unwrap_or(Value::Null);
    let result = (|| {
        if !id_ok {
            return Err(ApiError::new(
                Code::InvalidRequest,
                "id must be a string or a number",
            ));
        }
        if request.get("jsonrpc") != Some(&json!("2.0")) {
            return Err(ApiError::new(
                Code::InvalidRequest,
                "jsonrpc must be \"2.0\"",
            ));
        }
        let Some(Value::String(method)) = request.get("method") else {
            return Err(ApiError::new(
                Code::InvalidRequest,
                "method must be a string",
            ));
        };
        let params = match request.get("params") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => {
                return Err(ApiError::new(
                    Code::InvalidParams,
                    "params must be an object (by name)",
                ))
            }
        };
        if let Some(other) = request
            .keys()
            .find(|k| !["jsonrpc", "method", "params"].contains(&k.as_str()))
        {
            return Err(ApiError::new(
                Code::InvalidRequest,
                format!("unknown member '{other}'"),
            ));
        }
        dispatch(registry, method, params, passed)
    })();
    id.as_ref()?;
    Some(match result {
        Ok(v) => success(reply_id, v),
        Err(e) => failure(reply_id, &e),
    })
}

fn dispatch(
    registry: &Registry,
    method: &str,
    mut params: Map<String, Value>,
    passed: &mut Option<File>,
) -> Result<Value, ApiError> {
    match method {
        "version" => {
            allow(&params, &[])?;
            Ok(json!({"version": env!("CARGO_PKG_VERSION"), "build": env!("VUDEV_BUILD")}))
        }
        "list" => {
            allow(&params, &[])?;
            Ok(json!(registry.list()))
        }
        "show" => {
            allow(&params, &["name"])?;
            Ok(json!(registry.show(&string(&params, "name")?)?))
        }
        "add" => {
            let device = match params.remove("device-fd") {
                None => None,
                Some(Value::Bool(true)) => Some(passed.take().ok_or_else(|| {
                    ApiError::new(
                        Code::InvalidParams,
                        "device-fd: no file descriptor came with the request: send the open \
                         /dev/vduse/NAME with it (SCM_RIGHTS), as `vudev ctl add vduse … \
                         --device-fd N` does",
                    )
                })?),
                Some(_) => {
                    return Err(ApiError::new(
                        Code::InvalidParams,
                        "device-fd must be true: the descriptor itself comes with the request \
                         (SCM_RIGHTS)",
                    ))
                }
            };
            Ok(json!(registry.add(params, device)?))
        }
        "stats" => {
            allow(&params, &["name"])?;
            let name = match params.get("name") {
                None => None,
                Some(_) => Some(string(&params, "name")?),
            };
            if let Some(n) = &name {
                registry.show(n)?;
            }
            Ok(super::metrics::json(&registry.stats(name.as_deref())))
        }
        "remove" => {
            allow(&params, &["name", "force"])?;
            registry.remove(&string(&params, "name")?, force(&params)?)?;
            Ok(json!({}))
        }
        "resize" => {
            allow(&params, &["name", "size", "force"])?;
            let size = match params.get("size") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) if n.is_u64() => Some(n.to_string()),
                Some(_) => {
                    return Err(ApiError::new(
                        Code::InvalidParams,
                        "size must be a number of bytes or a string such as \"20G\"",
                    ))
                }
            };
            let name = string(&params, "name")?;
            Ok(json!(registry.resize(
                &name,
                size.as_deref(),
                force(&params)?
            )?))
        }
        other => Err(ApiError::new(
            Code::MethodNotFound,
            format!("unknown method '{other}': the methods are {METHODS}"),
        )),
    }
}

fn force(params: &Map<String, Value>) -> Result<bool, ApiError> {
    match params.get("force") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::new(
            Code::InvalidParams,
            "force must be true or false",
        )),
    }
}

fn allow(params: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::new(
            Code::InvalidParams,
            format!("unknown parameter '{k}'"),
        )),
        None => Ok(()),
    }
}

fn string(params: &Map<String, Value>, key: &str) -> Result<String, ApiError> {
    match params.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::new(
            Code::InvalidParams,
            format!("{key} must be a string"),
        )),
        None => Err(ApiError::new(
            Code::InvalidParams,
            format!("{key} is missing"),
        )),
    }
}

//! The control API's wire format, shared by `vudev serve` and `vudev ctl`: JSON-RPC 2.0, one
//! request and one reply per line, over the daemon's unix socket. The method names and error
//! codes are stable; docs/API.md documents them.

use serde_json::{json, Value};

/// The longest request line the daemon reads; a longer one is answered with an error and the
/// connection closed.
pub const MAX_REQUEST: usize = 1 << 20;

/// Error codes: JSON-RPC's own, then the daemon's (stable, documented in docs/API.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The request is not JSON.
    Parse = -32700,
    /// JSON, but not a JSON-RPC 2.0 request (or larger than [`MAX_REQUEST`]).
    InvalidRequest = -32600,
    /// No such method.
    MethodNotFound = -32601,
    /// The parameters are missing, of the wrong type, or not a valid export.
    InvalidParams = -32602,
    /// No export has that name.
    NotFound = 1,
    /// The name (or the socket) is taken by another export.
    Exists = 2,
    /// The backend could not be opened (file, NBD server…).
    Backend = 3,
    /// The transport could not be set up (VDUSE device, vdpa bus, socket).
    Transport = 4,
    /// The export is busy: in use by a mounted filesystem, or still starting or stopping.
    Busy = 5,
    /// The daemon is shutting down.
    ShuttingDown = 6,
    /// Too many clients are connected at once.
    TooManyClients = 7,
}

/// A failed call: a code and a message for people.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// The stable code.
    pub code: Code,
    /// What failed and what to do.
    pub message: String,
}

impl ApiError {
    /// An error of `code`.
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// A request line (without its newline).
pub fn request(id: u64, method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

/// A successful reply.
pub fn success(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// An error reply.
pub fn failure(id: Value, e: &ApiError) -> Value {
    json!({"jsonrpc": "2.0", "id": id,
           "error": {"code": e.code as i32, "message": e.message}})
}

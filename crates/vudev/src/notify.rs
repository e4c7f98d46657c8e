//! The service manager's notification protocol (sd_notify): a datagram of `KEY=VALUE` lines
//! sent to `$NOTIFY_SOCKET` (a path, or an abstract name after `@`). No libsystemd needed;
//! without `$NOTIFY_SOCKET` nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `state` (e.g. `READY=1\nSTATUS=serving 3 exports`) if a service manager listens.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!("cannot notify the service manager at {path}: {e}");
    }
}

/// How often to send `WATCHDOG=1`: half the `WatchdogSec` the manager set
/// (`$WATCHDOG_USEC`), if it set one for the service's main process `main_pid`.
pub fn watchdog_interval(main_pid: u32) -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != main_pid {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

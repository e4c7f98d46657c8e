//! `vudev export vduse|vhost-user`: one export in the foreground, from the command line,
//! until SIGINT/SIGTERM; then taken down cleanly.

use std::fs::File;
use std::time::Duration;

use vudev_blk::BlockDevice;

use crate::cli::{BackendArgs, BackendOptions, DeviceArgs, SandboxArgs, VduseArgs, VhostUserArgs};
use crate::device::{self, Built};
use crate::serving::{VduseServing, VhostUserServing};
use crate::{sandbox, signals};

/// [`device::build`] on a thread of its own, so that SIGINT/SIGTERM stop vudev while the
/// backend is still being opened (an NBD server may take its time): `Ok(None)` then.
/// `file` is `--file`, opened already.
fn build_unless_terminated(
    backend: &BackendArgs,
    opts: &BackendOptions,
    dev: &DeviceArgs,
    file: Option<File>,
) -> Result<Option<Built>, String> {
    let (backend, opts, dev) = (backend.clone(), opts.clone(), dev.clone());
    match signals::unless_terminated(move || device::build(&backend, &opts, &dev, file))
        .map_err(|e| format!("opening the backend: {e}"))?
    {
        Ok(built) => built.map(Some),
        Err(sig) => {
            tracing::info!("signal {sig} received while opening the backend: nothing was created");
            Ok(None)
        }
    }
}

/// How often an export looks whether its storage was resized by other hands.
const FOLLOW_SIZE: Duration = Duration::from_secs(2);

/// Waits for SIGINT/SIGTERM. Meanwhile, every [`FOLLOW_SIZE`], takes on a size the storage
/// of a disk (`device`) took by other hands (an `rbd resize`) and tells the driver with `tell`.
fn wait_for_signal(
    device: Option<&BlockDevice>,
    tell: impl Fn() -> Result<String, String>,
) -> Result<(), String> {
    loop {
        match signals::wait_termination_for(FOLLOW_SIZE) {
            Ok(Some(sig)) => {
                tracing::info!("signal {sig} received: shutting down");
                return Ok(());
            }
            Ok(None) => {
                let Some(device) = device else { continue };
                let was = device.size();
                let Some(bytes) = device.adopt_changed_size() else {
                    continue;
                };
                match tell() {
                    Ok(told) => tracing::info!(
                        "the storage was resized from {was} to {bytes} bytes: {told}"
                    ),
                    Err(e) => tracing::warn!("the storage was resized to {bytes} bytes, but {e}"),
                }
            }
            Err(e) => return Err(format!("waiting for signals: {e}")),
        }
    }
}

/// Runs one vhost-user export in the foreground: frontends one after another until a signal.
/// Nothing it does needs privileges once its file is open: with `--user` it opens the file
/// and then confines itself, before any thread exists.
pub fn run_vhost_user(args: VhostUserArgs, sandbox: SandboxArgs) -> Result<(), String> {
    // Before any thread exists, so that every thread inherits the mask.
    signals::block_termination().map_err(|e| format!("cannot block signals: {e}"))?;
    let identity = sandbox.identity()?;
    let file = match identity {
        Some(id) => {
            sandbox::before_dropping(id, &args.backend, &args.backend_options, &args.device)?
        }
        None => None,
    };
    sandbox::confine(identity, sandbox.sandbox)?;
    let built = build_unless_terminated(&args.backend, &args.backend_options, &args.device, file)?;
    let Some(built) = built else {
        return Ok(());
    };
    let serving = VhostUserServing::start(&args, &built, || {
        // Wake the main thread out of sigwait so that the error is reported.
        // SAFETY: kill(2) on our own process with a signal we have blocked.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    })
    .map_err(|e| match identity {
        // Made after giving root up: say so, it is what the operator has to change.
        Some(id) => format!(
            "{e} (with --user, the socket is made as uid {}: its directory must be writable by \
             it, and --socket-user cannot give it away; use --socket-group and --socket-mode \
             0660 instead)",
            id.uid
        ),
        None => e,
    })?;
    let waited = wait_for_signal(built.block().map(|b| &**b), || {
        serving.config_changed().map(|told| match told {
            true => "the frontend was told".to_string(),
            false => "no frontend to tell (the next one sees the new size)".to_string(),
        })
    });
    let failure = serving.failure();
    let stopped = serving.stop();
    match failure {
        Some(e) => Err(e),
        None => waited.and(stopped),
    }
}

/// Runs one VDUSE export in the foreground.
pub fn run_vduse(
    args: VduseArgs,
    device_fd: Option<i32>,
    sandbox: SandboxArgs,
) -> Result<(), String> {
    signals::block_termination().map_err(|e| format!("cannot block signals: {e}"))?;
    device::check_vduse(&args.backend, &args.device)?;
    // With --user this forks: the helper stays root, and only the child returns here.
    let (authority, file) = sandbox::vduse_authority(&args, device_fd, &sandbox)?;
    let built = build_unless_terminated(&args.backend, &args.backend_options, &args.device, file)?;
    let Some(built) = built else {
        return Ok(());
    };
    let serving = VduseServing::start(&args, &built, authority)?;
    let waited = wait_for_signal(built.block().map(|b| &**b), || {
        serving
            .config_changed()
            .map(|()| "the driver was told".to_string())
    });
    waited.and(serving.stop())
}

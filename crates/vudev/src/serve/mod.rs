//! `vudev serve`: one daemon for many exports. It starts those of the config file, serves
//! the control API (JSON-RPC on a unix socket) on a thread of its own, tells the service
//! manager (sd_notify), and on SIGINT/SIGTERM takes every export down and exits.

mod config;
mod control;
mod metrics;
mod record;
mod registry;
pub mod spec;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vudev_core::readiness::{poll, pollfd};

use crate::cli::{SandboxArgs, ServeArgs};
use crate::sandbox::helper::{Client, Policy, Scope};
use crate::sandbox::split::Unavailable;
use crate::sandbox::{self, split as fork, Identity};
use crate::{notify, signals};
use control::Control;
use registry::Registry;
use spec::ExportArgs;

/// How often the daemon looks whether the files behind its exports have grown.
const FOLLOW_FILES: Duration = Duration::from_secs(2);

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), String> {
    // Before any thread exists, so that every thread inherits the mask.
    signals::block_termination().map_err(|e| format!("cannot block signals: {e}"))?;
    let config = match &args.config {
        Some(path) => config::load(path)?,
        None => config::Config::default(),
    };
    if args.check {
        let mut out = std::io::stdout();
        for (spec, _) in &config.exports {
            let _ = writeln!(out, "{}", spec::command_line(spec));
        }
        let _ = writeln!(
            out,
            "{}: {} export(s), no error",
            args.config
                .as_deref()
                .unwrap_or(std::path::Path::new("-"))
                .display(),
            config.exports.len()
        );
        return Ok(());
    }
    // The command line's user and group, or else the config's: never one of each.
    let (user, group) = match args.sandbox.user {
        Some(_) => (args.sandbox.user, args.sandbox.group),
        None => (config.user, config.group),
    };
    let identity = SandboxArgs {
        user,
        group,
        sandbox: args.sandbox.sandbox,
    }
    .identity()?;
    // Bound as root, before any change of user: the socket's directory need not be the user's.
    let control = Control::bind(&args.control, args.control_group.as_deref())?;
    let metrics = args
        .metrics
        .as_deref()
        .map(metrics::Endpoint::bind)
        .transpose()?;
    let (helper, state_dir, files) = match identity {
        Some(id) => {
            let mut listeners = vec![control.as_raw_fd()];
            listeners.extend(metrics.as_ref().map(|m| m.as_raw_fd()));
            let (client, state_dir, files) = split(&args, &config, id, listeners)?;
            (Some((Arc::new(client), id.uid)), state_dir, files)
        }
        None => {
            sandbox::confine(None, args.sandbox.sandbox)?;
            (None, args.state_dir.clone(), HashMap::new())
        }
    };
    let notify = |state: &str| match &helper {
        Some((helper, _)) => helper.notify(state),
        None => notify::notify(state),
    };
    let registry = Arc::new(Registry::new(&state_dir, helper.clone()));
    if let Some(endpoint) = metrics {
        let registry = registry.clone();
        std::thread::Builder::new()
            .name("vudev-metrics".into())
            .spawn(move || endpoint.serve(registry))
            .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    }
    notify("STATUS=starting the exports");
    registry.start(config.exports, files);
    let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| format!("eventfd: {e}"))?;
    let result = std::thread::scope(|s| {
        let (registry2, control, stop) = (&registry, &control, &stop);
        s.spawn(move || control.serve(registry2, stop));
        // Storage resized elsewhere is followed on a thread of its own, not on the one that
        // answers the watchdog: a slow stat or cluster call cannot get the daemon killed.
        s.spawn(move || loop {
            let mut fds = [pollfd(stop.as_raw_fd())];
            match poll(&mut fds, Some(FOLLOW_FILES)) {
                Ok(_) if fds[0].revents != 0 => break,
                Ok(_) => registry2.follow_grown_files(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("poll: {e}: resized storage is no longer followed");
                    break;
                }
            }
        });
        let status = |n: usize| format!("STATUS=serving {n} export(s)");
        tracing::info!(
            control = %args.control.display(),
            "ready: serving {} export(s)",
            registry.list().len()
        );
        notify(&format!("READY=1\n{}", status(registry.list().len())));
        // The service manager started the helper, whose pid it gave, and which passes the
        // daemon's notifications on.
        let main_pid = match &helper {
            // SAFETY: getppid has no preconditions.
            Some(_) => (unsafe { libc::getppid() }) as u32,
            None => std::process::id(),
        };
        let watchdog = notify::watchdog_interval(main_pid);
        let tick = watchdog.map_or(FOLLOW_FILES, |w| w.min(FOLLOW_FILES));
        let waited = loop {
            match signals::wait_termination_for(tick) {
                Ok(Some(sig)) => {
                    tracing::info!("signal {sig} received: shutting down");
                    break Ok(());
                }
                Ok(None) => {
                    if watchdog.is_some() {
                        notify("WATCHDOG=1");
                    }
                }
                Err(e) => break Err(format!("waiting for signals: {e}")),
            }
        };
        notify("STOPPING=1\nSTATUS=taking the exports down");
        let _ = stop.write(1);
        waited
    });
    drop(control);
    registry.shutdown();
    result
}

/// Splits the daemon that serves as `id` into its root helper and the serving process (this
/// function returns in the latter). Root does first what the user cannot: the state
/// directory (root's, 0755), the files of the config's exports (opened now, as they will be
/// used), the user's RBD record directory, and the memory lock limit a bounce buffer needs.
/// Files added at run time are opened by the user. Returns the helper's client, the state
/// directory (its symlinks resolved) and the config's files by export name.
fn split(
    args: &ServeArgs,
    config: &config::Config,
    id: Identity,
    listeners: Vec<RawFd>,
) -> Result<(Client, PathBuf, HashMap<String, File>), String> {
    let state_dir = sandbox::state_dir(&args.state_dir)?;
    let files: HashMap<String, File> = config
        .exports
        .iter()
        .filter_map(|(_, a)| {
            let (backend, opts, dev) = a.parts();
            Some((a.name(), sandbox::open_file_first(backend, opts, dev)?))
        })
        .collect();
    sandbox::give_rbd_records(id)?;
    if config
        .exports
        .iter()
        .any(|(_, a)| matches!(a, ExportArgs::Vduse(v) if v.bounce_umem))
    {
        fork::raise_memlock();
    }
    let policy = Policy {
        scope: Scope::Daemon {
            record: state_dir.join(record::record_name(Some(id.uid))),
            devices: state_dir.join(format!("serve-devices-{}.json", id.uid)),
            nodes: PathBuf::from("/dev/vduse"),
        },
        device_ids: vec![
            virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            virtio_bindings::virtio_ids::VIRTIO_ID_NET,
        ],
        state_dir: state_dir.clone(),
        owner: id,
    };
    let sockets = vec![args.control.clone()];
    let client = match vudev_vduse::authority::Local::open() {
        Ok(local) => fork::fork(policy, local, args.sandbox.sandbox, sockets, listeners),
        Err(e) => {
            let unavailable = Unavailable(e.to_string());
            fork::fork(
                policy,
                unavailable,
                args.sandbox.sandbox,
                sockets,
                listeners,
            )
        }
    }?;
    Ok((client, state_dir, files))
}

//! `vudev export vduse|vhost-user`: build the device from the command line, serve it until
//! SIGINT/SIGTERM, then take it down cleanly.

use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vudev_blk::{BlockConfig, BlockDevice};
use vudev_core::{Polling, WorkerOptions};
use vudev_vduse::lifecycle::Attached;
use vudev_vduse::{VduseExport, VduseOptions};
use vudev_vhost_user::{VhostUserOptions, VhostUserServer};

use crate::cli::{BackendArgs, BackendOptions, DeviceArgs, VduseArgs, VhostUserArgs};
use crate::{backend, signals};

/// [`build_device`] on a thread of its own, so that SIGINT/SIGTERM stop vudev while the
/// backend is still being opened (an NBD server may take its time): `Ok(None)` then.
fn build_device_unless_terminated(
    backend: &BackendArgs,
    opts: &BackendOptions,
    dev: &DeviceArgs,
) -> Result<Option<(Arc<BlockDevice>, String)>, String> {
    let (backend, opts, dev) = (backend.clone(), opts.clone(), dev.clone());
    match signals::unless_terminated(move || build_device(&backend, &opts, &dev))
        .map_err(|e| format!("opening the backend: {e}"))?
    {
        Ok(built) => built.map(Some),
        Err(sig) => {
            tracing::info!("signal {sig} received while opening the backend: nothing was created");
            Ok(None)
        }
    }
}

/// Validates the device options, opens the backend and builds the virtio-blk device.
fn build_device(
    backend: &BackendArgs,
    opts: &BackendOptions,
    dev: &DeviceArgs,
) -> Result<(Arc<BlockDevice>, String), String> {
    if !dev.queue_size.is_power_of_two() || !(2..=32768).contains(&dev.queue_size) {
        return Err(format!(
            "invalid --queue-size {}: use a power of two from 2 to 32768",
            dev.queue_size
        ));
    }
    if dev.serial.len() > 20 {
        return Err(format!(
            "invalid --serial '{}': at most 20 bytes",
            dev.serial
        ));
    }
    // SAFETY: sysconf has no memory effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    if let Some(bad) = dev.queue_cpus.iter().find(|&&c| c >= cpus) {
        return Err(format!(
            "invalid --queue-cpus: CPU {bad} does not exist (this machine has CPUs 0 to {})",
            cpus - 1
        ));
    }
    let block_size = dev.logical_block_size.bytes();
    let backend = backend::open(backend, opts, dev, block_size)?;
    let cfg = BlockConfig {
        size: backend.size(),
        logical_block_size: block_size,
        num_queues: dev.num_queues,
        queue_size: dev.queue_size,
        read_only: dev.readonly || backend.read_only(),
        serial: dev.serial.clone(),
        discard: backend.supports_discard(),
        write_zeroes: true,
    };
    let description = backend.describe();
    Ok((Arc::new(BlockDevice::new(cfg, backend)), description))
}

/// How the queue workers run, from the device options.
fn worker_options(dev: &DeviceArgs) -> WorkerOptions {
    WorkerOptions {
        poll: match dev.poll_us {
            None => Polling::Adaptive,
            Some(0) => Polling::Off,
            Some(us) => Polling::Fixed(Duration::from_micros(u64::from(us))),
        },
        cpus: dev.queue_cpus.clone(),
    }
}

/// Runs one vhost-user export in the foreground: frontends one after another until a signal.
pub fn run_vhost_user(args: VhostUserArgs) -> Result<(), String> {
    signals::block_termination().map_err(|e| format!("cannot block signals: {e}"))?;
    let Some((device, description)) =
        build_device_unless_terminated(&args.backend, &args.backend_options, &args.device)?
    else {
        return Ok(());
    };
    let server = VhostUserServer::bind(
        device,
        &VhostUserOptions {
            socket: args.socket.clone(),
            socket_mode: args.socket_mode,
            queue_size: args.device.queue_size,
            workers: worker_options(&args.device),
        },
    )
    .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    tracing::info!(
        socket = %args.socket.display(),
        queues = args.device.num_queues,
        "serving {description}"
    );
    let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| format!("eventfd: {e}"))?;
    let stop2 = stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
    std::thread::scope(|s| {
        let serving = s.spawn(|| {
            let served = server.serve(&stop2);
            if served.is_err() {
                // Wake the main thread out of sigwait so that the error is reported.
                // SAFETY: kill(2) on our own process with a signal we have blocked.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            }
            served
        });
        let waited = signals::wait_termination();
        if let Ok(sig) = &waited {
            tracing::info!("signal {sig} received: shutting down");
        }
        let _ = stop.write(1);
        let served = serving
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the server thread panicked")));
        waited
            .map(|_| ())
            .map_err(|e| format!("waiting for signals: {e}"))
            .and(served.map_err(|e| format!("vhost-user server: {e}")))
    })
}

/// Runs one VDUSE export in the foreground.
pub fn run_vduse(args: VduseArgs) -> Result<(), String> {
    // Before any thread exists, so that every thread inherits the mask.
    signals::block_termination().map_err(|e| format!("cannot block signals: {e}"))?;
    let dev = &args.device;
    let Some((device, description)) =
        build_device_unless_terminated(&args.backend, &args.backend_options, dev)?
    else {
        return Ok(());
    };
    let export = VduseExport::create(
        device,
        &VduseOptions {
            name: args.name.clone(),
            queue_size: dev.queue_size,
            state_dir: Some(args.state_dir.clone()),
            bounce_umem: args.bounce_umem,
            workers: worker_options(dev),
        },
    )
    .map_err(|e| e.to_string())?;
    let messages = export.spawn_message_loop().map_err(|e| e.to_string())?;
    tracing::info!(
        name = %args.name,
        queues = dev.num_queues,
        queue_size = dev.queue_size,
        "serving {description}"
    );

    let served = if args.no_attach {
        tracing::info!(
            "not attached: run `vudev vdpa attach {} [--driver vhost-vdpa]` to use it",
            args.name
        );
        Ok(())
    } else {
        let was = export.is_attached();
        match export.attach() {
            Ok(Attached::NoNode) => {
                tracing::warn!(
                    "attached {}, but no device node appeared: is virtio_blk loaded?",
                    args.name
                );
                Ok(())
            }
            Ok(on) if was => {
                // An adopted device stays where the previous daemon put it.
                tracing::info!("{} is already attached: {on}", args.name);
                Ok(())
            }
            Ok(on) => {
                tracing::info!("attached: {} is {on}", args.name);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    };
    let result = served.and_then(|()| {
        let sig = signals::wait_termination().map_err(|e| format!("waiting for signals: {e}"))?;
        tracing::info!("signal {sig} received: shutting down");
        Ok(())
    });

    // Clean path, also after an error: off the bus (while the message loop still answers the
    // kernel's reset), then stop the loop, stop the queues and destroy the device.
    let detached = match export.detach() {
        Ok(true) => {
            tracing::info!("detached {}", args.name);
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => Err(format!("cannot detach {}: {e}", args.name)),
    };
    messages.stop();
    let destroyed = export.shutdown().map_err(|e| e.to_string());
    result.and(detached).and(destroyed)
}

//! Building the virtio-blk device of an export from its options: the checks that need
//! nothing opened ([`check`], also what `vudev serve --check` runs), then the backend.

use std::sync::Arc;
use std::time::Duration;

use vudev_blk::{BlockConfig, BlockDevice};
use vudev_core::{Polling, WorkerOptions};

use crate::backend;
use crate::cli::{BackendArgs, BackendOptions, DeviceArgs};

/// A built device and what its backend is, for logs and `vudev ctl list`.
pub struct Built {
    /// The device.
    pub device: Arc<BlockDevice>,
    /// The backend, e.g. `file /srv/disk.img (io_uring)`.
    pub description: String,
}

/// Checks the options without opening anything.
pub fn check(backend: &BackendArgs, opts: &BackendOptions, dev: &DeviceArgs) -> Result<(), String> {
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
    backend::check_options(backend, opts)?;
    for size in [&backend.memory, &backend.null].into_iter().flatten() {
        backend::checked_size(size, dev.logical_block_size.bytes())?;
    }
    Ok(())
}

/// Checks the options, opens the backend and builds the virtio-blk device; `file` is the
/// backend's `--file` if it was opened already (by root, for a sandboxed process).
pub fn build(
    backend: &BackendArgs,
    opts: &BackendOptions,
    dev: &DeviceArgs,
    file: Option<std::fs::File>,
) -> Result<Built, String> {
    check(backend, opts, dev)?;
    let block_size = dev.logical_block_size.bytes();
    let backend = backend::open(backend, opts, dev, block_size, file)?;
    let cfg = BlockConfig {
        size: backend.size(),
        logical_block_size: block_size,
        num_queues: dev.num_queues,
        queue_size: dev.queue_size,
        read_only: dev.readonly || backend.read_only(),
        serial: dev.serial.clone(),
        discard: backend.supports_discard(),
        write_zeroes: true,
        granularity: backend.optimal_io_size().unwrap_or(0),
    };
    Ok(Built {
        description: backend.describe(),
        device: Arc::new(BlockDevice::new(cfg, backend)),
    })
}

/// How the queue workers run, from the device options.
pub fn worker_options(dev: &DeviceArgs) -> WorkerOptions {
    WorkerOptions {
        poll: match dev.poll_us {
            None => Polling::Adaptive,
            Some(0) => Polling::Off,
            Some(us) => Polling::Fixed(Duration::from_micros(u64::from(us))),
        },
        cpus: dev.queue_cpus.clone(),
    }
}

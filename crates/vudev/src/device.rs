//! Building the device of an export from its options: the checks that need nothing opened
//! ([`check`], also what `vudev serve --check` runs), then the backend: a virtio-blk device
//! over storage, or with `--net-tap` a virtio-net device over a TAP.

use std::sync::Arc;
use std::time::Duration;

use vudev_blk::{BlockConfig, BlockDevice};
use vudev_core::{Device, Polling, WorkerOptions};
use vudev_net::{MacAddress, NetConfig, NetDevice, Tap};

use crate::backend;
use crate::cli::{BackendArgs, BackendOptions, DeviceArgs};

/// The device an export serves.
#[derive(Clone)]
pub enum Exported {
    /// A disk.
    Block(Arc<BlockDevice>),
    /// A network interface.
    Net(Arc<NetDevice>),
}

/// A built device and what its backend is, for logs and `vudev ctl list`.
pub struct Built {
    /// The device.
    pub device: Exported,
    /// The backend, e.g. `file /srv/disk.img (io_uring)`.
    pub description: String,
}

impl Exported {
    /// The block device, unless this is a net export.
    pub fn block(&self) -> Option<&Arc<BlockDevice>> {
        match self {
            Exported::Block(b) => Some(b),
            Exported::Net(_) => None,
        }
    }
}

impl Built {
    /// The device, for a transport.
    pub fn virtio(&self) -> Arc<dyn Device> {
        match &self.device {
            Exported::Block(b) => b.clone(),
            Exported::Net(n) => n.clone(),
        }
    }

    /// The block device, unless this is a net export.
    pub fn block(&self) -> Option<&Arc<BlockDevice>> {
        self.device.block()
    }
}

/// The default MTU of a net export.
const DEFAULT_MTU: u32 = 1500;

/// A net export's settings from its options; `tap` is its TAP's name.
pub(crate) fn net_config(
    tap: &str,
    opts: &BackendOptions,
    dev: &DeviceArgs,
) -> Result<NetConfig, String> {
    // What the block options mean has no sense for a NIC: refused rather than ignored.
    let misplaced = [
        (dev.readonly, "--readonly"),
        (!dev.serial.is_empty(), "--serial"),
        (
            dev.logical_block_size.bytes() != 512,
            "--logical-block-size",
        ),
    ];
    if let Some((_, opt)) = misplaced.iter().find(|m| m.0) {
        return Err(format!(
            "{opt} applies to disks, and this export is --net-tap {tap}: drop it"
        ));
    }
    vudev_net::tap::valid_name(tap).map_err(|e| e.to_string())?;
    let cfg = NetConfig {
        mac: match &opts.mac {
            Some(m) => m.parse()?,
            None => MacAddress::derived(tap),
        },
        mtu: opts.mtu.unwrap_or(DEFAULT_MTU),
        queue_size: dev.queue_size,
        // A NIC's queues come in pairs: --num-queues counts pairs, as QEMU's `queues=` does.
        queue_pairs: dev.num_queues,
    };
    cfg.check()?;
    Ok(cfg)
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
    if let Some(tap) = &backend.net_tap {
        net_config(tap, opts, dev)?;
    }
    for size in [&backend.memory, &backend.null].into_iter().flatten() {
        backend::checked_size(size, dev.logical_block_size.bytes())?;
    }
    Ok(())
}

/// Checks what only a VDUSE export cannot do: a net device of several queue pairs (they need
/// a control queue, which the kernel refuses on a VDUSE net device).
pub fn check_vduse(backend: &BackendArgs, dev: &DeviceArgs) -> Result<(), String> {
    if backend.net_tap.is_some() && dev.num_queues > 1 {
        return Err(format!(
            "--num-queues {}: a VDUSE net device has one queue pair (the kernel refuses the \
             control queue that more would need); several are for vhost-user exports",
            dev.num_queues
        ));
    }
    Ok(())
}

/// Checks the options, opens the backend and builds the device; `file` is the backend's
/// `--file`, or the `--net-tap` TAP, if it was opened already (by root, for a sandboxed
/// process).
pub fn build(
    backend: &BackendArgs,
    opts: &BackendOptions,
    dev: &DeviceArgs,
    file: Option<std::fs::File>,
) -> Result<Built, String> {
    check(backend, opts, dev)?;
    if let Some(name) = &backend.net_tap {
        let cfg = net_config(name, opts, dev)?;
        let taps = match file {
            // Opened by root before it was given up (--user).
            Some(f) => vec![Tap::from_file(f, name)],
            None => Tap::open_queues(name, cfg.queue_pairs).map_err(|e| e.to_string())?,
        };
        let net = NetDevice::new(cfg, taps).map_err(|e| e.to_string())?;
        return Ok(Built {
            description: net.describe(),
            device: Exported::Net(Arc::new(net)),
        });
    }
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
        device: Exported::Block(Arc::new(BlockDevice::new(cfg, backend))),
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

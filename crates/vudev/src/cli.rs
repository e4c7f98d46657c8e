//! The command line.

use std::path::PathBuf;
use vudev_core::socket::{group_id, user_and_group, user_id};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Userspace virtio devices, exported through VDUSE.
#[derive(Debug, Parser)]
#[command(name = "vudev", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("VUDEV_BUILD"), ")"), about)]
pub struct Cli {
    /// More log output (-v debug, -vv trace); VUDEV_LOG=filter overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines as text (colour on a terminal only) or as JSON objects, one per line, for
    /// log collectors.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Export a virtio-blk device (or, with --net-tap, a virtio-net one) until SIGINT or
    /// SIGTERM.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Run the daemon: the exports of a config file, and more added and removed at run time
    /// through the control socket (`vudev ctl`).
    Serve(ServeArgs),
    /// Drive a running `vudev serve` through its control socket.
    Ctl(CtlArgs),
    /// Create and destroy VDUSE devices for a vudev that serves them without privileges
    /// (`vudev export vduse --device-fd`).
    #[command(subcommand)]
    Vduse(VduseCommand),
    /// Manage vdpa devices (what iproute2's `vdpa dev` does).
    #[command(subcommand)]
    Vdpa(VdpaCommand),
    /// Print shell completions for SHELL (from this command line's own definition).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (vudev.1 and one per subcommand) into DIR.
    Man {
        /// Where to write them, e.g. /usr/local/share/man/man1.
        dir: PathBuf,
    },
}

/// Where a daemon's control socket is unless --control says otherwise.
pub const DEFAULT_CONTROL: &str = "/run/vudev/control.sock";

/// `vudev serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The exports to serve at start, one `[[export]]` table each (TOML).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Only check the config: print the exports it would create, touch nothing.
    #[arg(long, requires = "config")]
    pub check: bool,
    /// The control socket (JSON-RPC 2.0, one request per line).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// Let this group use the control socket too (mode 0660 instead of 0600).
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// Serve metrics (Prometheus text format, GET /metrics) on host:port, e.g.
    /// 127.0.0.1:9540, or on a unix socket (a path).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Where the daemon records the exports added at run time (serve-exports.json), so that
    /// a restarted daemon serves them again; and where its VDUSE exports keep their state
    /// files, unless one names another `state-dir`.
    #[arg(long, value_name = "DIR", default_value = "/run/vudev")]
    pub state_dir: PathBuf,
    /// Who serves the data (over the config's `user` and `group`), and how confined.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// `vudev ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL, global = true)]
    pub control: PathBuf,
    /// Print the daemon's JSON reply instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `vudev ctl …` commands.
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Add an export: the options of `vudev export`.
    #[command(subcommand)]
    Add(Export),
    /// Remove an export: its frontend or driver is disconnected, its device taken away.
    Remove {
        /// Export name.
        name: String,
        /// Remove it even if its block device is in use (mounted).
        #[arg(long)]
        force: bool,
    },
    /// Change an export's size while it serves; its driver or frontend sees the new size.
    Resize {
        /// Export name.
        name: String,
        /// The new size (e.g. 20G); without it, a file backend's size as the file is now.
        size: Option<String>,
        /// Shrink even if that cuts data the disk holds.
        #[arg(long)]
        force: bool,
    },
    /// Request counters of each export's queues (of NAME only, if given).
    Stats {
        /// Export name.
        name: Option<String>,
    },
    /// List the exports.
    List,
    /// One export, with its options.
    Show {
        /// Export name.
        name: String,
    },
    /// The daemon's version.
    Version,
}

/// `vudev export`: a transport's options, and the process's own.
#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Through VDUSE: /dev/vdX on this host (virtio-vdpa) or a VM (vhost-vdpa).
    Vduse {
        #[command(flatten)]
        args: VduseArgs,
        /// Serve a VDUSE device that was created by someone else (`vudev vduse create`)
        /// and handed over as this open file descriptor of /dev/vduse/NAME: no privileges
        /// are needed, and attaching, detaching and destroying it stay with its creator.
        #[arg(long, value_name = "FD")]
        device_fd: Option<i32>,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// Through a vhost-user socket: for QEMU, cloud-hypervisor or libblkio.
    VhostUser {
        #[command(flatten)]
        args: VhostUserArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
}

/// Who serves an export's data, and how confined.
#[derive(Clone, Debug, Args)]
pub struct SandboxArgs {
    /// Serve the data as this user (a name or a uid) with no capabilities. Start vudev as
    /// root: the files named on the command line (or in serve's config) are opened first;
    /// for VDUSE a small helper process keeps the privileges and does only what needs them
    /// (creating the device, putting it on the vdpa bus, destroying it). A vhost-user socket
    /// is made by the user: its directory must be the user's.
    #[arg(long, value_name = "USER", value_parser = user_and_group)]
    pub user: Option<(u32, Option<u32>)>,
    /// The group to serve as (default: the user's primary group).
    #[arg(long, value_name = "GROUP", value_parser = group_id, requires = "user")]
    pub group: Option<u32>,
    /// `on`: the process serving the data gains no privileges (no_new_privs) and may make
    /// only the system calls it needs (seccomp: any other one kills it). `off`: for
    /// debugging.
    #[arg(long, value_enum, default_value = "on")]
    pub sandbox: Switch,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// `vudev vduse`: the privileged side of `vudev export vduse --device-fd`.
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum VduseCommand {
    /// Create a VDUSE device with an export's options, not attached and not served: open
    /// /dev/vduse/NAME and hand it to `vudev export vduse --device-fd` (same options), then
    /// `vudev vdpa attach NAME`.
    Create {
        #[command(flatten)]
        args: VduseArgs,
        /// The user (a name or a uid) that will serve it: its state file is given to it.
        #[arg(long, value_name = "USER", value_parser = user_and_group)]
        user: Option<(u32, Option<u32>)>,
        /// The group of the state file (default: the user's primary group).
        #[arg(long, value_name = "GROUP", value_parser = group_id, requires = "user")]
        group: Option<u32>,
    },
    /// Destroy a VDUSE device (taking it off the vdpa bus first) and its state file.
    Destroy {
        /// The device name.
        name: String,
        /// Where its state file is.
        #[arg(long, value_name = "DIR", default_value = "/run/vudev")]
        state_dir: PathBuf,
    },
}

/// Export transports (`vudev ctl add`).
#[derive(Debug, Subcommand)]
pub enum Export {
    /// Through VDUSE: /dev/vdX on this host (virtio-vdpa) or a VM (vhost-vdpa).
    Vduse {
        #[command(flatten)]
        args: VduseArgs,
        /// Hand the daemon this open file descriptor of /dev/vduse/NAME (sent with the
        /// request): it serves a device created by someone else (`vudev vduse create`),
        /// and attaching, detaching and destroying it stay with its creator.
        #[arg(long, value_name = "FD")]
        device_fd: Option<i32>,
    },
    /// Through a vhost-user socket: for QEMU, cloud-hypervisor or libblkio.
    VhostUser(VhostUserArgs),
}

/// `vudev export vhost-user`.
#[derive(Clone, Debug, Args)]
pub struct VhostUserArgs {
    /// Export name (default: the socket's file name without its extension).
    #[arg(long)]
    pub name: Option<String>,
    /// Unix socket to listen on (created; removed on exit).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Permissions of the socket file, in octal.
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Give the socket file to this user (a name or a uid), e.g. the one QEMU runs as.
    #[arg(long, value_name = "USER", value_parser = user_id)]
    pub socket_user: Option<u32>,
    /// Give the socket file to this group (a name or a gid); with --socket-mode 0660 its
    /// members may connect.
    #[arg(long, value_name = "GROUP", value_parser = group_id)]
    pub socket_group: Option<u32>,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub backend_options: BackendOptions,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl VhostUserArgs {
    /// The export's name: --name, or the socket's file name without its extension.
    pub fn export_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.socket
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.socket.display().to_string())
        })
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("invalid mode '{s}': use octal such as 0600 or 0660"))
}

/// `vudev export vduse`.
#[derive(Clone, Debug, Args)]
pub struct VduseArgs {
    /// Device name (/dev/vduse/NAME and the vdpa device name).
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub backend_options: BackendOptions,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Create the device but do not add it to the vdpa bus (attach it later with
    /// `vudev vdpa attach NAME [--driver vhost-vdpa]`).
    #[arg(long)]
    pub no_attach: bool,
    /// Where the device's in-flight records live (NAME.state). If vudev dies, running the
    /// same command again adopts the device and finishes the requests recorded there.
    #[arg(long, value_name = "DIR", default_value = "/run/vudev")]
    pub state_dir: PathBuf,
    /// Register vudev's own memory as the kernel's bounce buffer (VDUSE_IOTLB_REG_UMEM), where
    /// the kernel allows it. Pins 64 MiB per device; experimental.
    #[arg(long)]
    pub bounce_umem: bool,
}

/// Where the data lives. Exactly one is required.
#[derive(Clone, Debug, Args)]
#[group(required = true, multiple = false)]
pub struct BackendArgs {
    /// A regular file or block device.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// A RAM disk of SIZE (e.g. 64M, 1G, 1048576); contents are lost on exit.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// A disk of SIZE that reads zeros and drops writes.
    #[arg(long, value_name = "SIZE")]
    pub null: Option<String>,
    /// An NBD export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    #[arg(long, value_name = "URI")]
    pub nbd: Option<String>,
    /// A Ceph RBD image: POOL[/NAMESPACE]/IMAGE, or POOL/IMAGE@SNAP for a snapshot (read-only).
    #[arg(long, value_name = "IMAGE")]
    pub rbd: Option<String>,
    /// Not a disk but a network interface: a virtio-net device whose frames go in and out of
    /// this TAP interface (created if missing; create it with `ip tuntap add dev NAME mode
    /// tap` to keep it, and what is configured on it, across restarts).
    #[arg(long, value_name = "NAME")]
    pub net_tap: Option<String>,
}

/// Options of one backend each: given with another backend, they are refused with the reason
/// (`backend::check_options`).
#[derive(Clone, Debug, Args)]
pub struct BackendOptions {
    /// Open --file with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// How --file does I/O: io_uring (asynchronous, batched), sync (preadv/pwritev on the
    /// queue's thread), or auto (the default): io_uring, except sync for a buffered file on
    /// tmpfs or ramfs where the kernel would hand every io_uring request to a worker thread.
    #[arg(long)]
    pub aio: Option<AioMode>,
    /// Seconds an NBD request may wait for the server before it fails with an I/O error
    /// (default 30).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub nbd_timeout: Option<u64>,
    /// The Ceph config that names the monitors and keyring of --rbd's cluster (default:
    /// $CEPH_CONF, then /etc/ceph/ceph.conf; $CEPH_ARGS is honoured).
    #[arg(long, value_name = "PATH")]
    pub rbd_conf: Option<PathBuf>,
    /// The Ceph client id --rbd connects as, without "client." (default admin).
    #[arg(long, value_name = "NAME")]
    pub rbd_id: Option<String>,
    /// Seconds an RBD request (or a monitor call) may take before it fails with an I/O error
    /// (default 30).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub rbd_timeout: Option<u64>,
    /// The MAC address of --net-tap's device (default: one derived from the TAP's name, the
    /// same at every start).
    #[arg(long, value_name = "ADDR")]
    pub mac: Option<String>,
    /// The MTU of --net-tap's device, 68 to 65535; the TAP is given the same (default 1500).
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u32>,
}

/// How long an NBD request waits for the server unless --nbd-timeout says otherwise.
pub const DEFAULT_NBD_TIMEOUT: u64 = 30;

/// How long an RBD request waits for the cluster unless --rbd-timeout says otherwise.
pub const DEFAULT_RBD_TIMEOUT: u64 = 30;

/// virtio-blk device options.
#[derive(Clone, Debug, Args)]
pub struct DeviceArgs {
    /// Number of request queues (one worker thread each); for a net export, queue pairs
    /// (vhost-user only, over a multi-queue TAP).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Queue size: a power of two from 2 to 32768.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Refuse writes (the driver sees a read-only disk).
    #[arg(long)]
    pub readonly: bool,
    /// Serial number returned to the driver (at most 20 bytes).
    #[arg(long, default_value = "")]
    pub serial: String,
    /// Logical block size in bytes.
    #[arg(long, default_value = "512")]
    pub logical_block_size: BlockSize,
    /// Busy-poll each queue for this many microseconds after its last activity before
    /// sleeping, always (0: never poll). Without it a queue polls adaptively: as long as
    /// that pays, up to 32 µs, and not at all when idle.
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub poll_us: Option<u32>,
    /// Pin queue worker threads to these CPUs, e.g. 2,3: queue i runs on the (i mod n)-th.
    #[arg(long, value_delimiter = ',', value_name = "CPU,...")]
    pub queue_cpus: Vec<usize>,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line.
    Json,
}

/// I/O submission of the file backend.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AioMode {
    /// io_uring, or sync where io_uring would punt every request (tmpfs).
    Auto,
    /// io_uring.
    #[value(name = "io_uring")]
    IoUring,
    /// Synchronous preadv/pwritev.
    Sync,
}

/// Allowed logical block sizes.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BlockSize {
    /// 512 bytes.
    #[value(name = "512")]
    B512,
    /// 4096 bytes.
    #[value(name = "4096")]
    B4096,
}

impl BlockSize {
    /// Bytes.
    pub fn bytes(self) -> u32 {
        match self {
            BlockSize::B512 => 512,
            BlockSize::B4096 => 4096,
        }
    }
}

/// `vudev vdpa …`.
#[derive(Debug, Subcommand)]
pub enum VdpaCommand {
    /// List vdpa management devices and devices.
    List,
    /// Add a created VDUSE device to the vdpa bus.
    Attach {
        /// Device name.
        name: String,
        /// Bus driver to bind: virtio-vdpa gives /dev/vdX here, vhost-vdpa gives
        /// /dev/vhost-vdpa-N for a VM. Default: whichever the kernel picks.
        #[arg(long)]
        driver: Option<Driver>,
    },
    /// Remove a device from the vdpa bus.
    Detach {
        /// Device name.
        name: String,
    },
}

/// vdpa bus drivers.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Driver {
    /// The in-kernel virtio driver: the device appears on this host.
    VirtioVdpa,
    /// vhost-vdpa: the device is handed to a VM or a userspace driver.
    VhostVdpa,
}

impl Driver {
    /// The kernel's driver name.
    pub fn kernel_name(self) -> &'static str {
        match self {
            Driver::VirtioVdpa => vdpa::VIRTIO_VDPA,
            Driver::VhostVdpa => vdpa::VHOST_VDPA,
        }
    }
}

//! Opening the backend named on the command line, with errors that say what to do.

use std::fs::File;
use std::io;
use std::sync::Arc;

use std::time::Duration;

use vudev_blk::{
    Aio, BlockBackend, FileBackend, MemoryBackend, NbdBackend, NullBackend, RbdBackend, RbdOptions,
};

use crate::size::parse_size;

use crate::cli::{
    AioMode, BackendArgs, BackendOptions, DeviceArgs, DEFAULT_NBD_TIMEOUT, DEFAULT_RBD_TIMEOUT,
};

/// Refuses options that mean nothing for the backend chosen (rather than ignore them).
pub fn check_options(args: &BackendArgs, opts: &BackendOptions) -> Result<(), String> {
    let chosen = if args.file.is_some() {
        "--file"
    } else if args.memory.is_some() {
        "--memory"
    } else if args.null.is_some() {
        "--null"
    } else if args.nbd.is_some() {
        "--nbd"
    } else if args.rbd.is_some() {
        "--rbd"
    } else {
        "--net-tap"
    };
    let not_rbd = args.rbd.is_none();
    let not_net = args.net_tap.is_none();
    let misplaced = [
        (opts.direct && args.file.is_none(), "--direct", "--file"),
        (opts.aio.is_some() && args.file.is_none(), "--aio", "--file"),
        (
            opts.nbd_timeout.is_some() && args.nbd.is_none(),
            "--nbd-timeout",
            "--nbd",
        ),
        (opts.rbd_conf.is_some() && not_rbd, "--rbd-conf", "--rbd"),
        (opts.rbd_id.is_some() && not_rbd, "--rbd-id", "--rbd"),
        (
            opts.rbd_timeout.is_some() && not_rbd,
            "--rbd-timeout",
            "--rbd",
        ),
        (opts.mac.is_some() && not_net, "--mac", "--net-tap"),
        (opts.mtu.is_some() && not_net, "--mtu", "--net-tap"),
    ];
    match misplaced.iter().find(|m| m.0) {
        Some((_, opt, only)) => Err(format!(
            "{opt} applies to {only} only, and this export uses {chosen}: drop {opt}"
        )),
        None => Ok(()),
    }
}

/// Opens the backend; `block_size` is the logical block size its size must be a multiple of;
/// `file` is `--file` opened already (by root, for a sandboxed process), else it is opened
/// here.
pub fn open(
    args: &BackendArgs,
    opts: &BackendOptions,
    dev: &DeviceArgs,
    block_size: u32,
    file: Option<File>,
) -> Result<Arc<dyn BlockBackend>, String> {
    let (direct, read_only) = (opts.direct, dev.readonly);
    let aio = match opts.aio.unwrap_or(AioMode::Auto) {
        AioMode::Auto => Aio::Auto,
        AioMode::IoUring => Aio::IoUring,
        AioMode::Sync => Aio::Sync,
    };
    let backend: Arc<dyn BlockBackend> = if let Some(path) = &args.file {
        let opened = match file {
            Some(f) => FileBackend::from_file(f, path, read_only, direct, aio),
            None => FileBackend::open(path, read_only, direct, aio),
        };
        let b = opened.map_err(|e| {
            let p = path.display();
            match e.kind() {
                io::ErrorKind::NotFound => {
                    format!("{p}: file not found: create it first (e.g. truncate -s 1G {p})")
                }
                io::ErrorKind::PermissionDenied => format!(
                    "{p}: permission denied: make it {} by this user, or pass --readonly",
                    if read_only {
                        "readable"
                    } else {
                        "readable and writable"
                    }
                ),
                _ if e.raw_os_error() == Some(libc::EINVAL) && direct => {
                    format!("{p}: O_DIRECT is not supported on this file system: drop --direct")
                }
                _ => format!("{p}: {e}"),
            }
        })?;
        Arc::new(b)
    } else if let Some(size) = &args.memory {
        let size = checked_size(size, block_size)?;
        Arc::new(MemoryBackend::new(size, read_only).map_err(|e| e.to_string())?)
    } else if let Some(size) = &args.null {
        Arc::new(NullBackend::new(checked_size(size, block_size)?, read_only))
    } else if let Some(uri) = &args.nbd {
        let timeout = Duration::from_secs(opts.nbd_timeout.unwrap_or(DEFAULT_NBD_TIMEOUT));
        let b = NbdBackend::connect(uri, read_only, timeout).map_err(|e| e.to_string())?;
        if !block_size.is_multiple_of(b.min_block_size()) {
            return Err(format!(
                "{uri}: the server needs I/O in units of {} bytes: use --logical-block-size 4096",
                b.min_block_size()
            ));
        }
        Arc::new(b)
    } else if let Some(image) = &args.rbd {
        let rbd = RbdOptions {
            conf: opts.rbd_conf.clone(),
            id: opts.rbd_id.clone().unwrap_or_else(|| "admin".into()),
            timeout: Duration::from_secs(opts.rbd_timeout.unwrap_or(DEFAULT_RBD_TIMEOUT)),
        };
        Arc::new(RbdBackend::open(image, read_only, &rbd).map_err(|e| e.to_string())?)
    } else {
        return Err(
            "no backend: pass --file PATH, --memory SIZE, --null SIZE, --nbd URI or --rbd IMAGE"
                .into(),
        );
    };
    let size = backend.size();
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return Err(format!(
            "{}: size {size} is not a non-zero multiple of the {block_size}-byte block size: \
             resize it (truncate -s) or pick another --logical-block-size",
            backend.describe()
        ));
    }
    Ok(backend)
}

/// Parses a SIZE option (`64M`, `1G`, `1048576`) that must be a multiple of the block size.
pub fn checked_size(s: &str, block_size: u32) -> Result<u64, String> {
    let size = parse_size(s)?;
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return Err(format!(
            "invalid size '{s}': must be a non-zero multiple of the {block_size}-byte block size"
        ));
    }
    Ok(size)
}

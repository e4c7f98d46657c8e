//! The vdpa bus in sysfs: which driver a device is bound to, moving it between virtio_vdpa
//! (a block device on this host) and vhost_vdpa (a VM or userspace driver), and finding the
//! device node that results.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BUS: &str = "/sys/bus/vdpa";

/// The driver `dev` is bound to, if any.
pub fn bound_driver(dev: &str) -> io::Result<Option<String>> {
    let link = Path::new(BUS).join("devices").join(dev).join("driver");
    match fs::read_link(&link) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Rebinds `dev` to `driver` (e.g. "vhost_vdpa").
pub fn bind_driver(dev: &str, driver: &str) -> io::Result<()> {
    let drivers = Path::new(BUS).join("drivers");
    if !drivers.join(driver).exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("vdpa driver {driver} is not loaded: modprobe {driver}"),
        ));
    }
    if let Some(cur) = bound_driver(dev)? {
        if cur == driver {
            return Ok(());
        }
        fs::write(drivers.join(&cur).join("unbind"), dev)
            .map_err(|e| io::Error::new(e.kind(), format!("unbind {dev} from {cur}: {e}")))?;
    }
    fs::write(drivers.join(driver).join("bind"), dev)
        .map_err(|e| io::Error::new(e.kind(), format!("bind {dev} to {driver}: {e}")))
}

/// `/dev/vhost-vdpa-N` of `dev`, waiting up to `timeout` for it to appear.
pub fn wait_for_vhost_vdpa_dev(dev: &str, timeout: Duration) -> Option<PathBuf> {
    let dir = Path::new(BUS).join("devices").join(dev);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("vhost-vdpa-") {
                    let node = Path::new("/dev").join(&name);
                    if node.exists() {
                        return Some(node);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The block device name ("vda") of `dev` when virtio_vdpa and virtio_blk drive it.
pub fn block_device_of(dev: &str) -> Option<String> {
    let dir = Path::new(BUS).join("devices").join(dev);
    for e in fs::read_dir(&dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("virtio") {
            if let Some(b) = fs::read_dir(e.path().join("block")).ok()?.flatten().next() {
                return Some(b.file_name().to_string_lossy().into_owned());
            }
        }
    }
    None
}

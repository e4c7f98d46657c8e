//! The vdpa bus in sysfs: which driver a vdpa device is bound to, moving it between
//! `virtio_vdpa` (a virtio device, e.g. `/dev/vdX`, on this host) and `vhost_vdpa`
//! (`/dev/vhost-vdpa-N` for a VM or a userspace driver), and finding the node that results.
//!
//! Everything here reads or writes files under [`VDPA_BUS`](crate::VDPA_BUS); device and driver names are
//! checked to be plain file names before they become part of a path.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::names::VDPA_BUS;

/// How often [`wait_for_vhost_vdpa_dev`] looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Whether `name` can be used as one path component under the bus directory.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

fn check_name(what: &'static str, name: &str) -> Result<(), Error> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what,
            value: name.into(),
            reason: "use a plain name without '/'",
        })
    }
}

/// The driver vdpa device `dev` is bound to (`virtio_vdpa`, `vhost_vdpa`, ...), or `None`
/// when it has none. Fails with `NotFound` when there is no such device, and with
/// `InvalidInput` when `dev` is not a plain name.
pub fn bound_driver(dev: &str) -> io::Result<Option<String>> {
    bound_driver_in(Path::new(VDPA_BUS), dev)
}

fn bound_driver_in(bus: &Path, dev: &str) -> io::Result<Option<String>> {
    if !is_plain_name(dev) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid vdpa device name '{dev}'"),
        ));
    }
    let dir = bus.join("devices").join(dev);
    match fs::read_link(dir.join("driver")) {
        Ok(target) => Ok(target
            .file_name()
            .and_then(OsStr::to_str)
            .map(str::to_owned)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if dir.exists() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no vdpa device named '{dev}' ({} is missing)",
                        dir.display()
                    ),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// Binds vdpa device `dev` to vdpa bus driver `driver` (`"virtio_vdpa"` or `"vhost_vdpa"`).
///
/// Unbinds it from its current driver first (`drivers/CUR/unbind`), then binds it
/// (`drivers/WANT/bind`) and checks that it took. Nothing is done when it is bound to `driver`
/// already. If the bind fails, the device is given back to its previous driver (best effort).
/// Needs root.
pub fn bind_driver(dev: &str, driver: &str) -> Result<(), Error> {
    bind_driver_in(Path::new(VDPA_BUS), dev, driver)
}

fn bind_driver_in(bus: &Path, dev: &str, driver: &str) -> Result<(), Error> {
    check_name("device", dev)?;
    check_name("driver", driver)?;
    if !bus.is_dir() {
        return Err(Error::NoVdpaBus);
    }
    if !bus.join("devices").join(dev).exists() {
        return Err(Error::NoSuchDevice { name: dev.into() });
    }
    let drivers = bus.join("drivers");
    if !drivers.join(driver).is_dir() {
        return Err(Error::DriverNotLoaded {
            driver: driver.into(),
        });
    }
    let current = bound_driver_in(bus, dev).map_err(|e| Error::Io {
        op: format!("read the driver of {dev}"),
        source: e,
    })?;
    if current.as_deref() == Some(driver) {
        return Ok(());
    }
    if let Some(cur) = &current {
        check_name("driver", cur)?;
        write_attr(
            &drivers.join(cur).join("unbind"),
            dev,
            &format!("unbind {dev} from {cur}"),
        )?;
    }
    if let Err(e) = write_attr(
        &drivers.join(driver).join("bind"),
        dev,
        &format!("bind {dev} to {driver}"),
    ) {
        if let Some(cur) = &current {
            let back = write_attr(
                &drivers.join(cur).join("bind"),
                dev,
                &format!("rebind {dev} to {cur}"),
            );
            if let Err(b) = back {
                tracing::warn!("{b}; {dev} is left without a driver");
            }
        }
        return Err(e);
    }
    let actual = bound_driver_in(bus, dev).map_err(|e| Error::Io {
        op: format!("read the driver of {dev}"),
        source: e,
    })?;
    if actual.as_deref() != Some(driver) {
        return Err(Error::NotBound {
            dev: dev.into(),
            driver: driver.into(),
            actual,
        });
    }
    Ok(())
}

/// Writes `value` to an existing sysfs attribute file (never creates one).
fn write_attr(path: &Path, value: &str, op: &str) -> Result<(), Error> {
    let result = OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    result.map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => Error::PermissionDenied { op: op.into() },
        _ => Error::Io {
            op: format!("{op} (write {})", path.display()),
            source: e,
        },
    })
}

/// `/dev/vhost-vdpa-N` of vdpa device `dev` once it is bound to `vhost_vdpa`.
///
/// Looks for `/sys/bus/vdpa/devices/DEV/vhost-vdpa-N` and waits, up to `timeout`, for that and
/// for the `/dev` node (created by devtmpfs or udev) to appear. `Duration::ZERO` looks once.
pub fn wait_for_vhost_vdpa_dev(dev: &str, timeout: Duration) -> Option<PathBuf> {
    if !is_plain_name(dev) {
        return None;
    }
    // A timeout too large for an Instant means no deadline.
    let deadline = Instant::now().checked_add(timeout);
    loop {
        if let Some(name) = vhost_vdpa_name_in(Path::new(VDPA_BUS), dev) {
            let node = Path::new("/dev").join(name);
            if node.exists() {
                return Some(node);
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The `vhost-vdpa-N` child of the device, if any.
fn vhost_vdpa_name_in(bus: &Path, dev: &str) -> Option<String> {
    child_with_number(&bus.join("devices").join(dev), dev, "vhost-vdpa-")
}

/// The child entry of `dir` named `PREFIX<digits>` with the lowest number.
fn child_with_number(dir: &Path, dev: &str, prefix: &str) -> Option<String> {
    if !is_plain_name(dev) {
        return None;
    }
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| {
            let n: u32 = name
                .strip_prefix(prefix)
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))?
                .parse()
                .ok()?;
            Some((n, name))
        })
        .min()
        .map(|(_, name)| name)
}

/// The block device name (`"vda"`) of vdpa device `dev` when it is bound to `virtio_vdpa` and
/// virtio_blk drives it: the entry of `/sys/bus/vdpa/devices/DEV/virtioN/block/`. `None` when
/// there is none (yet).
pub fn block_device_of(dev: &str) -> Option<String> {
    node_in(Path::new(VDPA_BUS), dev, "block")
}

/// The network interface (`eth1`) the virtio_vdpa driver made of vdpa device `dev`, if any.
pub fn net_device_of(dev: &str) -> Option<String> {
    node_in(Path::new(VDPA_BUS), dev, "net")
}

/// True if virtio_net drives vdpa device `dev`, whether or not its interface can be seen
/// from here: one moved to another network namespace leaves the `net` directory empty.
pub fn is_net_device(dev: &str) -> bool {
    has_class_in(Path::new(VDPA_BUS), dev, "net")
}

/// True if vdpa device `dev`'s virtio device has a `class` directory.
fn has_class_in(bus: &Path, dev: &str, class: &str) -> bool {
    let dir = bus.join("devices").join(dev);
    child_with_number(&dir, dev, "virtio").is_some_and(|v| dir.join(v).join(class).is_dir())
}

/// The node of `class` (`block`, `net`) under vdpa device `dev`'s virtio device.
fn node_in(bus: &Path, dev: &str, class: &str) -> Option<String> {
    let dir = bus.join("devices").join(dev);
    let virtio = child_with_number(&dir, dev, "virtio")?;
    fs::read_dir(dir.join(virtio).join(class))
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_plain_name(name))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A scratch directory laid out like /sys/bus/vdpa, removed on drop.
    struct FakeBus(PathBuf);

    impl FakeBus {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("vduse-sysfs-test-{}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            for d in ["devices", "drivers/virtio_vdpa", "drivers/vhost_vdpa"] {
                fs::create_dir_all(dir.join(d)).unwrap();
            }
            for drv in ["virtio_vdpa", "vhost_vdpa"] {
                for f in ["bind", "unbind"] {
                    fs::write(dir.join("drivers").join(drv).join(f), "").unwrap();
                }
            }
            FakeBus(dir)
        }

        fn add_device(&self, dev: &str, driver: Option<&str>) -> PathBuf {
            let d = self.0.join("devices").join(dev);
            fs::create_dir_all(&d).unwrap();
            if let Some(drv) = driver {
                symlink(
                    format!("../../../../bus/vdpa/drivers/{drv}"),
                    d.join("driver"),
                )
                .unwrap();
            }
            d
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.0.join(rel)).unwrap()
        }
    }

    impl Drop for FakeBus {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_the_bound_driver() {
        let bus = FakeBus::new("bound");
        bus.add_device("vd0", Some("virtio_vdpa"));
        bus.add_device("vd1", None);
        assert_eq!(
            bound_driver_in(&bus.0, "vd0").unwrap().as_deref(),
            Some("virtio_vdpa")
        );
        assert_eq!(bound_driver_in(&bus.0, "vd1").unwrap(), None);
        let e = bound_driver_in(&bus.0, "nope").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        for bad in ["", ".", "..", "../devices/vd0", "a\0b"] {
            let e = bound_driver_in(&bus.0, bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn rebinding_writes_unbind_then_bind() {
        let bus = FakeBus::new("rebind");
        let d = bus.add_device("vd0", Some("virtio_vdpa"));
        // The fake bus does not move the device, so the final check reports it.
        let e = bind_driver_in(&bus.0, "vd0", "vhost_vdpa").unwrap_err();
        assert_eq!(bus.read("drivers/virtio_vdpa/unbind"), "vd0");
        assert_eq!(bus.read("drivers/vhost_vdpa/bind"), "vd0");
        assert!(matches!(e, Error::NotBound { .. }), "{e}");
        assert!(e.to_string().contains("dmesg"), "{e}");

        // Once the device has the driver, binding again does nothing.
        fs::remove_file(d.join("driver")).unwrap();
        symlink("../../drivers/vhost_vdpa", d.join("driver")).unwrap();
        fs::write(bus.0.join("drivers/vhost_vdpa/bind"), "").unwrap();
        bind_driver_in(&bus.0, "vd0", "vhost_vdpa").unwrap();
        assert_eq!(bus.read("drivers/vhost_vdpa/bind"), "");
    }

    #[test]
    fn failed_bind_gives_the_device_back() {
        let bus = FakeBus::new("giveback");
        bus.add_device("vd0", Some("virtio_vdpa"));
        // A driver directory without a bind file: the bind write fails.
        fs::create_dir_all(bus.0.join("drivers/other")).unwrap();
        let e = bind_driver_in(&bus.0, "vd0", "other").unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(!bus.0.join("drivers/other/bind").exists(), "never created");
        assert_eq!(bus.read("drivers/virtio_vdpa/unbind"), "vd0");
        assert_eq!(bus.read("drivers/virtio_vdpa/bind"), "vd0");
    }

    #[test]
    fn binding_errors_name_the_fix() {
        let bus = FakeBus::new("errors");
        bus.add_device("vd0", None);
        let e = bind_driver_in(&bus.0, "vd0", "vhost_vdpa_x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "driver vhost_vdpa_x not loaded: modprobe vhost_vdpa_x"
        );
        let e = bind_driver_in(&bus.0, "vd9", "vhost_vdpa").unwrap_err();
        assert!(matches!(e, Error::NoSuchDevice { .. }), "{e}");
        let e = bind_driver_in(&bus.0, "../x", "vhost_vdpa").unwrap_err();
        assert!(matches!(e, Error::InvalidName { .. }), "{e}");
        let e = bind_driver_in(&bus.0, "vd0", "..").unwrap_err();
        assert!(matches!(e, Error::InvalidName { .. }), "{e}");
        let e = bind_driver_in(&bus.0.join("missing"), "vd0", "vhost_vdpa").unwrap_err();
        assert!(e.to_string().contains("modprobe vdpa"), "{e}");
    }

    #[test]
    fn finds_the_vhost_vdpa_and_block_nodes() {
        let bus = FakeBus::new("nodes");
        let d = bus.add_device("vd0", None);
        assert_eq!(vhost_vdpa_name_in(&bus.0, "vd0"), None);
        assert_eq!(node_in(&bus.0, "vd0", "block"), None);

        fs::create_dir(d.join("vhost-vdpa-12")).unwrap();
        fs::create_dir(d.join("vhost-vdpa-x")).unwrap();
        fs::create_dir(d.join("vhost-vdpa-")).unwrap();
        assert_eq!(
            vhost_vdpa_name_in(&bus.0, "vd0").as_deref(),
            Some("vhost-vdpa-12")
        );

        // virtioN without a disk yet, then with one.
        fs::create_dir_all(d.join("virtio3")).unwrap();
        fs::create_dir_all(d.join("virtio_extra/block/sdz")).unwrap();
        assert_eq!(node_in(&bus.0, "vd0", "block"), None);
        fs::create_dir_all(d.join("virtio3/block/vdb")).unwrap();
        assert_eq!(node_in(&bus.0, "vd0", "block").as_deref(), Some("vdb"));
        assert!(!has_class_in(&bus.0, "vd0", "net"));
        // An interface moved to another network namespace: its directory, seen empty.
        fs::create_dir_all(d.join("virtio3/net")).unwrap();
        assert!(has_class_in(&bus.0, "vd0", "net"));
        assert_eq!(node_in(&bus.0, "vd0", "net"), None);

        assert_eq!(node_in(&bus.0, "../devices/vd0", "block"), None);
        assert!(!has_class_in(&bus.0, "../devices/vd0", "block"));
        assert_eq!(vhost_vdpa_name_in(&bus.0, ".."), None);
    }

    #[test]
    fn waiting_for_a_missing_device_times_out() {
        let start = Instant::now();
        assert_eq!(
            wait_for_vhost_vdpa_dev("vudev-no-such-device", Duration::from_millis(50)),
            None
        );
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(wait_for_vhost_vdpa_dev("../x", Duration::ZERO), None);
    }
}

//! The names of vdpa's kernel objects that users of this crate need too.

/// The management device that VDUSE devices are added through (it has no bus name).
pub const VDUSE_MGMTDEV: &str = "vduse";

/// The vdpa bus in sysfs.
pub const VDPA_BUS: &str = "/sys/bus/vdpa";

/// Where the vdpa bus lists its devices: a device `NAME` on the bus is `VDPA_DEVICES/NAME`.
pub const VDPA_DEVICES: &str = "/sys/bus/vdpa/devices";

/// The vdpa bus driver that makes a vdpa device a virtio device of this host.
pub const VIRTIO_VDPA: &str = "virtio_vdpa";

/// The vdpa bus driver that hands a vdpa device to a VM or a userspace driver.
pub const VHOST_VDPA: &str = "vhost_vdpa";

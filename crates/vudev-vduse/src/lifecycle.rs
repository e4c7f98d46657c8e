//! Putting an export's device on the vdpa bus and taking it off: the half of a VDUSE export's
//! lifecycle that is vdpa management. With [`VduseExport::create`] (create or adopt) and
//! [`VduseExport::shutdown`] (destroy) it is the one owner of the lifecycle, called the same way
//! by a foreground export and by a daemon serving many.

use std::path::Path;
use std::time::{Duration, Instant};

use vdpa::{sysfs, VDPA_DEVICES, VIRTIO_VDPA};

use crate::{TransportError, VduseExport};

/// How long [`VduseExport::attach`] waits for the kernel's driver to give the device a node.
const ATTACH_WAIT: Duration = Duration::from_secs(10);

/// Where an attached device ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A block device of this host (`vda`), through virtio_vdpa.
    Block(String),
    /// A network interface of this host (`eth1`), through virtio_vdpa.
    Net(String),
    /// A network interface, through virtio_vdpa, in another network namespace (an adopted
    /// device whose interface was moved into a container's): its name is not seen from here.
    NetElsewhere,
    /// Bound to another vdpa bus driver (`vhost_vdpa`: a VM's or a userspace driver's).
    Driver(String),
    /// On the bus, but no node appeared in time (is the virtio driver loaded?).
    NoNode,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attached::Block(b) => write!(f, "/dev/{b}"),
            Attached::Net(n) => write!(f, "network interface {n}"),
            Attached::NetElsewhere => {
                write!(f, "a network interface in another network namespace")
            }
            Attached::Driver(d) => write!(f, "bound to {d}"),
            Attached::NoNode => write!(f, "on the vdpa bus, with no device node"),
        }
    }
}

impl VduseExport {
    /// True if the device is on the vdpa bus.
    pub fn is_attached(&self) -> bool {
        Path::new(VDPA_DEVICES).join(self.name()).exists()
    }

    /// Puts the device on the vdpa bus (an adopted device already there stays where it is)
    /// and waits for the kernel's driver to make a node of it. The message loop must be
    /// running: the driver talks to the device at once.
    pub fn attach(&self) -> Result<Attached, TransportError> {
        let name = self.name();
        let was = self.is_attached();
        if !was {
            self.authority.attach(name)?;
        }
        let deadline = Instant::now() + ATTACH_WAIT;
        loop {
            if let Some(blk) = sysfs::block_device_of(name) {
                return Ok(Attached::Block(blk));
            }
            if let Some(net) = sysfs::net_device_of(name) {
                return Ok(Attached::Net(net));
            }
            // A fresh interface is made in this namespace: only an adopted one can be away.
            if was && sysfs::is_net_device(name) {
                return Ok(Attached::NetElsewhere);
            }
            if let Ok(Some(driver)) = sysfs::bound_driver(name) {
                if driver != VIRTIO_VDPA {
                    return Ok(Attached::Driver(driver));
                }
            }
            if Instant::now() > deadline {
                return Ok(Attached::NoNode);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Takes the device off the vdpa bus if it is on it (the kernel's driver drains its I/O
    /// through the still-running message loop first); false if it was not attached.
    pub fn detach(&self) -> Result<bool, TransportError> {
        if !self.is_attached() {
            return Ok(false);
        }
        self.authority.detach(self.name())?;
        Ok(true)
    }
}

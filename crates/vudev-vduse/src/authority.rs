//! Who does the privileged half of a VDUSE export: creating and destroying the kernel device,
//! opening its node, and putting it on the vdpa bus and taking it off. An export asks an
//! [`Authority`] for these and does everything else (the rings, the backend) itself, so the
//! process that serves the data can be one without privileges: the binary's helper process
//! is an authority over a socket, and a device handed over as an open fd ([`HandedOver`]) is
//! served with no authority at all.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use vdpa::{VdpaNetlink, VDUSE_MGMTDEV};
use vduse::uapi::VDUSE_API_VERSION_1;
use vduse::{DeviceConfig, VduseControl, VduseDevice, VduseError};

use crate::error::TransportError;

/// The privileged operations of a VDUSE export.
pub trait Authority: Send + Sync {
    /// The VDUSE API version devices are created with (it decides how messages decode).
    fn api_version(&self) -> u64;
    /// The VDUSE features negotiated for them (`VDUSE_F_*` bits), for the log.
    fn vduse_features(&self) -> u64 {
        0
    }
    /// Creates a device; [`VduseError::NameTaken`] if one of that name exists.
    fn create_device(&self, cfg: &DeviceConfig) -> Result<(), TransportError>;
    /// Opens `/dev/vduse/NAME`.
    fn open_device(&self, name: &str) -> Result<VduseDevice, TransportError>;
    /// Destroys a device: false if this authority leaves that to the device's creator.
    fn destroy_device(&self, name: &str) -> Result<bool, TransportError>;
    /// Adds the device to the vdpa bus.
    fn attach(&self, name: &str) -> Result<(), TransportError>;
    /// Takes the device off the vdpa bus.
    fn detach(&self, name: &str) -> Result<(), TransportError>;
    /// False when the device belongs to whoever handed it over: the export then neither
    /// attaches, detaches nor destroys it.
    fn owns_device(&self) -> bool {
        true
    }
    /// Opens the state file `dir/NAME.state` of a device this authority created or opened,
    /// for reading and writing, made if missing (a sandboxed export's helper keeps it root's
    /// and passes it open); `None`: the caller opens it by path itself.
    fn open_state_file(&self, _dir: &Path, _name: &str) -> Result<Option<File>, TransportError> {
        Ok(None)
    }
}

/// This process has the privileges: `/dev/vduse/control` and vdpa netlink, used directly.
pub struct Local {
    control: VduseControl,
}

impl Local {
    /// Opens `/dev/vduse/control` and negotiates the API.
    pub fn open() -> Result<Self, TransportError> {
        Ok(Local {
            control: VduseControl::open()?,
        })
    }
}

impl Authority for Local {
    fn api_version(&self) -> u64 {
        self.control.api_version()
    }

    fn vduse_features(&self) -> u64 {
        self.control.features()
    }

    fn create_device(&self, cfg: &DeviceConfig) -> Result<(), TransportError> {
        Ok(self.control.create_device(cfg)?)
    }

    fn open_device(&self, name: &str) -> Result<VduseDevice, TransportError> {
        Ok(VduseDevice::open(name)?)
    }

    fn destroy_device(&self, name: &str) -> Result<bool, TransportError> {
        self.control.destroy_device(name)?;
        Ok(true)
    }

    fn attach(&self, name: &str) -> Result<(), TransportError> {
        Ok(VdpaNetlink::open()?.add_device(name, VDUSE_MGMTDEV)?)
    }

    fn detach(&self, name: &str) -> Result<(), TransportError> {
        Ok(VdpaNetlink::open()?.del_device(name)?)
    }
}

/// A device created by someone else (`vudev vduse create`, a platform's agent) and handed to
/// this process as an open `/dev/vduse/NAME`: it is served as an adopted device, and creating,
/// destroying and the vdpa bus stay with whoever created it.
pub struct HandedOver {
    name: String,
    file: Mutex<Option<File>>,
}

impl HandedOver {
    /// The device `name`, open as `file`.
    pub fn new(name: &str, file: File) -> Self {
        HandedOver {
            name: name.into(),
            file: Mutex::new(Some(file)),
        }
    }

    fn not_ours(&self, what: &str) -> TransportError {
        TransportError::NotDelegated(format!(
            "{what} {}: the device was handed over (--device-fd), so that is the job of whoever \
             created it (`vudev vdpa attach|detach {0}`, `vudev vduse destroy {0}`)",
            self.name
        ))
    }
}

impl Authority for HandedOver {
    /// The creator's version is not known here; decoding as version 1 is right for both:
    /// the kernel zeroes a message's unused bytes, so a version 0 device's address space
    /// reads as 0, the only one declared.
    fn api_version(&self) -> u64 {
        VDUSE_API_VERSION_1
    }

    fn create_device(&self, cfg: &DeviceConfig) -> Result<(), TransportError> {
        if cfg.name != self.name {
            return Err(self.not_ours("creating"));
        }
        // It exists: the caller adopts it.
        Err(VduseError::NameTaken(self.name.clone()).into())
    }

    fn open_device(&self, name: &str) -> Result<VduseDevice, TransportError> {
        let file = match self.file.lock() {
            Ok(mut f) if name == self.name => f.take(),
            _ => None,
        };
        match file {
            Some(file) => Ok(VduseDevice::from_file(name, file)),
            None => Err(self.not_ours("opening another node for")),
        }
    }

    fn destroy_device(&self, _name: &str) -> Result<bool, TransportError> {
        Ok(false)
    }

    fn attach(&self, _name: &str) -> Result<(), TransportError> {
        Err(self.not_ours("attaching"))
    }

    fn detach(&self, _name: &str) -> Result<(), TransportError> {
        Err(self.not_ours("detaching"))
    }

    fn owns_device(&self) -> bool {
        false
    }
}

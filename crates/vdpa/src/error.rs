//! The one error type of vdpa management, worded for the operator who has to fix it.
use std::io;

use crate::names::VDPA_BUS;

/// Errors of vdpa management, worded for the operator who has to fix them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no `vdpa` generic netlink family.
    #[error(
        "generic netlink family 'vdpa' not found: load the vdpa module (modprobe vdpa); note \
         that vdpa management is only available in the initial network namespace"
    )]
    FamilyNotFound,
    /// The kernel refused the request for lack of privilege.
    #[error("{op}: permission denied: run as root (vdpa management needs CAP_NET_ADMIN)")]
    PermissionDenied {
        /// The refused request.
        op: String,
    },
    /// `add_device`: a vdpa device of this name exists already.
    #[error(
        "a vdpa device named '{name}' already exists: pick another name, or delete the old \
         one first (`vudev vdpa detach {name}`)"
    )]
    DeviceExists {
        /// The device name.
        name: String,
    },
    /// There is no vdpa device of this name (`del_device`, driver binding).
    #[error(
        "no vdpa device named '{name}': `vudev vdpa list` shows the existing devices \
         (`vudev vdpa attach {name}` adds one)"
    )]
    NoSuchDevice {
        /// The device name.
        name: String,
    },
    /// `add_device`: the management device does not exist.
    #[error("no vdpa management device '{mgmtdev}': {hint}")]
    NoSuchMgmtDev {
        /// The management device as given.
        mgmtdev: String,
        /// What to do about it.
        hint: String,
    },
    /// A name given to a request cannot be sent.
    #[error("invalid {what} '{value}': {reason}")]
    InvalidName {
        /// Which name ("device name", "management device name").
        what: &'static str,
        /// The name as given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The kernel answered a request with an error.
    #[error("{op}: {source}{}", detail(.ext, .hint))]
    Kernel {
        /// The request.
        op: String,
        /// The errno the kernel returned.
        #[source]
        source: io::Error,
        /// The kernel's extended-ack message, if it sent one.
        ext: Option<String>,
        /// What to check, where the errno alone does not say.
        hint: Option<String>,
    },
    /// A system call on the netlink socket failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A reply did not fit the receive buffer.
    #[error(
        "netlink reply of {len} bytes does not fit the {limit}-byte receive buffer: \
         this is a bug, please report it"
    )]
    Truncated {
        /// Size of the datagram the kernel had.
        len: usize,
        /// Size of the receive buffer.
        limit: usize,
    },
    /// A reply from the kernel does not parse.
    #[error("malformed netlink reply from the kernel: {0}")]
    Malformed(String),
    /// The kernel marked a dump inconsistent every time it was tried.
    #[error("{op}: the list kept changing while it was read: try again")]
    DumpInterrupted {
        /// The request.
        op: String,
    },
    /// A dump returned more entries than this crate accepts.
    #[error("{op}: more than {limit} entries: refusing to read further")]
    TooManyEntries {
        /// The request.
        op: String,
        /// Most entries accepted.
        limit: usize,
    },
    /// There is no vdpa bus in sysfs.
    #[error("{VDPA_BUS} not found: load the vdpa module (modprobe vdpa)")]
    NoVdpaBus,
    /// The wanted driver is not registered on the vdpa bus.
    #[error("driver {driver} not loaded: modprobe {driver}")]
    DriverNotLoaded {
        /// The driver name.
        driver: String,
    },
    /// The bind was accepted, but the device did not end up with the driver.
    #[error(
        "asked {driver} to bind {dev}, but {dev} is bound to {}: see the kernel log (dmesg) \
         for why {driver} refused it",
        .actual.as_deref().unwrap_or("no driver")
    )]
    NotBound {
        /// The device name.
        dev: String,
        /// The wanted driver.
        driver: String,
        /// The driver the device has now.
        actual: Option<String>,
    },
}

pub(crate) fn detail(ext: &Option<String>, hint: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(ext) = ext {
        s.push_str(" (kernel: ");
        s.push_str(ext);
        s.push(')');
    }
    if let Some(hint) = hint {
        s.push_str(": ");
        s.push_str(hint);
    }
    s
}

impl Error {
    /// The errno behind this error, where there is one (`EEXIST` for [`DeviceExists`],
    /// `ENODEV` for [`NoSuchDevice`] and [`NoSuchMgmtDev`], `EPERM` for [`PermissionDenied`],
    /// `ENOENT` for [`FamilyNotFound`]).
    ///
    /// [`DeviceExists`]: Error::DeviceExists
    /// [`NoSuchDevice`]: Error::NoSuchDevice
    /// [`NoSuchMgmtDev`]: Error::NoSuchMgmtDev
    /// [`PermissionDenied`]: Error::PermissionDenied
    /// [`FamilyNotFound`]: Error::FamilyNotFound
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::FamilyNotFound => Some(libc::ENOENT),
            Error::PermissionDenied { .. } => Some(libc::EPERM),
            Error::DeviceExists { .. } => Some(libc::EEXIST),
            Error::NoSuchDevice { .. } | Error::NoSuchMgmtDev { .. } => Some(libc::ENODEV),
            Error::Kernel { source, .. } | Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub(crate) fn malformed(what: impl Into<String>) -> Error {
    Error::Malformed(what.into())
}

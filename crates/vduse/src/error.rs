//! Errors of the VDUSE interface, worded for the operator who has to fix them.

use std::io;

/// Something the kernel's VDUSE interface refused or could not do.
#[derive(Debug, thiserror::Error)]
pub enum VduseError {
    /// `/dev/vduse/control` does not exist.
    #[error("/dev/vduse/control not found: load the vduse module (modprobe vduse)")]
    NoControlDevice,
    /// The caller may not open a VDUSE node.
    #[error("{path}: permission denied: VDUSE needs root (or CAP_SYS_ADMIN)")]
    PermissionDenied {
        /// The node that was refused.
        path: String,
    },
    /// The kernel refused to create a net device: that takes CAP_NET_ADMIN as well.
    #[error(
        "creating VDUSE net device '{0}' was refused: a VDUSE net device needs CAP_NET_ADMIN \
         (run vudev as root, or give it that capability)"
    )]
    NetNeedsNetAdmin(String),
    /// A device of this name exists already and is served by another process.
    #[error(
        "a VDUSE device named '{0}' already exists and another process serves it: pick \
         another --name, or stop that process"
    )]
    NameTaken(String),
    /// The name is empty, too long or holds a character the kernel refuses.
    #[error("invalid device name '{0}': use 1-255 characters, no '/' and no NUL")]
    BadName(String),
    /// Any other failed system call, with the operation that failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

impl VduseError {
    /// Wraps the last OS error with a description of the operation.
    pub fn last_os(op: impl Into<String>) -> Self {
        VduseError::Io {
            op: op.into(),
            source: io::Error::last_os_error(),
        }
    }

    /// The errno behind this error, if it has one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            VduseError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, VduseError>;

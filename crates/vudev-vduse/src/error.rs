//! The one error type of the VDUSE transport.

use std::io;

use vduse::VduseError;

/// Errors of the VDUSE transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The kernel interface refused something.
    #[error(transparent)]
    Vduse(#[from] VduseError),
    /// vdpa management (putting the device on the bus, taking it off) failed.
    #[error(transparent)]
    Vdpa(#[from] vdpa::Error),
    /// The device's state file could not be created or read.
    #[error(
        "cannot keep the device's state file: {0} (--state-dir must name a writable \
         directory, the default is /run/vudev; for a device handed over, `vudev vduse create \
         --user` gives its state file to the user that serves it)"
    )]
    StateFile(#[source] io::Error),
    /// An adopted device's queues could not be started where its previous daemon left them.
    #[error("cannot resume the adopted device's queues: {0}")]
    Resume(#[source] io::Error),
    /// The thread that answers the kernel's messages could not be started.
    #[error("cannot start the thread that answers the kernel's messages: {0}")]
    MessageThread(#[source] io::Error),
    /// The device cannot be destroyed while this process still holds it.
    #[error("cannot destroy the device: the message loop still runs (stop it first)")]
    StillServed,
    /// Something only the device's creator may do was asked of an export that was handed
    /// its device.
    #[error("{0}")]
    NotDelegated(String),
    /// The privileged helper process refused a request or could not do it.
    #[error("{0}")]
    Helper(String),
    /// A device of this name exists with other settings than the ones asked for.
    #[error(
        "a VDUSE device named '{0}' exists with other settings ({1}): run the command that \
         created it, or remove it first (`vudev vdpa detach {0}`, then stop every process \
         using it)"
    )]
    Mismatch(String, String),
}

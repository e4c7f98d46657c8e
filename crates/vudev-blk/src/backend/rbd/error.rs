//! Why an RBD export could not be opened, in words that say what to do.

use std::io;

/// An RBD export that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// The spec is malformed.
    #[error("{0}")]
    Spec(String),
    /// librados or librbd could not be loaded.
    #[error("{0}")]
    Library(String),
    /// No configuration file.
    #[error("cannot read the Ceph config {conf}: {source}: pass --rbd-conf PATH or set CEPH_CONF")]
    Config {
        /// The file, or where librados looked.
        conf: String,
        /// The error.
        source: io::Error,
    },
    /// An option librados refused (CEPH_ARGS, a timeout).
    #[error("Ceph refused the option {option}: {source}")]
    Option {
        /// The option.
        option: String,
        /// The error.
        source: io::Error,
    },
    /// The monitors could not be reached or refused us.
    #[error("cannot connect to the Ceph cluster as client.{id} ({conf}): {why}")]
    Connect {
        /// The client id.
        id: String,
        /// The config used.
        conf: String,
        /// What failed and what to do.
        why: String,
    },
    /// The pool, namespace, image or snapshot is not there, or not ours.
    #[error("RBD image {spec}: {why}")]
    Image {
        /// The image spec.
        spec: String,
        /// What failed and what to do.
        why: String,
    },
}

/// An errno from librados or librbd (returned negative) as an `io::Error`.
pub(super) fn errno(ret: i64) -> io::Error {
    io::Error::from_raw_os_error(i32::try_from(-ret).unwrap_or(libc::EIO))
}

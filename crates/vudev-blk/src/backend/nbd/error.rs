//! The errors of opening an NBD export, for the operator.

use std::io;

/// Why an NBD export could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The URI does not parse.
    #[error(
        "invalid NBD URI '{uri}': {reason} (use nbd[s]://HOST[:PORT]/EXPORT or \
         nbd[s]+unix:///EXPORT?socket=PATH, with ?tls-certificates=DIR for nbds)"
    )]
    Uri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting to the server or negotiating the export failed.
    #[error("{uri}: {source}")]
    Connect {
        /// The URI as given.
        uri: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The server's block size limits leave no size a request could have.
    #[error("{uri}: the server's minimum block size ({min}) is above its maximum payload ({max})")]
    BlockSizes {
        /// The URI as given.
        uri: String,
        /// The server's minimum block size.
        min: u32,
        /// The server's maximum payload.
        max: u32,
    },
}

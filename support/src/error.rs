//! What can go wrong while setting up TLS, tokens or a connection.

use std::path::PathBuf;

/// What can go wrong while setting up security.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A certificate, key or token file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file: "--tls-cert", "--tls-key", ...
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Flags that only make sense together were given alone.
    #[error("{0}")]
    Incomplete(&'static str),
    /// The address to connect to does not parse.
    #[error("invalid address {addr:?}: {reason}")]
    Address {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// tonic refused the TLS configuration.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] tonic::transport::Error),
    /// A token that cannot travel in an HTTP header.
    #[error("the access token must be printable ASCII without spaces")]
    BadToken,
}

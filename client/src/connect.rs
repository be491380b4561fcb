//! How this client connects: TLS towards the registry and the instances, and
//! the token it shows the registry.
//!
//! One [`Connector`] is given to the [`Directory`](crate::Directory), which
//! hands it on to everything that opens a connection (calls, reflection,
//! balanced channels), so TLS applies to every connection, not only the
//! registry's.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use registry_client::{Connector, Directory};
//! use registry_proto::security::TlsArgs;
//! let tls = TlsArgs { tls_ca: Some("ca.pem".into()), ..TlsArgs::default() };
//! let connector = Connector::new(tls, Some("read-token"))?;
//! let directory = Directory::connect_with("registry.lan:50051", connector)?;
//! # Ok(()) }
//! ```

use registry_proto::security::{
    BearerToken, RegistryConn, SecurityError, TlsArgs, registry_client,
};
use tonic::transport::{Channel, Endpoint};

/// TLS settings and the registry token. The default is plaintext with no
/// token (the local demo).
#[derive(Clone, Debug, Default)]
pub struct Connector {
    /// `--tls-ca` (turns TLS on and is the CA servers must be signed by),
    /// and `--tls-cert`/`--tls-key` (the client certificate, for mutual TLS).
    tls: TlsArgs,
    /// Sent as `authorization: Bearer ...` on every registry call.
    token: BearerToken,
}

impl Connector {
    /// Plaintext, no token.
    pub fn plaintext() -> Connector {
        Connector::default()
    }

    /// A connector with these TLS settings and this token (`None` or empty:
    /// none). Reads the certificate files once now, so a wrong path fails
    /// here rather than on the first call.
    pub fn new(tls: TlsArgs, token: Option<&str>) -> Result<Connector, SecurityError> {
        tls.identity()?;
        tls.ca()?;
        Ok(Connector {
            tls,
            token: BearerToken::new(token)?,
        })
    }

    /// Whether connections use TLS (`--tls-ca` given).
    pub fn uses_tls(&self) -> bool {
        self.tls.client_uses_tls()
    }

    /// An endpoint for `addr` (`HOST:PORT` or a URL): TLS verifying that the
    /// server's certificate names HOST when TLS is on.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, SecurityError> {
        self.tls.endpoint(addr)
    }

    /// A registry client over `channel` that sends the token.
    pub fn registry(&self, channel: Channel) -> RegistryConn {
        registry_client(channel, self.token.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_plaintext() {
        let c = Connector::plaintext();
        assert!(!c.uses_tls());
        let e = c.endpoint("127.0.0.1:1").expect("valid");
        assert_eq!(e.uri().scheme_str(), Some("http"));
    }

    #[test]
    fn missing_files_and_bad_tokens_fail_early() {
        let tls = TlsArgs {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..TlsArgs::default()
        };
        let err = Connector::new(tls, None).expect_err("no such file");
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        let err = Connector::new(TlsArgs::default(), Some("a b")).expect_err("space");
        assert!(matches!(err, SecurityError::BadToken), "{err}");
    }
}

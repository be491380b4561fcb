//! How a process connects to the registry and to instances: TLS from
//! [`TlsArgs`], the endpoint's timeouts and HTTP/2 keepalive (see
//! [`TlsArgs::endpoint`]), and the token the registry is shown.
//!
//! One [`Connector`] is built from the flags at start (which reads the
//! certificate files, so a wrong path fails at once) and handed to
//! everything that opens a connection: the node host's registrar, the
//! client's directory, calls, reflection and balanced channels. TLS then
//! applies to every connection, not only the registry's.
//!
//! ```no_run
//! # fn demo() -> Result<(), support::SecurityError> {
//! use support::{Connector, TlsArgs};
//! let tls = TlsArgs { tls_ca: Some("ca.pem".into()), ..TlsArgs::default() };
//! let connector = Connector::new(tls, Some("read-token"))?;
//! let registry = connector.registry(connector.endpoint("registry.lan:50051")?.connect_lazy());
//! # drop(registry); Ok(()) }
//! ```

use registry_proto::registry::v1::registry_client::RegistryClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::BearerToken;
use crate::error::SecurityError;
use crate::tls::TlsArgs;

/// The registry client every binary uses: a channel plus its token.
pub type RegistryConn = RegistryClient<InterceptedService<Channel, BearerToken>>;

/// Wraps a channel into a [`RegistryConn`] that sends `token` on each call.
pub fn registry_client(channel: Channel, token: BearerToken) -> RegistryConn {
    RegistryClient::with_interceptor(channel, token)
        // A descriptor set may be 4 MiB by itself; with the rest of a
        // Register or GetDescriptors message that is over tonic's default
        // limit of 4 MiB. A Resolve of a very large service may be up to the
        // registry's 64 MiB reply limit.
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(16 * 1024 * 1024)
}

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

//! TLS flags, the same on every binary, and the endpoint they give a
//! connection: TLS when `--tls-ca` is set, and the timeouts and HTTP/2
//! keepalive every connection in this system wants.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::error::SecurityError;

/// TLS flags, the same on every binary (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate chain this process presents. On a listener it turns
    /// TLS on (with --tls-key); towards a server it is the client
    /// certificate for mutual TLS.
    #[arg(long, value_name = "PEM", env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s). Towards a server: connect with TLS and trust
    /// only servers it signed (their name or IP is checked against the
    /// certificate). On a listener with --tls-require-client-cert: accept
    /// only clients it signed.
    #[arg(long, value_name = "PEM", env = "TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS on this process's listener: refuse clients without a
    /// certificate signed by --tls-ca.
    #[arg(long, requires = "tls_ca")]
    pub tls_require_client_cert: bool,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl TlsArgs {
    /// The certificate and key this process presents, if any.
    pub fn identity(&self) -> Result<Option<Identity>, SecurityError> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ))),
            (Some(_), None) => Err(SecurityError::Incomplete("--tls-cert needs --tls-key")),
            (None, Some(_)) => Err(SecurityError::Incomplete("--tls-key needs --tls-cert")),
        }
    }

    /// The CA to trust, if any.
    pub fn ca(&self) -> Result<Option<Certificate>, SecurityError> {
        self.tls_ca
            .as_deref()
            .map(|p| read("--tls-ca", p).map(Certificate::from_pem))
            .transpose()
    }

    /// TLS for a listener: `None` when no certificate was given (plaintext).
    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>, SecurityError> {
        let Some(identity) = self.identity()? else {
            if self.tls_require_client_cert {
                return Err(SecurityError::Incomplete(
                    "--tls-require-client-cert needs --tls-cert and --tls-key",
                ));
            }
            return Ok(None);
        };
        let mut config = ServerTlsConfig::new().identity(identity);
        if self.tls_require_client_cert {
            let ca = self.ca()?.ok_or(SecurityError::Incomplete(
                "--tls-require-client-cert needs --tls-ca",
            ))?;
            config = config.client_ca_root(ca);
        }
        Ok(Some(config))
    }

    /// Whether connections made by this process use TLS.
    pub fn client_uses_tls(&self) -> bool {
        self.tls_ca.is_some()
    }

    /// An endpoint for `addr` (`host:port`, or a full `http://` /
    /// `https://` URL), with TLS when --tls-ca is set, and the timeouts every
    /// connection in this system wants: a dead peer must be noticed in
    /// about a second, not after TCP's minutes.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, SecurityError> {
        let bad = |reason: String| SecurityError::Address {
            addr: addr.to_string(),
            reason,
        };
        // Asked for TLS without saying whom to trust: refuse rather than
        // quietly connect in plaintext.
        if addr.starts_with("https://") && !self.client_uses_tls() {
            return Err(bad(
                "https:// needs --tls-ca (the CA that signed the server's certificate)".into(),
            ));
        }
        let bare = addr
            .strip_prefix("http://")
            .or_else(|| addr.strip_prefix("https://"))
            .unwrap_or(addr);
        let scheme = if self.client_uses_tls() {
            "https"
        } else {
            "http"
        };
        let uri: http::Uri = format!("{scheme}://{bare}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        let host = uri
            .host()
            .ok_or_else(|| bad("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if uri.port_u16().is_none() {
            return Err(bad("no port (expected HOST:PORT)".into()));
        }
        let mut endpoint = Endpoint::from(uri)
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_millis(500))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true);
        if let Some(ca) = self.ca()? {
            let mut tls = ClientTlsConfig::new().ca_certificate(ca).domain_name(host);
            if let Some(identity) = self.identity()? {
                tls = tls.identity(identity);
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parses_host_port_and_rejects_garbage() {
        let tls = TlsArgs::default();
        let e = tls.endpoint("127.0.0.1:50051").unwrap();
        assert_eq!(e.uri().to_string(), "http://127.0.0.1:50051/");
        assert!(tls.endpoint("http://10.0.0.1:1").is_ok());
        let err = tls.endpoint("https://10.0.0.1:1").expect_err("no CA");
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        assert!(matches!(
            tls.endpoint("nohost"),
            Err(SecurityError::Address { .. })
        ));
        assert!(matches!(
            tls.endpoint("a b:1"),
            Err(SecurityError::Address { .. })
        ));
    }

    #[test]
    fn cert_without_key_is_refused() {
        let tls = TlsArgs {
            tls_cert: Some("c.pem".into()),
            ..TlsArgs::default()
        };
        assert!(matches!(tls.identity(), Err(SecurityError::Incomplete(_))));
    }
}

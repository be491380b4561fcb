//! Transport security shared by the three binaries: TLS options, connecting
//! to a server with them, and access tokens on the registry's calls.
//!
//! One place, so `registry`, `node-host` and `client` take the same flags
//! with the same meaning and a fix here reaches all of them.

use std::path::{Path, PathBuf};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Status};

use crate::registry::v1::registry_client::RegistryClient;

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

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// No token: calls go out without an `authorization` header.
    pub fn none() -> BearerToken {
        BearerToken(None)
    }

    /// A token from a flag or environment variable; empty means none.
    pub fn new(token: Option<&str>) -> Result<BearerToken, SecurityError> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(BearerToken(None)),
            Some(t) if t.bytes().all(|b| b.is_ascii_graphic()) => format!("Bearer {t}")
                .parse()
                .map(|v| BearerToken(Some(v)))
                .map_err(|_| SecurityError::BadToken),
            Some(_) => Err(SecurityError::BadToken),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

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

/// Which token each kind of registry call needs.
#[derive(Clone, Debug, Default)]
pub struct TokenPolicy {
    /// Needed by calls that change state (leases, register, update,
    /// deregister). `None`: anyone may write.
    pub write: Option<String>,
    /// Needed by calls that only read (list, resolve, descriptors, watch).
    /// `None`: anyone may read. The write token is accepted for reads too.
    pub read: Option<String>,
}

/// Methods of `registry.v1.Registry` that change state.
const WRITE_METHODS: &[&str] = &[
    "GrantLease",
    "KeepAlive",
    "RevokeLease",
    "Register",
    "Update",
    "Deregister",
];

impl TokenPolicy {
    /// Whether any token is required at all.
    pub fn is_open(&self) -> bool {
        self.write.is_none() && self.read.is_none()
    }

    /// Checks a call to `path` (`/registry.v1.Registry/Register`) carrying
    /// the `authorization` header value `presented`. Calls outside the
    /// registry service (health, reflection) are always allowed.
    pub fn check(&self, path: &str, presented: Option<&[u8]>) -> Result<(), Status> {
        let Some(method) = path.strip_prefix("/registry.v1.Registry/") else {
            return Ok(());
        };
        // The tokens accepted; no allocation, as this runs on every call.
        let (accepted, kind) = if WRITE_METHODS.contains(&method) {
            ([self.write.as_ref(), None], "write")
        } else {
            // The write token reads too, but only once reads need a token.
            let read = self.read.as_ref();
            ([read, read.and(self.write.as_ref())], "read")
        };
        if accepted.iter().all(Option::is_none) {
            return Ok(());
        }
        let Some(presented) = presented else {
            return Err(Status::unauthenticated(format!(
                "{method} needs the registry's {kind} token: none was sent (--token or REGISTRY_TOKEN)"
            )));
        };
        // The auth scheme is case-insensitive (RFC 9110): tools such as
        // grpcurl are often given `authorization: bearer ...`.
        let token = match presented.split_at_checked(7) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"Bearer ") => token,
            _ => presented,
        };
        if accepted
            .iter()
            .flatten()
            .any(|t| constant_time_eq(t.as_bytes(), token))
        {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!(
                "{method} needs the registry's {kind} token: the token sent is not it"
            )))
        }
    }
}

/// Compares without stopping at the first difference, so response time does
/// not tell an attacker how much of a guessed token (or lease secret) was
/// right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A tower layer that enforces a [`TokenPolicy`] on a server.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    policy: std::sync::Arc<TokenPolicy>,
}

impl AuthLayer {
    /// Enforces `policy`.
    pub fn new(policy: TokenPolicy) -> AuthLayer {
        AuthLayer {
            policy: std::sync::Arc::new(policy),
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AuthLayer`] produces.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    policy: std::sync::Arc<TokenPolicy>,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Auth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<R>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let presented = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self.policy.check(request.uri().path(), presented) {
            Ok(()) => futures_util::future::Either::Left(self.inner.call(request)),
            Err(status) => {
                futures_util::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(write: Option<&str>, read: Option<&str>) -> TokenPolicy {
        TokenPolicy {
            write: write.map(String::from),
            read: read.map(String::from),
        }
    }

    #[test]
    fn open_policy_allows_everything() {
        let p = policy(None, None);
        assert!(p.check("/registry.v1.Registry/Register", None).is_ok());
        assert!(p.check("/registry.v1.Registry/Resolve", None).is_ok());
    }

    #[test]
    fn write_token_guards_writes_only() {
        let p = policy(Some("s3cret"), None);
        let err = p.check("/registry.v1.Registry/Register", None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("write token"), "{}", err.message());
        let err = p
            .check("/registry.v1.Registry/Deregister", Some(b"Bearer x"))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("not it"), "{}", err.message());
        // Neither the expected token nor the one sent is echoed back.
        assert!(!err.message().contains("s3cret"), "{}", err.message());
        assert!(!err.message().contains("Bearer"), "{}", err.message());
        assert!(
            p.check("/registry.v1.Registry/Register", Some(b"Bearer s3cret"))
                .is_ok()
        );
        // Without a read token, reads are open even with a write token set.
        assert!(p.check("/registry.v1.Registry/Watch", None).is_ok());
        assert!(
            p.check("/registry.v1.Registry/Resolve", Some(b"Bearer x"))
                .is_ok()
        );
    }

    #[test]
    fn read_token_alone_leaves_writes_open() {
        let p = policy(None, Some("r"));
        assert!(p.check("/registry.v1.Registry/Register", None).is_ok());
        assert!(p.check("/registry.v1.Registry/Resolve", None).is_err());
        assert!(
            p.check("/registry.v1.Registry/Resolve", Some(b"Bearer r"))
                .is_ok()
        );
    }

    #[test]
    fn constant_time_eq_compares_whole_slices() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn read_token_accepts_write_token_and_leaves_health_open() {
        let p = policy(Some("w"), Some("r"));
        assert!(
            p.check("/registry.v1.Registry/Resolve", Some(b"Bearer r"))
                .is_ok()
        );
        assert!(
            p.check("/registry.v1.Registry/Resolve", Some(b"Bearer w"))
                .is_ok()
        );
        assert!(
            p.check("/registry.v1.Registry/Register", Some(b"Bearer r"))
                .is_err()
        );
        assert!(
            p.check("/registry.v1.Registry/Resolve", Some(b"bearer r"))
                .is_ok(),
            "the scheme is case-insensitive"
        );
        let err = p.check("/registry.v1.Registry/Resolve", None).unwrap_err();
        assert!(err.message().contains("read token"));
        assert!(p.check("/grpc.health.v1.Health/Check", None).is_ok());
    }

    #[test]
    fn bearer_token_rejects_header_breakers() {
        assert!(BearerToken::new(Some("ok-token")).is_ok());
        assert!(BearerToken::new(Some("")).unwrap().0.is_none());
        assert!(matches!(
            BearerToken::new(Some("a b")),
            Err(SecurityError::BadToken)
        ));
        assert!(matches!(
            BearerToken::new(Some("a\nb")),
            Err(SecurityError::BadToken)
        ));
    }

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

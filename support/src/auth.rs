//! Access tokens: the one a client sends ([`BearerToken`]) and the policy a
//! server enforces ([`TokenPolicy`], through [`AuthLayer`]).

use std::task::{Context, Poll};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::SecurityError;

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
}

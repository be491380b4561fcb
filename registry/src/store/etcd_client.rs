//! The etcd store's connection to etcd: a channel per endpoint of the
//! `--store` URL, one in use at a time ([`Failover`]), with etcd's auth
//! token when `--etcd-user` is given (plaintext, or TLS with a CA and optionally a client
//! certificate), its KV, Watch and Lease clients, and the identity of the
//! cluster behind them.

use std::time::Duration;

use etcd_api::pb::{
    RangeRequest, kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
};
use thiserror::Error;
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::store::etcd::{EtcdUrl, sha256_hex};
use crate::store::etcd_failover::{Credentials, Failover};

/// How long connecting (and the first read) may take before the registry
/// gives up with an error naming the endpoints.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest answer read from etcd: a page of descriptor chunks, or a
/// watch response catching up over many revisions.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// The TLS settings for etcd from the `--etcd-ca`, `--etcd-cert` and
/// `--etcd-key` files: `None` when none is given (plaintext).
pub fn tls_config(
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<Option<ClientTlsConfig>, EtcdError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| EtcdError::Tls(format!("{}: {e}", path.display())))
    };
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = ca {
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    match (cert, key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(EtcdError::Tls(
                "--etcd-cert and --etcd-key go together (a client certificate and its key)".into(),
            ));
        }
    }
    Ok(Some(tls))
}

/// How this registry reaches etcd beyond its addresses: TLS (a CA, and a
/// client certificate for an etcd started with `--client-cert-auth`) and
/// etcd's own user and password auth. Default: plaintext, no user.
#[derive(Clone, Debug, Default)]
pub struct EtcdAccess {
    /// `--etcd-ca`, `--etcd-cert`, `--etcd-key`.
    pub tls: Option<ClientTlsConfig>,
    /// `--etcd-user` and its password.
    pub credentials: Option<Credentials>,
}

/// Why etcd could not be reached.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// An endpoint or the TLS settings were refused by the transport.
    #[error("etcd store: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS files for etcd are missing, unreadable or incomplete.
    #[error("etcd store TLS: {0}")]
    Tls(String),
    /// etcd refused `--etcd-user` (a wrong password, an unknown user).
    #[error("etcd store: etcd at {endpoints} refused user {user:?}: {message}")]
    Refused {
        /// The endpoints tried.
        endpoints: String,
        /// `--etcd-user`.
        user: String,
        /// etcd's reason.
        message: String,
    },
    /// etcd did not answer, or answered with an error.
    #[error("etcd store: no etcd member at {endpoints} answered a read: {}", status.message())]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// What came back.
        status: tonic::Status,
    },
}

/// A connection to an etcd cluster. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    /// Reads, writes and transactions.
    pub kv: KvClient<Failover>,
    /// Watches of the prefix.
    pub watch: WatchClient<Failover>,
    /// The etcd leases behind registry leases.
    pub lease: LeaseClient<Failover>,
    /// etcd's cluster id (the same from every member).
    pub cluster_id: u64,
    /// The member in use, and the move to the next.
    pub members: Failover,
    /// `--etcd-user`, for a new token when etcd refuses the one it gave.
    pub credentials: Option<Credentials>,
}

impl EtcdClient {
    /// Connects to `url`'s endpoints (with `tls` if set) and reads once, to
    /// learn the cluster's id and fail now rather than at the first write:
    /// each member in turn until one answers, within [`CONNECT_TIMEOUT`].
    pub async fn connect(url: &EtcdUrl, access: &EtcdAccess) -> Result<EtcdClient, EtcdError> {
        let tls = access.tls.as_ref();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoints = Vec::with_capacity(url.endpoints.len());
        for host in &url.endpoints {
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true);
            if let Some(tls) = &tls {
                endpoint = endpoint.tls_config((*tls).clone())?;
            }
            endpoints.push((host.clone(), endpoint));
        }
        let members = Failover::new(endpoints);
        if let Some(credentials) = &access.credentials {
            authenticate(url, &members, credentials).await?;
        }
        let kv = KvClient::new(members.clone());
        let probe = RangeRequest {
            key: url.all_keys(),
            range_end: etcd_api::prefix_end(&url.all_keys()),
            count_only: true,
            ..Default::default()
        };
        let header = on_some_member(
            url,
            &members,
            |_| None,
            || {
                let mut kv = kv.clone();
                let probe = probe.clone();
                async move {
                    Ok(kv
                        .range(probe)
                        .await?
                        .into_inner()
                        .header
                        .unwrap_or_default())
                }
            },
        )
        .await?;
        Ok(EtcdClient {
            kv: kv.max_decoding_message_size(MAX_ANSWER_BYTES),
            watch: WatchClient::new(members.clone()).max_decoding_message_size(MAX_ANSWER_BYTES),
            lease: LeaseClient::new(members.clone()),
            cluster_id: header.cluster_id,
            members,
            credentials: access.credentials.clone(),
        })
    }

    /// A new token once etcd refused the last one (see
    /// [`Failover::token_refused`]); nothing to do otherwise.
    pub async fn renew_token(&self) {
        let Some(credentials) = &self.credentials else {
            return;
        };
        if !self.members.token_refused() {
            return;
        }
        match self.members.authenticate(credentials).await {
            Ok(()) => tracing::info!(user = credentials.user, "etcd token renewed"),
            Err(status) => tracing::warn!(
                user = credentials.user,
                "etcd token not renewed: {}",
                status.message()
            ),
        }
    }
}

/// The first token, from any member that answers within
/// [`CONNECT_TIMEOUT`]. A refusal of the user is final; etcd without auth
/// enabled is told in a warning, and the registry goes on without a token.
async fn authenticate(
    url: &EtcdUrl,
    members: &Failover,
    credentials: &Credentials,
) -> Result<(), EtcdError> {
    let settle = |status: &tonic::Status, host: &str| match status.code() {
        tonic::Code::InvalidArgument => Some(Err(EtcdError::Refused {
            endpoints: url.endpoints.join(","),
            user: credentials.user.clone(),
            message: status.message().to_string(),
        })),
        tonic::Code::FailedPrecondition => {
            tracing::warn!(
                user = credentials.user,
                "etcd at {host}: {} (--etcd-user is not needed)",
                status.message()
            );
            Some(Ok(()))
        }
        _ => None,
    };
    on_some_member(
        url,
        members,
        |(status, host)| settle(status, host),
        || members.authenticate(credentials),
    )
    .await
}

/// `attempt` on the pinned member, then on the next while it fails, until
/// one answers or every member failed, within [`CONNECT_TIMEOUT`];
/// `settle` ends the search on a failure no other member would change
/// (etcd's own answer). Unreachable names every member's failure.
async fn on_some_member<T, F, Fut>(
    url: &EtcdUrl,
    members: &Failover,
    settle: impl Fn((&tonic::Status, &str)) -> Option<Result<T, EtcdError>>,
    mut attempt: F,
) -> Result<T, EtcdError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut failures = Vec::new();
    loop {
        let (member, host) = members.pinned();
        let host = host.to_string();
        let status = match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(status)) => status,
            Err(_) => {
                tonic::Status::deadline_exceeded(format!("no answer within {CONNECT_TIMEOUT:?}"))
            }
        };
        if let Some(settled) = settle((&status, &host)) {
            return settled;
        }
        // A refused connection moved on already; a member that answers
        // with an error (or not at all) is left here.
        members.failed(member);
        let mut failure = format!("{host}: {}", status.message());
        if status.message().contains("user name is empty") {
            failure
                .push_str(" (etcd has auth enabled: give --etcd-user and REGISTRY_ETCD_PASSWORD)");
        }
        failures.push(failure);
        if failures.len() >= members.len() || status.code() == tonic::Code::DeadlineExceeded {
            return Err(EtcdError::Unreachable {
                endpoints: url.endpoints.join(","),
                status: tonic::Status::new(status.code(), failures.join("; ")),
            });
        }
    }
}

/// The registry id every replica over the same etcd cluster and prefix
/// sends watchers: so a watcher resumes on any of them, and tells another
/// cluster (or another prefix of the same one) apart.
pub fn registry_id(cluster_id: u64, prefix: &str) -> String {
    format!(
        "etcd-{cluster_id:016x}-{}",
        &sha256_hex(prefix.as_bytes())[..16]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_id_names_the_cluster_and_the_prefix() {
        let a = registry_id(0x1234, "/registry");
        assert_eq!(a, registry_id(0x1234, "/registry"));
        assert!(a.starts_with("etcd-0000000000001234-"));
        assert_ne!(a, registry_id(0x1234, "/other"));
        assert_ne!(a, registry_id(0x1235, "/registry"));
        assert!(a.len() <= crate::validate::MAX_REGISTRY_ID);
    }
}

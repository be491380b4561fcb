//! Every way a registry call can fail, and the one place where each becomes
//! a gRPC status code.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Why a call was refused. Nothing has changed when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A request field is missing, malformed or out of range.
    #[error("{field}: {message}")]
    Invalid {
        /// The field's path in the request, e.g. `instance.port`.
        field: String,
        /// What is wrong with it, including the value when short.
        message: String,
    },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {0} not found (expired or revoked?): grant a new lease and register again")]
    LeaseNotFound(u64),
    /// The secret does not match the lease.
    #[error("wrong lease_secret for lease {0}")]
    WrongSecret(u64),
    /// No instance with this id in this service.
    #[error("instance {instance_id:?} of service {service:?} not found")]
    InstanceNotFound {
        /// The service asked for.
        service: String,
        /// The instance asked for.
        instance_id: String,
    },
    /// The instance exists but belongs to another lease.
    #[error("instance {instance_id:?} of service {service:?} belongs to another lease")]
    NotOwner {
        /// The service of the instance.
        service: String,
        /// The instance id.
        instance_id: String,
    },
    /// The service has no instance.
    #[error("service {0:?} not found (no instance registered)")]
    ServiceNotFound(String),
    /// The service has instances, but none registered descriptors.
    #[error("service {0:?} has no registered descriptors")]
    NoDescriptors(String),
    /// A documented limit was reached.
    #[error("limit reached: {message}")]
    Limit {
        /// Which limit, for programs (the metrics label, the status's
        /// `google.rpc.ErrorInfo` reason).
        limit: Limit,
        /// What was refused and the flag that sets the limit, for people.
        message: String,
    },
    /// A rate limit was reached: unlike [`Error::Limit`], it passes by
    /// itself, after `retry_after`. The status carries that wait as a
    /// `google.rpc.RetryInfo` detail, for programs to act on without
    /// reading the message.
    #[error("limit reached: {message}")]
    RateLimit {
        /// What was refused and the flag that sets the limit, for people.
        message: String,
        /// How long until a retry can succeed.
        retry_after: Duration,
    },
    /// The store behind this replica (etcd) cannot be reached or did not
    /// answer: another replica may.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The limits a call can run into: the `limit` label of
/// `registry_refused_total` and, in upper case, the `reason` of the
/// `google.rpc.ErrorInfo` detail of the refusal's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-leases`: live leases in the registry.
    Leases,
    /// `--max-instances`: instances in the registry.
    Instances,
    /// `--max-instances-per-lease`.
    InstancesPerLease,
    /// `--max-instances-per-service`.
    InstancesPerService,
    /// Bytes of distinct descriptor sets held.
    DescriptorBytes,
    /// `--max-watches-per-connection`.
    WatchesPerConnection,
    /// `--max-registrations-per-sec`, per peer.
    RegistrationsPerSecond,
}

impl Limit {
    /// Every limit, in the order of the metrics' labels.
    pub const ALL: [Limit; 7] = [
        Limit::RegistrationsPerSecond,
        Limit::WatchesPerConnection,
        Limit::InstancesPerLease,
        Limit::InstancesPerService,
        Limit::Leases,
        Limit::DescriptorBytes,
        Limit::Instances,
    ];

    /// The metrics label (snake case).
    pub fn label(self) -> &'static str {
        match self {
            Limit::Leases => "leases",
            Limit::Instances => "instances",
            Limit::InstancesPerLease => "instances_per_lease",
            Limit::InstancesPerService => "instances_per_service",
            Limit::DescriptorBytes => "descriptor_bytes",
            Limit::WatchesPerConnection => "watches_per_connection",
            Limit::RegistrationsPerSecond => "registrations_per_sec",
        }
    }
}

/// The `domain` of the `google.rpc.ErrorInfo` details this registry sends.
pub const ERROR_DOMAIN: &str = "registry.v1";

impl Error {
    /// An [`Error::Limit`]: `limit` refused the call, as `message` explains.
    pub fn limit(limit: Limit, message: impl Into<String>) -> Error {
        Error::Limit {
            limit,
            message: message.into(),
        }
    }

    /// The limit that refused the call, if one did.
    pub fn refused_by(&self) -> Option<Limit> {
        match self {
            Error::Limit { limit, .. } => Some(*limit),
            Error::RateLimit { .. } => Some(Limit::RegistrationsPerSecond),
            _ => None,
        }
    }

    /// An [`Error::Invalid`] for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The gRPC code the protocol documents for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid { .. } => Code::InvalidArgument,
            Error::LeaseNotFound(_)
            | Error::InstanceNotFound { .. }
            | Error::ServiceNotFound(_)
            | Error::NoDescriptors(_) => Code::NotFound,
            Error::WrongSecret(_) | Error::NotOwner { .. } => Code::PermissionDenied,
            Error::Limit { .. } | Error::RateLimit { .. } => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
        }
    }
}

impl Error {
    /// The status this error is sent as. Handlers convert with `?`; the
    /// `From` conversion (in `crate::service`, the gRPC edge) also counts
    /// limit refusals in the metrics.
    pub fn status(&self) -> Status {
        match self {
            Error::RateLimit { retry_after, .. } => {
                let mut details = ErrorDetails::with_retry_info(Some(*retry_after));
                details.set_error_info(
                    Limit::RegistrationsPerSecond.label().to_uppercase(),
                    ERROR_DOMAIN,
                    HashMap::new(),
                );
                Status::with_error_details(self.code(), self.to_string(), details)
            }
            Error::Limit { limit, .. } => Status::with_error_details(
                self.code(),
                self.to_string(),
                ErrorDetails::with_error_info(
                    limit.label().to_uppercase(),
                    ERROR_DOMAIN,
                    HashMap::new(),
                ),
            ),
            _ => Status::new(self.code(), self.to_string()),
        }
    }
}

/// Shorthand for results of registry operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_rate_limit_carries_retry_info() {
        let wait = Duration::from_millis(250);
        let status = Error::RateLimit {
            message: "registrations per second per peer".into(),
            retry_after: wait,
        }
        .status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("per second"),
            "{}",
            status.message()
        );
        let info = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(info.retry_delay, Some(wait));

        let quota = Error::limit(Limit::InstancesPerLease, "instances per lease").status();
        assert_eq!(quota.code(), Code::ResourceExhausted);
        assert!(quota.get_details_retry_info().is_none());
    }

    #[test]
    fn every_limit_refusal_names_its_limit_for_programs() {
        let rate = Error::RateLimit {
            message: "registrations per second".into(),
            retry_after: Duration::from_millis(1),
        };
        let limits = Limit::ALL.map(|limit| Error::limit(limit, "at most 1"));
        for error in limits.iter().chain([&rate]) {
            let limit = error.refused_by().expect("a limit refusal");
            let info = error.status().get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, limit.label().to_uppercase(), "{error}");
            assert_eq!(info.domain, ERROR_DOMAIN);
        }
        assert_eq!(Error::LeaseNotFound(1).refused_by(), None);
    }
}

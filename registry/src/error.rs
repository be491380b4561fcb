//! Every way a registry call can fail, and the one place where each becomes
//! a gRPC status code.

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
    #[error("limit reached: {0}")]
    Limit(String),
    /// A rate limit was reached: unlike [`Error::Limit`], it passes by
    /// itself, after `retry_after`. The status carries that wait as a
    /// `google.rpc.RetryInfo` detail, for programs to act on without
    /// reading the message.
    #[error("limit reached: {message}")]
    RateLimit {
        /// Which limit, as [`Error::Limit`] says it.
        message: String,
        /// How long until a retry can succeed.
        retry_after: Duration,
    },
}

impl Error {
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
            Error::Limit(_) | Error::RateLimit { .. } => Code::ResourceExhausted,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        crate::metrics::refused(&error);
        error.status()
    }
}

impl Error {
    /// The status this error is sent as (not counted in the metrics: that
    /// is the `From` conversion's job).
    fn status(&self) -> Status {
        match self {
            Error::RateLimit { retry_after, .. } => Status::with_error_details(
                self.code(),
                self.to_string(),
                ErrorDetails::with_retry_info(Some(*retry_after)),
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

        let quota = Error::Limit("instances per lease".into()).status();
        assert_eq!(quota.code(), Code::ResourceExhausted);
        assert!(quota.get_details_retry_info().is_none());
    }
}

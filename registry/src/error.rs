//! Every way a registry call can fail, and the one place where each becomes
//! a gRPC status code.

use tonic::{Code, Status};

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
            Error::Limit(_) => Code::ResourceExhausted,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        crate::metrics::refused(&error);
        Status::new(error.code(), error.to_string())
    }
}

/// Shorthand for results of registry operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

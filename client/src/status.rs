//! A gRPC status as people read it, in errors and logs.

use std::error::Error;
use std::fmt;
use tonic::Status;

/// Why a connection to a server failed, read from the types of the error's
/// causes (an `io::Error`'s kind, tonic's `TimeoutExpired`), not its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens there: the host answered with a reset.
    Refused,
    /// No route to the host or its network.
    NoRoute,
    /// No answer within the connect timeout.
    TimedOut,
}

impl ConnectFailure {
    /// Whether an immediate retry is pointless: the host said no at once.
    /// A one-shot command reports such a failure instead of waiting.
    pub fn is_final(self) -> bool {
        matches!(self, ConnectFailure::Refused | ConnectFailure::NoRoute)
    }
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectFailure::Refused => "connection refused",
            ConnectFailure::NoRoute => "no route to host",
            ConnectFailure::TimedOut => "timed out",
        })
    }
}

/// The connection failure behind `status`, if it is one.
pub fn connect_failure(status: &Status) -> Option<ConnectFailure> {
    let mut cause: Option<&(dyn Error + 'static)> = status.source();
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            match io.kind() {
                ErrorKind::ConnectionRefused => return Some(ConnectFailure::Refused),
                ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                    return Some(ConnectFailure::NoRoute);
                }
                ErrorKind::TimedOut => return Some(ConnectFailure::TimedOut),
                _ => {}
            }
        }
        if error.is::<tonic::TimeoutExpired>() {
            return Some(ConnectFailure::TimedOut);
        }
        cause = error.source();
    }
    None
}

/// Whether `status` is the transport failing rather than an answer: the
/// connection could not be made, or broke before the reply was complete.
/// Read from the types of the status's causes: a status a server sent
/// arrives as headers and has no cause, whatever its code or message say;
/// one tonic made from an I/O, HTTP/2 or hyper error carries that error.
/// A deadline that ran out (tonic's `TimeoutExpired`) is not a transport
/// failure: another instance would not be faster.
pub fn is_transport_failure(status: &Status) -> bool {
    let mut transport = false;
    let mut cause: Option<&(dyn Error + 'static)> = status.source();
    while let Some(error) = cause {
        if error.is::<tonic::TimeoutExpired>() {
            return false;
        }
        transport |= error.is::<std::io::Error>()
            || error.is::<h2::Error>()
            || error.is::<hyper::Error>()
            || error.is::<tonic::transport::Error>();
        cause = error.source();
    }
    transport
}

/// A status as one readable line: `InvalidArgument: division by zero`.
pub fn status_text(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            status_text(&Status::invalid_argument("b is 0")),
            "InvalidArgument: b is 0"
        );
        assert_eq!(status_text(&Status::unavailable("")), "Unavailable");
    }

    #[test]
    fn connect_failures_are_read_from_types_not_text() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = Status::from_error(Box::new(refused));
        assert_eq!(connect_failure(&status), Some(ConnectFailure::Refused));
        // The words alone are not a refusal.
        assert_eq!(
            connect_failure(&Status::unavailable("connection refused")),
            None
        );
    }
}

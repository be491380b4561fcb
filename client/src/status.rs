//! A gRPC status as people read it, in errors and logs.

use tonic::Status;

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
}

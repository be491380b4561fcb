//! From `SERVICE/METHOD` as typed to a method descriptor.
//!
//! SERVICE is the registered name (`calculator`) or the full protobuf name of
//! the gRPC service (`calculator.v1.Calculator`). METHOD is case-sensitive, as
//! gRPC paths are; a near miss gets a "did you mean" and the list of methods.

use crate::codec::method_path;
use crate::descriptors::{DescriptorError, Descriptors};
use crate::directory::Snapshot;
use prost_reflect::{MethodDescriptor, ServiceDescriptor};
use thiserror::Error;

/// A method to call, on a registered service.
#[derive(Debug, Clone)]
pub struct Target {
    /// The registered service name (whose instances serve the method).
    pub service: String,
    /// The method, with its input and output descriptors.
    pub method: MethodDescriptor,
    /// The method's HTTP/2 path, made once rather than at every call
    /// (`None` if it is not a valid path: each call then says why).
    path: Option<http::uri::PathAndQuery>,
}

impl Target {
    /// The method `method` of the registered service `service`.
    pub fn new(service: String, method: MethodDescriptor) -> Target {
        let path = method_path(&method).ok();
        Target {
            service,
            method,
            path,
        }
    }

    /// The method's HTTP/2 path: `/package.Service/Method`.
    pub fn path(&self) -> Result<http::uri::PathAndQuery, tonic::Status> {
        match &self.path {
            Some(path) => Ok(path.clone()),
            None => method_path(&self.method),
        }
    }
}

/// Why `SERVICE/METHOD` could not be resolved.
#[derive(Debug, Error)]
pub enum ResolveError {
    /// Not of the form `SERVICE/METHOD`.
    #[error("expected SERVICE/METHOD (e.g. calculator/Add), got `{0}`")]
    BadTarget(String),
    /// No such service in the registry.
    #[error("no service `{name}` is registered{hint}; registered services: {known}")]
    UnknownService {
        /// The name given.
        name: String,
        /// ", did you mean `x`?" or empty.
        hint: String,
        /// The registered services, with their protobuf names.
        known: String,
    },
    /// No such method in the service.
    #[error("no method `{method}` in {service}{hint}; methods: {methods}")]
    UnknownMethod {
        /// The method given.
        method: String,
        /// Full protobuf name of the service.
        service: String,
        /// ", did you mean `x`?" or empty.
        hint: String,
        /// The service's methods.
        methods: String,
    },
    /// The service's descriptors could not be found.
    #[error(transparent)]
    Descriptors(#[from] DescriptorError),
}

/// Resolves `SERVICE/METHOD` against the directory of `descriptors`,
/// fetching the service's descriptors if they are not cached yet (or if the
/// cached ones lack the method: see [`Descriptors::get_fitting`]).
pub async fn resolve(descriptors: &Descriptors, target: &str) -> Result<Target, ResolveError> {
    let (service, method) = split_target(target)?;
    let service = find_service(&descriptors.directory().snapshot(), service)?;
    let descriptor = descriptors
        .get_fitting(&service, |d| d.methods().any(|m| m.name() == method))
        .await?;
    let method = find_method(&descriptor, method)?;
    Ok(Target::new(service, method))
}

/// Splits `SERVICE/METHOD`.
pub fn split_target(target: &str) -> Result<(&str, &str), ResolveError> {
    match target.split_once('/') {
        Some((s, m)) if !s.is_empty() && !m.is_empty() && !m.contains('/') => Ok((s, m)),
        _ => Err(ResolveError::BadTarget(target.to_string())),
    }
}

/// The registered service named `name`, either by its registered name or by
/// the protobuf service its instances serve.
pub fn find_service(snapshot: &Snapshot, name: &str) -> Result<String, ResolveError> {
    let services = snapshot.services();
    if services.iter().any(|s| s == name) {
        return Ok(name.to_string());
    }
    if let Some(s) = services
        .iter()
        .find(|s| snapshot.proto_service(s).as_deref() == Some(name))
    {
        return Ok(s.clone());
    }
    let mut candidates: Vec<String> = services.clone();
    candidates.extend(services.iter().filter_map(|s| snapshot.proto_service(s)));
    let known: Vec<String> = services
        .iter()
        .map(|s| match snapshot.proto_service(s) {
            Some(p) => format!("{s} ({p})"),
            None => s.clone(),
        })
        .collect();
    Err(ResolveError::UnknownService {
        name: name.to_string(),
        hint: hint(suggest(name, candidates.iter().map(String::as_str))),
        known: if known.is_empty() {
            "(none)".to_string()
        } else {
            known.join(", ")
        },
    })
}

/// The method named exactly `name` in `service`.
pub fn find_method(
    service: &ServiceDescriptor,
    name: &str,
) -> Result<MethodDescriptor, ResolveError> {
    let Some(method) = service.methods().find(|m| m.name() == name) else {
        let names: Vec<String> = service.methods().map(|m| m.name().to_string()).collect();
        return Err(ResolveError::UnknownMethod {
            method: name.to_string(),
            service: service.full_name().to_string(),
            hint: hint(suggest(name, names.iter().map(String::as_str))),
            methods: if names.is_empty() {
                "(none)".to_string()
            } else {
                names.join(", ")
            },
        });
    };
    Ok(method)
}

fn hint(suggestion: Option<&str>) -> String {
    suggestion
        .map(|s| format!(", did you mean `{s}`?"))
        .unwrap_or_default()
}

/// The candidate closest to `wanted`: one equal ignoring case, else the only
/// one it is a prefix of (for words of 2 chars or more), else the nearest by
/// edit distance if it is close enough to be a typo (at most a third of the
/// word's length, at least 1, none for words under 3 chars).
pub fn suggest<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    if let Some(c) = candidates.iter().find(|c| c.eq_ignore_ascii_case(wanted)) {
        return Some(c);
    }
    let lower = wanted.to_lowercase();
    // Counted in chars, not bytes: a single `é` is one char.
    let len = wanted.chars().count();
    // A unique prefix: `Mul` for `Multiply`.
    let mut prefixed = candidates
        .iter()
        .filter(|c| len >= 2 && c.to_lowercase().starts_with(&lower));
    if let (Some(c), None) = (prefixed.next(), prefixed.next()) {
        return Some(c);
    }
    // Very short words are too easy to "correct" into anything.
    let limit = if len < 3 { 0 } else { (len / 3).max(1) };
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_protos::{calculator_pool, service, shop_pool};

    fn calculator() -> ServiceDescriptor {
        service(&calculator_pool(), "calculator.v1.Calculator")
    }

    #[test]
    fn methods_are_case_sensitive_with_a_suggestion() {
        assert_eq!(
            find_method(&calculator(), "Add").expect("found").name(),
            "Add"
        );
        let err = find_method(&calculator(), "add").unwrap_err().to_string();
        assert_eq!(
            err,
            "no method `add` in calculator.v1.Calculator, did you mean `Add`?; methods: Add, Subtract, Multiply, Divide"
        );
        let err = find_method(&calculator(), "Multipy")
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `Multiply`?"), "{err}");
        let err = find_method(&calculator(), "Sqrt").unwrap_err().to_string();
        assert!(!err.contains("did you mean"), "{err}");
    }

    #[test]
    fn every_kind_of_method_resolves() {
        let svc = service(&shop_pool(), "shop.v1.Shop");
        for (name, client, server) in [
            ("Place", false, false),
            ("Watch", false, true),
            ("Upload", true, false),
            ("Chat", true, true),
        ] {
            let m = find_method(&svc, name).expect("callable");
            assert_eq!(
                (m.is_client_streaming(), m.is_server_streaming()),
                (client, server),
                "{name}"
            );
        }
    }

    #[test]
    fn targets_split_on_one_slash() {
        assert_eq!(
            split_target("calculator/Add").expect("ok"),
            ("calculator", "Add")
        );
        for bad in ["calculator", "/Add", "calculator/", "a/b/c"] {
            assert!(split_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn suggestions() {
        let names = ["calculator", "echo"];
        assert_eq!(suggest("Calculator", names), Some("calculator"));
        assert_eq!(suggest("calculater", names), Some("calculator"));
        assert_eq!(suggest("eco", names), Some("echo"));
        assert_eq!(suggest("zzz", names), None);
        assert_eq!(suggest("calc", names), Some("calculator"));
        assert_eq!(suggest("c", names), None);
        // One char, two bytes: still too short for a prefix suggestion.
        assert_eq!(suggest("é", ["école"]), None);
        // The distance counts chars, as the limit does.
        assert_eq!(strsim::levenshtein("kitten", "sitting"), 3);
        assert_eq!(strsim::levenshtein("école", "ecole"), 1);
    }
}

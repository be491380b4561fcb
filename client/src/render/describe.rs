//! `describe`: a service's methods with their request and response fields.

use crate::names::{field_list, streaming_kind};
use prost_reflect::{MethodDescriptor, ServiceDescriptor};
use std::fmt::Write as _;

/// What `describe` prints: how many instances `service` has, then
/// [`describe_service`].
pub fn describe_text(service: &str, instances: usize, descriptor: &ServiceDescriptor) -> String {
    format!(
        "{service}: {instances} instance{}\n{}",
        if instances == 1 { "" } else { "s" },
        describe_service(descriptor)
    )
}

/// A method signature: `rpc Add(calculator.v1.BinaryRequest) returns (calculator.v1.Result)`.
pub fn signature(method: &MethodDescriptor) -> String {
    let stream = |yes: bool| if yes { "stream " } else { "" };
    format!(
        "rpc {}({}{}) returns ({}{})",
        method.name(),
        stream(method.is_client_streaming()),
        method.input().full_name(),
        stream(method.is_server_streaming()),
        method.output().full_name()
    )
}

/// A multi-line description of a service: each method with its request and
/// response fields.
pub fn describe_service(service: &ServiceDescriptor) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "service {}", service.full_name());
    for method in service.methods() {
        let _ = writeln!(out, "  {}", signature(&method));
        let _ = writeln!(
            out,
            "      request  {}: {}",
            method.input().full_name(),
            field_list(&method.input())
        );
        let _ = writeln!(
            out,
            "      response {}: {}",
            method.output().full_name(),
            field_list(&method.output())
        );
        if method.is_client_streaming() {
            // How to give several requests is not obvious from the signature.
            let _ = writeln!(
                out,
                "      ({}: call with the request messages as JSON objects one after another)",
                streaming_kind(&method)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_protos::{calculator_pool, service, shop_pool};

    #[test]
    fn describes_every_method_with_its_fields() {
        let svc = service(&calculator_pool(), "calculator.v1.Calculator");
        let text = describe_service(&svc);
        for m in ["Add", "Subtract", "Multiply", "Divide"] {
            assert!(
                text.contains(&format!(
                    "rpc {m}(calculator.v1.BinaryRequest) returns (calculator.v1.Result)"
                )),
                "{text}"
            );
        }
        assert!(
            text.contains("request  calculator.v1.BinaryRequest: a (double), b (double)"),
            "{text}"
        );
        assert!(
            text.contains("response calculator.v1.Result: value (double)"),
            "{text}"
        );
    }

    #[test]
    fn streaming_signatures() {
        let svc = service(&shop_pool(), "shop.v1.Shop");
        let watch = svc.methods().find(|m| m.name() == "Watch").expect("Watch");
        assert_eq!(
            signature(&watch),
            "rpc Watch(shop.v1.Order) returns (stream shop.v1.Order)"
        );
        assert_eq!(streaming_kind(&watch), "server streaming");
        let text = describe_service(&svc);
        assert!(
            text.contains("rpc Chat(stream shop.v1.Order) returns (stream shop.v1.Order)"),
            "{text}"
        );
        assert!(
            text.contains("(bidirectional streaming: call with the request messages as JSON objects one after another)"),
            "{text}"
        );
        assert!(!text.contains("not callable"), "{text}");
    }
}

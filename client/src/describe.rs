//! How services, methods and fields are shown to people.

use prost_reflect::{
    FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor, ServiceDescriptor,
};
use std::fmt::Write as _;

/// The name of a field kind as written in a .proto file: `double`,
/// `enum shop.v1.Color`, `message shop.v1.Address`.
pub fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
        Kind::Message(m) => format!("message {}", m.full_name()),
        Kind::Enum(e) => format!("enum {}", e.full_name()),
    }
}

/// A field's full type: `double`, `repeated string`, `map<string, int32>`.
pub fn field_type(field: &FieldDescriptor) -> String {
    if let Kind::Message(entry) = field.kind()
        && field.is_map()
    {
        let key = kind_name(&entry.map_entry_key_field().kind());
        let value = kind_name(&entry.map_entry_value_field().kind());
        return format!("map<{key}, {value}>");
    }
    let base = kind_name(&field.kind());
    if field.is_list() {
        format!("repeated {base}")
    } else {
        base
    }
}

/// The fields of a message with their types: `a (double), b (double)`.
pub fn field_list(desc: &MessageDescriptor) -> String {
    let fields: Vec<String> = desc
        .fields()
        .map(|f| format!("{} ({})", f.name(), field_type(&f)))
        .collect();
    if fields.is_empty() {
        "(none)".to_string()
    } else {
        fields.join(", ")
    }
}

/// How a method streams: `unary`, `server streaming`, ...
pub fn streaming_kind(method: &MethodDescriptor) -> &'static str {
    match (method.is_client_streaming(), method.is_server_streaming()) {
        (false, false) => "unary",
        (false, true) => "server streaming",
        (true, false) => "client streaming",
        (true, true) => "bidirectional streaming",
    }
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
    use crate::test_protos::{calculator_pool, shop_pool};

    #[test]
    fn describes_every_method_with_its_fields() {
        let svc = calculator_pool()
            .get_service_by_name("calculator.v1.Calculator")
            .expect("defined");
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
    fn field_types_as_in_proto_files() {
        let order = shop_pool()
            .get_message_by_name("shop.v1.Order")
            .expect("defined");
        let list = field_list(&order);
        assert!(list.contains("tags (repeated string)"), "{list}");
        assert!(list.contains("color (enum shop.v1.Color)"), "{list}");
        assert!(list.contains("labels (map<string, int32>)"), "{list}");
        assert!(list.contains("address (message shop.v1.Address)"), "{list}");
    }

    #[test]
    fn streaming_signatures() {
        let svc = shop_pool()
            .get_service_by_name("shop.v1.Shop")
            .expect("defined");
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

//! How protobuf kinds, field types and method kinds are named, in error
//! messages and descriptions alike.

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_protos::{message, shop_pool};

    #[test]
    fn field_types_as_in_proto_files() {
        let order = message(&shop_pool(), "shop.v1.Order");
        let list = field_list(&order);
        assert!(list.contains("tags (repeated string)"), "{list}");
        assert!(list.contains("color (enum shop.v1.Color)"), "{list}");
        assert!(list.contains("labels (map<string, int32>)"), "{list}");
        assert!(list.contains("address (message shop.v1.Address)"), "{list}");
    }
}

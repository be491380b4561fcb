//! Command-line arguments into a request message, and replies into JSON.
//!
//! Two forms, chosen by the first argument:
//! - JSON: `'{"a": 2, "b": 3}'` (one argument, or several that join into one
//!   object), following the proto3 JSON mapping: field names or their
//!   lowerCamelCase JSON names, 64-bit integers as numbers or strings, enums
//!   by name, nested messages as objects.
//! - `key=value` pairs for flat messages: each value is parsed by the kind of
//!   its field (number, bool, string, enum name or number); a repeated field
//!   takes one pair per element.
//!
//! No arguments means the default (empty) message. Errors name the field and
//! list what would have been valid.
//!
//! A client-streaming or bidirectional method takes a *sequence* of requests
//! ([`parse_sequence`]), read the way grpcurl reads `-d`: JSON objects one
//! after another, whitespace between them optional
//! (`'{"message": "a"}' '{"message": "b"}'`, or `{...}{...}` in one
//! argument), each one message, sent in order. Not a JSON array: an array is
//! one JSON value, and grpcurl users expect the concatenated form, so `[`
//! is refused with a hint. `key=value` pairs still give one flat message,
//! and no arguments send no message at all. An error in the sequence names
//! the message's position: `message 3: no field `x` ...`.

use crate::names::{field_list, field_type, kind_name};
use crate::resolve::suggest;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor, SerializeOptions,
    Value,
};
use thiserror::Error;

/// Why arguments could not be turned into a request.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    /// A key that names no field.
    #[error("no field `{field}` in {message}{hint}; fields: {fields}")]
    UnknownField {
        /// The key given.
        field: String,
        /// Full name of the request message.
        message: String,
        /// ", did you mean `x`?" or empty.
        hint: String,
        /// The fields with their types.
        fields: String,
    },
    /// A value that does not parse as its field's type.
    #[error("field `{field}` of {message} expects {expected}, got {value}{detail}")]
    WrongType {
        /// The field.
        field: String,
        /// Full name of the message holding it.
        message: String,
        /// The field's type, e.g. `a double`.
        expected: String,
        /// The value given, quoted.
        value: String,
        /// Extra explanation (allowed enum values, parser message), or empty.
        detail: String,
    },
    /// An argument that is neither `key=value` nor JSON.
    #[error(
        "expected key=value pairs or one JSON object, got `{arg}`; fields of {message}: {fields}"
    )]
    NotKeyValue {
        /// The argument.
        arg: String,
        /// Full name of the request message.
        message: String,
        /// The fields with their types.
        fields: String,
    },
    /// A message or map field given as `key=value`.
    #[error(
        "field `{field}` of {message} is a {ty}: give the whole request as JSON, e.g. '{{\"{field}\": ...}}'"
    )]
    NotFlat {
        /// The field.
        field: String,
        /// Full name of the request message.
        message: String,
        /// The field's type.
        ty: String,
    },
    /// A singular field given twice.
    #[error("field `{field}` of {message} given more than once")]
    Duplicate {
        /// The field.
        field: String,
        /// Full name of the request message.
        message: String,
    },
    /// Text that is not JSON at all.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// JSON that does not fit the message (a nested problem, say).
    #[error("the JSON does not fit {message}: {error}")]
    JsonMismatch {
        /// Full name of the request message.
        message: String,
        /// What prost-reflect said.
        error: String,
    },
    /// A JSON array where a sequence of request messages was expected.
    #[error(
        "expected JSON objects one after another, one per request message ('{{...}} {{...}}'), got an array: drop the [ ] and the commas between the objects"
    )]
    ArrayNotSequence,
    /// One message of a sequence is wrong.
    #[error("message {index}: {error}")]
    InMessage {
        /// Its position, from 1.
        index: usize,
        /// What is wrong with it.
        error: Box<ArgsError>,
    },
}

/// Builds a request of type `desc` from command-line arguments.
pub fn parse_args<S: AsRef<str>>(
    desc: &MessageDescriptor,
    args: &[S],
) -> Result<DynamicMessage, ArgsError> {
    let first = args.first().map(|a| a.as_ref().trim_start());
    match first {
        None => Ok(DynamicMessage::new(desc.clone())),
        Some(a) if a.starts_with('{') => {
            let joined = args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" ");
            parse_json(desc, &joined)
        }
        Some(_) => parse_pairs(desc, args),
    }
}

/// Builds the requests of a call to `method`: exactly one for a unary or
/// server-streaming method ([`parse_args`]), a sequence of any length for a
/// client-streaming or bidirectional one ([`parse_sequence`]).
pub fn parse_requests<S: AsRef<str>>(
    method: &MethodDescriptor,
    args: &[S],
) -> Result<Vec<DynamicMessage>, ArgsError> {
    if method.is_client_streaming() {
        parse_sequence(&method.input(), args)
    } else {
        parse_args(&method.input(), args).map(|m| vec![m])
    }
}

/// Builds a sequence of messages of type `desc`: JSON objects one after
/// another (the arguments joined by spaces), or `key=value` pairs for one
/// flat message. No arguments, or only whitespace, give no message.
pub fn parse_sequence<S: AsRef<str>>(
    desc: &MessageDescriptor,
    args: &[S],
) -> Result<Vec<DynamicMessage>, ArgsError> {
    let joined = args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" ");
    let text = joined.trim_start();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    if text.starts_with('[') {
        return Err(ArgsError::ArrayNotSequence);
    }
    if !text.starts_with('{') {
        return parse_pairs(desc, args).map(|m| vec![m]);
    }
    let mut messages = Vec::new();
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    loop {
        let in_message = |error| ArgsError::InMessage {
            index: messages.len() + 1,
            error: Box::new(error),
        };
        let value = match values.next() {
            None => return Ok(messages),
            Some(Ok(value)) => value,
            Some(Err(e)) => {
                // The usual slip of someone who thought of an array.
                let hint = if text[values.byte_offset()..].trim_start().starts_with(',') {
                    " (separate the messages with spaces, not commas)"
                } else {
                    ""
                };
                return Err(in_message(ArgsError::MalformedJson(format!("{e}{hint}"))));
            }
        };
        let message = from_json_value(desc, &value).map_err(in_message)?;
        messages.push(message);
    }
}

/// Parses a JSON object (proto3 JSON mapping) into a message of type `desc`.
pub fn parse_json(desc: &MessageDescriptor, text: &str) -> Result<DynamicMessage, ArgsError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ArgsError::MalformedJson(e.to_string()))?;
    from_json_value(desc, &value)
}

/// A parsed JSON value into a message of type `desc`, naming the field that
/// does not fit.
fn from_json_value(
    desc: &MessageDescriptor,
    value: &serde_json::Value,
) -> Result<DynamicMessage, ArgsError> {
    let serde_json::Value::Object(object) = value else {
        return Err(ArgsError::MalformedJson(format!(
            "expected an object like {{\"field\": value}}, got {value}"
        )));
    };
    for key in object.keys() {
        lookup(desc, key)?;
    }
    match DynamicMessage::deserialize(desc.clone(), value) {
        Ok(msg) => Ok(msg),
        Err(error) => {
            // Find the top-level field that does not fit, to name it.
            for (key, v) in object {
                let alone =
                    serde_json::Value::Object([(key.clone(), v.clone())].into_iter().collect());
                if let Err(e) = DynamicMessage::deserialize(desc.clone(), &alone) {
                    let field = lookup(desc, key)?;
                    return Err(ArgsError::WrongType {
                        field: field.name().to_string(),
                        message: desc.full_name().to_string(),
                        expected: article(&field_type(&field)),
                        value: v.to_string(),
                        detail: format!(" ({e})"),
                    });
                }
            }
            Err(ArgsError::JsonMismatch {
                message: desc.full_name().to_string(),
                error: error.to_string(),
            })
        }
    }
}

/// Parses `key=value` pairs into a flat message of type `desc`.
pub fn parse_pairs<S: AsRef<str>>(
    desc: &MessageDescriptor,
    args: &[S],
) -> Result<DynamicMessage, ArgsError> {
    let mut msg = DynamicMessage::new(desc.clone());
    let mut seen = Vec::new();
    for arg in args {
        let arg = arg.as_ref();
        let Some((key, raw)) = arg.split_once('=') else {
            return Err(ArgsError::NotKeyValue {
                arg: arg.to_string(),
                message: desc.full_name().to_string(),
                fields: field_list(desc),
            });
        };
        let field = lookup(desc, key.trim())?;
        let value = scalar(desc, &field, raw)?;
        if field.is_list() {
            if let Value::List(items) = msg.get_field_mut(&field) {
                items.push(value);
            }
        } else {
            if seen.contains(&field.number()) {
                return Err(ArgsError::Duplicate {
                    field: field.name().to_string(),
                    message: desc.full_name().to_string(),
                });
            }
            seen.push(field.number());
            msg.set_field(&field, value);
        }
    }
    Ok(msg)
}

/// A reply as pretty JSON, default values included (`{"value": 0.0}`, not
/// `{}`), field names as in the .proto file.
pub fn to_json(msg: &DynamicMessage) -> String {
    let options = SerializeOptions::new()
        .skip_default_fields(false)
        .use_proto_field_name(true);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::pretty(&mut out);
    match msg.serialize_with_options(&mut ser, &options) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        // Serializing to memory fails only on values JSON cannot hold.
        Err(e) => format!("<reply not printable as JSON: {e}>"),
    }
}

/// The field named `key` (proto name or JSON name), or an error listing them.
fn lookup(desc: &MessageDescriptor, key: &str) -> Result<FieldDescriptor, ArgsError> {
    desc.get_field_by_name(key)
        .or_else(|| desc.get_field_by_json_name(key))
        .ok_or_else(|| {
            let names: Vec<String> = desc.fields().map(|f| f.name().to_string()).collect();
            ArgsError::UnknownField {
                field: key.to_string(),
                message: desc.full_name().to_string(),
                hint: suggest(key, names.iter().map(String::as_str))
                    .map(|s| format!(", did you mean `{s}`?"))
                    .unwrap_or_default(),
                fields: field_list(desc),
            }
        })
}

/// Parses one value by its field's kind.
fn scalar(
    desc: &MessageDescriptor,
    field: &FieldDescriptor,
    raw: &str,
) -> Result<Value, ArgsError> {
    let wrong = |detail: String| ArgsError::WrongType {
        field: field.name().to_string(),
        message: desc.full_name().to_string(),
        expected: article(&kind_name(&field.kind())),
        value: format!("`{raw}`"),
        detail,
    };
    let t = raw.trim();
    let num_err = |e: &dyn std::fmt::Display| wrong(format!(" ({e})"));
    Ok(match field.kind() {
        Kind::Double => Value::F64(t.parse().map_err(|e| num_err(&e))?),
        Kind::Float => Value::F32(t.parse().map_err(|e| num_err(&e))?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(t.parse().map_err(|e| num_err(&e))?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(t.parse().map_err(|e| num_err(&e))?)
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(t.parse().map_err(|e| num_err(&e))?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(t.parse().map_err(|e| num_err(&e))?),
        Kind::Bool => match t {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(wrong(" (true or false)".to_string())),
        },
        Kind::String => Value::String(raw.to_string()),
        Kind::Bytes => Value::Bytes(raw.as_bytes().to_vec().into()),
        Kind::Enum(e) => {
            if let Some(v) = e.get_value_by_name(t) {
                Value::EnumNumber(v.number())
            } else if let Ok(n) = t.parse::<i32>() {
                Value::EnumNumber(n)
            } else {
                let values: Vec<String> = e.values().map(|v| v.name().to_string()).collect();
                let hint = suggest(t, values.iter().map(String::as_str))
                    .map(|s| format!("did you mean `{s}`? "))
                    .unwrap_or_default();
                return Err(wrong(format!("; {hint}values: {}", values.join(", "))));
            }
        }
        Kind::Message(_) => {
            return Err(ArgsError::NotFlat {
                field: field.name().to_string(),
                message: desc.full_name().to_string(),
                ty: field_type(field),
            });
        }
    })
}

/// "a double", "an int32", "an enum x.Y", "a uint32".
fn article(ty: &str) -> String {
    // No 'u': the only type names starting with it are uint32/uint64, said
    // "you-int".
    let vowel = ty.starts_with(['a', 'e', 'i', 'o']);
    format!("{} {ty}", if vowel { "an" } else { "a" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_protos::{calculator_pool, message, service, shop_pool};
    use proptest::prelude::*;

    fn binary() -> MessageDescriptor {
        message(&calculator_pool(), "calculator.v1.BinaryRequest")
    }

    fn order() -> MessageDescriptor {
        message(&shop_pool(), "shop.v1.Order")
    }

    fn f64_of(msg: &DynamicMessage, name: &str) -> f64 {
        msg.get_field_by_name(name)
            .and_then(|v| v.as_f64())
            .expect("double")
    }

    /// Asserts `text` starts with `prefix`, showing it whole if not.
    fn assert_starts(text: &str, prefix: &str) {
        assert!(text.starts_with(prefix), "{text}");
    }

    /// The message of the error `result` must be.
    fn error_of<T: std::fmt::Debug>(result: Result<T, ArgsError>) -> String {
        result.expect_err("an error").to_string()
    }

    #[test]
    fn key_value_pairs() {
        let msg = parse_args(&binary(), &["a=2", "b=-3.5"]).expect("parses");
        assert_eq!(f64_of(&msg, "a"), 2.0);
        assert_eq!(f64_of(&msg, "b"), -3.5);
    }

    #[test]
    fn json_object_in_one_or_several_arguments() {
        let msg = parse_args(&binary(), &[r#"{"a": 2, "b": 3}"#]).expect("parses");
        assert_eq!((f64_of(&msg, "a"), f64_of(&msg, "b")), (2.0, 3.0));
        let msg = parse_args(&binary(), &["{\"a\":", "1}"]).expect("parses");
        assert_eq!(f64_of(&msg, "a"), 1.0);
    }

    #[test]
    fn no_arguments_is_the_default_message() {
        let msg = parse_args::<&str>(&binary(), &[]).expect("parses");
        assert_eq!(f64_of(&msg, "a"), 0.0);
    }

    #[test]
    fn unknown_field_lists_the_fields() {
        let err = parse_args(&binary(), &["c=1"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no field `c` in calculator.v1.BinaryRequest; fields: a (double), b (double)"
        );
        let err = parse_args(&binary(), &[r#"{"c": 1}"#]).unwrap_err();
        assert!(matches!(err, ArgsError::UnknownField { .. }), "{err}");
    }

    #[test]
    fn wrong_type_names_field_type_and_value() {
        let err = error_of(parse_args(&binary(), &["a=x"]));
        assert_starts(
            &err,
            "field `a` of calculator.v1.BinaryRequest expects a double, got `x`",
        );
        let err = error_of(parse_args(&binary(), &[r#"{"a": true}"#]));
        assert_starts(
            &err,
            "field `a` of calculator.v1.BinaryRequest expects a double, got true",
        );
    }

    #[test]
    fn articles_as_spoken() {
        assert_eq!(article("double"), "a double");
        assert_eq!(article("int32"), "an int32");
        assert_eq!(article("enum x.Y"), "an enum x.Y");
        assert_eq!(article("uint32"), "a uint32");
    }

    #[test]
    fn malformed_json() {
        let err = parse_args(&binary(), &[r#"{"a": 2,"#]).unwrap_err();
        assert!(matches!(err, ArgsError::MalformedJson(_)), "{err}");
        assert!(err.to_string().starts_with("malformed JSON: "), "{err}");
    }

    #[test]
    fn not_a_pair() {
        let err = error_of(parse_args(&binary(), &["a"]));
        assert!(err.contains("expected key=value"), "{err}");
        assert!(err.contains("a (double), b (double)"), "{err}");
    }

    #[test]
    fn kinds_enums_repeated_and_camel_case() {
        let msg = parse_args(
            &order(),
            &[
                "item_id=18446744073709551615",
                "quantity=-3",
                "color=GREEN",
                "gift=true",
                "tags=x",
                "tags=y",
                "note=a=b",
            ],
        )
        .expect("parses");
        assert_eq!(
            msg.get_field_by_name("item_id").and_then(|v| v.as_u64()),
            Some(u64::MAX)
        );
        assert_eq!(
            msg.get_field_by_name("quantity").and_then(|v| v.as_i32()),
            Some(-3)
        );
        assert_eq!(
            msg.get_field_by_name("color")
                .and_then(|v| v.as_enum_number()),
            Some(2)
        );
        assert_eq!(
            msg.get_field_by_name("gift").and_then(|v| v.as_bool()),
            Some(true)
        );
        assert_eq!(
            msg.get_field_by_name("note")
                .and_then(|v| v.as_str().map(str::to_string)),
            Some("a=b".to_string())
        );
        let tags = msg.get_field_by_name("tags").expect("set");
        assert_eq!(tags.as_list().map(<[Value]>::len), Some(2));
        // JSON names work too.
        let msg = parse_args(&order(), &["itemId=7"]).expect("parses");
        assert_eq!(
            msg.get_field_by_name("item_id").and_then(|v| v.as_u64()),
            Some(7)
        );
    }

    #[test]
    fn enum_errors_list_values() {
        let err = error_of(parse_args(&order(), &["color=GREN"]));
        assert!(err.contains("did you mean `GREEN`?"), "{err}");
        assert!(
            err.contains("values: COLOR_UNSPECIFIED, RED, GREEN"),
            "{err}"
        );
    }

    #[test]
    fn nested_and_duplicate() {
        let err = error_of(parse_args(&order(), &["address=x"]));
        assert!(err.contains("give the whole request as JSON"), "{err}");
        let err = parse_args(&order(), &["quantity=1", "quantity=2"]).unwrap_err();
        assert!(matches!(err, ArgsError::Duplicate { .. }), "{err}");
        let msg = parse_args(&order(), &[r#"{"address": {"city": "Rome"}}"#]).expect("parses");
        assert!(to_json(&msg).contains("\"city\": \"Rome\""));
    }

    fn values_of_a(msgs: &[DynamicMessage]) -> Vec<f64> {
        msgs.iter().map(|m| f64_of(m, "a")).collect()
    }

    #[test]
    fn sequences_of_json_objects_as_grpcurl_reads_them() {
        let seq = parse_sequence(&binary(), &[r#"{"a": 1}"#, r#"{"a": 2}"#]).expect("parses");
        assert_eq!(values_of_a(&seq), [1.0, 2.0]);
        // One argument, with or without whitespace between the objects.
        let seq = parse_sequence(&binary(), &[r#"{"a": 1}{"a": 2} {"a": 3}"#]).expect("parses");
        assert_eq!(values_of_a(&seq), [1.0, 2.0, 3.0]);
        // An object split over arguments, as parse_args allows.
        let seq = parse_sequence(&binary(), &["{\"a\":", "4}", "{}"]).expect("parses");
        assert_eq!(values_of_a(&seq), [4.0, 0.0]);
        // Nothing sends nothing.
        assert!(
            parse_sequence::<&str>(&binary(), &[])
                .expect("empty")
                .is_empty()
        );
        assert!(
            parse_sequence(&binary(), &["", "  "])
                .expect("empty")
                .is_empty()
        );
        // key=value is one flat message.
        let seq = parse_sequence(&binary(), &["a=5", "b=6"]).expect("parses");
        assert_eq!(values_of_a(&seq), [5.0]);
    }

    #[test]
    fn a_bad_message_of_a_sequence_is_named_by_position() {
        let err = parse_sequence(&binary(), &[r#"{"a": 1} {"a": 2} {"x": 3}"#]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "message 3: no field `x` in calculator.v1.BinaryRequest; fields: a (double), b (double)"
        );
        let err = error_of(parse_sequence(&binary(), &[r#"{"a": 1}"#, r#"{"a": "y"}"#]));
        assert_starts(
            &err,
            "message 2: field `a` of calculator.v1.BinaryRequest expects a double",
        );
        let err = error_of(parse_sequence(&binary(), &[r#"{"a": 1} 7"#]));
        assert_starts(&err, "message 2: malformed JSON: expected an object");
        let err = error_of(parse_sequence(&binary(), &[r#"{"a": 1} {"a": "#]));
        assert_starts(&err, "message 2: malformed JSON: ");
        let err = error_of(parse_sequence(&binary(), &[r#"{"a": 1}, {"a": 2}"#]));
        assert_starts(&err, "message 2: malformed JSON: ");
        assert!(
            err.ends_with("(separate the messages with spaces, not commas)"),
            "{err}"
        );
        let err = parse_sequence(&binary(), &[r#"[{"a": 1}, {"a": 2}]"#]).unwrap_err();
        assert_eq!(err, ArgsError::ArrayNotSequence);
        assert!(err.to_string().contains("drop the [ ]"), "{err}");
    }

    #[test]
    fn requests_by_method_kind() {
        let pool = shop_pool();
        let shop = service(&pool, "shop.v1.Shop");
        let method = |name: &str| shop.methods().find(|m| m.name() == name).expect("defined");
        let two = [r#"{"quantity": 1}"#, r#"{"quantity": 2}"#];
        // Client streaming and bidi: the sequence, empty included.
        for name in ["Upload", "Chat"] {
            assert_eq!(
                parse_requests(&method(name), &two).expect("parses").len(),
                2
            );
            assert!(
                parse_requests::<&str>(&method(name), &[])
                    .expect("parses")
                    .is_empty()
            );
        }
        // Unary and server streaming: exactly one, the default when none.
        for name in ["Place", "Watch"] {
            assert_eq!(
                parse_requests::<&str>(&method(name), &[])
                    .expect("parses")
                    .len(),
                1
            );
            assert!(parse_requests(&method(name), &two).is_err());
        }
    }

    #[test]
    fn replies_print_default_fields() {
        let result = message(&calculator_pool(), "calculator.v1.Result");
        let json = to_json(&DynamicMessage::new(result));
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v, serde_json::json!({"value": 0.0}));
    }

    proptest! {
        #[test]
        fn random_pairs_never_panic(
            pairs in proptest::collection::vec(
                (prop_oneof![Just("item_id".to_string()), Just("quantity".to_string()),
                             Just("color".to_string()), Just("gift".to_string()),
                             Just("tags".to_string()), Just("address".to_string()), ".*"],
                 ".*", any::<bool>()),
                0..6),
        ) {
            let args: Vec<String> = pairs
                .into_iter()
                .map(|(k, v, eq)| if eq { format!("{k}={v}") } else { format!("{k}{v}") })
                .collect();
            let _ = parse_args(&order(), &args);
        }

        #[test]
        fn random_text_never_panics(text in ".*") {
            let _ = parse_args(&order(), &[text]);
        }
    }
}

//! Fuzzing entry point for command-line argument parsing. The `client_args`
//! cargo-fuzz target calls [`args`], and `tests/fuzz_corpus.rs` replays the
//! committed corpus through it, so both run the same code.

use std::sync::OnceLock;

use prost_reflect::prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, ReflectMessage, Value};

use crate::args::{parse_args, parse_json, parse_sequence, to_json};

/// The request messages the arguments are parsed into.
const MESSAGES: &[&str] = &["calculator.v1.BinaryRequest", "echo.v1.EchoStreamRequest"];

/// The request descriptors, decoded once (not once per fuzz input).
fn descriptors() -> &'static [MessageDescriptor] {
    static DESCRIPTORS: OnceLock<Vec<MessageDescriptor>> = OnceLock::new();
    DESCRIPTORS.get_or_init(|| {
        let pool = DescriptorPool::decode(registry_proto::ALL_DESCRIPTORS)
            .unwrap_or_else(|e| panic!("ALL_DESCRIPTORS do not decode: {e}"));
        MESSAGES
            .iter()
            .map(|name| {
                pool.get_message_by_name(name)
                    .unwrap_or_else(|| panic!("{name} not in ALL_DESCRIPTORS"))
            })
            .collect()
    })
}

/// Splits `data` (lossy UTF-8) into arguments at NUL bytes and newlines,
/// parses them into each request message, and as a sequence of them (a
/// client-streaming call's), and checks: no panic; an error has a message;
/// every request survives encoding and decoding, and printing as JSON and
/// reading back. Panics on a broken invariant.
pub fn args(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let args: Vec<&str> = if text.is_empty() {
        Vec::new()
    } else {
        text.split(['\0', '\n']).collect()
    };
    for desc in descriptors() {
        match parse_args(desc, &args) {
            Ok(msg) => check_round_trips(desc, &msg),
            Err(e) => assert!(!e.to_string().trim().is_empty(), "empty error: {e:?}"),
        }
        match parse_sequence(desc, &args) {
            Ok(msgs) => msgs.iter().for_each(|msg| check_round_trips(desc, msg)),
            Err(e) => assert!(!e.to_string().trim().is_empty(), "empty error: {e:?}"),
        }
    }
}

fn check_round_trips(desc: &MessageDescriptor, msg: &DynamicMessage) {
    assert_eq!(msg.descriptor().full_name(), desc.full_name());
    let bytes = msg.encode_to_vec();
    let decoded = DynamicMessage::decode(desc.clone(), bytes.as_slice())
        .unwrap_or_else(|e| panic!("{msg:?} encodes to bytes that do not decode: {e}"));
    assert_same(msg, &decoded, "protobuf");
    assert_eq!(decoded.encode_to_vec(), bytes, "re-encoding differs");

    let json = to_json(msg);
    let read = parse_json(desc, &json)
        .unwrap_or_else(|e| panic!("printed JSON {json} does not read back: {e}"));
    assert_same(msg, &read, "JSON");
}

/// Field by field equality, where NaN equals NaN (a=NaN is a valid double).
fn assert_same(a: &DynamicMessage, b: &DynamicMessage, how: &str) {
    for field in a.descriptor().fields() {
        let (x, y) = (a.get_field(&field), b.get_field(&field));
        let same = match (x.as_ref(), y.as_ref()) {
            (Value::F64(x), Value::F64(y)) => x == y || (x.is_nan() && y.is_nan()),
            (Value::F32(x), Value::F32(y)) => x == y || (x.is_nan() && y.is_nan()),
            (x, y) => x == y,
        };
        assert!(
            same,
            "field {} changed through {how}: {x:?} -> {y:?}",
            field.name()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_doubles_parse_exactly() {
        // Found by the client_args fuzz target: without serde_json's
        // float_roundtrip, `{"b": -1e-60}` became -1.0000000000000001e-60.
        let desc = descriptors()[0].clone();
        for text in [
            "-1e-60",
            "1e308",
            "0.1",
            "2.2250738585072014e-308",
            "5e-324",
        ] {
            let msg = parse_json(&desc, &format!("{{\"b\": {text}}}")).expect("parses");
            let b = msg.get_field_by_name("b").and_then(|v| v.as_f64());
            assert_eq!(b, text.parse::<f64>().ok(), "{text}");
        }
        args(b"a=1e308\nb=-1e-60");
    }

    #[test]
    fn samples_run() {
        args(b"");
        args(b"a=1\nb=2");
        args(b"message=hi\0count=3\0interval_ms=10");
        args(b"{\"a\": \"NaN\", \"b\": -0.0}");
        args(b"a=inf\nb=-nan");
        args(b"\xff=\xfe");
        args(b"{\"a\": 1} {\"b\": 2}{}");
        args(b"{\"message\": \"x\"}\0{\"count\": 3}, {}");
    }
}

//! Protos compiled at test time, so unit tests need no generated code.

use prost_reflect::{DescriptorPool, MessageDescriptor, ServiceDescriptor};
use protox::file::{File, FileResolver};

struct Sources(&'static [(&'static str, &'static str)]);

impl FileResolver for Sources {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match self.0.iter().find(|(n, _)| *n == name) {
            Some((n, src)) => File::from_source(n, src),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

fn compile(sources: &'static [(&'static str, &'static str)]) -> DescriptorPool {
    let mut compiler = protox::Compiler::with_file_resolver(Sources(sources));
    compiler.include_imports(true);
    for (name, _) in sources {
        compiler.open_file(name).expect("test proto compiles");
    }
    DescriptorPool::decode(compiler.encode_file_descriptor_set().as_slice()).expect("valid")
}

/// A copy of the calculator's interface.
pub(crate) fn calculator_pool() -> DescriptorPool {
    compile(&[(
        "calculator.proto",
        r#"syntax = "proto3"; package calculator.v1;
        service Calculator {
          rpc Add(BinaryRequest) returns (Result);
          rpc Subtract(BinaryRequest) returns (Result);
          rpc Multiply(BinaryRequest) returns (Result);
          rpc Divide(BinaryRequest) returns (Result);
        }
        message BinaryRequest { double a = 1; double b = 2; }
        message Result { double value = 1; }"#,
    )])
}

/// A service with every kind of field and method.
pub(crate) fn shop_pool() -> DescriptorPool {
    compile(&[
        (
            "common.proto",
            r#"syntax = "proto3"; package shop.v1; message Address { string city = 1; }"#,
        ),
        (
            "shop.proto",
            r#"syntax = "proto3"; package shop.v1; import "common.proto";
            enum Color { COLOR_UNSPECIFIED = 0; RED = 1; GREEN = 2; }
            message Order {
              uint64 item_id = 1; int32 quantity = 2; Color color = 3; bool gift = 4;
              repeated string tags = 5; string note = 6; Address address = 7;
              map<string, int32> labels = 8; bytes blob = 9; float ratio = 10; sint64 delta = 11;
            }
            service Shop {
              rpc Place(Order) returns (Order);
              rpc Watch(Order) returns (stream Order);
              rpc Upload(stream Order) returns (Order);
              rpc Chat(stream Order) returns (stream Order);
            }"#,
        ),
    ])
}

/// The service `name` of `pool`, which must define it.
pub(crate) fn service(pool: &DescriptorPool, name: &str) -> ServiceDescriptor {
    pool.get_service_by_name(name)
        .unwrap_or_else(|| panic!("{name} is not defined"))
}

/// The message `name` of `pool`, which must define it.
pub(crate) fn message(pool: &DescriptorPool, name: &str) -> MessageDescriptor {
    pool.get_message_by_name(name)
        .unwrap_or_else(|| panic!("{name} is not defined"))
}

//! gRPC server reflection (v1 and v1alpha) that behaves like grpc-go's, for
//! every server we run (the registry, node hosts).
//!
//! tonic-reflection falls short for generic tools from other languages,
//! which resolve every listed service: each version knows only its own
//! reflection file, so asking v1 about v1alpha (or the other way round)
//! fails, and a lookup miss is a status that ends the stream where clients
//! expect an in-stream `error_response`. Here:
//! - both versions answer from one index of every file, both reflection
//!   files included, and both reflection services are always listed;
//! - a miss is an `error_response` (NOT_FOUND, or INVALID_ARGUMENT for an
//!   empty request) and the stream goes on;
//! - `FileByFilename`, `FileContainingSymbol` and `FileContainingExtension`
//!   return the file and its transitive dependencies, skipping those this
//!   stream was already sent (the file asked for is always sent), as
//!   grpc-go does;
//! - symbols are services, methods, messages, fields, oneofs, enums, enum
//!   values and extensions, by full name.
//!
//! The v1alpha messages are v1's on the wire, so v1alpha requests are
//! re-decoded as v1 and answered by the same code.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use futures_util::Stream;
use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_reflection::pb::v1 as pb;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1alpha as alpha;

/// `grpc.reflection.v1.ServerReflection`.
pub const V1_NAME: &str = "grpc.reflection.v1.ServerReflection";
/// `grpc.reflection.v1alpha.ServerReflection`.
pub const V1ALPHA_NAME: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Answers queued per stream before the server stops reading requests.
const STREAM_BUFFER: usize = 16;

/// Why the index could not be built (a build bug: the sets are embedded).
#[derive(Debug, thiserror::Error)]
#[error("descriptor set for server reflection: {0}")]
pub struct ReflectionError(#[from] prost::DecodeError);

/// One file: its encoding and what it imports.
#[derive(Debug)]
struct File {
    encoded: Vec<u8>,
    dependencies: Vec<String>,
}

/// Every file, and where each symbol and extension is defined.
#[derive(Debug, Default)]
struct Index {
    files: HashMap<String, File>,
    /// Full symbol name (no leading dot) -> file name.
    symbols: HashMap<String, String>,
    /// Full names of message types (the valid `AllExtensionNumbersOfType`).
    messages: HashSet<String>,
    /// (extended message, field number) -> file name.
    extensions: HashMap<(String, i32), String>,
    /// Extended message -> its extension numbers.
    extension_numbers: BTreeMap<String, Vec<i32>>,
}

impl Index {
    fn build<'a>(sets: impl IntoIterator<Item = &'a FileDescriptorSet>) -> Index {
        let mut index = Index::default();
        for set in sets {
            for file in &set.file {
                let name = file.name().to_string();
                if index.files.contains_key(&name) {
                    continue;
                }
                let scope = match file.package() {
                    "" => String::new(),
                    p => format!("{p}."),
                };
                for message in &file.message_type {
                    index.add_message(&scope, message, &name);
                }
                for e in &file.enum_type {
                    index.add_enum(&scope, e, &name);
                }
                for extension in &file.extension {
                    index.add_extension(&scope, extension, &name);
                }
                for service in &file.service {
                    let full = format!("{scope}{}", service.name());
                    for method in &service.method {
                        index
                            .symbols
                            .insert(format!("{full}.{}", method.name()), name.clone());
                    }
                    index.symbols.insert(full, name.clone());
                }
                let file = File {
                    encoded: file.encode_to_vec(),
                    dependencies: file.dependency.clone(),
                };
                index.files.insert(name, file);
            }
        }
        index
    }

    fn add_message(&mut self, scope: &str, message: &DescriptorProto, file: &str) {
        let full = format!("{scope}{}", message.name());
        for field in &message.field {
            self.symbols
                .insert(format!("{full}.{}", field.name()), file.to_string());
        }
        for oneof in &message.oneof_decl {
            self.symbols
                .insert(format!("{full}.{}", oneof.name()), file.to_string());
        }
        let inner = format!("{full}.");
        for nested in &message.nested_type {
            self.add_message(&inner, nested, file);
        }
        for e in &message.enum_type {
            self.add_enum(&inner, e, file);
        }
        for extension in &message.extension {
            self.add_extension(&inner, extension, file);
        }
        self.messages.insert(full.clone());
        self.symbols.insert(full, file.to_string());
    }

    fn add_enum(&mut self, scope: &str, e: &EnumDescriptorProto, file: &str) {
        // Enum values are scoped like their enum, not inside it.
        for value in &e.value {
            self.symbols
                .insert(format!("{scope}{}", value.name()), file.to_string());
        }
        self.symbols
            .insert(format!("{scope}{}", e.name()), file.to_string());
    }

    fn add_extension(&mut self, scope: &str, extension: &FieldDescriptorProto, file: &str) {
        let extendee = extension.extendee().trim_start_matches('.').to_string();
        self.extensions
            .insert((extendee.clone(), extension.number()), file.to_string());
        self.extension_numbers
            .entry(extendee)
            .or_default()
            .push(extension.number());
        self.symbols
            .insert(format!("{scope}{}", extension.name()), file.to_string());
    }

    /// `name` and its transitive imports, breadth first, less those already
    /// `sent` on this stream (`name` itself always).
    fn with_dependencies(&self, name: &str, sent: &mut HashSet<String>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut queue = std::collections::VecDeque::from([name.to_string()]);
        let mut seen = HashSet::new();
        while let Some(next) = queue.pop_front() {
            if !seen.insert(next.clone()) {
                continue;
            }
            let Some(file) = self.files.get(&next) else {
                continue;
            };
            if out.is_empty() || !sent.contains(&next) {
                out.push(file.encoded.clone());
                sent.insert(next);
            }
            queue.extend(file.dependencies.iter().cloned());
        }
        out
    }
}

/// Server reflection over a set of files, listing a set of services; both
/// may change while it serves (a node host's mounted plugins, and the files
/// of plugins learned at run time). Cheap to clone: clones share both.
#[derive(Debug, Clone)]
pub struct Reflection {
    /// The files given at start, decoded.
    base: Arc<Vec<FileDescriptorSet>>,
    /// The index in force: base files first, then the extra ones.
    index: Arc<RwLock<Arc<Index>>>,
    listed: Arc<RwLock<Vec<String>>>,
}

impl Reflection {
    /// An index of `sets` (encoded `FileDescriptorSet`s; the reflection
    /// files are added), listing `listed` and both reflection services.
    pub fn new(sets: &[&[u8]], listed: &[&str]) -> Result<Reflection, ReflectionError> {
        let mut base = Vec::new();
        for set in sets
            .iter()
            .chain([&pb::FILE_DESCRIPTOR_SET, &alpha::FILE_DESCRIPTOR_SET])
        {
            base.push(FileDescriptorSet::decode(*set)?);
        }
        let reflection = Reflection {
            index: Arc::new(RwLock::new(Arc::new(Index::build(&base)))),
            base: Arc::new(base),
            listed: Arc::default(),
        };
        reflection.list(listed);
        Ok(reflection)
    }

    /// Describes `extra` files too from now on (beside those given at
    /// start, which win where both define a file), instead of the previous
    /// extra ones.
    pub fn set_extra_files(&self, extra: &[FileDescriptorSet]) {
        let index = Arc::new(Index::build(self.base.iter().chain(extra)));
        match self.index.write() {
            Ok(mut guard) => *guard = index,
            Err(poisoned) => *poisoned.into_inner() = index,
        }
    }

    fn index(&self) -> Arc<Index> {
        match self.index.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Lists exactly `listed` and both reflection services from now on.
    pub fn list(&self, listed: &[&str]) {
        let mut names: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
        for name in [V1_NAME, V1ALPHA_NAME] {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        match self.listed.write() {
            Ok(mut guard) => *guard = names,
            Err(poisoned) => *poisoned.into_inner() = names,
        }
    }

    /// The v1 service, to route.
    pub fn v1(&self) -> pb::server_reflection_server::ServerReflectionServer<V1> {
        pb::server_reflection_server::ServerReflectionServer::new(V1(self.clone()))
    }

    /// The v1alpha service, to route.
    pub fn v1alpha(&self) -> alpha::server_reflection_server::ServerReflectionServer<V1Alpha> {
        alpha::server_reflection_server::ServerReflectionServer::new(V1Alpha(self.clone()))
    }

    fn listed(&self) -> Vec<String> {
        match self.listed.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The answer to one request; `sent` is what this stream was sent.
    fn answer(
        &self,
        request: pb::ServerReflectionRequest,
        sent: &mut HashSet<String>,
    ) -> pb::ServerReflectionResponse {
        let index = &self.index();
        let not_found = |what: String| error(Code::NotFound, what);
        let files = |name: &str, sent: &mut HashSet<String>| {
            MessageResponse::FileDescriptorResponse(pb::FileDescriptorResponse {
                file_descriptor_proto: index.with_dependencies(name, sent),
            })
        };
        let response = match &request.message_request {
            None => error(Code::InvalidArgument, "empty request".into()),
            Some(MessageRequest::FileByFilename(name)) => match index.files.get(name) {
                Some(_) => files(name, sent),
                None => not_found(format!("file {name:?} not found")),
            },
            Some(MessageRequest::FileContainingSymbol(symbol)) => {
                match index.symbols.get(symbol.trim_start_matches('.')) {
                    Some(file) => files(file, sent),
                    None => not_found(format!("symbol {symbol:?} not found")),
                }
            }
            Some(MessageRequest::FileContainingExtension(e)) => {
                let key = (
                    e.containing_type.trim_start_matches('.').to_string(),
                    e.extension_number,
                );
                match index.extensions.get(&key) {
                    Some(file) => files(file, sent),
                    None => not_found(format!(
                        "extension {} of {:?} not found",
                        e.extension_number, e.containing_type
                    )),
                }
            }
            Some(MessageRequest::AllExtensionNumbersOfType(name)) => {
                let name = name.trim_start_matches('.');
                if index.messages.contains(name) {
                    MessageResponse::AllExtensionNumbersResponse(pb::ExtensionNumberResponse {
                        base_type_name: name.to_string(),
                        extension_number: index
                            .extension_numbers
                            .get(name)
                            .cloned()
                            .unwrap_or_default(),
                    })
                } else {
                    not_found(format!("message type {name:?} not found"))
                }
            }
            Some(MessageRequest::ListServices(_)) => {
                MessageResponse::ListServicesResponse(pb::ListServiceResponse {
                    service: self
                        .listed()
                        .into_iter()
                        .map(|name| pb::ServiceResponse { name })
                        .collect(),
                })
            }
        };
        pb::ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request),
            message_response: Some(response),
        }
    }

    /// Answers every request of a stream, in order, on the returned stream.
    fn serve<In, Out>(
        &self,
        mut requests: Streaming<In>,
        decode: fn(In) -> Result<pb::ServerReflectionRequest, Status>,
        encode: fn(pb::ServerReflectionResponse) -> Result<Out, Status>,
    ) -> ResponseStream<Out>
    where
        In: Send + 'static,
        Out: Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            let mut sent = HashSet::new();
            loop {
                let next = match requests.message().await {
                    Ok(Some(request)) => {
                        decode(request).and_then(|request| encode(this.answer(request, &mut sent)))
                    }
                    Ok(None) => break,
                    Err(status) => Err(status),
                };
                let failed = next.is_err();
                if tx.send(next).await.is_err() || failed {
                    break;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

fn error(code: Code, message: String) -> MessageResponse {
    MessageResponse::ErrorResponse(pb::ErrorResponse {
        error_code: code as i32,
        error_message: message,
    })
}

/// What both versions stream back.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The v1 service over a [`Reflection`].
#[derive(Debug, Clone)]
pub struct V1(Reflection);

/// The v1alpha service over a [`Reflection`].
#[derive(Debug, Clone)]
pub struct V1Alpha(Reflection);

#[tonic::async_trait]
impl pb::server_reflection_server::ServerReflection for V1 {
    type ServerReflectionInfoStream = ResponseStream<pb::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<pb::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(self.0.serve(request.into_inner(), Ok, Ok)))
    }
}

/// Re-encodes a message as another of the same wire format.
fn convert<A: Message, B: Message + Default>(message: A) -> Result<B, Status> {
    B::decode(message.encode_to_vec().as_slice())
        .map_err(|e| Status::internal(format!("reflection message conversion: {e}")))
}

#[tonic::async_trait]
impl alpha::server_reflection_server::ServerReflection for V1Alpha {
    type ServerReflectionInfoStream = ResponseStream<alpha::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(self.0.serve(
            request.into_inner(),
            convert,
            convert,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reflection() -> Reflection {
        Reflection::new(&[registry_proto::ALL_DESCRIPTORS], &["echo.v1.Echo"])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn ask(r: &Reflection, request: MessageRequest, sent: &mut HashSet<String>) -> MessageResponse {
        let response = r.answer(
            pb::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            },
            sent,
        );
        response
            .message_response
            .unwrap_or_else(|| panic!("no answer"))
    }

    fn file_names(response: MessageResponse) -> Vec<String> {
        match response {
            MessageResponse::FileDescriptorResponse(f) => f
                .file_descriptor_proto
                .iter()
                .map(|b| {
                    prost_types::FileDescriptorProto::decode(b.as_slice())
                        .map(|f| f.name().to_string())
                        .unwrap_or_else(|e| panic!("{e}"))
                })
                .collect(),
            other => panic!("not files: {other:?}"),
        }
    }

    #[test]
    fn every_kind_of_symbol_resolves_to_its_file() {
        let r = reflection();
        for symbol in [
            "echo.v1.Echo",
            "echo.v1.Echo.Echo",
            ".echo.v1.Echo",
            V1_NAME,
            V1ALPHA_NAME,
            "grpc.reflection.v1alpha.ServerReflectionRequest.file_by_filename",
            "grpc.reflection.v1.ServerReflectionRequest.message_request",
        ] {
            let names = file_names(ask(
                &r,
                MessageRequest::FileContainingSymbol(symbol.into()),
                &mut HashSet::new(),
            ));
            assert!(!names.is_empty(), "{symbol}");
        }
    }

    #[test]
    fn misses_are_not_found_in_the_stream() {
        let r = reflection();
        for request in [
            MessageRequest::FileContainingSymbol("no.Such".into()),
            MessageRequest::FileByFilename("no.proto".into()),
            MessageRequest::AllExtensionNumbersOfType("no.Such".into()),
        ] {
            match ask(&r, request, &mut HashSet::new()) {
                MessageResponse::ErrorResponse(e) => {
                    assert_eq!(e.error_code, Code::NotFound as i32)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn dependencies_come_along_once_per_stream() {
        // a.proto imports b.proto, which imports c.proto.
        let file = |name: &str, deps: &[&str]| prost_types::FileDescriptorProto {
            name: Some(name.into()),
            package: Some("t".into()),
            dependency: deps.iter().map(|d| d.to_string()).collect(),
            message_type: vec![DescriptorProto {
                name: Some(name.trim_end_matches(".proto").to_uppercase()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let set = FileDescriptorSet {
            file: vec![
                file("a.proto", &["b.proto"]),
                file("b.proto", &["c.proto"]),
                file("c.proto", &[]),
            ],
        }
        .encode_to_vec();
        let r = Reflection::new(&[&set], &[]).unwrap_or_else(|e| panic!("{e}"));
        let mut sent = HashSet::new();
        let by_symbol = MessageRequest::FileContainingSymbol("t.A".into());
        assert_eq!(
            file_names(ask(&r, by_symbol, &mut sent)),
            ["a.proto", "b.proto", "c.proto"]
        );
        // The same stream: what it has is not sent again, what it asks is.
        let by_name = MessageRequest::FileByFilename("b.proto".into());
        assert_eq!(file_names(ask(&r, by_name.clone(), &mut sent)), ["b.proto"]);
        // A new stream gets it all again.
        assert_eq!(
            file_names(ask(&r, by_name, &mut HashSet::new())),
            ["b.proto", "c.proto"]
        );
    }

    #[test]
    fn extra_files_are_described_until_replaced() {
        let r = reflection();
        let extra = FileDescriptorSet {
            file: vec![prost_types::FileDescriptorProto {
                name: Some("x.proto".into()),
                package: Some("x".into()),
                message_type: vec![DescriptorProto {
                    name: Some("X".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let ask_x = |r: &Reflection| {
            ask(
                r,
                MessageRequest::FileContainingSymbol("x.X".into()),
                &mut HashSet::new(),
            )
        };
        assert!(matches!(ask_x(&r), MessageResponse::ErrorResponse(_)));
        r.set_extra_files(&[extra]);
        assert_eq!(file_names(ask_x(&r)), ["x.proto"]);
        r.set_extra_files(&[]);
        assert!(matches!(ask_x(&r), MessageResponse::ErrorResponse(_)));
        // The base files stay.
        let echo = MessageRequest::FileContainingSymbol("echo.v1.Echo".into());
        assert!(!file_names(ask(&r, echo, &mut HashSet::new())).is_empty());
    }

    #[test]
    fn both_reflection_services_are_always_listed() {
        let r = reflection();
        match ask(
            &r,
            MessageRequest::ListServices(String::new()),
            &mut HashSet::new(),
        ) {
            MessageResponse::ListServicesResponse(l) => {
                let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
                assert_eq!(names, ["echo.v1.Echo", V1_NAME, V1ALPHA_NAME]);
            }
            other => panic!("{other:?}"),
        }
    }
}

//! Which service an external plugin serves, and its descriptors, from the
//! plugin's own server reflection (v1, else v1alpha: their messages are the
//! same on the wire, only the path differs).
//!
//! ListServices names the service (the one besides health and reflection,
//! or the one `service =` chooses); FileContainingSymbol gives the file
//! defining it, and each import still missing is fetched with
//! FileByFilename (`support::reflection_fetch`). Bounded by [`LIMITS`].

use prost_types::FileDescriptorSet;
use support::reflection_fetch::{self, Ask, FetchError, Limits, Progress};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

/// Bounds on one discovery: requests, descriptor files, and bytes of
/// descriptors (the registry takes 4 MiB per service).
pub const LIMITS: Limits = Limits {
    requests: 256,
    files: 256,
    bytes: 4 * 1024 * 1024,
};

const PATHS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// What discovery found.
#[derive(Debug, Clone)]
pub struct Discovered {
    /// The full protobuf service name, e.g. `inventory.v1.Inventory`.
    pub service: String,
    /// The file defining it and everything it imports.
    pub files: FileDescriptorSet,
}

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// The plugin does not answer (yet): worth asking again.
    #[error("{0}")]
    NotReady(String),
    /// The plugin answers, wrongly for us: asking again will not help.
    #[error("{0}")]
    Wrong(String),
}

/// Finds the service (`wanted`, or the only one) and its descriptors.
pub async fn discover(
    channel: Channel,
    wanted: Option<&str>,
    table: &str,
) -> Result<Discovered, DiscoverError> {
    let mut last = None;
    for path in PATHS {
        match Session::open(channel.clone(), path).await {
            Ok(mut session) => return session.run(wanted, table).await,
            Err(status) if status.code() == Code::Unimplemented => last = Some(status),
            Err(status) => {
                return Err(DiscoverError::NotReady(format!(
                    "reflection: {}: {}",
                    status.code(),
                    status.message()
                )));
            }
        }
    }
    let _ = last;
    Err(DiscoverError::Wrong(
        "it serves no server reflection (neither grpc.reflection.v1 nor v1alpha): the host learns the plugin's service from it".into(),
    ))
}

/// One reflection stream: a request, its reply, in turn.
struct Session {
    tx: mpsc::Sender<ServerReflectionRequest>,
    replies: tonic::Streaming<ServerReflectionResponse>,
    /// Requests sent so far (ListServices went with the stream).
    progress: Progress,
}

impl Session {
    /// Opens the stream on `path` and asks ListServices, so that a server
    /// without this version answers UNIMPLEMENTED here.
    async fn open(channel: Channel, path: &'static str) -> Result<Session, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4);
        let codec =
            tonic_prost::ProstCodec::<ServerReflectionRequest, ServerReflectionResponse>::default();
        let request = tonic::Request::new(ReceiverStream::new(rx));
        // The first request goes with the stream, so its answer (or a
        // status) comes with the response headers.
        tx.send(list_services())
            .await
            .map_err(|_| tonic::Status::internal("reflection request channel closed"))?;
        let replies = grpc
            .streaming(request, http::uri::PathAndQuery::from_static(path), codec)
            .await?
            .into_inner();
        Ok(Session {
            tx,
            replies,
            progress: Progress {
                requests: 1,
                ..Progress::default()
            },
        })
    }

    async fn reply(&mut self) -> Result<MessageResponse, FetchError> {
        reflection_fetch::next_reply(&mut self.replies).await
    }

    async fn run(
        &mut self,
        wanted: Option<&str>,
        table: &str,
    ) -> Result<Discovered, DiscoverError> {
        let MessageResponse::ListServicesResponse(list) = self.reply().await? else {
            return Err(DiscoverError::Wrong(
                "reflection: unexpected reply to ListServices".into(),
            ));
        };
        let names = reflection_fetch::application_services(list);
        let service = choose(&names, wanted, table)?;
        let files = self.files_of(&service).await?;
        let defined = files.file.iter().any(|f| {
            f.service.iter().any(|s| {
                let full = match f.package() {
                    "" => s.name().to_string(),
                    package => format!("{package}.{}", s.name()),
                };
                full == service
            })
        });
        if !defined {
            return Err(DiscoverError::Wrong(format!(
                "reflection: no file it sent defines service {service}"
            )));
        }
        Ok(Discovered { service, files })
    }

    /// The file defining `service`, then every import, until none is missing.
    async fn files_of(&mut self, service: &str) -> Result<FileDescriptorSet, DiscoverError> {
        let mut progress = std::mem::take(&mut self.progress);
        let mut ask = Asker(self);
        let files = reflection_fetch::files_of(&mut ask, service, &mut progress, LIMITS).await;
        self.progress = progress;
        Ok(FileDescriptorSet { file: files? })
    }
}

/// A session as [`Ask`] (a newtype: the session keeps the progress, which
/// the exchange borrows separately).
struct Asker<'a>(&'a mut Session);

impl Ask for Asker<'_> {
    async fn ask(&mut self, request: MessageRequest) -> Result<MessageResponse, FetchError> {
        self.0
            .tx
            .send(ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            })
            .await
            .map_err(|_| FetchError::Transport("reflection stream closed".into()))?;
        self.0.reply().await
    }
}

impl From<FetchError> for DiscoverError {
    fn from(error: FetchError) -> DiscoverError {
        if error.is_transport() {
            DiscoverError::NotReady(error.to_string())
        } else {
            DiscoverError::Wrong(error.to_string())
        }
    }
}

fn list_services() -> ServerReflectionRequest {
    ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }
}

/// The service to mount among `names` (health and reflection left out).
fn choose(names: &[String], wanted: Option<&str>, table: &str) -> Result<String, DiscoverError> {
    let listed = || names.join(", ");
    match (wanted, names) {
        (Some(w), _) if names.iter().any(|n| n == w) => Ok(w.to_string()),
        (Some(w), []) => Err(DiscoverError::Wrong(format!(
            "`service = \"{w}\"`, but its reflection lists no service besides health and reflection"
        ))),
        (Some(w), _) => Err(DiscoverError::Wrong(format!(
            "`service = \"{w}\"`, but its reflection lists {} instead",
            listed()
        ))),
        (None, [one]) => Ok(one.clone()),
        (None, []) => Err(DiscoverError::Wrong(
            "its reflection lists no service besides health and reflection".into(),
        )),
        (None, many) => Err(DiscoverError::Wrong(format!(
            "its reflection lists {} services ({}): choose one with `service = \"{}\"` in [plugins.{table}]",
            many.len(),
            listed(),
            many[0]
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_service_is_chosen_several_need_a_choice() {
        let one = names(&["inv.v1.Inv"]);
        assert_eq!(
            choose(&one, None, "inv").ok().as_deref(),
            Some("inv.v1.Inv")
        );
        let two = names(&["a.v1.A", "b.v1.B"]);
        let e = choose(&two, None, "ab").expect_err("two").to_string();
        assert_eq!(
            e,
            "its reflection lists 2 services (a.v1.A, b.v1.B): choose one with `service = \"a.v1.A\"` in [plugins.ab]"
        );
        assert_eq!(
            choose(&two, Some("b.v1.B"), "ab").ok().as_deref(),
            Some("b.v1.B")
        );
        let e = choose(&two, Some("c.v1.C"), "ab")
            .expect_err("absent")
            .to_string();
        assert!(e.contains("lists a.v1.A, b.v1.B instead"), "{e}");
        assert!(choose(&[], None, "x").is_err());
    }
}

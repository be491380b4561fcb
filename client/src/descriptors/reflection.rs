//! Descriptors from an instance itself, through gRPC server reflection (v1).
//!
//! The service is the one the instance lists besides reflection and health
//! when none is named; its file and imports are fetched by
//! `support::reflection_fetch`, bounded by work as well as by time.

use crate::status::status_text;
use prost_reflect::DescriptorPool;
use prost_types::FileDescriptorProto;
use registry_proto::descriptors::pool_from_files;
use std::time::Duration;
use support::reflection_fetch::{self, Ask, FetchError, Limits, Progress, ask_counted};
use tonic::transport::Channel;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

/// Bounds on one exchange: requests (ListServices, the file defining the
/// service, then one per import), files, and bytes of descriptors (the
/// registry accepts 4 MiB of descriptors per service).
const REFLECTION_LIMITS: Limits = Limits {
    requests: 256,
    files: 256,
    bytes: 16 * 1024 * 1024,
};

/// Asks an instance through server reflection. `symbol` is the protobuf
/// service to look for; when empty, the instance's list of services decides
/// (the one that is not reflection or health).
pub async fn from_reflection(
    channel: Channel,
    symbol: &str,
    timeout: Duration,
) -> Result<(String, DescriptorPool), String> {
    let mut progress = Progress::default();
    let outcome = tokio::time::timeout(timeout, reflect(channel, symbol, &mut progress)).await;
    outcome.unwrap_or_else(|_| Err(progress.timed_out(timeout)))
}

async fn reflect(
    channel: Channel,
    symbol: &str,
    progress: &mut Progress,
) -> Result<(String, DescriptorPool), String> {
    let mut client = ServerReflectionClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let replies = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("reflection: {}", status_text(&s)))?
        .into_inner();
    let ask = ReflectionStream { tx, replies };
    let (symbol, files) = converse(symbol, ask, progress)
        .await
        .map_err(|e| e.to_string())?;
    let pool =
        pool_from_files(files).map_err(|e| format!("reflection sent invalid descriptors: {e}"))?;
    Ok((symbol, pool))
}

/// A server reflection stream: one request, one reply, in turn.
struct ReflectionStream {
    /// Requests.
    tx: tokio::sync::mpsc::Sender<ServerReflectionRequest>,
    /// Replies.
    replies: tonic::Streaming<ServerReflectionResponse>,
}

impl Ask for ReflectionStream {
    async fn ask(&mut self, request: MessageRequest) -> Result<MessageResponse, FetchError> {
        self.tx
            .send(ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            })
            .await
            .map_err(|_| FetchError::Transport("reflection stream closed".into()))?;
        reflection_fetch::next_reply(&mut self.replies).await
    }
}

/// Which service (ListServices, when `symbol` is empty), then its file and
/// imports.
async fn converse(
    symbol: &str,
    mut ask: impl Ask,
    progress: &mut Progress,
) -> Result<(String, Vec<FileDescriptorProto>), FetchError> {
    let limits = REFLECTION_LIMITS;
    let symbol = if symbol.is_empty() {
        let request = MessageRequest::ListServices(String::new());
        let MessageResponse::ListServicesResponse(list) =
            ask_counted(&mut ask, progress, limits, request, "the service list").await?
        else {
            return Err(FetchError::Unexpected(
                "unexpected reply to ListServices".into(),
            ));
        };
        let names = reflection_fetch::application_services(list);
        match names.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(FetchError::Unexpected(
                    "lists no application service".into(),
                ));
            }
            many => {
                return Err(FetchError::Unexpected(format!(
                    "lists several services ({}); register proto_service",
                    many.join(", ")
                )));
            }
        }
    } else {
        symbol.to_string()
    };
    let files = reflection_fetch::files_of(&mut ask, &symbol, progress, limits).await?;
    Ok((symbol, files))
}

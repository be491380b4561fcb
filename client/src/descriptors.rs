//! Where a service's protobuf descriptors come from.
//!
//! First the registry (`GetDescriptors`: what the instances registered). If
//! the registry has none, the instance itself through gRPC server reflection
//! (v1): `FileContainingSymbol` may return only the file defining the
//! service (tonic's does), so each import still missing is then fetched
//! with `FileByFilename`.

use prost::Message;
use prost_reflect::{DescriptorPool, ServiceDescriptor};
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use registry_proto::registry::v1::GetDescriptorsRequest;
use registry_proto::security::RegistryConn;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use thiserror::Error;
use tonic::transport::Channel;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// Why descriptors could not be obtained.
#[derive(Debug, Error)]
pub enum DescriptorError {
    /// Neither the registry nor any instance could provide them.
    #[error("no descriptors for service `{service}`: {reason}")]
    Unavailable {
        /// Registered service name.
        service: String,
        /// What went wrong at each source.
        reason: String,
    },
    /// The descriptors do not hold together.
    #[error("invalid descriptors for `{service}`: {reason}")]
    Invalid {
        /// Registered service name.
        service: String,
        /// Why.
        reason: String,
    },
}

/// Asks the registry. `Ok(None)` when it has none for the service.
pub async fn from_registry(
    registry: &mut RegistryConn,
    service: &str,
    timeout: Duration,
) -> Result<Option<(String, DescriptorPool)>, String> {
    let mut request = tonic::Request::new(GetDescriptorsRequest {
        service: service.to_string(),
    });
    request.set_timeout(timeout);
    let reply = tokio::time::timeout(timeout, registry.get_descriptors(request))
        .await
        .map_err(|_| "registry: timed out".to_string())?
        .map_err(|s| format!("registry: {}", crate::call::status_text(&s)))?
        .into_inner();
    if reply.file_descriptor_set.is_empty() {
        return Ok(None);
    }
    let pool = DescriptorPool::decode(reply.file_descriptor_set.as_slice())
        .map_err(|e| format!("registry sent invalid descriptors: {e}"))?;
    Ok(Some((reply.proto_service, pool)))
}

/// Asks an instance through server reflection. `symbol` is the protobuf
/// service to look for; when empty, the instance's list of services decides
/// (the one that is not reflection or health).
pub async fn from_reflection(
    channel: Channel,
    symbol: &str,
    timeout: Duration,
) -> Result<(String, DescriptorPool), String> {
    tokio::time::timeout(timeout, reflect(channel, symbol))
        .await
        .map_err(|_| "reflection: timed out".to_string())?
}

async fn reflect(channel: Channel, symbol: &str) -> Result<(String, DescriptorPool), String> {
    let mut client = ServerReflectionClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("reflection: {}", crate::call::status_text(&s)))?
        .into_inner();
    // One request, one reply, on the same stream.
    let mut ask = async |request: MessageRequest| -> Result<MessageResponse, String> {
        tx.send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        })
        .await
        .map_err(|_| "reflection stream closed".to_string())?;
        let reply = replies
            .message()
            .await
            .map_err(|s| format!("reflection: {}", crate::call::status_text(&s)))?
            .and_then(|r| r.message_response)
            .ok_or_else(|| "reflection stream ended".to_string())?;
        match reply {
            MessageResponse::ErrorResponse(e) => Err(format!("reflection: {}", e.error_message)),
            other => Ok(other),
        }
    };

    let symbol = if symbol.is_empty() {
        let MessageResponse::ListServicesResponse(list) =
            ask(MessageRequest::ListServices(String::new())).await?
        else {
            return Err("reflection: unexpected reply to ListServices".into());
        };
        let names: Vec<String> = list
            .service
            .into_iter()
            .map(|s| s.name)
            .filter(|n| !n.starts_with("grpc.reflection.") && !n.starts_with("grpc.health."))
            .collect();
        match names.as_slice() {
            [one] => one.clone(),
            [] => return Err("reflection lists no application service".into()),
            many => {
                return Err(format!(
                    "reflection lists several services ({}); register proto_service",
                    many.join(", ")
                ));
            }
        }
    } else {
        symbol.to_string()
    };

    let mut files: HashMap<String, FileDescriptorProto> = HashMap::new();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let first = ask(MessageRequest::FileContainingSymbol(symbol.clone())).await?;
    add_files(first, &mut files, &mut wanted)?;
    // Follow imports until every file is known.
    while let Some(name) = wanted.iter().find(|n| !files.contains_key(*n)).cloned() {
        wanted.remove(&name);
        let reply = ask(MessageRequest::FileByFilename(name)).await?;
        add_files(reply, &mut files, &mut wanted)?;
    }
    let set = FileDescriptorSet {
        file: files.into_values().collect(),
    };
    let pool = DescriptorPool::from_file_descriptor_set(set)
        .map_err(|e| format!("reflection sent invalid descriptors: {e}"))?;
    Ok((symbol, pool))
}

fn add_files(
    reply: MessageResponse,
    files: &mut HashMap<String, FileDescriptorProto>,
    wanted: &mut BTreeSet<String>,
) -> Result<(), String> {
    let MessageResponse::FileDescriptorResponse(r) = reply else {
        return Err("reflection: expected file descriptors".into());
    };
    for bytes in r.file_descriptor_proto {
        let file = FileDescriptorProto::decode(bytes.as_slice())
            .map_err(|e| format!("reflection: bad file descriptor: {e}"))?;
        wanted.extend(
            file.dependency
                .iter()
                .filter(|d| !files.contains_key(*d))
                .cloned(),
        );
        let name = file.name().to_string();
        wanted.remove(&name);
        files.insert(name, file);
    }
    Ok(())
}

/// The service `proto_service` in `pool`; when `proto_service` is empty, the
/// pool's only service.
pub fn service_in(
    pool: &DescriptorPool,
    proto_service: &str,
    service: &str,
) -> Result<ServiceDescriptor, DescriptorError> {
    if !proto_service.is_empty() {
        return pool
            .get_service_by_name(proto_service)
            .ok_or_else(|| DescriptorError::Invalid {
                service: service.to_string(),
                reason: format!("they do not define {proto_service}"),
            });
    }
    let mut services = pool.services();
    match (services.next(), services.next()) {
        (Some(one), None) => Ok(one),
        _ => Err(DescriptorError::Invalid {
            service: service.to_string(),
            reason:
                "no proto_service registered and the descriptors do not define exactly one service"
                    .into(),
        }),
    }
}

//! The registry calls that tests of every crate make the same way, for any
//! client (plain, or with a bearer token). They panic on failure: a test
//! that needs the error calls the client itself.

use bytes::Bytes;
use registry_proto::registry::v1 as pb;
use registry_proto::registry::v1::registry_client::RegistryClient;

type StdError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a generated `RegistryClient<T>` asks of its `T` (a channel, or one
/// wrapped in an interceptor), named once.
pub trait Transport:
    tonic::client::GrpcService<
        tonic::body::Body,
        Error: Into<StdError>,
        ResponseBody: http_body::Body<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
    >
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Error: Into<StdError>,
            ResponseBody: http_body::Body<Data = Bytes, Error: Into<StdError> + Send>
                              + Send
                              + 'static,
        >
{
}

/// The instances the registry lists for `service`.
pub async fn resolve<T>(client: &mut RegistryClient<T>, service: &str) -> Vec<pb::Instance>
where
    T: Transport,
{
    client
        .resolve(pb::ResolveRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("Resolve {service}: {e}"))
        .into_inner()
        .instances
}

/// Opens a Watch of `services` (all when empty).
pub async fn watch<T>(
    client: &mut RegistryClient<T>,
    services: &[&str],
) -> tonic::Streaming<pb::WatchResponse>
where
    T: Transport,
{
    client
        .watch(pb::WatchRequest {
            services: services.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("Watch {services:?}: {e}"))
        .into_inner()
}

/// The descriptors the registry holds for `service`.
pub async fn descriptors<T>(
    client: &mut RegistryClient<T>,
    service: &str,
) -> pb::GetDescriptorsResponse
where
    T: Transport,
{
    client
        .get_descriptors(pb::GetDescriptorsRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("GetDescriptors {service}: {e}"))
        .into_inner()
}

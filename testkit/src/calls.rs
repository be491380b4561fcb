//! The registry calls that tests of every crate make the same way, for any
//! client (plain, or with a bearer token). They panic on failure: a test
//! that needs the error calls the client itself.

use bytes::Bytes;
use registry_proto::registry::v1 as pb;
use registry_proto::registry::v1::registry_client::RegistryClient;

type StdError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The instances the registry lists for `service`.
pub async fn resolve<T>(client: &mut RegistryClient<T>, service: &str) -> Vec<pb::Instance>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<StdError> + Send,
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
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<StdError> + Send,
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

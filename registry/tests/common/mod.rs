//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use registry_proto::registry::v1 as pb;
use registry_proto::registry::v1::registry_client::RegistryClient;
use tonic::transport::Channel;

/// A client of the registry.
pub type Client = RegistryClient<Channel>;

/// A granted lease.
#[derive(Clone, Debug)]
pub struct Lease {
    pub id: u64,
    pub secret: String,
}

/// Grants a lease of `ttl_ms` (0: default).
pub async fn grant(client: &mut Client, ttl_ms: u64) -> Lease {
    let r = client
        .grant_lease(pb::GrantLeaseRequest { ttl_ms })
        .await
        .unwrap()
        .into_inner();
    Lease {
        id: r.lease_id,
        secret: r.lease_secret,
    }
}

/// An instance of `service` on 127.0.0.1:`port`.
pub fn instance(service: &str, id: &str, port: u32) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        instance_id: id.into(),
        host: "127.0.0.1".into(),
        port,
        weight: 1,
        ..Default::default()
    }
}

/// A Register request under `lease`.
pub fn register_request(lease: &Lease, instance: pb::Instance) -> pb::RegisterRequest {
    pb::RegisterRequest {
        lease_id: lease.id,
        lease_secret: lease.secret.clone(),
        instance: Some(instance),
        file_descriptor_set: Vec::new(),
    }
}

/// Registers `instance` under `lease`.
pub async fn register(
    client: &mut Client,
    lease: &Lease,
    instance: pb::Instance,
) -> pb::RegisterResponse {
    client
        .register(register_request(lease, instance))
        .await
        .unwrap()
        .into_inner()
}

/// Deregisters an instance.
pub async fn deregister(
    client: &mut Client,
    lease: &Lease,
    service: &str,
    id: &str,
) -> Result<pb::DeregisterResponse, tonic::Status> {
    client
        .deregister(pb::DeregisterRequest {
            lease_id: lease.id,
            lease_secret: lease.secret.clone(),
            service: service.into(),
            instance_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Instance ids of `service`, in order.
pub async fn ids(client: &mut Client, service: &str) -> Vec<String> {
    resolve(client, service)
        .await
        .into_iter()
        .map(|i| i.instance_id)
        .collect()
}

/// Instances of `service`.
pub async fn resolve(client: &mut Client, service: &str) -> Vec<pb::Instance> {
    client
        .resolve(pb::ResolveRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .instances
}

/// Everything observable: the service list and every service's instances.
pub async fn everything(client: &mut Client) -> (Vec<pb::ServiceSummary>, Vec<pb::Instance>) {
    let services = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    let mut instances = Vec::new();
    for s in &services {
        instances.extend(resolve(client, &s.name).await);
    }
    (services, instances)
}

/// Generous bound for things that should happen "promptly".
pub const PROMPTLY: Duration = Duration::from_secs(5);

//! A service's protobuf descriptors: where they come from, in which order,
//! how long they are kept, and when they are asked for again.
//!
//! [`Descriptors`] is the one cache. Asked for a service it answers from the
//! cache, or else asks the registry (`GetDescriptors`: what the instances
//! registered), or else each instance in turn through server reflection
//! ([`reflection`]). Once fetched, a service's descriptors are kept, so
//! calls keep working while the registry is down once a service has been
//! called or described. They are asked for again only when a lookup does
//! not fit them ([`Descriptors::get_fitting`]: a method the cached copy does
//! not have, after a redeploy), and the cached copy is kept if asking fails.

pub mod reflection;

pub use reflection::from_reflection;

use crate::directory::{Directory, address};
use crate::status::status_text;
use prost_reflect::{DescriptorPool, ServiceDescriptor};
use registry_proto::descriptors::decode_pool;
use registry_proto::registry::v1::GetDescriptorsRequest;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use support::Replicas;
use thiserror::Error;

/// Timeout of one request for descriptors (to the registry, or one
/// reflection exchange with an instance).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

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

/// The descriptors of the services of one [`Directory`], cached by
/// registered service name. Cheap to clone: clones share the cache.
#[derive(Debug, Clone)]
pub struct Descriptors {
    /// Where instances (for reflection) and the registry connection come from.
    directory: Directory,
    /// Descriptors by registered service name. A std mutex: never held
    /// across an await.
    cache: Arc<Mutex<HashMap<String, ServiceDescriptor>>>,
}

impl Descriptors {
    /// An empty cache over `directory`.
    pub fn new(directory: Directory) -> Descriptors {
        Descriptors {
            directory,
            cache: Arc::default(),
        }
    }

    /// The directory these descriptors are of.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, ServiceDescriptor>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Descriptors of `service` if already fetched.
    pub fn cached(&self, service: &str) -> Option<ServiceDescriptor> {
        self.lock().get(service).cloned()
    }

    /// The protobuf service `service` serves, from the cache, or else from
    /// the registry, or else from an instance's server reflection.
    pub async fn get(&self, service: &str) -> Result<ServiceDescriptor, DescriptorError> {
        match self.cached(service) {
            Some(d) => Ok(d),
            None => self.fetch(service).await,
        }
    }

    /// Like [`get`](Self::get), for a lookup that `fits` the descriptors
    /// (say, they have the method wanted). A cached copy that does not fit
    /// may be out of date (the service was redeployed with a new interface
    /// since it was cached): it is asked for again once, and the fresh copy
    /// replaces it. If it cannot be asked for now (the registry is down),
    /// the cached copy is kept and returned, for the caller to report what
    /// it lacks.
    pub async fn get_fitting(
        &self,
        service: &str,
        fits: impl Fn(&ServiceDescriptor) -> bool,
    ) -> Result<ServiceDescriptor, DescriptorError> {
        let Some(cached) = self.cached(service) else {
            return self.fetch(service).await;
        };
        if fits(&cached) {
            return Ok(cached);
        }
        Ok(self.fetch(service).await.unwrap_or(cached))
    }

    /// Asks the registry, then each instance, and caches what it finds.
    async fn fetch(&self, service: &str) -> Result<ServiceDescriptor, DescriptorError> {
        let directory = &self.directory;
        let mut problems = Vec::new();
        let hint = directory
            .snapshot()
            .proto_service(service)
            .unwrap_or_default();
        let mut found = None;
        match from_registry(directory.replicas(), service, REQUEST_TIMEOUT).await {
            Ok(Some(pair)) => found = Some(pair),
            Ok(None) => problems.push("the registry has none".to_string()),
            Err(e) => problems.push(e),
        }
        if found.is_none() {
            for instance in directory.instances(service).iter() {
                let addr = address(instance);
                let channel = match directory.connector().endpoint(&addr) {
                    Ok(e) => e.connect_timeout(Duration::from_secs(1)).connect_lazy(),
                    Err(e) => {
                        problems.push(format!("{addr}: {e}"));
                        continue;
                    }
                };
                match from_reflection(channel, &hint, REQUEST_TIMEOUT).await {
                    Ok(pair) => {
                        found = Some(pair);
                        break;
                    }
                    Err(e) => problems.push(format!("{addr}: {e}")),
                }
            }
        }
        let Some((proto_service, pool)) = found else {
            return Err(DescriptorError::Unavailable {
                service: service.to_string(),
                reason: problems.join("; "),
            });
        };
        let proto = if proto_service.is_empty() {
            hint
        } else {
            proto_service
        };
        let descriptor = service_in(&pool, &proto, service)?;
        self.lock().insert(service.to_string(), descriptor.clone());
        Ok(descriptor)
    }
}

/// Asks the registry (the next replica when one is down or answers
/// nothing within `timeout`). `Ok(None)` when it has none for the service.
pub async fn from_registry(
    replicas: &Replicas,
    service: &str,
    timeout: Duration,
) -> Result<Option<(String, DescriptorPool)>, String> {
    let reply = replicas
        .call(|mut registry| {
            let mut request = tonic::Request::new(GetDescriptorsRequest {
                service: service.to_string(),
            });
            request.set_timeout(timeout);
            async move {
                tokio::time::timeout(timeout, registry.get_descriptors(request))
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::unavailable("timed out")))
            }
        })
        .await
        .map_err(|s| format!("registry: {}", status_text(&s)))?;
    if reply.file_descriptor_set.is_empty() {
        return Ok(None);
    }
    let pool = decode_pool(&reply.file_descriptor_set)
        .map_err(|e| format!("registry sent invalid descriptors: {e}"))?;
    Ok(Some((reply.proto_service, pool)))
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

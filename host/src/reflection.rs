//! Server reflection (v1 and v1alpha) that lists what is MOUNTED right now.
//!
//! tonic-reflection builds a fixed service. Like the plugins' gates, the
//! reflection services are routed once, at start, as a thin wrapper around a
//! swappable inner service; every mount or unmount builds a fresh pair that
//! lists the mounted plugins (plus health and reflection itself) and swaps
//! it in. Descriptors of every known plugin stay loaded, so looking up a
//! symbol of an unmounted plugin still works; it is just not listed.
//! Descriptors learned at run time (an external plugin's, from its own
//! reflection) are added and listed while that plugin is mounted.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use prost_types::FileDescriptorSet;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

/// A type-erased HTTP service, the shape tonic's generated servers have.
type HttpService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// Names a reflection protocol version at the type level.
pub trait Version: Send + Sync + 'static {
    /// Its full gRPC service name.
    const NAME: &'static str;
}

/// `grpc.reflection.v1`.
#[derive(Debug, Clone, Copy)]
pub struct V1;
impl Version for V1 {
    const NAME: &'static str = "grpc.reflection.v1.ServerReflection";
}

/// `grpc.reflection.v1alpha` (what some tools, e.g. Evans, still speak).
#[derive(Debug, Clone, Copy)]
pub struct V1Alpha;
impl Version for V1Alpha {
    const NAME: &'static str = "grpc.reflection.v1alpha.ServerReflection";
}

/// The routed wrapper of one reflection version.
pub struct Swap<V> {
    /// The service in force, replaced on every mount change.
    current: Arc<RwLock<HttpService>>,
    /// Which version this is.
    version: PhantomData<V>,
}

impl<V> Clone for Swap<V> {
    fn clone(&self) -> Self {
        Swap {
            current: self.current.clone(),
            version: PhantomData,
        }
    }
}

impl<V: Version> NamedService for Swap<V> {
    const NAME: &'static str = V::NAME;
}

impl<V: Version> Service<http::Request<Body>> for Swap<V> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner service is cloned per call and driven with `oneshot`,
        // which waits for its readiness.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Box::pin(inner.oneshot(req))
    }
}

/// Both reflection services and what they are built from.
pub struct Reflection {
    /// Every descriptor set that may be described.
    descriptors: Vec<&'static [u8]>,
    /// Always listed: health and reflection itself.
    fixed_names: Vec<&'static str>,
    /// The v1 service in force.
    v1: Arc<RwLock<HttpService>>,
    /// The v1alpha service in force.
    v1alpha: Arc<RwLock<HttpService>>,
    /// What is listed now; a std mutex: held only while rebuilding, never
    /// across an await.
    listed: Mutex<Listed>,
}

/// What the reflection services list, besides the fixed names.
#[derive(Default)]
struct Listed {
    /// Built-in services that are mounted.
    builtin: Vec<String>,
    /// Services learned at run time, with their descriptors.
    runtime: BTreeMap<String, FileDescriptorSet>,
}

impl Reflection {
    /// Builds both services over `descriptors`, listing `listed` services,
    /// and routes them.
    pub fn add_to(
        routes: &mut RoutesBuilder,
        descriptors: Vec<&'static [u8]>,
        listed: &[&str],
    ) -> Result<Reflection, tonic_reflection::server::Error> {
        let fixed_names = vec!["grpc.health.v1.Health", V1::NAME, V1Alpha::NAME];
        let state = Listed {
            builtin: listed.iter().map(|s| s.to_string()).collect(),
            runtime: BTreeMap::new(),
        };
        let (v1, v1alpha) = build(&descriptors, &fixed_names, &state)?;
        let reflection = Reflection {
            descriptors,
            fixed_names,
            v1: Arc::new(RwLock::new(v1)),
            v1alpha: Arc::new(RwLock::new(v1alpha)),
            listed: Mutex::new(state),
        };
        routes.add_service(Swap::<V1> {
            current: reflection.v1.clone(),
            version: PhantomData,
        });
        routes.add_service(Swap::<V1Alpha> {
            current: reflection.v1alpha.clone(),
            version: PhantomData,
        });
        Ok(reflection)
    }

    /// Lists exactly `listed` of the built-in services (plus health,
    /// reflection and the run-time ones) from now on.
    pub fn list(&self, listed: &[&str]) -> Result<(), tonic_reflection::server::Error> {
        let mut state = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        state.builtin = listed.iter().map(|s| s.to_string()).collect();
        self.rebuild(&state)
    }

    /// Lists `service`, described by `descriptors`, from now on (`Some`), or
    /// no longer (`None`).
    pub fn set_runtime(
        &self,
        service: &str,
        descriptors: Option<FileDescriptorSet>,
    ) -> Result<(), tonic_reflection::server::Error> {
        let mut state = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        match descriptors {
            Some(set) => state.runtime.insert(service.to_string(), set),
            None => state.runtime.remove(service),
        };
        self.rebuild(&state)
    }

    fn rebuild(&self, state: &Listed) -> Result<(), tonic_reflection::server::Error> {
        let (v1, v1alpha) = build(&self.descriptors, &self.fixed_names, state)?;
        for (slot, service) in [(&self.v1, v1), (&self.v1alpha, v1alpha)] {
            match slot.write() {
                Ok(mut guard) => *guard = service,
                Err(poisoned) => *poisoned.into_inner() = service,
            }
        }
        Ok(())
    }
}

/// Builds the v1 and v1alpha services.
fn build(
    descriptors: &[&'static [u8]],
    fixed: &[&str],
    listed: &Listed,
) -> Result<(HttpService, HttpService), tonic_reflection::server::Error> {
    let builder = || {
        let b = descriptors
            .iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, d| {
                b.register_encoded_file_descriptor_set(d)
            });
        let b = listed
            .runtime
            .values()
            .fold(b, |b, set| b.register_file_descriptor_set(set.clone()));
        let names = fixed
            .iter()
            .map(|s| s.to_string())
            .chain(listed.builtin.iter().cloned())
            .chain(listed.runtime.keys().cloned());
        names.fold(b, |b, name| b.with_service_name(name))
    };
    Ok((
        HttpService::new(builder().build_v1()?),
        HttpService::new(builder().build_v1alpha()?),
    ))
}

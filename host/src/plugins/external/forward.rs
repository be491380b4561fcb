//! The forwarding service: every call whose service no built-in route
//! serves lands here (it is the router's fallback); a call to a mounted
//! external plugin's service goes to the plugin as it came, over its local
//! socket, and the plugin's answer comes back as it was sent.
//!
//! Forwarding works at the HTTP/2 level, with tonic's `Channel` as the
//! client: the request's headers (metadata, `grpc-timeout`, encodings) and
//! body frames go through untouched, and so do the response's headers, body
//! and trailers (`grpc-status`, `grpc-message`, trailing metadata). Nothing
//! is decoded, so every kind of method works, and messages of any size the
//! plugin accepts. A caller that goes away (or whose deadline passes) drops
//! the call, which resets the plugin's stream too.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Bytes, StdError};
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

/// Where calls to one external service go.
#[derive(Debug, Clone)]
pub enum Route {
    /// To the plugin, over this channel.
    Up {
        /// The plugin's name.
        plugin: String,
        /// Its local connection.
        channel: Channel,
    },
    /// The plugin is (re)starting: calls fail `UNAVAILABLE`, which clients
    /// retry on another instance.
    Down {
        /// The plugin's name.
        plugin: String,
    },
}

impl Route {
    fn plugin(&self) -> &str {
        match self {
            Route::Up { plugin, .. } | Route::Down { plugin } => plugin,
        }
    }
}

/// The external services this node forwards, by full protobuf service name.
/// Cheap to clone; every clone is the same table.
#[derive(Debug, Clone, Default)]
pub struct Table(Arc<RwLock<HashMap<String, Route>>>);

impl Table {
    /// Routes `service` to `route`, unless another plugin holds it; then
    /// returns that plugin's name.
    pub fn set(&self, service: &str, route: Route) -> Result<(), String> {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = map.get(service)
            && held.plugin() != route.plugin()
        {
            return Err(held.plugin().to_string());
        }
        map.insert(service.to_string(), route);
        Ok(())
    }

    /// Stops routing `service`: calls to it are `UNIMPLEMENTED` again.
    pub fn remove(&self, service: &str) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.remove(service);
    }

    fn get(&self, service: &str) -> Option<Route> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.get(service).cloned()
    }
}

/// The router's fallback service, forwarding by [`Table`].
#[derive(Debug, Clone)]
pub struct Forwarder {
    /// What to forward where.
    table: Table,
}

impl Forwarder {
    /// A forwarder following `table`.
    pub fn new(table: Table) -> Forwarder {
        Forwarder { table }
    }
}

impl<B> Service<http::Request<B>> for Forwarder
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // `/package.Service/Method`
        let service = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let route = self.table.get(&service);
        Box::pin(async move {
            let (plugin, channel) = match route {
                None => {
                    return Ok(Status::unimplemented(format!(
                        "service {service} is not served by this node"
                    ))
                    .into_http());
                }
                Some(Route::Down { plugin }) => {
                    return Ok(Status::unavailable(format!(
                        "plugin {plugin} ({service}) is not running on this node right now"
                    ))
                    .into_http());
                }
                Some(Route::Up { plugin, channel }) => (plugin, channel),
            };
            match channel.oneshot(req.map(Body::new)).await {
                Ok(response) => Ok(response),
                // The channel applies the call's grpc-timeout too: that is
                // the caller's deadline, not an unreachable plugin.
                Err(e) if timed_out(&e) => Ok(Status::deadline_exceeded(format!(
                    "plugin {plugin} ({service}) did not answer before the deadline"
                ))
                .into_http()),
                Err(e) => Ok(Status::unavailable(format!(
                    "plugin {plugin} ({service}) cannot be reached: {e}"
                ))
                .into_http()),
            }
        })
    }
}

/// Whether `error` is the call's own deadline passing.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

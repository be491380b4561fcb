//! The gate: a tower service in front of each plugin's tonic service that
//! lets the plugin be mounted and unmounted while the server keeps running.
//!
//! tonic's router is built once, when the server starts; it cannot gain or
//! lose routes later. So every known plugin is routed from the start, behind
//! a gate holding a shared flag. An open gate passes calls through; a closed
//! one answers `UNIMPLEMENTED` at once, exactly as if the service were not
//! there, without touching the plugin.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

/// The shared on/off switch of one plugin's gate. Cheap to clone; every
/// clone flips the same gate.
#[derive(Debug, Clone, Default)]
pub struct Switch {
    /// Whether calls pass. Relaxed ordering is enough: the flag guards no
    /// other memory, and a call racing a flip may go either way.
    mounted: Arc<AtomicBool>,
}

impl Switch {
    /// A switch that starts unmounted (calls are refused).
    pub fn new() -> Switch {
        Switch::default()
    }

    /// Opens or closes the gate.
    pub fn set(&self, mounted: bool) {
        self.mounted.store(mounted, Ordering::Relaxed);
    }

    /// Whether the gate is open.
    pub fn is_mounted(&self) -> bool {
        self.mounted.load(Ordering::Relaxed)
    }
}

/// A tonic service wrapped in a gate. Keeps the inner service's gRPC name so
/// the router sends the same paths to it.
#[derive(Debug, Clone)]
pub struct Gate<S> {
    /// The plugin's generated tonic server.
    inner: S,
    /// Open or closed.
    switch: Switch,
}

impl<S> Gate<S> {
    /// Puts `inner` behind the gate controlled by `switch`.
    pub fn new(inner: S, switch: Switch) -> Gate<S> {
        Gate { inner, switch }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Gate<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>
        + NamedService,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.switch.is_mounted() {
            Either::Left(self.inner.call(req))
        } else {
            let status = tonic::Status::unimplemented(format!(
                "service {} is not mounted on this node",
                S::NAME
            ));
            Either::Right(ready(Ok(status.into_http())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Always;
    impl NamedService for Always {
        const NAME: &'static str = "test.v1.Always";
    }
    impl Service<http::Request<()>> for Always {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Ready<Result<http::Response<Body>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            ready(Ok(http::Response::new(Body::empty())))
        }
    }

    fn grpc_status(resp: &http::Response<Body>) -> Option<String> {
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or_default().to_string())
    }

    #[tokio::test]
    async fn closed_gate_answers_unimplemented_and_open_gate_passes() {
        let switch = Switch::new();
        let mut gate = Gate::new(Always, switch.clone());
        let resp = gate
            .call(http::Request::new(()))
            .await
            .unwrap_or_else(|e| match e {});
        assert_eq!(grpc_status(&resp).as_deref(), Some("12"));
        let msg = resp.headers().get("grpc-message").unwrap();
        assert!(msg.to_str().unwrap().contains("test.v1.Always"), "{msg:?}");

        switch.set(true);
        let resp = gate
            .call(http::Request::new(()))
            .await
            .unwrap_or_else(|e| match e {});
        assert_eq!(grpc_status(&resp), None);
    }
}

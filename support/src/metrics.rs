//! What the registry and the node host share for Prometheus: a tower layer
//! that counts every gRPC call by service, method and status code and
//! times it ([`GrpcMetricsLayer`]), the text exposition of a registry
//! ([`render`]), and the HTTP serving of an axum router on a listener
//! ([`serve_http`]).
//!
//! The status code of a gRPC call is known only at its end: in the response
//! headers of a refusal (trailers-only), otherwise in the trailers after the
//! last message. The layer wraps the response body and records the call
//! when the trailers pass by, or as `CANCELLED` when the body is dropped
//! first (the client went away).
//!
//! Labels come from the request path, which a client controls: a call
//! answered `UNIMPLEMENTED` is counted under `service="unknown"` and
//! `method="unknown"`, and past [`MAX_METHOD_LABELS`] distinct methods the
//! rest count as `"other"`, so a scanner cannot grow the exposition
//! without bound.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Frame, SizeHint};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Most distinct (service, method) label pairs a [`GrpcMetrics`] keeps;
/// calls to further methods count under `"other"`.
pub const MAX_METHOD_LABELS: usize = 256;

/// Latency buckets, in seconds: from 100 µs (a Resolve on loopback) to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The metrics of one gRPC server. Cheap to clone (shared counters).
#[derive(Clone, Debug)]
pub struct GrpcMetrics {
    /// `<prefix>_grpc_requests_total{service,method,code}`.
    requests: IntCounterVec,
    /// `<prefix>_grpc_request_duration_seconds{service,method}`.
    duration: HistogramVec,
    /// `<prefix>_grpc_requests_in_flight`.
    in_flight: IntGauge,
    /// The (service, method) pairs given labels so far.
    seen: Arc<Mutex<HashSet<(String, String)>>>,
}

impl GrpcMetrics {
    /// Creates the metrics, named `<prefix>_grpc_...`, in `registry`.
    pub fn new(prefix: &str, registry: &Registry) -> prometheus::Result<GrpcMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_grpc_requests_total"),
                "gRPC calls finished, by service, method and status code.",
            ),
            &["service", "method", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                format!("{prefix}_grpc_request_duration_seconds"),
                "Time from a gRPC call's request to its status (for streams: the stream's life).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["service", "method"],
        )?;
        let in_flight = IntGauge::new(
            format!("{prefix}_grpc_requests_in_flight"),
            "gRPC calls started and not finished (open streams included).",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(GrpcMetrics {
            requests,
            duration,
            in_flight,
            seen: Arc::default(),
        })
    }

    /// The layer that feeds these metrics.
    pub fn layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            metrics: self.clone(),
        }
    }

    /// The labels for a call to `path` that ended with `code`.
    fn labels(&self, path: &str, code: i32) -> (String, String) {
        if code == tonic::Code::Unimplemented as i32 {
            return ("unknown".into(), "unknown".into());
        }
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        let pair = (service.to_string(), method.to_string());
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&pair) {
            return pair;
        }
        if seen.len() >= MAX_METHOD_LABELS {
            return ("other".into(), "other".into());
        }
        seen.insert(pair.clone());
        pair
    }

    fn finish(&self, call: &Call, code: i32) {
        self.in_flight.dec();
        let (service, method) = self.labels(&call.path, code);
        self.requests
            .with_label_values(&[service.as_str(), method.as_str(), code_name(code)])
            .inc();
        self.duration
            .with_label_values(&[service.as_str(), method.as_str()])
            .observe(call.started.elapsed().as_secs_f64());
    }
}

/// The canonical name of a gRPC status code (`OK`, `UNAVAILABLE`, ...).
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// The `grpc-status` in `headers`, if any (an unparsable one is UNKNOWN).
fn status_in(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status").map(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(tonic::Code::Unknown as i32)
    })
}

/// One call in progress.
#[derive(Debug)]
struct Call {
    path: String,
    started: Instant,
}

/// The tower layer of [`GrpcMetrics`]; put it outermost, so calls that
/// other layers refuse (a missing token, a message too large) count too.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: GrpcMetrics,
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = Metered<S>;
    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] produces.
#[derive(Clone, Debug)]
pub struct Metered<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B> tower_service::Service<http::Request<B>> for Metered<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = Call {
            path: request.uri().path().to_string(),
            started: Instant::now(),
        };
        let metrics = self.metrics.clone();
        metrics.in_flight.inc();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(e) => {
                    metrics.finish(&call, tonic::Code::Internal as i32);
                    return Err(e);
                }
            };
            if let Some(code) = status_in(response.headers()) {
                metrics.finish(&call, code);
                return Ok(response);
            }
            Ok(response.map(|inner| {
                tonic::body::Body::new(MeteredBody {
                    inner,
                    call: Some(call),
                    metrics,
                })
            }))
        })
    }
}

/// A response body that records its call when the status goes by.
struct MeteredBody {
    inner: tonic::body::Body,
    /// Taken when recorded.
    call: Option<Call>,
    metrics: GrpcMetrics,
}

impl MeteredBody {
    fn record(&mut self, code: i32) {
        if let Some(call) = self.call.take() {
            self.metrics.finish(&call, code);
        }
    }
}

impl http_body::Body for MeteredBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    self.record(code);
                }
            }
            // A body that breaks, or ends without a status, is a failed
            // call to the client.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                self.record(tonic::Code::Unknown as i32)
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Dropped before its status: the client cancelled or went away.
        self.record(tonic::Code::Cancelled as i32);
    }
}

/// The content type of [`render`]'s output.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `registry`'s metrics in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buffer) {
        tracing::error!("cannot encode metrics: {e}");
    }
    String::from_utf8(buffer).unwrap_or_default()
}

/// Serves `router` on `listener` (HTTP/1.1) until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(14), "UNAVAILABLE");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(-1), "UNKNOWN");
        assert_eq!(code_name(99), "UNKNOWN");
    }

    #[test]
    fn labels_are_bounded() {
        let metrics = GrpcMetrics::new("t", &Registry::new()).unwrap();
        assert_eq!(
            metrics.labels("/calculator.v1.Calculator/Add", 0),
            ("calculator.v1.Calculator".into(), "Add".into())
        );
        assert_eq!(
            metrics.labels("/x.Y/Nope", tonic::Code::Unimplemented as i32),
            ("unknown".into(), "unknown".into())
        );
        for i in 0..MAX_METHOD_LABELS * 2 {
            metrics.labels(&format!("/s/m{i}"), 16);
        }
        assert_eq!(metrics.seen.lock().unwrap().len(), MAX_METHOD_LABELS);
        assert_eq!(
            metrics.labels("/s/brand-new", 16),
            ("other".into(), "other".into())
        );
        // A pair seen before keeps its labels.
        assert_eq!(metrics.labels("/calculator.v1.Calculator/Add", 0).1, "Add");
    }
}

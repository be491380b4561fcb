//! The registry's HTTP listener (`registry --http ADDR`): Prometheus
//! metrics at `/metrics`, and a live dashboard of the fleet at `/`, whose
//! page follows `/events`, a stream of server-sent events fed by the
//! registry's own watch ([`fleet`]). Page, script and style are embedded in
//! the binary: nothing is fetched from elsewhere, so it works on a LAN
//! without internet.
//!
//! With a read token set (`--read-token`), every path needs it: as
//! `Authorization: Bearer TOKEN` (Prometheus' `authorization` setting), or
//! once as `/?token=TOKEN`, which answers with a cookie holding it (the
//! browser then sends it with every request, the event stream included)
//! and a redirect to `/` so the token leaves the address bar.
//!
//! At most [`HttpConfig::max_dashboard_clients`] event streams are open at
//! once; one more is refused with 503.

pub mod fleet;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use support::{CancellationToken, TokenPolicy};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::metrics;
use crate::watch::Watchers;
use fleet::{Fleet, Update};

/// Default of [`HttpConfig::max_dashboard_clients`].
pub const DEFAULT_MAX_DASHBOARD_CLIENTS: usize = 32;

/// How often an idle event stream gets a comment, so proxies and the
/// browser keep it open and a vanished client is noticed.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// The cookie that carries the read token once `/?token=` was opened.
pub const TOKEN_COOKIE: &str = "registry_token";

/// What an operator tunes on the HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpConfig {
    /// Most dashboard event streams open at once (each holds a copy of the
    /// fleet while it is sent); more are refused with 503. 0: none at all.
    pub max_dashboard_clients: usize,
}

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig {
            max_dashboard_clients: DEFAULT_MAX_DASHBOARD_CLIENTS,
        }
    }
}

#[derive(Clone)]
struct App {
    watchers: Watchers,
    fleet: Fleet,
    tokens: Arc<TokenPolicy>,
    clients: Arc<Semaphore>,
    shutdown: CancellationToken,
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Serves the HTTP listener until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    watchers: Watchers,
    tokens: TokenPolicy,
    config: HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = App {
        fleet: Fleet::spawn(watchers.clone(), shutdown.clone()),
        watchers,
        tokens: Arc::new(tokens),
        clients: Arc::new(Semaphore::new(config.max_dashboard_clients)),
        shutdown: shutdown.clone(),
    };
    let router = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/events", get(events))
        .route("/metrics", get(metrics_page))
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
        .with_state(app);
    support::metrics::serve_http(listener, router, shutdown.cancelled_owned()).await
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The gauges of `/metrics`, read from the store and the watch hub now.
fn gauges(watchers: &Watchers) -> metrics::Gauges {
    let store = watchers.store();
    metrics::Gauges {
        services: store.list_services().0,
        leases: store.lease_count(),
        watch_log_bytes: watchers.hub().log_bytes(),
        watch_memory_bytes: watchers.hub().memory_used(),
    }
}

async fn metrics_page(State(app): State<App>) -> Response {
    (
        [(header::CONTENT_TYPE, support::metrics::TEXT_FORMAT)],
        metrics::render(&gauges(&app.watchers)),
    )
        .into_response()
}

/// The event stream of one dashboard: `snapshot` (the whole fleet), then
/// `changes` (arrays of changes) as they happen; a fresh `snapshot` when
/// the view was rebuilt or this client fell behind.
async fn events(State(app): State<App>) -> Response {
    let Ok(permit) = app.clients.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many dashboards open (--max-dashboard-clients); close one and reload\n",
        )
            .into_response();
    };
    let counted = metrics::Counted::new(&metrics::get().dashboard_clients);
    let (snapshot, receiver) = app.fleet.subscribe();
    let fleet = app.fleet.clone();
    let first =
        futures::stream::once(async move { Event::default().event("snapshot").data(snapshot) });
    let rest = BroadcastStream::new(receiver).map(move |update| match update {
        Ok(Update::Changes(json)) => Event::default().event("changes").data(&*json),
        // A rebuilt view, or this client fell behind: start it over. The
        // receiver in use is not replaced: later changes still arrive,
        // and the client drops those it already has by revision.
        Ok(Update::Reset) | Err(BroadcastStreamRecvError::Lagged(_)) => {
            Event::default().event("snapshot").data(fleet.subscribe().0)
        }
    });
    let stop = app.shutdown.clone();
    let stream = first
        .chain(rest)
        .map(move |event| {
            let _held = (&permit, &counted);
            Ok::<_, Infallible>(event)
        })
        .take_until(stop.cancelled_owned());
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(SSE_KEEPALIVE))
        .into_response()
}

/// The token a request presents: its `Authorization` header, else the
/// cookie set by `/?token=`.
fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        return Some(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .and_then(|(_, value)| from_hex(value))
}

/// The `token` parameter of the query, percent-decoded.
fn query_token(uri: &http::Uri) -> Option<String> {
    uri.query()?;
    axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(uri)
        .ok()?
        .0
        .remove("token")
}

fn to_hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Lets a request through when it carries the read token (or none is
/// needed); `/?token=` turns a good token into a cookie.
async fn authorize(State(app): State<App>, request: Request, next: Next) -> Response {
    // The same rule as the Watch call: the read token, or the write token
    // once reads need one.
    let check = |token: Option<&str>| {
        app.tokens
            .check("/registry.v1.Registry/Watch", token.map(str::as_bytes))
    };
    if let Some(token) = query_token(request.uri()) {
        if let Err(status) = check(Some(&token)) {
            return refuse(status.message());
        }
        let cookie = format!(
            "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            to_hex(&token)
        );
        let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return response;
    }
    match check(presented(request.headers()).as_deref()) {
        Ok(()) => next.run(request).await,
        Err(status) => refuse(status.message()),
    }
}

fn refuse(why: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!(
            "{why}\nOpen /?token=READ_TOKEN once (a cookie keeps it), or send \
             `Authorization: Bearer READ_TOKEN`.\n"
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_survive_the_cookie_and_the_query() {
        for token in ["s3cret", "a b;c=d", "ünï"] {
            assert_eq!(from_hex(&to_hex(token)).as_deref(), Some(token));
        }
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("abc"), None);
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(
            query_token(&uri("/?x=1&token=a%20b")).as_deref(),
            Some("a b")
        );
        assert_eq!(query_token(&uri("/?x=1")), None);
        assert_eq!(query_token(&uri("/")), None);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {TOKEN_COOKIE}={}", to_hex("tok"))).unwrap(),
        );
        assert_eq!(presented(&headers).as_deref(), Some("tok"));
    }
}

//! Following an external plugin's health: a `grpc.health.v1.Health/Watch`
//! stream on the plugin's service name, or on `""` (the whole server) when
//! the plugin reports nothing for that name. Any change is published on a
//! watch channel at once; a stream that fails counts as NOT_SERVING until
//! it can be opened again (tried every [`RETRY`]).

use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Pause before opening a failed Watch stream again.
pub const RETRY: Duration = Duration::from_millis(200);

/// What the plugin's health says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not known yet (no answer so far).
    Unknown,
    /// SERVING.
    Serving,
    /// NOT_SERVING (or any status but SERVING), with what it said.
    NotServing(String),
}

/// Follows `service`'s health on `channel` until the returned receiver is
/// dropped (the task then ends at its next change).
pub fn follow(channel: Channel, service: String) -> watch::Receiver<Health> {
    let (tx, rx) = watch::channel(Health::Unknown);
    tokio::spawn(async move {
        let mut name = service;
        loop {
            if tx.is_closed() {
                return;
            }
            let why = match watch_once(channel.clone(), &name, &tx).await {
                WatchEnd::Closed => return,
                WatchEnd::Unknown if !name.is_empty() => {
                    // No status for the service's name: follow the server's.
                    name.clear();
                    continue;
                }
                WatchEnd::Unknown => "its health service knows neither its service nor \"\"".into(),
                WatchEnd::Failed(why) => why,
            };
            let _ = tx.send_replace(Health::NotServing(why));
            tokio::time::sleep(RETRY).await;
        }
    });
    rx
}

enum WatchEnd {
    /// Nobody follows any more.
    Closed,
    /// SERVICE_UNKNOWN for the name.
    Unknown,
    /// The stream failed or ended.
    Failed(String),
}

async fn watch_once(channel: Channel, name: &str, tx: &watch::Sender<Health>) -> WatchEnd {
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest {
        service: name.to_string(),
    };
    let mut stream = tokio::select! {
        () = tx.closed() => return WatchEnd::Closed,
        r = client.watch(request) => match r {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return WatchEnd::Unknown,
            Err(s) => return WatchEnd::Failed(format!("health: {}: {}", s.code(), s.message())),
        },
    };
    loop {
        let message = tokio::select! {
            () = tx.closed() => return WatchEnd::Closed,
            m = stream.message() => m,
        };
        let status = match message {
            Ok(Some(reply)) => reply.status(),
            Ok(None) => return WatchEnd::Failed("health: the Watch stream ended".into()),
            Err(s) => return WatchEnd::Failed(format!("health: {}: {}", s.code(), s.message())),
        };
        let health = match status {
            ServingStatus::Serving => Health::Serving,
            ServingStatus::ServiceUnknown => return WatchEnd::Unknown,
            other => Health::NotServing(format!("its health says {}", other.as_str_name())),
        };
        tx.send_if_modified(|h| {
            let changed = *h != health;
            *h = health.clone();
            changed
        });
    }
}

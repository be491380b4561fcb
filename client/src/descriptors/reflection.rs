//! Descriptors from an instance itself, through gRPC server reflection (v1).
//!
//! `FileContainingSymbol` may return only the file defining the service
//! (tonic's does), so each import still missing is then fetched with
//! `FileByFilename`. That exchange is bounded by work as well as by time: at
//! most 256 requests, 256 files and 16 MiB of descriptors, and a reply that
//! does not hold the file asked for is an error, so a server whose answers
//! never complete the imports fails at once, naming what is missing, rather
//! than at the timeout.

use crate::status::status_text;
use prost::Message;
use prost_reflect::DescriptorPool;
use prost_types::FileDescriptorProto;
use registry_proto::descriptors::pool_from_files;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tonic::transport::Channel;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

/// Most requests one reflection exchange may make: ListServices, the file
/// defining the service, then one per import.
const MAX_REFLECTION_REQUESTS: usize = 256;
/// Most files it may collect (the service's file and its imports, directly
/// or not; real services need a few dozen at most).
const MAX_REFLECTION_FILES: usize = 256;
/// Most bytes of file descriptors it may collect (the registry accepts 4 MiB
/// of descriptors per service).
const MAX_REFLECTION_BYTES: usize = 16 * 1024 * 1024;

/// Bounds on the work of one reflection exchange, so that a server that
/// keeps answering without ever completing the imports fails at once
/// rather than at the overall timeout.
#[derive(Debug, Clone, Copy)]
struct ReflectionLimits {
    /// Requests sent.
    requests: usize,
    /// Files collected.
    files: usize,
    /// Bytes of file descriptors collected.
    bytes: usize,
}

const REFLECTION_LIMITS: ReflectionLimits = ReflectionLimits {
    requests: MAX_REFLECTION_REQUESTS,
    files: MAX_REFLECTION_FILES,
    bytes: MAX_REFLECTION_BYTES,
};

/// How far a reflection exchange got: what a timeout reports.
#[derive(Debug, Default)]
struct Progress {
    /// Requests sent.
    requests: usize,
    /// Files collected.
    files: usize,
    /// Bytes of file descriptors collected.
    bytes: usize,
    /// The request last sent, e.g. `FileByFilename("a.proto")`.
    waiting_for: String,
}

impl Progress {
    fn timed_out(&self, timeout: Duration) -> String {
        if self.requests == 0 {
            return format!("reflection: timed out after {timeout:?} opening the stream");
        }
        format!(
            "reflection: no reply to {} within {timeout:?} ({} requests, {} files so far)",
            self.waiting_for, self.requests, self.files
        )
    }
}

/// Asks an instance through server reflection. `symbol` is the protobuf
/// service to look for; when empty, the instance's list of services decides
/// (the one that is not reflection or health).
pub async fn from_reflection(
    channel: Channel,
    symbol: &str,
    timeout: Duration,
) -> Result<(String, DescriptorPool), String> {
    let mut progress = Progress::default();
    let outcome = tokio::time::timeout(timeout, reflect(channel, symbol, &mut progress)).await;
    outcome.unwrap_or_else(|_| Err(progress.timed_out(timeout)))
}

async fn reflect(
    channel: Channel,
    symbol: &str,
    progress: &mut Progress,
) -> Result<(String, DescriptorPool), String> {
    let mut client = ServerReflectionClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let replies = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("reflection: {}", status_text(&s)))?
        .into_inner();
    let ask = ReflectionStream { tx, replies };
    let (symbol, files) = converse(symbol, ask, progress, REFLECTION_LIMITS).await?;
    let pool =
        pool_from_files(files).map_err(|e| format!("reflection sent invalid descriptors: {e}"))?;
    Ok((symbol, pool))
}

/// Sends one reflection request and waits for its reply. A trait so that
/// [`converse`] can be tested against scripted servers (an `AsyncFnMut`
/// would do, but its future cannot be shown to be `Send`).
trait Ask {
    fn ask(
        &mut self,
        request: MessageRequest,
    ) -> impl Future<Output = Result<MessageResponse, String>> + Send;
}

/// A server reflection stream: one request, one reply, in turn.
struct ReflectionStream {
    /// Requests.
    tx: tokio::sync::mpsc::Sender<ServerReflectionRequest>,
    /// Replies.
    replies: tonic::Streaming<ServerReflectionResponse>,
}

impl Ask for ReflectionStream {
    async fn ask(&mut self, request: MessageRequest) -> Result<MessageResponse, String> {
        self.tx
            .send(ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            })
            .await
            .map_err(|_| "reflection stream closed".to_string())?;
        let reply = self
            .replies
            .message()
            .await
            .map_err(|s| format!("reflection: {}", status_text(&s)))?
            .and_then(|r| r.message_response)
            .ok_or_else(|| "reflection stream ended".to_string())?;
        match reply {
            MessageResponse::ErrorResponse(e) => Err(format!("reflection: {}", e.error_message)),
            other => Ok(other),
        }
    }
}

/// The reflection conversation, apart from its transport (so it can be
/// tested against scripted servers): which service (ListServices, when
/// `symbol` is empty), the file defining it, then each import still
/// missing. Fails as soon as `limits` are reached, naming what is missing.
async fn converse(
    symbol: &str,
    mut ask: impl Ask,
    progress: &mut Progress,
    limits: ReflectionLimits,
) -> Result<(String, Vec<FileDescriptorProto>), String> {
    let symbol = if symbol.is_empty() {
        let request = MessageRequest::ListServices(String::new());
        let MessageResponse::ListServicesResponse(list) =
            ask_counted(&mut ask, progress, limits, request, "the service list").await?
        else {
            return Err("reflection: unexpected reply to ListServices".into());
        };
        let names: Vec<String> = list
            .service
            .into_iter()
            .map(|s| s.name)
            .filter(|n| !n.starts_with("grpc.reflection.") && !n.starts_with("grpc.health."))
            .collect();
        match names.as_slice() {
            [one] => one.clone(),
            [] => return Err("reflection lists no application service".into()),
            many => {
                return Err(format!(
                    "reflection lists several services ({}); register proto_service",
                    many.join(", ")
                ));
            }
        }
    } else {
        symbol.to_string()
    };

    let mut files: HashMap<String, FileDescriptorProto> = HashMap::new();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let request = MessageRequest::FileContainingSymbol(symbol.clone());
    let what = format!("the file defining {symbol}");
    let first = ask_counted(&mut ask, progress, limits, request, &what).await?;
    add_files(first, &mut files, &mut wanted, progress, limits, &symbol)?;
    // Follow imports until every file is known.
    while let Some(name) = wanted.pop_first() {
        let request = MessageRequest::FileByFilename(name.clone());
        let what = match listed(&wanted) {
            None => format!("the file {name}"),
            Some(others) => format!("the file {name} and the imports {others}"),
        };
        let reply = ask_counted(&mut ask, progress, limits, request, &what).await?;
        add_files(reply, &mut files, &mut wanted, progress, limits, &symbol)?;
        // A server that answers with other files would have us chase
        // their imports forever.
        if !files.contains_key(&name) {
            return Err(format!(
                "reflection: asked for the file {name}, the reply does not hold it"
            ));
        }
    }
    Ok((symbol, files.into_values().collect()))
}

/// Sends one request, unless the request limit is reached; `what` names
/// what the request was for, for that error.
async fn ask_counted(
    ask: &mut impl Ask,
    progress: &mut Progress,
    limits: ReflectionLimits,
    request: MessageRequest,
    what: &str,
) -> Result<MessageResponse, String> {
    if progress.requests >= limits.requests {
        return Err(format!(
            "reflection: still missing {what} after {} requests (the limit)",
            limits.requests
        ));
    }
    progress.requests += 1;
    progress.waiting_for = match &request {
        MessageRequest::ListServices(_) => "ListServices".to_string(),
        MessageRequest::FileContainingSymbol(s) => format!("FileContainingSymbol({s})"),
        MessageRequest::FileByFilename(f) => format!("FileByFilename({f})"),
        other => format!("{other:?}"),
    };
    ask.ask(request).await
}

/// The files still wanted, shortened for an error message; `None` if none.
fn listed(wanted: &BTreeSet<String>) -> Option<String> {
    const SHOWN: usize = 5;
    let shown: Vec<&str> = wanted.iter().take(SHOWN).map(String::as_str).collect();
    match wanted.len() {
        0 => None,
        n if n <= SHOWN => Some(shown.join(", ")),
        n => Some(format!("{}, and {} more", shown.join(", "), n - SHOWN)),
    }
}

fn add_files(
    reply: MessageResponse,
    files: &mut HashMap<String, FileDescriptorProto>,
    wanted: &mut BTreeSet<String>,
    progress: &mut Progress,
    limits: ReflectionLimits,
    symbol: &str,
) -> Result<(), String> {
    let MessageResponse::FileDescriptorResponse(r) = reply else {
        return Err("reflection: expected file descriptors".into());
    };
    for bytes in r.file_descriptor_proto {
        progress.bytes = progress.bytes.saturating_add(bytes.len());
        if progress.bytes > limits.bytes {
            return Err(format!(
                "reflection: the descriptors of {symbol} exceed {} bytes (the limit); imports still missing: {}",
                limits.bytes,
                listed(wanted).as_deref().unwrap_or("none")
            ));
        }
        let file = FileDescriptorProto::decode(bytes.as_slice())
            .map_err(|e| format!("reflection: bad file descriptor: {e}"))?;
        let name = file.name().to_string();
        if !files.contains_key(&name) && files.len() >= limits.files {
            return Err(format!(
                "reflection: {symbol} needs more than {} files (the limit), {name} would be one more; imports still missing: {}",
                limits.files,
                listed(wanted).as_deref().unwrap_or("none")
            ));
        }
        wanted.extend(
            file.dependency
                .iter()
                .filter(|d| !files.contains_key(*d) && **d != name)
                .cloned(),
        );
        wanted.remove(&name);
        files.insert(name, file);
        progress.files = files.len();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_reflection::pb::v1::FileDescriptorResponse;

    /// A reflection server played by a function.
    struct Scripted<F>(F);

    impl<F> Ask for Scripted<F>
    where
        F: FnMut(MessageRequest) -> Result<MessageResponse, String> + Send,
    {
        async fn ask(&mut self, request: MessageRequest) -> Result<MessageResponse, String> {
            (self.0)(request)
        }
    }

    /// A reflection server that never answers.
    struct Silent;

    impl Ask for Silent {
        async fn ask(&mut self, _: MessageRequest) -> Result<MessageResponse, String> {
            std::future::pending().await
        }
    }

    /// A reply holding files named `names`, each importing `imports(name)`.
    fn reply(names: &[&str], imports: impl Fn(&str) -> Vec<String>) -> MessageResponse {
        let files = names
            .iter()
            .map(|n| {
                FileDescriptorProto {
                    name: Some(n.to_string()),
                    dependency: imports(n),
                    ..Default::default()
                }
                .encode_to_vec()
            })
            .collect();
        MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
            file_descriptor_proto: files,
        })
    }

    fn requested(request: &MessageRequest) -> String {
        match request {
            MessageRequest::FileContainingSymbol(_) => "svc.proto".to_string(),
            MessageRequest::FileByFilename(f) => f.clone(),
            other => panic!("unexpected {other:?}"),
        }
    }

    const ROOMY: ReflectionLimits = ReflectionLimits {
        requests: 100,
        files: 100,
        bytes: 1 << 20,
    };

    #[tokio::test]
    async fn imports_are_followed_until_every_file_is_known() {
        let server = Scripted(|r: MessageRequest| {
            let name = requested(&r);
            Ok(reply(&[&name], |n| match n {
                "svc.proto" => vec!["a.proto".into(), "b.proto".into()],
                "a.proto" => vec!["b.proto".into()],
                _ => Vec::new(),
            }))
        });
        let mut progress = Progress::default();
        let (symbol, files) = converse("x.Svc", server, &mut progress, ROOMY)
            .await
            .expect("complete");
        assert_eq!(symbol, "x.Svc");
        let mut names: Vec<&str> = files.iter().map(|f| f.name()).collect();
        names.sort();
        assert_eq!(names, ["a.proto", "b.proto", "svc.proto"]);
        assert_eq!(progress.requests, 3);
    }

    #[tokio::test]
    async fn imports_that_never_end_stop_at_the_file_or_request_limit() {
        // Each file imports one more that does not exist yet.
        let endless = || {
            Scripted(|r: MessageRequest| {
                let name = requested(&r);
                Ok(reply(&[&name], |n| vec![format!("x{n}")]))
            })
        };
        let cases = [
            (
                ReflectionLimits { files: 10, ..ROOMY },
                "reflection: x.Svc needs more than 10 files (the limit), xxxxxxxxxxsvc.proto would be one more; imports still missing: none",
                11,
            ),
            (
                ReflectionLimits {
                    requests: 5,
                    ..ROOMY
                },
                "reflection: still missing the file xxxxxsvc.proto after 5 requests (the limit)",
                5,
            ),
        ];
        for (limits, expected, requests) in cases {
            let mut progress = Progress::default();
            let err = converse("x.Svc", endless(), &mut progress, limits)
                .await
                .expect_err("never complete");
            assert_eq!(err, expected);
            assert_eq!(progress.requests, requests);
        }
    }

    #[tokio::test]
    async fn a_reply_without_the_file_asked_for_is_an_error() {
        // Always the service's own file, whatever is asked.
        let server =
            Scripted(|_: MessageRequest| Ok(reply(&["svc.proto"], |_| vec!["dep.proto".into()])));
        let mut progress = Progress::default();
        let err = converse("x.Svc", server, &mut progress, ROOMY)
            .await
            .expect_err("dep.proto never comes");
        assert_eq!(
            err,
            "reflection: asked for the file dep.proto, the reply does not hold it"
        );
        assert_eq!(progress.requests, 2);
    }

    #[tokio::test]
    async fn descriptors_over_the_byte_limit_are_refused() {
        let server = Scripted(|r: MessageRequest| {
            let name = requested(&r);
            Ok(reply(&[&name], |n| {
                if n == "svc.proto" {
                    (0..50).map(|i| format!("import{i}.proto")).collect()
                } else {
                    Vec::new()
                }
            }))
        });
        let limits = ReflectionLimits {
            bytes: 1000,
            ..ROOMY
        };
        let mut progress = Progress::default();
        let err = converse("x.Svc", server, &mut progress, limits)
            .await
            .expect_err("too big");
        assert!(
            err.starts_with("reflection: the descriptors of x.Svc exceed 1000 bytes (the limit)"),
            "{err}"
        );
        // The first file was within the limit; its imports were being
        // fetched, and the error names some of those left, not all 50.
        assert!(err.contains("; imports still missing: import"), "{err}");
        assert!(err.ends_with(" more"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_times_out_naming_the_request() {
        let mut progress = Progress::default();
        let outcome = tokio::time::timeout(
            Duration::from_secs(3),
            converse("x.Svc", Silent, &mut progress, ROOMY),
        )
        .await;
        assert!(outcome.is_err(), "answered?");
        assert_eq!(
            progress.timed_out(Duration::from_secs(3)),
            "reflection: no reply to FileContainingSymbol(x.Svc) within 3s (1 requests, 0 files so far)"
        );
        assert_eq!(
            Progress::default().timed_out(Duration::from_secs(3)),
            "reflection: timed out after 3s opening the stream"
        );
    }
}

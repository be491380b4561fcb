//! Fetching a service's descriptors from a server's reflection: the file
//! defining the service (`FileContainingSymbol`), then each import still
//! missing (`FileByFilename`), until every file is known. The client does
//! this to call an instance that registered no descriptors; the node host,
//! to learn an external plugin's service.
//!
//! Bounded by work as well as by time: [`Limits`] caps requests, files and
//! bytes, and a reply that does not hold the file asked for is an error, so a
//! server whose answers never complete the imports fails at once, naming
//! what is missing, rather than at the caller's timeout. The transport is
//! the caller's ([`Ask`]): the client and the host open their streams
//! differently (the host tries v1, then v1alpha).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use prost::Message;
use prost_types::FileDescriptorProto;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ListServiceResponse, ServerReflectionResponse};

/// The services a ListServices answer names, but reflection's and
/// health's own: the application's.
pub fn application_services(list: ListServiceResponse) -> Vec<String> {
    list.service
        .into_iter()
        .map(|s| s.name)
        .filter(|n| !n.starts_with("grpc.reflection.") && !n.starts_with("grpc.health."))
        .collect()
}

/// Bounds on the work of one exchange.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests sent (ListServices, the service's file, one per import).
    pub requests: usize,
    /// Files collected (the service's file and its imports, directly or not;
    /// real services need a few dozen at most).
    pub files: usize,
    /// Bytes of file descriptors collected.
    pub bytes: usize,
}

/// How far an exchange got: what a timeout reports.
#[derive(Debug, Default)]
pub struct Progress {
    /// Requests sent.
    pub requests: usize,
    /// Files collected.
    pub files: usize,
    /// Bytes of file descriptors collected.
    pub bytes: usize,
    /// The request last sent, e.g. `FileByFilename("a.proto")`.
    pub waiting_for: String,
}

impl Progress {
    /// The error of an exchange that ran out of `timeout`.
    pub fn timed_out(&self, timeout: Duration) -> String {
        if self.requests == 0 {
            return format!("reflection: timed out after {timeout:?} opening the stream");
        }
        format!(
            "reflection: no reply to {} within {timeout:?} ({} requests, {} files so far)",
            self.waiting_for, self.requests, self.files
        )
    }
}

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The stream could not be opened, broke or ended: the server may not
    /// be ready yet.
    #[error("{0}")]
    Transport(String),
    /// The server answered with an `error_response`.
    #[error("reflection: {0}")]
    Answered(String),
    /// The server answers, but not what was asked.
    #[error("reflection: {0}")]
    Unexpected(String),
    /// A limit was reached before every file was known.
    #[error("reflection: {0}")]
    Limit(String),
}

impl FetchError {
    /// Whether asking again later may succeed (the server answered nothing
    /// wrong, it did not answer).
    pub fn is_transport(&self) -> bool {
        matches!(self, FetchError::Transport(_))
    }
}

/// Sends one reflection request and waits for its reply. A trait so that
/// the exchange can be tested against scripted servers (an `AsyncFnMut`
/// would do, but its future cannot be shown to be `Send`).
pub trait Ask {
    /// The reply to `request`; an `error_response` is [`FetchError::Answered`].
    fn ask(
        &mut self,
        request: MessageRequest,
    ) -> impl Future<Output = Result<MessageResponse, FetchError>> + Send;
}

/// The next reply on a reflection stream. A broken or ended stream is a
/// [`FetchError::Transport`]; the server's `ErrorResponse`, a
/// [`FetchError::Answered`].
pub async fn next_reply(
    replies: &mut tonic::Streaming<ServerReflectionResponse>,
) -> Result<MessageResponse, FetchError> {
    let reply = replies
        .message()
        .await
        .map_err(|s| {
            FetchError::Transport(if s.message().is_empty() {
                format!("reflection: {:?}", s.code())
            } else {
                format!("reflection: {:?}: {}", s.code(), s.message())
            })
        })?
        .and_then(|r| r.message_response)
        .ok_or_else(|| FetchError::Transport("reflection stream ended".into()))?;
    match reply {
        MessageResponse::ErrorResponse(e) => Err(FetchError::Answered(e.error_message)),
        other => Ok(other),
    }
}

/// Sends one request, unless the request limit is reached; `what` names
/// what the request was for, for that error.
pub async fn ask_counted(
    ask: &mut impl Ask,
    progress: &mut Progress,
    limits: Limits,
    request: MessageRequest,
    what: &str,
) -> Result<MessageResponse, FetchError> {
    if progress.requests >= limits.requests {
        return Err(FetchError::Limit(format!(
            "still missing {what} after {} requests (the limit)",
            limits.requests
        )));
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

/// The file defining `symbol` and everything it imports, by name order.
pub async fn files_of(
    ask: &mut impl Ask,
    symbol: &str,
    progress: &mut Progress,
    limits: Limits,
) -> Result<Vec<FileDescriptorProto>, FetchError> {
    let mut files = Files::default();
    let request = MessageRequest::FileContainingSymbol(symbol.to_string());
    let what = format!("the file defining {symbol}");
    let first = ask_counted(ask, progress, limits, request, &what).await?;
    files.add(first, progress, limits, symbol)?;
    while let Some(name) = files.wanted.pop_first() {
        let request = MessageRequest::FileByFilename(name.clone());
        let what = match listed(&files.wanted) {
            None => format!("the file {name}"),
            Some(others) => format!("the file {name} and the imports {others}"),
        };
        let reply = ask_counted(ask, progress, limits, request, &what).await?;
        files.add(reply, progress, limits, symbol)?;
        // A server that answers with other files would have us chase
        // their imports forever.
        if !files.known.contains_key(&name) {
            return Err(FetchError::Unexpected(format!(
                "asked for the file {name}, the reply does not hold it"
            )));
        }
    }
    Ok(files.known.into_values().collect())
}

/// The files collected so far, and the imports still missing.
#[derive(Default)]
struct Files {
    known: BTreeMap<String, FileDescriptorProto>,
    wanted: BTreeSet<String>,
}

impl Files {
    fn add(
        &mut self,
        reply: MessageResponse,
        progress: &mut Progress,
        limits: Limits,
        symbol: &str,
    ) -> Result<(), FetchError> {
        let MessageResponse::FileDescriptorResponse(r) = reply else {
            return Err(FetchError::Unexpected("expected file descriptors".into()));
        };
        let missing = |wanted: &BTreeSet<String>| listed(wanted).unwrap_or_else(|| "none".into());
        for bytes in r.file_descriptor_proto {
            progress.bytes = progress.bytes.saturating_add(bytes.len());
            if progress.bytes > limits.bytes {
                return Err(FetchError::Limit(format!(
                    "the descriptors of {symbol} exceed {} bytes (the limit); imports still missing: {}",
                    limits.bytes,
                    missing(&self.wanted)
                )));
            }
            let file = FileDescriptorProto::decode(bytes.as_slice())
                .map_err(|e| FetchError::Unexpected(format!("bad file descriptor: {e}")))?;
            let name = file.name().to_string();
            if !self.known.contains_key(&name) && self.known.len() >= limits.files {
                return Err(FetchError::Limit(format!(
                    "{symbol} needs more than {} files (the limit), {name} would be one more; imports still missing: {}",
                    limits.files,
                    missing(&self.wanted)
                )));
            }
            let known = &self.known;
            self.wanted.extend(
                file.dependency
                    .iter()
                    .filter(|d| !known.contains_key(*d) && **d != name)
                    .cloned(),
            );
            self.wanted.remove(&name);
            self.known.insert(name, file);
            progress.files = self.known.len();
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_reflection::pb::v1::FileDescriptorResponse;

    /// A reflection server played by a function.
    struct Scripted<F>(F);

    impl<F> Ask for Scripted<F>
    where
        F: FnMut(MessageRequest) -> Result<MessageResponse, FetchError> + Send,
    {
        async fn ask(&mut self, request: MessageRequest) -> Result<MessageResponse, FetchError> {
            (self.0)(request)
        }
    }

    /// A reflection server that never answers.
    struct Silent;

    impl Ask for Silent {
        async fn ask(&mut self, _: MessageRequest) -> Result<MessageResponse, FetchError> {
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

    const ROOMY: Limits = Limits {
        requests: 100,
        files: 100,
        bytes: 1 << 20,
    };

    async fn fetch(
        mut server: impl Ask,
        progress: &mut Progress,
        limits: Limits,
    ) -> Result<Vec<FileDescriptorProto>, String> {
        files_of(&mut server, "x.Svc", progress, limits)
            .await
            .map_err(|e| e.to_string())
    }

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
        let files = fetch(server, &mut progress, ROOMY).await.expect("complete");
        let names: Vec<&str> = files.iter().map(|f| f.name()).collect();
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
                Limits { files: 10, ..ROOMY },
                "reflection: x.Svc needs more than 10 files (the limit), xxxxxxxxxxsvc.proto would be one more; imports still missing: none",
                11,
            ),
            (
                Limits {
                    requests: 5,
                    ..ROOMY
                },
                "reflection: still missing the file xxxxxsvc.proto after 5 requests (the limit)",
                5,
            ),
        ];
        for (limits, expected, requests) in cases {
            let mut progress = Progress::default();
            let err = fetch(endless(), &mut progress, limits)
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
        let err = fetch(server, &mut progress, ROOMY)
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
        let limits = Limits {
            bytes: 1000,
            ..ROOMY
        };
        let mut progress = Progress::default();
        let err = fetch(server, &mut progress, limits)
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
        let outcome =
            tokio::time::timeout(Duration::from_secs(3), fetch(Silent, &mut progress, ROOMY)).await;
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

//! The echo plugin: `echo.v1.Echo`, returns what it is sent, once, as a
//! stream, joined (client streaming) or message by message (bidirectional),
//! and says which node answered.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use registry_proto::echo::v1::echo_server::{Echo, EchoServer};
use registry_proto::echo::v1::{EchoRequest, EchoResponse, EchoStreamRequest};
use tonic::service::RoutesBuilder;
use tonic::{Request, Response, Status, Streaming};

use crate::gate::{Gate, Switch};
use crate::plugin::{Plugin, PluginContext};

/// Most replies one EchoStream call may ask for.
pub const MAX_COUNT: u32 = 1000;
/// Longest pause between two replies of EchoStream, in milliseconds.
pub const MAX_INTERVAL_MS: u32 = 10_000;
/// Most messages one EchoCollect call may send: it holds them all until the
/// caller is done, so a caller must not be able to make it grow forever.
pub const MAX_COLLECT_MESSAGES: usize = 1000;
/// Most bytes of joined text one EchoCollect reply may hold.
pub const MAX_COLLECT_BYTES: usize = 64 * 1024;

/// The echo plugin.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoPlugin;

impl Plugin for EchoPlugin {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn proto_service(&self) -> &'static str {
        "echo.v1.Echo"
    }

    fn descriptors(&self) -> &'static [u8] {
        registry_proto::ECHO_DESCRIPTORS
    }

    fn add_to(&self, routes: &mut RoutesBuilder, switch: Switch, ctx: &PluginContext) {
        let service = EchoService {
            served_by: ctx.advertised.clone(),
        };
        routes.add_service(Gate::new(EchoServer::new(service), switch));
    }
}

/// The tonic service implementation.
#[derive(Debug, Clone)]
pub struct EchoService {
    /// This node's advertised `ip:port`, returned in every reply.
    served_by: String,
}

/// Checks an EchoStream request; returns how many replies to send and the
/// pause between them.
pub fn stream_plan(req: &EchoStreamRequest) -> Result<(u32, Duration), Status> {
    if req.count > MAX_COUNT {
        return Err(Status::invalid_argument(format!(
            "count is {}, at most {MAX_COUNT} (0 means 1)",
            req.count
        )));
    }
    if req.interval_ms > MAX_INTERVAL_MS {
        return Err(Status::invalid_argument(format!(
            "interval_ms is {}, at most {MAX_INTERVAL_MS}",
            req.interval_ms
        )));
    }
    Ok((
        req.count.max(1),
        Duration::from_millis(u64::from(req.interval_ms)),
    ))
}

/// The messages of an EchoCollect call joined so far, within the limits.
#[derive(Debug, Default)]
pub struct Collected {
    /// The messages, joined by single spaces.
    joined: String,
    /// How many were joined.
    count: usize,
}

impl Collected {
    /// Adds one message, or says which limit it would break
    /// (`RESOURCE_EXHAUSTED`, the caller may send less).
    pub fn push(&mut self, message: &str) -> Result<(), Status> {
        if self.count == MAX_COLLECT_MESSAGES {
            return Err(Status::resource_exhausted(format!(
                "EchoCollect takes at most {MAX_COLLECT_MESSAGES} messages"
            )));
        }
        let separator = if self.count == 0 { "" } else { " " };
        let len = self.joined.len() + separator.len() + message.len();
        if len > MAX_COLLECT_BYTES {
            return Err(Status::resource_exhausted(format!(
                "EchoCollect joins at most {MAX_COLLECT_BYTES} bytes; message {} would make it {len}",
                self.count + 1
            )));
        }
        self.joined.push_str(separator);
        self.joined.push_str(message);
        self.count += 1;
        Ok(())
    }

    /// The joined text.
    pub fn into_text(self) -> String {
        self.joined
    }
}

/// A stream of replies (EchoStream, EchoChat).
type EchoStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, req: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(EchoResponse {
            message: req.into_inner().message,
            served_by: self.served_by.clone(),
        }))
    }

    type EchoStreamStream = EchoStream;

    async fn echo_stream(
        &self,
        req: Request<EchoStreamRequest>,
    ) -> Result<Response<EchoStream>, Status> {
        let req = req.into_inner();
        let (count, interval) = stream_plan(&req)?;
        let reply = EchoResponse {
            message: req.message,
            served_by: self.served_by.clone(),
        };
        // The first reply goes at once; each later one `interval` after the
        // previous. When the caller goes away tonic drops the stream, which
        // ends the sleeps too.
        let stream = futures::stream::unfold(0u32, move |sent| {
            let reply = reply.clone();
            async move {
                if sent == count {
                    return None;
                }
                if sent > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                Some((Ok(reply), sent + 1))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn echo_collect(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let mut requests = req.into_inner();
        let mut collected = Collected::default();
        while let Some(req) = requests.message().await? {
            collected.push(&req.message)?;
        }
        Ok(Response::new(EchoResponse {
            message: collected.into_text(),
            served_by: self.served_by.clone(),
        }))
    }

    type EchoChatStream = EchoStream;

    async fn echo_chat(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoStream>, Status> {
        let served_by = self.served_by.clone();
        // One reply per message, as it comes: nothing is held, so no limit
        // is needed. A broken request stream ends the replies with its error.
        let replies = req.into_inner().map(move |req| {
            req.map(|req| EchoResponse {
                message: req.message,
                served_by: served_by.clone(),
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tonic::Code;

    fn req(count: u32, interval_ms: u32) -> EchoStreamRequest {
        EchoStreamRequest {
            message: "hi".into(),
            count,
            interval_ms,
        }
    }

    #[test]
    fn plan_bounds() {
        assert_eq!(stream_plan(&req(0, 0)).ok(), Some((1, Duration::ZERO)));
        assert_eq!(
            stream_plan(&req(1000, 10_000)).ok(),
            Some((1000, Duration::from_secs(10)))
        );
        let e = stream_plan(&req(1001, 0)).expect_err("count too big");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("count is 1001"), "{}", e.message());
        let e = stream_plan(&req(1, 10_001)).expect_err("interval too long");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains("interval_ms is 10001"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn collect_joins_in_order_within_the_limits() {
        let mut c = Collected::default();
        assert_eq!(Collected::default().into_text(), "");
        for m in ["a", "", "b c"] {
            c.push(m).expect("within limits");
        }
        assert_eq!(c.into_text(), "a  b c");

        let mut c = Collected::default();
        for _ in 0..MAX_COLLECT_MESSAGES {
            c.push("").expect("within the count");
        }
        let e = c.push("").expect_err("one too many");
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(
            e.message().contains("at most 1000 messages"),
            "{}",
            e.message()
        );

        let mut c = Collected::default();
        c.push(&"x".repeat(MAX_COLLECT_BYTES))
            .expect("exactly the limit");
        let e = c.push("").expect_err("a separator more");
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(
            e.message()
                .contains("at most 65536 bytes; message 2 would make it 65537"),
            "{}",
            e.message()
        );
    }

    #[tokio::test]
    async fn stream_sends_count_replies() {
        let service = EchoService {
            served_by: "10.0.0.1:5".into(),
        };
        let resp = match service.echo_stream(Request::new(req(3, 1))).await {
            Ok(resp) => resp,
            Err(status) => panic!("{status}"),
        };
        let replies: Vec<_> = resp.into_inner().collect().await;
        assert_eq!(replies.len(), 3);
        for r in replies {
            let r = r.map_err(|s| s.to_string());
            assert_eq!(
                r,
                Ok(EchoResponse {
                    message: "hi".into(),
                    served_by: "10.0.0.1:5".into()
                })
            );
        }
    }
}

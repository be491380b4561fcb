//! The echo plugin: `echo.v1.Echo`, returns what it is sent, once or as a
//! stream, and says which node answered.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use registry_proto::echo::v1::echo_server::{Echo, EchoServer};
use registry_proto::echo::v1::{EchoRequest, EchoResponse, EchoStreamRequest};
use tonic::service::RoutesBuilder;
use tonic::{Request, Response, Status};

use crate::gate::{Gate, Switch};
use crate::plugin::{Plugin, PluginContext};

/// Most replies one EchoStream call may ask for.
pub const MAX_COUNT: u32 = 1000;
/// Longest pause between two replies of EchoStream, in milliseconds.
pub const MAX_INTERVAL_MS: u32 = 10_000;

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

/// The stream of EchoStream replies.
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

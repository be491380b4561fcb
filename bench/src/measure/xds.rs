//! Beside measure 3: the time from a registration sent to the registry to
//! the arrival of the ClusterLoadAssignment that holds it at an xDS client
//! (an ADS stream subscribed to the service's endpoints, as gRPC's xDS
//! clients subscribe), compared with the same change reaching one Watch.
//!
//! The clock starts when the writer sends the Register, as for Watch.
//! Each response is ACKed before the next change, as a client would.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;

use crate::backend::{Backend, System};
use crate::stats::Summary;

const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn ask(service: &str, version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: ENDPOINTS.into(),
        resource_names: vec![service.into()],
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// `changes` registrations timed to their arrival at one ADS stream of our
/// registry at `url`.
pub async fn propagation(url: &str, changes: usize) -> Result<Summary> {
    let service = "bench-xds";
    let mut ads = AggregatedDiscoveryServiceClient::connect(url.to_string()).await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(ask(service, "", "")).await?;
    let mut stream = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let wait = Duration::from_secs(10);
    let mut next = async || -> Result<(usize, String, String)> {
        let response = tokio::time::timeout(wait, stream.next())
            .await
            .context("no xDS response within 10 s")?
            .context("the ADS stream ended")??;
        let cla = ClusterLoadAssignment::decode(
            response
                .resources
                .first()
                .context("a response without the assignment")?
                .value
                .as_slice(),
        )?;
        Ok((cla.endpoints.len(), response.version_info, response.nonce))
    };
    // The first answer: no endpoints yet.
    let (_, version, nonce) = next().await?;
    tx.send(ask(service, &version, &nonce)).await?;

    let mut writer = Backend::connect(System::Ours, url).await?;
    let lease = writer.grant(Duration::from_secs(120)).await?;
    let mut samples = Vec::with_capacity(changes);
    for k in 0..changes {
        let sent = Instant::now();
        writer.register(&lease, service, &format!("x-{k}")).await?;
        loop {
            let (endpoints, version, nonce) = next().await?;
            let at = Instant::now();
            tx.send(ask(service, &version, &nonce)).await?;
            if endpoints == k + 1 {
                samples.push(at.saturating_duration_since(sent));
                break;
            }
        }
    }
    writer.revoke(&lease).await?;
    match Summary::of(&mut samples) {
        Some(s) => Ok(s),
        None => bail!("no change was timed"),
    }
}

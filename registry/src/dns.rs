//! A DNS interface to the registry, as Consul's: for everything that is
//! not gRPC (curl, databases, load balancers, scripts).
//!
//! `registry --dns 127.0.0.1:8600` answers over UDP and TCP, for the zone
//! `DOMAIN` (`--dns-domain`, default `registry`):
//!
//! - `SERVICE.service.DOMAIN` A / AAAA: the IPv4 / IPv6 addresses of the
//!   service's instances (instances registered under a DNS name are only
//!   in SRV answers), in random order;
//! - `SERVICE.service.DOMAIN` SRV: one record per instance with its port
//!   and weight, targeting `HEX.addr.DOMAIN` (the address in hex, as
//!   Consul does), whose A / AAAA record comes in the additional section;
//!   an instance registered under a DNS name targets that name;
//! - `HEX.addr.DOMAIN` A / AAAA: that address;
//! - `DOMAIN` SOA; any other type of an existing name: no records
//!   (NOERROR), with the SOA for negative caching;
//! - an unknown service or name in the zone: NXDOMAIN (with the SOA);
//!   a name outside the zone: REFUSED (this is no recursive resolver).
//!
//! Every record has a TTL of [`TTL_SECS`]: a few seconds, because
//! instances come and go with their leases (1.5 s by default).
//! Instances of weight 0 get no traffic, so they are not listed.
//!
//! Answers are capped at [`MAX_ANSWERS`] records (over TCP too); over UDP
//! a reply longer than the client's buffer (512 bytes, or its EDNS size up
//! to [`MAX_UDP_PAYLOAD`]) is cut and marked truncated (TC), and clients
//! retry over TCP. So a query never draws a reply much larger than itself
//! can ask for (no amplification beyond the cap).
//!
//! Packets are parsed and replies written by `hickory-server`; a packet
//! that does not parse is answered FORMERR (or dropped when even its
//! header does not parse). UDP is served by hickory's `Server`; TCP
//! connections are accepted here (hickory's listener has no cap), framed
//! by `hickory-net` and given to the same [`Handler`], so there is one
//! place that turns a query into a reply. This module only decides the
//! records, from the same follower of the registry's watch that xDS serves
//! from ([`crate::xds::cache`]).
//!
//! Limits: at most `--dns-max-tcp-connections` TCP connections
//! ([`DEFAULT_MAX_TCP_CONNECTIONS`] by default) are open at once; one past
//! that is closed as soon as it is accepted (and counted in
//! `registry_dns_tcp_refused_total`). A TCP connection that sends
//! no complete query for [`TCP_IDLE`] is closed, and its queries are
//! answered one after another. hickory serves each UDP query in its own
//! task.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hickory_server::Server;
use hickory_server::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::tcp::TcpStream as FramedTcp;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, LowerQuery, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_server::server::{
    Request, RequestHandler, ResponseHandle, ResponseHandler, ResponseInfo, TimeoutStream,
};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use rand::seq::SliceRandom;
use support::CancellationToken;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::xds::cache::Snapshot;

/// TTL of every record, in seconds.
pub const TTL_SECS: u32 = 2;
/// Most records in one answer section (and as many in the additional one).
pub const MAX_ANSWERS: usize = 64;
/// Largest UDP reply, whatever EDNS size a client offers: the size that
/// avoids IP fragmentation on common paths (DNS Flag Day 2020).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// How long a TCP connection may stay idle between queries.
pub const TCP_IDLE: Duration = Duration::from_secs(5);
/// The default zone.
pub const DEFAULT_DOMAIN: &str = "registry";
/// Default of `--dns-max-tcp-connections`: DNS over TCP is for the few
/// replies cut over UDP, each a short connection; 256 of them at once is
/// plenty, and far below a process's usual 1024 file descriptors.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 256;
/// Replies queued on one TCP connection before its reader waits.
const TCP_REPLY_QUEUE: usize = 16;

/// Where and for which zone to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP address (port 0: a free port, the same for both).
    pub addr: SocketAddr,
    /// The zone, e.g. `registry` (no trailing dot needed).
    pub domain: String,
    /// Most TCP connections open at once (`--dns-max-tcp-connections`).
    pub max_tcp_connections: usize,
}

/// Why the DNS interface could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `--dns-domain` is not a domain name.
    #[error("--dns-domain {domain:?} is not a domain name: {reason}")]
    Domain {
        /// What was given.
        domain: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A socket could not be bound.
    #[error("cannot listen for DNS on {addr} ({proto}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// UDP or TCP.
        proto: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Parses a zone name (`registry`, `registry.example.`), lowercased.
pub fn parse_domain(domain: &str) -> Result<Name, DnsError> {
    let bad = |reason: String| DnsError::Domain {
        domain: domain.to_string(),
        reason,
    };
    let trimmed = domain.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(bad("empty".into()));
    }
    if let Some(label) = trimmed
        .split('.')
        .find(|l| l.is_empty() || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(bad(format!(
            "label {label:?}: labels are letters, digits and hyphens"
        )));
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| bad(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// A running DNS interface; stops when dropped or at shutdown.
#[derive(Debug)]
pub struct Dns {
    /// The address both sockets are bound to.
    pub addr: SocketAddr,
    /// The server task.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds UDP and TCP on `config.addr` (the same port for both) and
/// answers from `snapshots` until `shutdown` is cancelled.
pub async fn start(
    config: DnsConfig,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: CancellationToken,
) -> Result<Dns, DnsError> {
    let zone = parse_domain(&config.domain)?;
    let (udp, tcp) = bind(config.addr).await?;
    let addr = udp.local_addr().map_err(|source| DnsError::Bind {
        addr: config.addr,
        proto: "UDP",
        source,
    })?;
    let handler = Handler {
        zone: Zones::new(zone),
        snapshots,
    };
    let mut server = Server::new(handler.clone());
    server.register_socket(udp);
    let connections = config.max_tcp_connections;
    let task = tokio::spawn(async move {
        let udp = async {
            shutdown.cancelled().await;
            if let Err(error) = server.shutdown_gracefully().await {
                tracing::debug!(%error, "DNS stopped");
            }
        };
        tokio::join!(udp, serve_tcp(tcp, handler, connections, shutdown.clone()));
    });
    tracing::info!(%addr, domain = config.domain, "DNS listening (UDP and TCP)");
    Ok(Dns { addr, task })
}

/// Accepts TCP connections until `shutdown`, at most `max` open at once.
///
/// One past the cap is closed at once rather than left waiting (in our
/// queue or the kernel's backlog): a client learns straight away and can
/// retry, instead of hanging behind connections that may be held for
/// [`TCP_IDLE`] per query they trickle; and accepting keeps the backlog
/// drained, so the closing costs one accept, not a file descriptor held.
async fn serve_tcp(
    listener: TcpListener,
    handler: Handler,
    max: usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max));
    // Dropped with this future: every connection goes with the listener.
    let mut connections = JoinSet::new();
    let mut full = false;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait a little rather
                    // than spin on a listener that cannot accept.
                    tracing::debug!(%error, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        while connections.try_join_next().is_some() {}
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if !full {
                tracing::warn!(
                    max,
                    "DNS TCP connections at --dns-max-tcp-connections; closing new ones"
                );
                full = true;
            }
            tracing::debug!(%peer, "DNS TCP connection past the cap, closed");
            crate::metrics::get().dns_tcp_refused.inc();
            // A reset, not a FIN: nothing is left in TIME_WAIT on our side.
            if let Err(error) = stream.set_zero_linger() {
                tracing::debug!(%error, "SO_LINGER");
            }
            drop(stream);
            continue;
        };
        full = false;
        let handler = handler.clone();
        connections.spawn(async move {
            serve_connection(stream, peer, &handler).await;
            drop(slot);
        });
    }
}

/// One TCP connection's queries, one after another, until it closes, errs
/// or is idle for [`TCP_IDLE`].
async fn serve_connection(stream: TcpStream, peer: SocketAddr, handler: &Handler) {
    let (framed, replies) =
        FramedTcp::from_stream_with_buffer_size(AsyncIoTokioAsStd(stream), peer, TCP_REPLY_QUEUE);
    let mut messages = TimeoutStream::new(framed, TCP_IDLE);
    while let Some(message) = messages.next().await {
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::debug!(%peer, %error, "DNS TCP connection closed");
                return;
            }
        };
        let (bytes, src) = message.into_parts();
        let reply = ResponseHandle::new(src, replies.clone(), Protocol::Tcp);
        handler.handle_raw(bytes, src, reply).await;
    }
}

/// UDP on `addr`, then TCP on the port UDP got (with port 0, retried a
/// few times should TCP find that port taken).
async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let mut attempt = 0;
    loop {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
                addr,
                proto: "UDP",
                source,
            })?;
        let bound = udp.local_addr().map_err(|source| DnsError::Bind {
            addr,
            proto: "UDP",
            source,
        })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 && attempt < 10 => {
                tracing::debug!(%bound, error = %e, "TCP port taken; another free port");
                attempt += 1;
            }
            Err(source) => {
                return Err(DnsError::Bind {
                    addr: bound,
                    proto: "TCP",
                    source,
                });
            }
        }
    }
}

/// The zone's names, precomputed.
#[derive(Debug, Clone)]
struct Zones {
    /// `DOMAIN.`
    apex: Name,
    /// `service.DOMAIN.`
    services: Name,
    /// `addr.DOMAIN.`
    addrs: Name,
    /// The SOA record of the zone.
    soa: Record,
}

impl Zones {
    fn new(apex: Name) -> Zones {
        let child = |label: &str| {
            Name::from_ascii(label)
                .and_then(|n| n.append_domain(&apex))
                .unwrap_or_else(|_| apex.clone())
        };
        let soa = Record::from_rdata(
            apex.clone(),
            TTL_SECS,
            RData::SOA(SOA::new(
                child("ns"),
                child("hostmaster"),
                1,
                3600,
                600,
                86400,
                // Negative answers are cached this long (RFC 2308).
                TTL_SECS,
            )),
        );
        Zones {
            services: child("service"),
            addrs: child("addr"),
            apex,
            soa,
        }
    }
}

/// The records of one answer.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    code: ResponseCode,
    answers: Vec<Record>,
    authority: Vec<Record>,
    additionals: Vec<Record>,
}

/// `HEX.addr.DOMAIN.` for an address.
fn addr_name(ip: IpAddr, zones: &Zones) -> Option<Name> {
    let hex = match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    };
    Name::from_ascii(hex).ok()?.append_domain(&zones.addrs).ok()
}

/// The address of a `HEX` label.
fn parse_addr_label(label: &str) -> Option<IpAddr> {
    match label.len() {
        8 => u32::from_str_radix(label, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(label, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

fn address_record(name: Name, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, TTL_SECS, rdata)
}

/// Whether `ip` answers a query of type `kind`.
fn fits(kind: RecordType, ip: IpAddr) -> bool {
    matches!(
        (kind, ip),
        (RecordType::A, IpAddr::V4(_)) | (RecordType::AAAA, IpAddr::V6(_))
    )
}

/// The answer to `name`/`kind` from `snapshot`: the whole of this module's
/// logic, without sockets.
fn answer(zones: &Zones, snapshot: &Snapshot, name: &Name, kind: RecordType) -> Answer {
    let name = name.to_lowercase();
    let negative = |code| Answer {
        code,
        authority: vec![zones.soa.clone()],
        ..Answer::default()
    };
    if !zones.apex.zone_of(&name) {
        return Answer {
            code: ResponseCode::Refused,
            ..Answer::default()
        };
    }
    let mut out = Answer::default();
    if name == zones.apex {
        if kind == RecordType::SOA {
            out.answers.push(zones.soa.clone());
            return out;
        }
        return negative(ResponseCode::NoError);
    }
    if name == zones.services || name == zones.addrs {
        // Empty non-terminals: they exist, with no records.
        return negative(ResponseCode::NoError);
    }
    // The labels left of `service.DOMAIN` / `addr.DOMAIN`, as text.
    let prefix = |parent: &Name| -> Option<String> {
        if !parent.zone_of(&name) {
            return None;
        }
        let own = usize::from(name.num_labels() - parent.num_labels());
        let labels: Vec<String> = name
            .iter()
            .take(own)
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        Some(labels.join("."))
    };
    if let Some(label) = prefix(&zones.addrs) {
        let Some(ip) = parse_addr_label(&label) else {
            return negative(ResponseCode::NXDomain);
        };
        if fits(kind, ip) {
            out.answers.push(address_record(name.clone(), ip));
            return out;
        }
        return negative(ResponseCode::NoError);
    }
    let Some(service) = prefix(&zones.services) else {
        return negative(ResponseCode::NXDomain);
    };
    // Service names are case-sensitive in the registry, DNS names are not:
    // the exact name first, else any that differs only in case.
    let found = snapshot.services.get(&service).or_else(|| {
        snapshot
            .services
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&service))
            .map(|(_, s)| s)
    });
    let Some(found) = found else {
        return negative(ResponseCode::NXDomain);
    };
    let mut backends = snapshot.backends(found);
    backends.retain(|b| b.weight > 0);
    backends.shuffle(&mut rand::rng());
    match kind {
        RecordType::A | RecordType::AAAA => {
            // Each address once: instances on one host differ by port only.
            let mut seen = std::collections::HashSet::new();
            out.answers = backends
                .iter()
                .filter_map(|b| b.ip())
                .filter(|ip| fits(kind, *ip) && seen.insert(*ip))
                .take(MAX_ANSWERS)
                .map(|ip| address_record(name.clone(), ip))
                .collect();
        }
        RecordType::SRV => {
            for b in backends.iter().take(MAX_ANSWERS) {
                let target = match b.ip() {
                    Some(ip) => match addr_name(ip, zones) {
                        Some(target) => {
                            let record = address_record(target.clone(), ip);
                            if !out.additionals.contains(&record) {
                                out.additionals.push(record);
                            }
                            target
                        }
                        None => continue,
                    },
                    None => match Name::from_ascii(&b.host) {
                        Ok(mut host) => {
                            host.set_fqdn(true);
                            host
                        }
                        Err(_) => continue,
                    },
                };
                let (Ok(port), Ok(weight)) = (u16::try_from(b.port), u16::try_from(b.weight))
                else {
                    continue;
                };
                out.answers.push(Record::from_rdata(
                    name.clone(),
                    TTL_SECS,
                    RData::SRV(SRV::new(1, weight, port, target)),
                ));
            }
        }
        _ => {}
    }
    if out.answers.is_empty() {
        return negative(ResponseCode::NoError);
    }
    out
}

/// hickory's request handler: parses nothing itself, answers from the
/// newest snapshot.
#[derive(Clone)]
struct Handler {
    zone: Zones,
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

impl Handler {
    /// A message off a TCP connection, as hickory's server treats one
    /// before its handler sees it: dropped when its header does not parse
    /// or it is a response (no reflection), FORMERR when the rest does not
    /// parse, else [`RequestHandler::handle_request`].
    async fn handle_raw(&self, bytes: Vec<u8>, src: SocketAddr, mut reply: ResponseHandle) {
        let Ok(header) = Header::read(&mut BinDecoder::new(&bytes)) else {
            return;
        };
        match Request::from_bytes(bytes, src, Protocol::Tcp) {
            Ok(request) if request.metadata.message_type == MessageType::Response => {}
            Ok(request) => {
                self.handle_request::<_, TokioTime>(&request, reply).await;
            }
            Err(error) => {
                tracing::debug!(%src, %error, "DNS query does not parse: FORMERR");
                // No question in the reply: it is the one that did not parse.
                let Ok(queries) = Queries::read(&mut BinDecoder::new(&[]), 0) else {
                    return;
                };
                let response = MessageResponseBuilder::new(&queries, None)
                    .error_msg(&header.metadata, ResponseCode::FormErr);
                if let Err(error) = reply.send_response(response).await {
                    tracing::debug!(%error, "DNS reply not sent");
                }
            }
        }
    }

    fn failed(request: &Request, code: ResponseCode) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = code;
        ResponseInfo::from(Header {
            metadata,
            counts: HeaderCounts::default(),
        })
    }
}

#[tonic::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut edns = None;
        if let Some(asked) = &request.edns {
            let mut ours = Edns::new();
            ours.set_max_payload(asked.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            edns = Some(ours);
        }
        let mut builder = builder;
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = false;
        let query: Option<&LowerQuery> = match request.queries.queries() {
            [one] => Some(one),
            _ => None,
        };
        let result = match (request.metadata.op_code, query) {
            (OpCode::Query, _) if !self.snapshots.borrow().ready => {
                // The registry's state has not arrived yet (the first
                // moments after start): SERVFAIL makes a resolver retry,
                // where NXDOMAIN would be cached as "no such service".
                let response = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                response_handle.send_response(response).await
            }
            (OpCode::Query, Some(query)) if query.query_class() == DNSClass::IN => {
                let snapshot = self.snapshots.borrow().clone();
                let a = answer(
                    &self.zone,
                    &snapshot,
                    query.original().name(),
                    query.query_type(),
                );
                metadata.response_code = a.code;
                metadata.authoritative = a.code != ResponseCode::Refused;
                let response = builder.build(
                    metadata,
                    a.answers.iter(),
                    a.authority.iter(),
                    std::iter::empty(),
                    a.additionals.iter(),
                );
                response_handle.send_response(response).await
            }
            (OpCode::Query, _) => {
                // No question, several questions, or another class.
                let response = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                response_handle.send_response(response).await
            }
            _ => {
                let response = builder.error_msg(&request.metadata, ResponseCode::NotImp);
                response_handle.send_response(response).await
            }
        };
        result.unwrap_or_else(|error| {
            tracing::debug!(%error, "DNS reply not sent");
            Handler::failed(request, ResponseCode::ServFail)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn snapshot(instances: &[(&str, &str, &str, u32)]) -> Snapshot {
        Snapshot::empty().with_puts(instances)
    }

    fn zones() -> Zones {
        Zones::new(parse_domain("Registry.").unwrap())
    }

    fn ask(s: &Snapshot, name: &str, kind: RecordType) -> Answer {
        answer(&zones(), s, &Name::from_ascii(name).unwrap(), kind)
    }

    #[test]
    fn a_aaaa_srv_with_targets_that_resolve() {
        let s = snapshot(&[
            ("calculator", "a", "10.0.0.1", 3),
            ("calculator", "b", "::1", 1),
            ("calculator", "c", "node.example", 2),
            ("calculator", "drained", "10.0.0.9", 0),
            ("other", "x", "10.0.0.1", 1),
        ]);
        let same_host = snapshot(&[("s", "p1", "10.0.0.1", 1), ("s", "p2", "10.0.0.1", 1)]);
        let a = ask(&same_host, "s.service.registry.", RecordType::A);
        assert_eq!(a.answers.len(), 1, "an address once");
        let srv = ask(&same_host, "s.service.registry.", RecordType::SRV);
        assert_eq!((srv.answers.len(), srv.additionals.len()), (2, 1));
        let a = ask(&s, "calculator.service.registry.", RecordType::A);
        assert_eq!(a.code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(&a.answers[0].data, &RData::A(A::new(10, 0, 0, 1)));
        assert_eq!(a.answers[0].ttl, TTL_SECS);
        let aaaa = ask(&s, "CALCULATOR.service.registry", RecordType::AAAA);
        assert_eq!(aaaa.answers.len(), 1);

        let srv = ask(&s, "calculator.service.registry.", RecordType::SRV);
        assert_eq!(srv.answers.len(), 3);
        let mut got: Vec<(u16, u16, String)> = srv
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(srv) => (srv.weight, srv.port, srv.target.to_ascii()),
                other => panic!("{other:?}"),
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (
                    1,
                    7000,
                    "00000000000000000000000000000001.addr.registry.".into()
                ),
                (2, 7000, "node.example.".into()),
                (3, 7000, "0a000001.addr.registry.".into()),
            ]
        );
        // The IP targets resolve in the additional section, and on their own.
        assert_eq!(srv.additionals.len(), 2);
        let target = ask(&s, "0a000001.addr.registry.", RecordType::A);
        assert_eq!(&target.answers[0].data, &RData::A(A::new(10, 0, 0, 1)));
    }

    #[test]
    fn unknown_names_other_types_and_other_zones() {
        let s = snapshot(&[("calculator", "a", "10.0.0.1", 3)]);
        let nx = ask(&s, "nosuch.service.registry.", RecordType::A);
        assert_eq!(nx.code, ResponseCode::NXDomain);
        assert!(matches!(&nx.authority[0].data, RData::SOA(_)));
        let txt = ask(&s, "calculator.service.registry.", RecordType::TXT);
        assert_eq!((txt.code, txt.answers.len()), (ResponseCode::NoError, 0));
        assert_eq!(txt.authority.len(), 1);
        let aaaa = ask(&s, "calculator.service.registry.", RecordType::AAAA);
        assert_eq!((aaaa.code, aaaa.answers.len()), (ResponseCode::NoError, 0));
        let soa = ask(&s, "registry.", RecordType::SOA);
        assert_eq!(soa.answers.len(), 1);
        assert_eq!(
            ask(&s, "x.registry.", RecordType::A).code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask(&s, "zz.addr.registry.", RecordType::A).code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask(&s, "example.com.", RecordType::A).code,
            ResponseCode::Refused
        );
    }

    #[test]
    fn answers_are_capped() {
        let many: Vec<(String, String)> = (0..200)
            .map(|i| (format!("i{i}"), format!("10.0.{}.{}", i / 250, i % 250 + 1)))
            .collect();
        let rows: Vec<(&str, &str, &str, u32)> = many
            .iter()
            .map(|(id, ip)| ("big", id.as_str(), ip.as_str(), 1))
            .collect();
        let s = snapshot(&rows);
        assert_eq!(
            ask(&s, "big.service.registry.", RecordType::A)
                .answers
                .len(),
            MAX_ANSWERS
        );
        let srv = ask(&s, "big.service.registry.", RecordType::SRV);
        assert_eq!(srv.answers.len(), MAX_ANSWERS);
        assert_eq!(srv.additionals.len(), MAX_ANSWERS);
    }

    #[test]
    fn domains_are_checked() {
        assert!(parse_domain("registry").is_ok());
        assert!(parse_domain("reg.example.").is_ok());
        for bad in ["", ".", "a..b", "under_score", "sp ace"] {
            let err = parse_domain(bad).unwrap_err().to_string();
            assert!(err.contains("--dns-domain"), "{err}");
        }
    }
}

//! The address this node advertises: the one other machines reach it on.
//!
//! Binding to `0.0.0.0` accepts connections on every interface, but the
//! registry must be told ONE address. The best guess is the local address
//! the operating system would use to reach the registry: whoever can reach
//! the registry can most likely reach us on the same network. A UDP socket
//! `connect`ed to the registry reveals it without sending a packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use tracing::debug;

/// Chooses the IP to advertise.
///
/// `--advertise` (or the file's `advertise`) wins. Otherwise the local IP
/// used to reach `registry` (`host:port`, resolved with DNS if needed); if
/// that is loopback or unspecified (a registry on this machine) and the
/// machine has a LAN address, the LAN address, so nodes on other machines
/// can still reach us. Loopback is the last resort.
pub async fn advertise_ip(explicit: Option<IpAddr>, registry: &str) -> IpAddr {
    if let Some(ip) = explicit {
        return ip;
    }
    let routed = route_ip(registry).await;
    debug!("local address towards the registry {registry}: {routed:?}");
    match routed {
        Some(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
        _ => match local_ip_address::local_ip() {
            Ok(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
            _ => routed
                .filter(|ip| !ip.is_unspecified())
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        },
    }
}

/// The local IP the OS would use to send to `registry`, if it resolves and
/// is routable.
async fn route_ip(registry: &str) -> Option<IpAddr> {
    let target: SocketAddr = tokio::net::lookup_host(registry).await.ok()?.next()?;
    local_ip_towards(target)
}

/// The local IP of a UDP socket `connect`ed to `target`. `connect` on UDP
/// only picks a route and a source address: nothing is sent.
pub fn local_ip_towards(target: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn explicit_wins() {
        let ip: IpAddr = "10.9.8.7"
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(advertise_ip(Some(ip), "127.0.0.1:1").await, ip);
    }

    #[test]
    fn towards_loopback_is_loopback() {
        let target: SocketAddr = (Ipv4Addr::LOCALHOST, 9).into();
        assert_eq!(
            local_ip_towards(target),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[tokio::test]
    async fn local_registry_still_advertises_a_reachable_address() {
        let ip = advertise_ip(None, "127.0.0.1:50051").await;
        assert!(!ip.is_unspecified());
        // With a LAN address on this machine, loopback is not advertised.
        if let Ok(lan) = local_ip_address::local_ip()
            && !lan.is_loopback()
        {
            assert_eq!(ip, lan);
        }
    }

    #[tokio::test]
    async fn unresolvable_registry_falls_back() {
        let ip = advertise_ip(None, "no-such-host.invalid:1").await;
        // No route to learn from: the LAN address if there is one, else
        // loopback.
        let expected = match local_ip_address::local_ip() {
            Ok(lan) if !lan.is_loopback() && !lan.is_unspecified() => lan,
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        assert_eq!(ip, expected);
    }
}

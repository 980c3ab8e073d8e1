//! The DNS plane: its sockets, bound anew by each attempt (so that a restarted plane gets
//! them back), its forwarder and its routes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use dcnet_dns as dns;
use dcnet_node_core::{ClusterState, Supervisor};
use prometheus::Registry;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use super::{Node, boxed};
use crate::config::AgentConfig;

pub(super) fn start(
    cfg: &AgentConfig,
    node: &Node,
    state: watch::Receiver<Arc<ClusterState>>,
    registry: &Registry,
    supervisor: &mut Supervisor,
) -> anyhow::Result<axum::Router> {
    let mut addrs = cfg.dns.listen.clone();
    if cfg.dns.listen_gateway {
        addrs.push(SocketAddr::new(node.subnet.gateway().into(), 53));
    }
    let own: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
    let forward = cfg.dns.forward.then(|| {
        let upstreams = cfg.dns.upstreams.clone().unwrap_or_else(|| {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            dns::upstreams_from_resolv_conf(&text, &own)
        });
        dns::ForwardConfig {
            upstreams,
            zones: cfg.dns.zones.clone().into_iter().collect(),
            timeout: cfg.dns.timeout,
            cache_size: cfg.dns.cache_size,
            max_inflight: cfg.dns.forward_max_inflight,
            pool_size: cfg.dns.forward_sockets,
        }
    });
    let plane = dns::Dns::new(
        dns::Config {
            records: dns::RecordConfig {
                domain: cfg.dns.domain.clone(),
                framework: "marathon".into(),
                ttl: cfg.dns.ttl,
                this_node: Some(node.node.id.clone()),
                boot: Some(node.boot.clone()),
            },
            forward,
            tcp: cfg.dns.tcp_limits(),
            max_amplification: cfg.dns.max_amplification,
        },
        dns::Metrics::register(registry).context("registering DNS metrics")?,
    );
    // The lookup route asks the first address (an unspecified one through loopback).
    let own_server = addrs.first().map(|a| match a.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new([127, 0, 0, 1].into(), a.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), a.port())
        }
        _ => *a,
    });
    let routes = plane.router(own_server);
    supervisor.spawn("dns", move |ready, stop| {
        let (plane, state, addrs) = (plane.clone(), state.clone(), addrs.clone());
        async move {
            // Every address is bound before anything is answered: a clash fails the plane.
            let (udp, tcp) = bind(&addrs).await.map_err(boxed)?;
            plane
                .run(state, udp, tcp, move || ready.serving(), stop)
                .await;
            Ok(())
        }
    });
    Ok(routes)
}

async fn bind(addrs: &[SocketAddr]) -> anyhow::Result<(Vec<UdpSocket>, Vec<TcpListener>)> {
    let (mut udp, mut tcp) = (Vec::new(), Vec::new());
    for addr in addrs {
        udp.push(
            UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding DNS to udp {addr}"))?,
        );
        tcp.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding DNS to tcp {addr}"))?,
        );
    }
    Ok((udp, tcp))
}

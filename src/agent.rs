//! `dcnet agent`: opens the store, starts node-core and serves the HTTP API until SIGTERM or
//! SIGINT.

use std::sync::Arc;

use anyhow::Context;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dcnet_node_core::ipam::{self, Subnet};
use dcnet_node_core::runtime::cgroup::{Cgroups, Hierarchies};
use dcnet_node_core::runtime::{ContainerConfig, ContainerRuntime, HostConfig, HostRuntime};
use dcnet_node_core::store::{Embedded, Store};
use dcnet_node_core::{ApiError, NodeCore};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use dcnet_dns as dns;
use tokio::net::{TcpListener, UdpSocket};

use crate::config::AgentConfig;

fn fqdn(zone: &str) -> String {
    let mut z = zone.trim_end_matches('.').to_ascii_lowercase();
    z.push('.');
    z
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let node = cfg.node()?;
    let node_id = node.id.clone();
    // This process's boot id: a VIP counts as ready on this node only once this process's
    // data plane serves it, never on the word of the agent that ran here before.
    let boot = format!("{:016x}", rand::random::<u64>());
    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .with_context(|| {
            format!(
                "binding the API to {}; is another agent running?",
                cfg.api.listen
            )
        })?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let store = Embedded::open(&cfg.state_dir.join("store.redb"))
        .with_context(|| format!("opening the store in {}", cfg.state_dir.display()))?;

    let hierarchies = Hierarchies::detect().context("reading /proc/self/mountinfo for cgroups")?;
    let cgroups = Cgroups::new(hierarchies, &cfg.runtime.cgroup_parent);
    info!(cgroups = %cgroups.describe(), parent = %cfg.runtime.cgroup_parent, "cgroups");
    let host = HostRuntime::new(HostConfig {
        sandbox_dir: cfg.state_dir.join("sandboxes"),
        cgroups,
        path_env: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
    });
    let store: Arc<dyn Store> = Arc::new(store);
    let range: Subnet = cfg.containers.range.parse().map_err(anyhow::Error::msg)?;
    let subnet = ipam::claim_subnet(&*store, &node.id, range, cfg.containers.node_prefix)
        .await
        .context("claiming this node's container subnet")?;
    let node_ip = match node.ip {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => anyhow::bail!("node.ip must be IPv4 for now (port mappings)"),
    };
    info!(%subnet, gateway = %subnet.gateway(), "container subnet");
    let runtime = ContainerRuntime::new(
        ContainerConfig {
            node: node.id.clone(),
            node_ip,
            subnet,
            bridge: cfg.containers.bridge.clone(),
            mtu: cfg.containers.mtu,
            netns_dir: cfg.state_dir.join("netns"),
            shim: std::env::current_exe().context("finding the dcnet binary for container-exec")?,
            search: cfg.containers.search.clone(),
        },
        host,
        store.clone(),
    );

    runtime
        .prepare()
        .await
        .context("creating the container bridge")?;

    // DNS: bind every address before anything serves, so a clash is an error at start.
    let mut dns_addrs = cfg.dns.listen.clone();
    if cfg.dns.listen_gateway {
        dns_addrs.push(std::net::SocketAddr::new(subnet.gateway().into(), 53));
    }
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for addr in &dns_addrs {
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
    let own: Vec<std::net::IpAddr> = dns_addrs.iter().map(|a| a.ip()).collect();
    let forward = cfg.dns.forward.then(|| {
        let upstreams = cfg.dns.upstreams.clone().unwrap_or_else(|| {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            dns::upstreams_from_resolv_conf(&text, &own)
        });
        dns::ForwardConfig {
            upstreams,
            zones: cfg
                .dns
                .zones
                .iter()
                .map(|(z, u)| (fqdn(z), u.clone()))
                .collect(),
            timeout: cfg.dns.timeout,
            cache_size: 10_000,
        }
    });

    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let core_cfg = dcnet_node_core::Config {
        node,
        leader_ttl: std::time::Duration::from_secs(10),
    };
    let store_for_l4lb = store.clone();
    let core = NodeCore::start(
        core_cfg,
        store,
        Arc::new(runtime),
        &registry,
        shutdown.child_token(),
    )
    .await
    .context("starting node-core")?;

    let dns = dns::Dns::new(
        dns::Config {
            records: dns::RecordConfig {
                domain: cfg.dns.domain.clone(),
                framework: "marathon".into(),
                ttl: cfg.dns.ttl,
                this_node: Some(node_id.clone()),
                boot: Some(boot.clone()),
            },
            forward,
            tcp_timeout: std::time::Duration::from_secs(10),
        },
        dns::Metrics::register(&registry).context("registering DNS metrics")?,
    );
    let dns_routes = dns.router();
    let vip_range: Subnet = cfg.l4lb.range.parse().map_err(anyhow::Error::msg)?;
    dcnet_l4lb::add_anyip_route(vip_range)
        .await
        .with_context(|| format!("adding the AnyIP route `local {vip_range} dev lo` for VIPs"))?;
    reuse_time_wait_ports();
    let l4lb = dcnet_l4lb::L4lb::new(
        dcnet_l4lb::Config {
            range: vip_range,
            node: node_id.clone(),
            boot,
        },
        store_for_l4lb,
        dcnet_l4lb::Metrics::register(&registry).context("registering L4LB metrics")?,
    );
    registry
        .register(Box::new(
            l4lb.backend_metrics()
                .context("making the L4LB backend metrics")?,
        ))
        .context("registering the L4LB backend metrics")?;
    let l4lb_routes = l4lb.router();
    let l4lb_task = tokio::spawn(l4lb.run(core.state(), shutdown.child_token()));
    let dns_task = tokio::spawn(dns.run(core.state(), udp, tcp, shutdown.child_token()));

    let metrics_registry = registry.clone();
    let mut app = core.router().merge(dns_routes).merge(l4lb_routes).route(
        "/metrics",
        get(move || {
            let registry = metrics_registry.clone();
            async move {
                let mut buf = Vec::new();
                let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf)
            }
        }),
    );
    if let Some(token) = cfg.api.token.clone().filter(|t| !t.is_empty()) {
        let expected: Arc<str> = format!("Bearer {token}").into();
        app = app.layer(middleware::from_fn(move |req: Request, next: Next| {
            let expected = expected.clone();
            async move { require_token(&expected, req, next).await }
        }));
    }
    info!(listen = %cfg.api.listen, "dcnet agent ready");

    let serve_stop = shutdown.clone();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(serve_stop.cancelled_owned())
            .await
    });
    tokio::select! {
        () = signal() => info!("starting shutdown"),
        res = &mut server => error!(?res, "the API server exited early"),
    }
    shutdown.cancel();
    let grace = cfg.shutdown_grace_period;
    let drained = tokio::time::timeout(grace, async {
        let _ = server.await;
        let _ = dns_task.await;
        let _ = l4lb_task.await;
        core.stopped().await;
    })
    .await;
    if drained.is_err() {
        warn!(?grace, "graceful shutdown timed out");
    }
    info!("agent stopped; tasks keep running and are adopted on the next start");
    Ok(())
}

async fn require_token(expected: &str, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if req.uri().path() == "/ping" || given == Some(expected) {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token (Authorization: Bearer <api.token>)",
    )
    .into_response()
}

async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The userspace proxy connects to a backend from one address of this node, and it closes
/// first whenever its client does: each such connection then holds a local port in TIME_WAIT
/// for a minute. Linux reuses those for outgoing connections only on loopback by default
/// (`tcp_tw_reuse = 2`), so a backend off loopback stopped being reachable after the 28,232
/// ports of the default range (measured: exactly that many connections, then every one
/// failed). With 1, a port is reused once its TIME_WAIT is a second old (TCP timestamps keep
/// that safe). The setting is per network namespace: this node's.
fn reuse_time_wait_ports() {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
    match std::fs::read_to_string(PATH).map(|v| v.trim().to_string()) {
        Ok(v) if v == "1" => {}
        Ok(v) => match std::fs::write(PATH, "1") {
            Ok(()) => {
                info!(was = %v, "net.ipv4.tcp_tw_reuse = 1, so VIP connections do not run out of ports")
            }
            Err(e) => {
                warn!(error = %e, "cannot set net.ipv4.tcp_tw_reuse = 1: busy VIPs may run out of local ports")
            }
        },
        Err(e) => warn!(error = %e, "cannot read net.ipv4.tcp_tw_reuse"),
    }
}

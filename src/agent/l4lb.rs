//! The L4LB plane: the AnyIP route that makes every VIP local, the sysctl that keeps the
//! proxy's ports from running out, the plane itself and its routes and metrics.

use std::sync::Arc;

use anyhow::Context;
use dcnet_l4lb as l4lb;
use dcnet_node_core::keys::SharedStore;
use dcnet_node_core::{ClusterState, Supervisor};
use prometheus::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use super::Node;
use crate::config::AgentConfig;

pub(super) async fn start(
    cfg: &AgentConfig,
    node: &Node,
    store: SharedStore,
    state: watch::Receiver<Arc<ClusterState>>,
    registry: &Registry,
    supervisor: &mut Supervisor,
) -> anyhow::Result<axum::Router> {
    let range = cfg.l4lb.range;
    l4lb::add_anyip_route(range)
        .await
        .with_context(|| format!("adding the AnyIP route `local {range} dev lo` for VIPs"))?;
    reuse_time_wait_ports();
    let plane = l4lb::L4lb::new(
        l4lb::Config {
            range,
            node: node.node.id.clone(),
            boot: node.boot.clone(),
            udp: cfg.l4lb.udp_limits(),
            data_plane: cfg.l4lb.data_plane(),
            ebpf: l4lb::EbpfConfig {
                pin_dir: cfg.l4lb.bpf_pin_dir.clone(),
                cgroups: bpf_cgroups(cfg),
                limits: cfg.l4lb.bpf_limits(),
            },
        },
        store,
        l4lb::Metrics::register(registry).context("registering L4LB metrics")?,
    );
    registry
        .register(Box::new(
            plane
                .backend_metrics()
                .context("making the L4LB backend metrics")?,
        ))
        .context("registering the L4LB backend metrics")?;
    let routes = plane.router();
    supervisor.spawn("l4lb", move |ready, stop| {
        let detail = ready.clone();
        let run = plane.clone().run(
            state.clone(),
            move || ready.serving(),
            move |d| detail.detail(d),
            stop,
        );
        async move {
            run.await
                .context("starting the eBPF data plane (l4lb.data_plane = \"ebpf\")")
                .map_err(Into::into)
        }
    });
    Ok(routes)
}

/// The cgroup v2 directories the eBPF plane attaches to: the one every task's cgroup is
/// made under, and the operator's. None when this machine mounts no cgroup2.
pub(super) fn bpf_cgroups(cfg: &AgentConfig) -> Vec<std::path::PathBuf> {
    let Ok(hierarchies) = dcnet_node_core::runtime::cgroup::Hierarchies::detect() else {
        return Vec::new();
    };
    let Some(v2) = hierarchies.v2 else {
        return Vec::new();
    };
    std::iter::once(cfg.runtime.cgroup_parent.as_str())
        .chain(cfg.l4lb.bpf_cgroups.iter().map(String::as_str))
        .map(|rel| v2.join(rel))
        .collect()
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

//! node-core on this node: the store, the task runtime (host processes and containers) and
//! node-core's loops.

use std::sync::Arc;

use anyhow::Context;
use dcnet_node_core::ipam;
use dcnet_node_core::keys::SharedStore;
use dcnet_node_core::runtime::cgroup::{Cgroups, Hierarchies};
use dcnet_node_core::runtime::{
    ContainerConfig, ContainerRuntime, HostConfig, HostRuntime, ImageSupport, pick_oci_runtime,
};
use dcnet_node_core::store::{Embedded, Etcd};
use dcnet_node_core::{NodeCore, Supervisor};
use prometheus::Registry;
use tracing::info;

use super::Node;
use crate::config::AgentConfig;

/// Opens the store, claims this node's container subnet and makes the runtime with its
/// bridge, so that DNS can listen on the gateway before the first container starts.
pub(super) async fn open(
    cfg: &AgentConfig,
    registry: &Registry,
) -> anyhow::Result<(SharedStore, Arc<ContainerRuntime>, Node)> {
    let mut node = cfg.node()?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    // The overlay's key pair: made once, kept here; only the public half is published.
    let overlay_key = if cfg.is_overlay_on() {
        let path = cfg.state_dir.join("overlay.key");
        let key = dcnet_overlay::keys::load_or_create(&path)
            .with_context(|| format!("the overlay's private key at {}", path.display()))?;
        node.overlay = Some(dcnet_node_core::model::OverlayEndpoint {
            public_key: key.public_base64(),
            port: cfg.overlay.port,
        });
        Some(key)
    } else {
        None
    };
    let store: SharedStore = match &cfg.store.etcd {
        None => Arc::new(
            Embedded::open(&cfg.state_dir.join("store.redb"))
                .with_context(|| format!("opening the store in {}", cfg.state_dir.display()))?,
        ),
        Some(etcd) => {
            let store = Etcd::connect(&etcd.to_config()).await.with_context(|| {
                format!(
                    "connecting to etcd at {} (is it running and reachable from this node?)",
                    etcd.endpoints.join(",")
                )
            })?;
            info!(endpoints = %etcd.endpoints.join(","), "store: etcd");
            Arc::new(store)
        }
    };
    let hierarchies = Hierarchies::detect().context("reading /proc/self/mountinfo for cgroups")?;
    let cgroups = Cgroups::new(hierarchies, &cfg.runtime.cgroup_parent);
    info!(cgroups = %cgroups.describe(), parent = %cfg.runtime.cgroup_parent, "cgroups");
    let host = HostRuntime::new(HostConfig {
        sandbox_dir: cfg.state_dir.join("sandboxes"),
        cgroups,
        path_env: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        waiter: Some(std::env::current_exe().context("finding the dcnet binary for task-wait")?),
    });
    let subnet = ipam::claim_subnet(
        &*store,
        &node.id,
        cfg.containers.range,
        cfg.containers.node_prefix,
    )
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
            range: cfg.containers.range,
            bridge: cfg.containers.bridge.clone(),
            mtu: cfg.containers.mtu,
            netns_dir: cfg.state_dir.join("netns"),
            shim: std::env::current_exe().context("finding the dcnet binary for container-exec")?,
            search: cfg.containers.search.clone(),
            images: image_support(cfg, registry)?,
        },
        host,
        store.clone(),
    );
    runtime
        .prepare()
        .await
        .context("creating the container bridge")?;
    let node = Node {
        node,
        boot: format!("{:016x}", rand::random::<u64>()),
        subnet,
        overlay_key,
    };
    Ok((store, Arc::new(runtime), node))
}

/// Registers the node and starts node-core's loops.
pub(super) async fn start(
    cfg: &AgentConfig,
    node: &Node,
    store: SharedStore,
    runtime: Arc<ContainerRuntime>,
    registry: &Registry,
    supervisor: &mut Supervisor,
) -> anyhow::Result<NodeCore> {
    let core_cfg = dcnet_node_core::Config {
        node: node.node.clone(),
        leader_ttl: cfg.store.leader_ttl,
        node_ttl: cfg.store.node_ttl,
        retention: dcnet_node_core::Retention {
            deployments_per_app: cfg.retention.deployments_per_app,
            sandboxes: cfg.retention.sandboxes,
            app_versions: cfg.retention.app_versions,
        },
        event_streams: cfg.api.event_streams,
        event_queue: cfg.api.event_queue,
        api_port: cfg.api.listen.port(),
        secrets_dir: cfg.secrets.dir.clone(),
    };
    NodeCore::start(core_cfg, store, runtime, registry, supervisor)
        .await
        .context("starting node-core")
}

/// The layer store, the fetcher and the OCI runtime, for tasks from images.
fn image_support(cfg: &AgentConfig, registry: &Registry) -> anyhow::Result<ImageSupport> {
    let images_cfg = cfg.images.to_config(&cfg.state_dir)?;
    let metrics = dcnet_images::Metrics::register(registry)?;
    let images = dcnet_images::Images::new(images_cfg.clone(), metrics)
        .with_context(|| format!("opening the image store in {}", images_cfg.dir.display()))?;
    let fetcher = dcnet_images::Fetcher::new(images_cfg.clone(), images.metrics().clone())
        .with_context(|| {
            format!(
                "opening the fetch cache in {}",
                images_cfg.cache_dir.display()
            )
        })?;
    let configured = (!cfg.images.oci_runtime.is_empty())
        .then(|| std::path::PathBuf::from(&cfg.images.oci_runtime));
    let oci_runtime = match pick_oci_runtime(configured.as_deref()) {
        Some(path) => path,
        None => {
            tracing::warn!(
                "neither crun nor runc is installed: tasks from images will fail to start"
            );
            "runc".into()
        }
    };
    info!(runtime = %oci_runtime.display(), store = %images_cfg.dir.display(), "images");
    Ok(ImageSupport::new(
        Arc::new(images),
        Arc::new(fetcher),
        oci_runtime,
        cfg.state_dir.join("oci"),
        cfg.state_dir.join("volumes"),
    ))
}

//! The overlay plane: the WireGuard device, made once at start (a node that cannot make it
//! says so and stops), and its loop, which keeps the peers and routes in step with the state.

use std::sync::Arc;

use anyhow::Context;
use dcnet_node_core::{ClusterState, Supervisor};
use dcnet_overlay as overlay;
use tokio::sync::watch;

use super::Node;
use crate::config::AgentConfig;

/// Starts the overlay when this node runs it; its routes (`/v1/overlay`), or none.
pub(super) async fn start(
    cfg: &AgentConfig,
    node: &Node,
    state: watch::Receiver<Arc<ClusterState>>,
    registry: &prometheus::Registry,
    supervisor: &mut Supervisor,
) -> anyhow::Result<axum::Router> {
    let Some(key) = node.overlay_key.clone() else {
        return Ok(axum::Router::new());
    };
    let metrics = overlay::Metrics::register(registry).context("registering overlay metrics")?;
    let plane = overlay::Overlay::start(
        overlay::Config {
            node: node.node.id.clone(),
            device: cfg.overlay.device.clone(),
            port: cfg.overlay.port,
            mtu: cfg.overlay.mtu,
            private_key: key,
        },
        metrics,
    )
    .await
    .with_context(|| {
        format!(
            "starting the overlay on `{}` (is /dev/net/tun there, and the name free?)",
            cfg.overlay.device
        )
    })?;
    let plane = Arc::new(plane);
    let routes = overlay::router(plane.status(), state.clone());
    supervisor.spawn("overlay", move |ready, stop| {
        let (plane, state) = (plane.clone(), state.clone());
        async move {
            ready.serving();
            plane.run(state, stop).await;
            Ok(())
        }
    });
    Ok(routes)
}

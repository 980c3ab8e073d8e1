//! `dcnet agent`: opens the store, starts node-core and every plane under one supervisor,
//! serves the HTTP API, and runs until SIGTERM or SIGINT, or until a plane keeps failing.
//!
//! One start function per plane (`core`, `dns`, `l4lb`, `api`), each taking the parsed
//! config and registering its loops with the [`Supervisor`].

mod api;
mod core;
mod dns;
mod l4lb;
mod overlay;

use dcnet_node_core::{RestartPolicy, Supervisor};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;

/// What every plane of this agent needs to know about where it runs.
pub(crate) struct Node {
    pub(crate) node: dcnet_node_core::model::Node,
    /// This process's boot id: a VIP counts as ready on this node only once this process's
    /// data plane serves it, never on the word of the agent that ran here before.
    pub(crate) boot: String,
    pub(crate) subnet: dcnet_node_core::ipam::Subnet,
    /// This node's overlay key, when it runs the overlay.
    pub(crate) overlay_key: Option<dcnet_overlay::keys::PrivateKey>,
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // The API's address first: a second agent on this node fails here, before it touches
    // anything.
    let api_listener = api::bind(&cfg)?;
    let registry = Registry::new();
    let (store, runtime, node) = core::open(&cfg, &registry).await?;
    let shutdown = CancellationToken::new();
    let mut supervisor = Supervisor::new(shutdown.clone(), RestartPolicy::default());

    let core = core::start(
        &cfg,
        &node,
        store.clone(),
        runtime,
        &registry,
        &mut supervisor,
    )
    .await?;
    let dns_routes = dns::start(&cfg, &node, core.state(), &registry, &mut supervisor)?;
    let l4lb_routes =
        l4lb::start(&cfg, &node, store, core.state(), &registry, &mut supervisor).await?;
    let overlay_routes =
        overlay::start(&cfg, &node, core.state(), &registry, &mut supervisor).await?;
    let refused = api::Refused::register(&registry)?;
    let app = api::router(
        &cfg,
        &node,
        core.router()
            .merge(dns_routes)
            .merge(l4lb_routes)
            .merge(overlay_routes)
            .merge(crate::ui::router()),
        registry,
        supervisor.planes(),
        refused.clone(),
    );
    api::start(&cfg, api_listener, app, refused, &mut supervisor);
    info!(listen = %cfg.api.listen, "dcnet agent ready");

    let result = tokio::select! {
        () = signal() => {
            info!("starting shutdown");
            Ok(())
        }
        Some(failed) = supervisor.failed() => {
            error!(plane = failed.plane, error = %failed.error, "a plane keeps failing; the agent stops");
            Err(anyhow::Error::new(failed).context("the agent stopped"))
        }
    };
    shutdown.cancel();
    let grace = cfg.shutdown_grace_period;
    if tokio::time::timeout(grace, supervisor.stopped())
        .await
        .is_err()
    {
        warn!(?grace, "graceful shutdown timed out");
    }
    info!("agent stopped; tasks keep running and are adopted on the next start");
    result
}

async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install the SIGTERM and SIGINT handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// A plane's start error, for the supervisor.
pub(crate) fn boxed(e: anyhow::Error) -> dcnet_node_core::supervisor::BoxError {
    format!("{e:#}").into()
}

//! The DNS plane: records derived from the `ClusterState` snapshot, served by hickory-server as
//! the authority for `mesos.`, `thisdcos.directory.` and `l4lb.`, everything else forwarded
//! upstream.
//!
//! Each new snapshot is turned into a complete [`Zone`] off the serving path and swapped in
//! with one atomic store; a query is one atomic load and a hash lookup.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

mod forward;
mod http;
mod metrics;
mod records;
mod server;
mod udp;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use dcnet_node_core::ClusterState;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::forward::{ForwardConfig, upstreams_from_resolv_conf};
pub use self::metrics::Metrics;
pub use self::records::{
    RecordConfig, RrSets, Zone, clean_label, listing, records_from, vip_label,
};
pub use hickory_proto as proto;

#[derive(Clone, Debug)]
pub struct Config {
    pub records: RecordConfig,
    /// `None`: forwarding is off and other names are REFUSED.
    pub forward: Option<ForwardConfig>,
    /// How long an idle TCP client may hold a connection.
    pub tcp_timeout: std::time::Duration,
}

/// hickory-server wants to own its handler; both paths share one.
struct SharedHandler(Arc<server::Handler>);

#[async_trait::async_trait]
impl hickory_server::server::RequestHandler for SharedHandler {
    async fn handle_request<
        R: hickory_server::server::ResponseHandler,
        T: hickory_server::net::runtime::Time,
    >(
        &self,
        request: &hickory_server::server::Request,
        response: R,
    ) -> hickory_server::server::ResponseInfo {
        self.0.handle_request::<R, T>(request, response).await
    }
}

/// The DNS plane: the zone it serves and what it needs to serve it.
#[derive(Clone)]
pub struct Dns {
    cfg: Config,
    zone: Arc<ArcSwap<Zone>>,
    metrics: Metrics,
}

impl Dns {
    pub fn new(cfg: Config, metrics: Metrics) -> Self {
        Self {
            cfg,
            zone: Arc::new(ArcSwap::from_pointee(Zone::default())),
            metrics,
        }
    }

    /// The Mesos-DNS HTTP API and `/v1/records`.
    pub fn router(&self) -> axum::Router {
        http::router(self.zone.clone(), self.cfg.clone())
    }

    /// Serves on the given sockets and follows `state` until `shutdown`.
    pub async fn run(
        self,
        mut state: watch::Receiver<Arc<ClusterState>>,
        udp: Vec<UdpSocket>,
        tcp: Vec<TcpListener>,
        shutdown: CancellationToken,
    ) {
        let addrs: Vec<SocketAddr> = udp.iter().filter_map(|s| s.local_addr().ok()).collect();
        let handler = server::Handler {
            zone: self.zone.clone(),
            forwarder: self
                .cfg
                .forward
                .clone()
                .map(|f| Arc::new(forward::Forwarder::new(f, self.metrics.clone()))),
            metrics: self.metrics.clone(),
        };
        let handler = Arc::new(handler);
        // UDP on our own loop (see udp.rs); TCP through hickory-server.
        for socket in udp {
            tokio::spawn(udp::serve(
                Arc::new(socket),
                handler.clone(),
                shutdown.clone(),
            ));
        }
        let mut server = hickory_server::Server::new(SharedHandler(handler));
        for listener in tcp {
            server.register_listener(listener, self.cfg.tcp_timeout, 64);
        }
        info!(listen = %server::describe(&addrs), "DNS serving");
        loop {
            let snap = state.borrow_and_update().clone();
            let seen = tokio::time::Instant::now();
            let cfg = self.cfg.records.clone();
            // Build off the serving threads: a big zone takes milliseconds to make.
            match tokio::task::spawn_blocking(move || records_from(&snap, &cfg)).await {
                Ok(zone) => {
                    let records = zone.records;
                    self.zone.store(Arc::new(zone));
                    self.metrics.zone(records, seen.elapsed());
                }
                Err(e) => warn!(error = %e, "building the zone failed"),
            }
            tokio::select! {
                res = state.changed() => if res.is_err() { break },
                () = shutdown.cancelled() => break,
            }
        }
        if let Err(e) = server.shutdown_gracefully().await {
            warn!(error = %e, "DNS server did not shut down cleanly");
        }
    }
}

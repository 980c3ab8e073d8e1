//! The overlay plane: a userspace WireGuard device (gotatun) on a TUN device per node, whose
//! peers and routes follow the cluster state, so that every container address is reachable
//! from every node, encrypted.
//!
//! - Each node's key pair is made on its first start and kept in its state dir (mode 0600);
//!   only the public key and the port go into its node record ([`keys`]).
//! - [`peers_from`] derives, purely, what the device should hold: every other node that
//!   publishes a key, at `node.ip:port`, allowed the container subnets it holds.
//! - [`Overlay::run`] diffs that against what it applied, by public key: a change touches only
//!   the peers and routes it names, and the device is never restarted for one.
//! - The device answers the WireGuard UAPI on `/var/run/wireguard/<device>.sock`, so Debian's
//!   `wg show <device>` lists the peers.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

pub mod keys;
mod metrics;
mod peers;
mod tun;
mod udp;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use dcnet_node_core::ClusterState;
use dcnet_node_core::model::NodeId;
use gotatun::device::uapi::UapiServer;
use gotatun::device::{Device, DeviceBuilder, Peer};
use gotatun::udp::socket::UdpSocketFactory;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::metrics::Metrics;
pub use self::peers::{PeerSpec, Peers, peers_from};

/// How often a peer is sent a keepalive, so that its endpoint stays known through NAT and
/// a dead one is noticed.
const KEEPALIVE_SECS: u16 = 25;
/// How often the peers' counters are read into the metrics.
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// The WireGuard UDP socket's buffers.
const UDP_BUFFER: usize = 4 << 20;

/// The device's transports: gotatun's UDP socket (recvmmsg with GRO) sending with GSO
/// ([`udp`]), and the offloading TUN device of [`tun`].
type Transports = (udp::GsoUdpFactory, tun::TunWriter, tun::TunReader);

#[derive(Clone, Debug)]
pub struct Config {
    /// This node.
    pub node: NodeId,
    /// The TUN device's name (unique per machine: its UAPI socket is machine-wide).
    pub device: String,
    /// The UDP port WireGuard listens on.
    pub port: u16,
    pub mtu: u32,
    /// This node's private key ([`keys::load_or_create`]).
    pub private_key: keys::PrivateKey,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the WireGuard device `{device}`: {error}")]
    Device {
        device: String,
        error: gotatun::device::Error,
    },
    #[error("the WireGuard UAPI socket for `{device}`: {error}")]
    Uapi { device: String, error: String },
    #[error("creating the TUN device `{device}`: {error}")]
    Tun {
        device: String,
        error: std::io::Error,
    },
    #[error("configuring the link `{device}`: {error}")]
    Link {
        device: String,
        error: std::io::Error,
    },
}

/// The running device and what it was last told (kept across restarts of the plane's loop,
/// so that a restarted loop removes what it no longer wants).
pub struct Overlay {
    cfg: Config,
    device: Arc<Device<Transports>>,
    netlink: dcnet_netns::Netlink,
    applied: tokio::sync::Mutex<Peers>,
    metrics: Metrics,
}

impl Overlay {
    /// Creates the TUN device and the WireGuard device on it, up, with no peers yet. Call
    /// on the node's namespace (the agent runs in it).
    pub async fn start(cfg: Config, metrics: Metrics) -> Result<Self, Error> {
        let device_err = |error| Error::Device {
            device: cfg.device.clone(),
            error,
        };
        let uapi =
            UapiServer::default_unix_socket(&cfg.device, None, None).map_err(|e| Error::Uapi {
                device: cfg.device.clone(),
                error: e.to_string(),
            })?;
        let mtu = u16::try_from(cfg.mtu).unwrap_or(u16::MAX);
        let (tun_tx, tun_rx) =
            tun::open(&cfg.device, mtu, &metrics).map_err(|error| Error::Tun {
                device: cfg.device.clone(),
                error,
            })?;
        let device = DeviceBuilder::new()
            // A bulk stream fills the default buffers between two reads (the kernel caps
            // these at net.core.{r,w}mem_max).
            .with_udp(udp::GsoUdpFactory(UdpSocketFactory {
                recv_buffer_size: Some(UDP_BUFFER),
                send_buffer_size: Some(UDP_BUFFER),
            }))
            .with_listen_port(cfg.port)
            .with_ip_pair(tun_tx, tun_rx)
            .with_uapi(uapi)
            .build()
            .await
            .map_err(device_err)?;
        // The key set after the build starts the device's UDP socket and TUN loops now (a
        // device built without peers starts them only on a reconfiguration, which adding a
        // peer is not).
        device
            .set_private_key(cfg.private_key.secret())
            .await
            .map_err(device_err)?;
        let link_err = |error| Error::Link {
            device: cfg.device.clone(),
            error,
        };
        let netlink = dcnet_netns::Netlink::connect().map_err(link_err)?;
        netlink
            .set_mtu_up(&cfg.device, cfg.mtu)
            .await
            .map_err(link_err)?;
        netlink
            .set_gso_max_segs(&cfg.device, tun::BATCH as u32)
            .await
            .map_err(link_err)?;
        info!(device = %cfg.device, port = cfg.port, public_key = %cfg.private_key.public_base64(), "overlay device up");
        Ok(Self {
            cfg,
            device: Arc::new(device),
            netlink,
            applied: tokio::sync::Mutex::new(Peers::new()),
            metrics,
        })
    }

    /// What `/v1/overlay` and `dcnet overlay status` show.
    pub fn status(&self) -> StatusSource {
        StatusSource {
            device: self.device.clone(),
            name: self.cfg.device.clone(),
            port: self.cfg.port,
            public_key: self.cfg.private_key.public_base64(),
        }
    }

    /// Follows `state` until `shutdown`, keeping the device's peers and the routes to their
    /// subnets equal to [`peers_from`]. The device stays up when this returns (the TUN goes
    /// with the process).
    pub async fn run(
        &self,
        mut state: watch::Receiver<Arc<ClusterState>>,
        shutdown: CancellationToken,
    ) {
        let mut sample = tokio::time::interval(SAMPLE_EVERY);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let snap = state.borrow_and_update().clone();
            if snap.is_loaded() {
                let desired = peers_from(&snap, &self.cfg.node);
                let mut applied = self.applied.lock().await;
                if desired != *applied {
                    let next = self.apply(&applied, &desired).await;
                    for gone in applied.iter().filter(|(k, _)| !next.contains_key(*k)) {
                        self.metrics.forget(&gone.1.node.0);
                    }
                    self.metrics.peers(next.len());
                    *applied = next;
                }
            }
            tokio::select! {
                res = state.changed() => if res.is_err() { return },
                _ = sample.tick() => self.sample().await,
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Reads every peer's counters into the metrics.
    async fn sample(&self) {
        let applied = self.applied.lock().await.clone();
        for p in self.device.peers().await {
            let key = keys::public_to_base64(&p.peer.public_key);
            if let Some(spec) = applied.get(&key) {
                self.metrics.observe(
                    &spec.node.0,
                    p.stats.rx_bytes as u64,
                    p.stats.tx_bytes as u64,
                    p.stats.last_handshake.map(|d| d.as_secs()),
                );
            }
        }
    }

    /// Moves the device from `applied` to `desired`; returns what it holds afterwards (a
    /// peer whose route could not be set is left out, so the next change tries again).
    async fn apply(&self, applied: &Peers, desired: &Peers) -> Peers {
        let mut now = applied.clone();
        for (key, old) in applied {
            if desired.contains_key(key) {
                continue;
            }
            let Some(public) = keys::public_from_base64(key) else {
                continue;
            };
            if let Err(e) = self.device.remove_peer(&public).await {
                warn!(node = %old.node, error = %e, "could not remove a WireGuard peer");
            }
            for subnet in &old.subnets {
                if let Err(e) = self
                    .netlink
                    .delete_route(subnet.network, subnet.prefix, &self.cfg.device)
                    .await
                {
                    warn!(node = %old.node, %subnet, error = %e, "could not remove an overlay route");
                }
            }
            info!(node = %old.node, "overlay peer removed");
            now.remove(key);
        }
        for (key, spec) in desired {
            if applied.get(key) == Some(spec) {
                continue;
            }
            let Some(public) = keys::public_from_base64(key) else {
                warn!(node = %spec.node, "its overlay public key is not valid base64 of 32 bytes");
                continue;
            };
            let mut peer = Peer::new(public).with_endpoint(spec.endpoint);
            peer.keepalive = Some(KEEPALIVE_SECS);
            peer = peer.with_allowed_ips(spec.subnets.iter().map(|s| {
                ipnetwork::IpNetwork::V4(
                    ipnetwork::Ipv4Network::new(s.network, s.prefix).expect("a valid subnet"),
                )
            }));
            if let Err(e) = self.device.add_or_update_peer(peer).await {
                warn!(node = %spec.node, error = %e, "could not set a WireGuard peer");
                now.remove(key);
                continue;
            }
            let old_subnets = applied
                .get(key)
                .map(|o| o.subnets.clone())
                .unwrap_or_default();
            for subnet in old_subnets.iter().filter(|s| !spec.subnets.contains(s)) {
                let _ = self
                    .netlink
                    .delete_route(subnet.network, subnet.prefix, &self.cfg.device)
                    .await;
            }
            let mut routed = true;
            for subnet in &spec.subnets {
                if let Err(e) = self
                    .netlink
                    .replace_route(subnet.network, subnet.prefix, &self.cfg.device)
                    .await
                {
                    warn!(node = %spec.node, %subnet, error = %e, "could not route a subnet into the overlay");
                    routed = false;
                }
            }
            if routed {
                info!(node = %spec.node, endpoint = %spec.endpoint, subnets = ?spec.subnets, "overlay peer set");
                now.insert(key.clone(), spec.clone());
            } else {
                now.remove(key);
            }
        }
        now
    }
}

/// What the device shows of itself, for the API.
#[derive(Clone)]
pub struct StatusSource {
    device: Arc<Device<Transports>>,
    name: String,
    port: u16,
    public_key: String,
}

impl StatusSource {
    pub async fn json(&self, state: &ClusterState) -> Value {
        let by_key: BTreeMap<String, &NodeId> = state
            .nodes
            .values()
            .filter_map(|n| Some((n.overlay.as_ref()?.public_key.clone(), &n.id)))
            .collect();
        let peers: Vec<Value> = self
            .device
            .peers()
            .await
            .into_iter()
            .map(|p| {
                let key = keys::public_to_base64(&p.peer.public_key);
                json!({
                    "node": by_key.get(&key),
                    "publicKey": key,
                    "endpoint": p.peer.endpoint,
                    "allowedIps": p.peer.allowed_ips.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                    "lastHandshakeSecs": p.stats.last_handshake.map(|d| d.as_secs()),
                    "rxBytes": p.stats.rx_bytes,
                    "txBytes": p.stats.tx_bytes,
                })
            })
            .collect();
        json!({
            "device": self.name,
            "listenPort": self.port,
            "publicKey": self.public_key,
            "peers": peers,
        })
    }
}

/// `GET /v1/overlay`: this node's device and every peer, as `dcnet overlay status` prints
/// it.
pub fn router(status: StatusSource, state: watch::Receiver<Arc<ClusterState>>) -> Router {
    Router::new()
        .route("/v1/overlay", get(overlay_status))
        .with_state((status, state))
}

async fn overlay_status(
    State((status, state)): State<(StatusSource, watch::Receiver<Arc<ClusterState>>)>,
) -> Json<Value> {
    let snap = state.borrow().clone();
    Json(status.json(&snap).await)
}

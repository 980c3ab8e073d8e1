//! The userspace data plane: a listener per VIP:port, bound straight to the VIP (the node's
//! AnyIP route `local <range> dev lo` makes every VIP a local address), that splices each TCP
//! connection to a backend, and for UDP keeps a session per client whose replies leave from
//! the VIP's own socket, so that clients see them come from the VIP.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::plane::{DataPlane, TableDiff};
use crate::relay::Pipes;
use crate::select::Selector;
use crate::table::{Entry, VipKey};
use crate::view::{ServedBackend, ServedVip, VipView, vip_label};
use dcnet_node_core::model::Protocol;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const ATTEMPTS: usize = 3;
/// A UDP session with no traffic this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(30);

/// How the operator's view names this data plane.
pub const NAME: &str = "userspace";

/// The selectors of the VIPs being served, for the operator's view.
type Registry = Arc<RwLock<BTreeMap<VipKey, Arc<ArcSwap<Selector>>>>>;

/// The proxy's [`VipView`]: its selectors, with their counters, read when asked.
struct ProxyView(Registry);

impl VipView for ProxyView {
    fn served(&self) -> Vec<ServedVip> {
        // Take the selectors, then read them without holding the lock.
        let selectors: Vec<(VipKey, Arc<Selector>)> = self
            .0
            .read()
            .expect("registry lock")
            .iter()
            .map(|(k, s)| (*k, s.load_full()))
            .collect();
        selectors
            .into_iter()
            .map(|(key, sel)| ServedVip {
                key,
                name: sel.name.clone(),
                lb: sel.lb,
                data_plane: NAME,
                backends: sel
                    .backends
                    .iter()
                    .map(|b| ServedBackend {
                        backend: b.backend.clone(),
                        health: b.health(),
                        active: b.active.load(Ordering::Relaxed) as u64,
                        total: b.total.load(Ordering::Relaxed),
                        failures: b.failures.load(Ordering::Relaxed),
                    })
                    .collect(),
            })
            .collect()
    }
}

struct Serving {
    selector: Arc<ArcSwap<Selector>>,
    stop: CancellationToken,
}

pub struct Proxy {
    serving: HashMap<VipKey, Serving>,
    registry: Registry,
    metrics: Metrics,
    shutdown: CancellationToken,
    /// Splice pipes shared by every TCP VIP.
    pipes: Arc<Pipes>,
}

impl Proxy {
    /// A proxy whose listeners all stop when `shutdown` is cancelled.
    pub fn new(metrics: Metrics, shutdown: CancellationToken) -> Self {
        Self {
            serving: HashMap::new(),
            registry: Registry::default(),
            metrics,
            shutdown,
            pipes: Arc::default(),
        }
    }

    /// Starts serving `key`: binds its listener and spawns its accept loop.
    async fn start(&mut self, key: &VipKey, entry: &Entry) {
        let selector = Arc::new(ArcSwap::from_pointee(Selector::new(entry, None)));
        let stop = self.shutdown.child_token();
        let addr = SocketAddr::new(key.ip, key.port);
        let label = vip_label(key, entry.name.as_deref());
        let (sel, stopped, metrics) = (selector.clone(), stop.clone(), self.metrics.clone());
        let bound = match key.protocol {
            Protocol::Tcp => TcpListener::bind(addr).await.map(|l| {
                let pipes = self.pipes.clone();
                tokio::spawn(serve_tcp(l, pipes, sel, stopped, metrics, label));
            }),
            Protocol::Udp => UdpSocket::bind(addr).await.map(|s| {
                tokio::spawn(serve_udp(Arc::new(s), sel, stopped, metrics, label));
            }),
        };
        if let Err(e) = bound {
            warn!(vip = %key, error = %e, "cannot listen on the VIP");
            return;
        }
        debug!(vip = %key, "VIP listening");
        self.registry
            .write()
            .expect("registry lock")
            .insert(*key, selector.clone());
        self.serving.insert(*key, Serving { selector, stop });
    }
}

impl DataPlane for Proxy {
    fn name(&self) -> &'static str {
        NAME
    }

    fn view(&self) -> Arc<dyn VipView> {
        Arc::new(ProxyView(self.registry.clone()))
    }

    /// New VIPs get listeners, changed ones a new selector (counters carried over), removed
    /// ones stop accepting (open connections finish).
    async fn apply(&mut self, diff: &TableDiff) -> BTreeSet<VipKey> {
        for (key, entry) in &diff.added {
            self.start(key, entry).await;
        }
        for (key, entry) in &diff.changed {
            match self.serving.get(key) {
                Some(s) => {
                    let next = Selector::new(entry, Some(&s.selector.load()));
                    s.selector.store(Arc::new(next));
                }
                None => self.start(key, entry).await,
            }
        }
        for key in &diff.removed {
            if let Some(s) = self.serving.remove(key) {
                s.stop.cancel();
                self.registry.write().expect("registry lock").remove(key);
            }
        }
        self.serving.keys().copied().collect()
    }
}

async fn serve_tcp(
    listener: TcpListener,
    pipes: Arc<Pipes>,
    selector: Arc<ArcSwap<Selector>>,
    stop: CancellationToken,
    metrics: Metrics,
    label: String,
) {
    loop {
        let (client, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let selector = selector.clone();
        let metrics = metrics.clone();
        let label = label.clone();
        let pipes = pipes.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let mut tried = Vec::new();
            for _ in 0..ATTEMPTS {
                let Some(backend) = selector.load().pick(peer, &tried) else {
                    break;
                };
                let addr = backend.backend.addr;
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(mut upstream)) => {
                        backend.restore();
                        let _ = upstream.set_nodelay(true);
                        backend.active.fetch_add(1, Ordering::Relaxed);
                        backend.total.fetch_add(1, Ordering::Relaxed);
                        metrics.connection(&label, "ok");
                        let mut client = client;
                        if let Err(e) =
                            crate::relay::relay(&mut client, &mut upstream, &pipes).await
                        {
                            debug!(%addr, error = %e, "connection ended with an error");
                        }
                        backend.active.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                    // Out of local ports: our shortage, not the backend's fault. Ejecting
                    // it would turn a moment without ports into seconds without the backend.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                        debug!(%addr, error = %e, "no local port left to reach the backend");
                        metrics.connection(&label, "no_local_port");
                        return;
                    }
                    Ok(Err(e)) => {
                        debug!(%addr, error = %e, "backend refused; ejecting it for a while")
                    }
                    Err(_) => debug!(%addr, "backend timed out; ejecting it for a while"),
                }
                backend.eject();
                metrics.connection(&label, "backend_failed");
                tried.push(addr);
            }
            metrics.connection(&label, "no_backend");
        });
    }
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    selector: Arc<ArcSwap<Selector>>,
    stop: CancellationToken,
    metrics: Metrics,
    label: String,
) {
    let sessions: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> =
        Arc::new(Mutex::new(HashMap::new()));
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        let existing = sessions.lock().await.get(&client).cloned();
        let upstream = match existing {
            Some(u) => u,
            None => {
                let Some(backend) = selector.load().pick(client, &[]) else {
                    metrics.connection(&label, "no_backend");
                    continue;
                };
                let bind: SocketAddr = if backend.backend.addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let Ok(up) = UdpSocket::bind(bind).await else {
                    continue;
                };
                if up.connect(backend.backend.addr).await.is_err() {
                    backend.eject();
                    continue;
                }
                let up = Arc::new(up);
                backend.total.fetch_add(1, Ordering::Relaxed);
                backend.active.fetch_add(1, Ordering::Relaxed);
                metrics.connection(&label, "ok");
                sessions.lock().await.insert(client, up.clone());
                // Replies go back from the VIP's socket; the session ends when idle.
                let (reply_socket, sessions, reply_up, stop) =
                    (socket.clone(), sessions.clone(), up.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_535];
                    loop {
                        tokio::select! {
                            r = tokio::time::timeout(UDP_IDLE, reply_up.recv(&mut buf)) => match r {
                                Ok(Ok(n)) => { let _ = reply_socket.send_to(&buf[..n], client).await; }
                                Ok(Err(_)) => {
                                    // ICMP unreachable: the backend is not there.
                                    backend.eject();
                                    break;
                                }
                                Err(_) => break,
                            },
                            () = stop.cancelled() => break,
                        }
                    }
                    backend.active.fetch_sub(1, Ordering::Relaxed);
                    sessions.lock().await.remove(&client);
                });
                up
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

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
                        active: Some(b.active.load(Ordering::Relaxed) as u64),
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
    udp: UdpLimits,
    sessions: Arc<SessionCount>,
    registry: Registry,
    metrics: Metrics,
    shutdown: CancellationToken,
    /// Splice pipes shared by every TCP VIP.
    pipes: Arc<Pipes>,
}

impl Proxy {
    /// A proxy whose listeners all stop when `shutdown` is cancelled.
    pub fn new(metrics: Metrics, udp: UdpLimits, shutdown: CancellationToken) -> Self {
        Self {
            serving: HashMap::new(),
            udp,
            sessions: Arc::default(),
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
                let (limits, total) = (self.udp, self.sessions.clone());
                tokio::spawn(serve_udp(
                    Arc::new(s),
                    sel,
                    stopped,
                    metrics,
                    label,
                    limits,
                    total,
                ));
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

/// Bounds of the UDP session tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpLimits {
    /// Sessions of every VIP together.
    pub max_sessions: usize,
    /// Sessions of one VIP.
    pub max_sessions_per_vip: usize,
    /// A session with no traffic this long is closed.
    pub idle: Duration,
}

impl Default for UdpLimits {
    fn default() -> Self {
        Self {
            max_sessions: 65_536,
            max_sessions_per_vip: 16_384,
            idle: UDP_IDLE,
        }
    }
}

struct Session {
    /// Distinguishes this session from a later one of the same client.
    id: u64,
    upstream: Arc<UdpSocket>,
    stop: CancellationToken,
    /// Set once the session has given its place in the count over every VIP back: at
    /// eviction, at once, so that the new session can take it; else when its task ends.
    released: Arc<std::sync::atomic::AtomicBool>,
    /// When it last carried a datagram: its place in `lru`.
    used: u64,
}

/// One VIP's sessions, least recently used first in `lru`.
#[derive(Default)]
struct Sessions {
    by_client: HashMap<SocketAddr, Session>,
    lru: BTreeMap<u64, SocketAddr>,
    clock: u64,
}

impl Sessions {
    fn touch(&mut self, client: SocketAddr) -> Option<Arc<UdpSocket>> {
        self.clock += 1;
        let now = self.clock;
        let s = self.by_client.get_mut(&client)?;
        self.lru.remove(&s.used);
        s.used = now;
        self.lru.insert(now, client);
        Some(s.upstream.clone())
    }

    fn insert(&mut self, client: SocketAddr, session: Session) {
        self.clock += 1;
        let used = self.clock;
        self.lru.insert(used, client);
        self.by_client.insert(client, Session { used, ..session });
    }

    /// Ends the least recently used session and gives its place in `total` back; whether
    /// there was one.
    fn evict_oldest(&mut self, total: &SessionCount) -> bool {
        let Some((_, client)) = self.lru.pop_first() else {
            return false;
        };
        if let Some(s) = self.by_client.remove(&client) {
            s.stop.cancel();
            if !s.released.swap(true, Ordering::AcqRel) {
                total.sub();
            }
        }
        true
    }

    /// Forgets session `id` of `client` (it ended by itself); a newer one stays.
    fn remove(&mut self, client: SocketAddr, id: u64) -> bool {
        match self.by_client.get(&client) {
            Some(s) if s.id == id => {
                let s = self.by_client.remove(&client).expect("just seen");
                self.lru.remove(&s.used);
                true
            }
            _ => false,
        }
    }
}

/// Sessions open across every UDP VIP, for `max_sessions`.
#[derive(Default)]
struct SessionCount(std::sync::atomic::AtomicUsize);

impl SessionCount {
    fn try_add(&self, max: usize) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn sub(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    selector: Arc<ArcSwap<Selector>>,
    stop: CancellationToken,
    metrics: Metrics,
    label: String,
    limits: UdpLimits,
    total: Arc<SessionCount>,
) {
    let sessions: Arc<std::sync::Mutex<Sessions>> = Arc::default();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        let existing = sessions.lock().expect("sessions lock").touch(client);
        let upstream = match existing {
            Some(u) => u,
            None => {
                let Some(backend) = selector.load().pick(client, &[]) else {
                    metrics.connection(&label, "no_backend");
                    continue;
                };
                // Room for one more: the least recently used session of this VIP goes first
                // when this VIP, or every VIP together, is at its bound.
                {
                    let mut table = sessions.lock().expect("sessions lock");
                    if table.by_client.len() >= limits.max_sessions_per_vip
                        && table.evict_oldest(&total)
                    {
                        metrics.connection(&label, "evicted");
                    }
                }
                if !total.try_add(limits.max_sessions) {
                    let evicted = sessions.lock().expect("sessions lock").evict_oldest(&total);
                    if evicted {
                        metrics.connection(&label, "evicted");
                    }
                    // Another VIP's sessions may hold every place: this one has none to give.
                    if !evicted || !total.try_add(limits.max_sessions) {
                        metrics.connection(&label, "session_limit");
                        continue;
                    }
                }
                let bind: SocketAddr = if backend.backend.addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let up = match UdpSocket::bind(bind).await {
                    Ok(up) if up.connect(backend.backend.addr).await.is_ok() => Arc::new(up),
                    Ok(_) => {
                        backend.eject();
                        total.sub();
                        continue;
                    }
                    Err(_) => {
                        total.sub();
                        continue;
                    }
                };
                backend.total.fetch_add(1, Ordering::Relaxed);
                backend.active.fetch_add(1, Ordering::Relaxed);
                metrics.connection(&label, "ok");
                next_id += 1;
                let (id, session_stop) = (next_id, stop.child_token());
                let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
                sessions.lock().expect("sessions lock").insert(
                    client,
                    Session {
                        id,
                        upstream: up.clone(),
                        stop: session_stop.clone(),
                        released: released.clone(),
                        used: 0,
                    },
                );
                // Replies go back from the VIP's socket; the session ends when idle, evicted
                // or stopped.
                let (reply_socket, sessions, reply_up, total) =
                    (socket.clone(), sessions.clone(), up.clone(), total.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_535];
                    loop {
                        tokio::select! {
                            r = tokio::time::timeout(limits.idle, reply_up.recv(&mut buf)) => match r {
                                Ok(Ok(n)) => { let _ = reply_socket.send_to(&buf[..n], client).await; }
                                Ok(Err(_)) => {
                                    // ICMP unreachable: the backend is not there.
                                    backend.eject();
                                    break;
                                }
                                Err(_) => break,
                            },
                            () = session_stop.cancelled() => break,
                        }
                    }
                    backend.active.fetch_sub(1, Ordering::Relaxed);
                    if !released.swap(true, Ordering::AcqRel) {
                        total.sub();
                    }
                    sessions.lock().expect("sessions lock").remove(client, id);
                });
                up
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

#[cfg(test)]
mod tests {
    use dcnet_node_core::model::{NodeId, TaskId};

    use super::*;
    use crate::table::{Backend, Lb};

    /// A UDP echo on loopback.
    async fn echo() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    fn counted(reg: &prometheus::Registry, result: &str) -> u64 {
        reg.gather()
            .iter()
            .filter(|f| f.name() == "dcnet_l4lb_connections_total")
            .flat_map(|f| f.get_metric())
            .filter(|m| m.get_label().iter().any(|l| l.value() == result))
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// A proxy serving one UDP "VIP" on loopback in front of an echo; the VIP's address.
    async fn proxy(limits: UdpLimits, reg: &prometheus::Registry) -> (Proxy, SocketAddr) {
        let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let vip = free.local_addr().unwrap();
        drop(free);
        let backend = echo().await;
        let mut proxy = Proxy::new(
            Metrics::register(reg).unwrap(),
            limits,
            CancellationToken::new(),
        );
        let key = VipKey {
            ip: vip.ip(),
            port: vip.port(),
            protocol: Protocol::Udp,
        };
        let entry = Entry {
            name: Some("/dns".into()),
            lb: Lb::P2c,
            backends: vec![Arc::new(Backend {
                addr: backend,
                node: NodeId("n1".into()),
                task: TaskId("dns.1".into()),
                weight: 1,
            })],
        };
        let served = proxy
            .apply(&TableDiff {
                added: vec![(key, Arc::new(entry))],
                ..Default::default()
            })
            .await;
        assert!(served.contains(&key));
        (proxy, vip)
    }

    async fn exchange(client: &UdpSocket, vip: SocketAddr) -> bool {
        client.send_to(b"ping", vip).await.unwrap();
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf)).await,
            Ok(Ok((4, from))) if from == vip
        )
    }

    async fn active(proxy: &Proxy, want: u64) {
        for _ in 0..200 {
            let served = proxy.view().served();
            if served[0].backends[0].active == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never {want} sessions: {:?}", proxy.view().served());
    }

    #[tokio::test]
    async fn a_vip_at_its_session_bound_closes_its_least_recently_used_session() {
        let reg = prometheus::Registry::new();
        let limits = UdpLimits {
            max_sessions: 100,
            max_sessions_per_vip: 3,
            idle: Duration::from_secs(30),
        };
        let (proxy, vip) = proxy(limits, &reg).await;
        let mut clients = Vec::new();
        for _ in 0..3 {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            assert!(exchange(&c, vip).await);
            clients.push(c);
        }
        active(&proxy, 3).await;
        // The first client is used again, so the second is now the least recently used.
        assert!(exchange(&clients[0], vip).await);
        let fourth = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert!(
            exchange(&fourth, vip).await,
            "a new client is served at the bound"
        );
        active(&proxy, 3).await;
        assert_eq!(counted(&reg, "evicted"), 1);
        assert_eq!(counted(&reg, "ok"), 4);
        // The first client kept its session; the second gets a new one (evicting the third).
        assert!(exchange(&clients[0], vip).await);
        assert_eq!(
            counted(&reg, "ok"),
            4,
            "the first client's session was kept"
        );
        assert!(exchange(&clients[1], vip).await);
        assert_eq!((counted(&reg, "ok"), counted(&reg, "evicted")), (5, 2));
        active(&proxy, 3).await;
    }

    #[tokio::test]
    async fn the_bound_over_every_vip_holds_too() {
        let reg = prometheus::Registry::new();
        let limits = UdpLimits {
            max_sessions: 2,
            max_sessions_per_vip: 100,
            idle: Duration::from_secs(30),
        };
        let (proxy, vip) = proxy(limits, &reg).await;
        for n in 1..=5u64 {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            assert!(exchange(&c, vip).await, "client {n} is served at the bound");
            assert!(proxy.sessions.0.load(Ordering::Acquire) <= 2);
            active(&proxy, n.min(2)).await;
        }
        assert_eq!(counted(&reg, "evicted"), 3);
        assert_eq!(counted(&reg, "session_limit"), 0);
    }
}

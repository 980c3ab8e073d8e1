//! The DNS plane: records derived from the `ClusterState` snapshot, served by hickory-server as
//! the authority for `mesos.`, `thisdcos.directory.` and `l4lb.`, everything else forwarded
//! upstream.
//!
//! Each new snapshot is turned into a complete [`Zone`] off the serving path and swapped in
//! with one atomic store; a query is one atomic load and a hash lookup.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

mod cookie;
mod forward;
mod http;
mod incremental;
mod metrics;
mod records;
mod screen;
mod server;
mod tcp;
mod udp;
mod wire;
mod zone;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use dcnet_node_core::ClusterState;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use self::forward::{ForwardConfig, upstreams_from_resolv_conf};
pub use self::metrics::Metrics;
pub use self::records::{RecordConfig, listing, records_from};
pub use self::tcp::TcpLimits;
pub use self::zone::{RrSets, Zone};
pub use hickory_proto as proto;

#[derive(Clone, Debug)]
pub struct Config {
    pub records: RecordConfig,
    /// `None`: forwarding is off and other names are REFUSED.
    pub forward: Option<ForwardConfig>,
    /// Bounds of the TCP server.
    pub tcp: TcpLimits,
    /// A UDP answer to a source that has not returned a DNS cookie of ours is at most this
    /// many times the size of its query; larger ones are truncated.
    pub max_amplification: usize,
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

    /// The Mesos-DNS HTTP API, `/v1/records`, and `/v1/dns/lookup`, which asks the server
    /// at `server` (this plane's own).
    pub fn router(&self, server: Option<SocketAddr>) -> axum::Router {
        http::router(self.zone.clone(), self.cfg.clone(), server)
    }

    /// Serves on the given sockets and follows `state` until `shutdown`; calls `serving`
    /// once the first zone from the store answers.
    pub async fn run(
        self,
        mut state: watch::Receiver<Arc<ClusterState>>,
        udp: Vec<UdpSocket>,
        tcp: Vec<TcpListener>,
        serving: impl FnOnce() + Send,
        shutdown: CancellationToken,
    ) {
        let addrs: Vec<SocketAddr> = udp.iter().filter_map(|s| s.local_addr().ok()).collect();
        // Nothing is answered before the first snapshot from the store is in the zone: an
        // empty zone would send NXDOMAIN for every task, or hand our own names to the
        // upstreams. Queries that come meanwhile wait in the sockets' queues.
        let loaded = tokio::select! {
            res = state.wait_for(|s| s.is_loaded()) => res.is_ok(),
            () = shutdown.cancelled() => false,
        };
        if !loaded {
            return;
        }
        // The zone follows what changed (a first build of a big cluster takes milliseconds:
        // off the serving threads).
        let snap = state.borrow_and_update().clone();
        let mut zone = self
            .update_zone(
                incremental::Incremental::new(self.cfg.records.clone()),
                snap,
            )
            .await;
        let handler = server::Handler {
            zone: self.zone.clone(),
            forwarder: match self.cfg.forward.clone() {
                Some(f) => match forward::Forwarder::new(f, self.metrics.clone(), &shutdown) {
                    Ok(f) => Some(Arc::new(f)),
                    Err(e) => {
                        warn!(error = %e, "cannot bind the upstream sockets; forwarding is off");
                        None
                    }
                },
                None => None,
            },
            metrics: self.metrics.clone(),
            cookies: cookie::Cookies::new(),
            max_amplification: self.cfg.max_amplification.max(1),
        };
        let handler = Arc::new(handler);
        // UDP and TCP on loops of our own (udp.rs, tcp.rs), answering through the handler.
        for socket in udp {
            tokio::spawn(udp::serve(
                Arc::new(socket),
                handler.clone(),
                shutdown.clone(),
            ));
        }
        for listener in tcp {
            tokio::spawn(tcp::serve(
                listener,
                handler.clone(),
                self.cfg.tcp,
                shutdown.clone(),
            ));
        }
        info!(listen = %server::describe(&addrs), "DNS serving");
        serving();
        loop {
            tokio::select! {
                res = state.changed() => if res.is_err() { break },
                () = shutdown.cancelled() => break,
            }
            let snap = state.borrow_and_update().clone();
            zone = self.update_zone(zone, snap).await;
        }
    }

    /// Brings `inc` to `snap` on a blocking thread and swaps the zone in; returns it for the
    /// next snapshot (a fresh one, which rebuilds, if the update panicked).
    async fn update_zone(
        &self,
        mut inc: incremental::Incremental,
        snap: Arc<ClusterState>,
    ) -> incremental::Incremental {
        let seen = tokio::time::Instant::now();
        match tokio::task::spawn_blocking(move || {
            let (zone, how) = inc.update(&snap);
            (inc, zone, how)
        })
        .await
        {
            Ok((inc, zone, how)) => {
                let records = zone.records;
                self.zone.store(Arc::new(zone));
                self.metrics.zone(records, seen.elapsed());
                if how == incremental::Update::Rebuild {
                    debug!(records, "zone rebuilt whole");
                }
                inc
            }
            Err(e) => {
                warn!(error = %e, "updating the zone failed; it is rebuilt from the next snapshot");
                incremental::Incremental::new(self.cfg.records.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dcnet_node_core::model::NodeId;
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};

    use super::*;

    /// After a restart the agent's DNS sockets are bound before node-core has read the store.
    /// A query in that window must wait for the real zone: answered from an empty one, it
    /// would be NXDOMAIN, or be forwarded and leak a cluster name to the upstreams.
    #[tokio::test]
    async fn queries_before_the_first_snapshot_wait_for_it_and_never_go_upstream() {
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        upstream.set_nonblocking(true).unwrap();
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let (tx, rx) = watch::channel(Arc::new(ClusterState::default()));
        let dns = Dns::new(
            Config {
                records: RecordConfig {
                    this_node: Some(NodeId("n1".into())),
                    ..Default::default()
                },
                forward: Some(ForwardConfig {
                    upstreams: vec![upstream.local_addr().unwrap()],
                    zones: Vec::new(),
                    timeout: Duration::from_millis(200),
                    cache_size: 16,
                    max_inflight: 16,
                    pool_size: 2,
                }),
                tcp: TcpLimits::default(),
                max_amplification: usize::MAX,
            },
            Metrics::register(&prometheus::Registry::new()).unwrap(),
        );
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(dns.run(rx, vec![server], Vec::new(), || {}, shutdown.clone()));

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(server_addr).await.unwrap();
        let mut query = Message::new(7, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(
            Name::from_ascii("leader.mesos.").unwrap(),
            RecordType::A,
        ));
        client.send(&query.to_vec().unwrap()).await.unwrap();
        let mut buf = [0u8; 512];
        let early = tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await;
        assert!(early.is_err(), "answered before the store was read");

        // The first snapshot from the store: the query that waited is answered from it.
        let node = crate::records::tests::node("n1", "192.0.2.1");
        tx.send_replace(Arc::new(ClusterState {
            revision: 1,
            nodes: [(node.id.clone(), Arc::new(node))].into_iter().collect(),
            leader: Some(NodeId("n1".into())),
            ..Default::default()
        }));
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("the waiting query is answered")
            .unwrap();
        let answer = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(answer.metadata.id, 7);
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(
            matches!(&answer.answers[0].data, RData::A(a) if a.0 == std::net::Ipv4Addr::new(192, 0, 2, 1)),
            "{answer:?}"
        );
        let mut leaked = [0u8; 512];
        assert!(
            upstream.recv_from(&mut leaked).is_err(),
            "a cluster name went upstream"
        );
        shutdown.cancel();
        serving.await.unwrap();
    }

    /// `/v1/dns/lookup` asks the plane's own server over TCP and gives its answer; a bad
    /// name or type is a 400 naming it, a server that does not answer a 502.
    #[tokio::test]
    async fn the_lookup_route_answers_as_the_server_does() {
        use tower::ServiceExt;
        let node = crate::records::tests::node("node-1", "192.0.2.1");
        let st = ClusterState {
            revision: 1,
            nodes: [(node.id.clone(), Arc::new(node))].into_iter().collect(),
            leader: Some(NodeId("node-1".into())),
            ..Default::default()
        };
        let (_tx, rx) = watch::channel(Arc::new(st));
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp = UdpSocket::bind(addr).await.unwrap();
        let dns = plane(usize::MAX);
        let router = dns.router(Some(addr));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(dns.run(rx, vec![udp], vec![tcp], || {}, shutdown.clone()));
        let get = |router: axum::Router, uri: &str| {
            let req = axum::http::Request::builder()
                .uri(uri)
                .body(axum::body::Body::empty())
                .unwrap();
            async move {
                let resp = router.oneshot(req).await.unwrap();
                let status = resp.status().as_u16();
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (
                    status,
                    serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
                )
            }
        };
        let (status, v) = get(router.clone(), "/v1/dns/lookup?name=leader.mesos&type=a").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["rcode"], "No Error", "{v}");
        assert_eq!(v["authoritative"], true, "{v}");
        assert_eq!(v["answers"][0]["data"], "192.0.2.1", "{v}");
        let (status, v) = get(router.clone(), "/v1/dns/lookup?name=nope.mesos").await;
        assert_eq!(
            (status, &v["rcode"]),
            (200, &serde_json::json!("Non-Existent Domain")),
            "{v}"
        );
        let (status, v) = get(
            router.clone(),
            "/v1/dns/lookup?name=leader.mesos&type=BOGUS",
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert!(v["message"].as_str().unwrap().contains("BOGUS"), "{v}");
        let (status, v) = get(router.clone(), "/v1/dns/lookup?name=").await;
        assert_eq!(status, 400, "{v}");
        shutdown.cancel();
        task.await.unwrap();
        // Nothing listens any more.
        let (status, v) = get(router, "/v1/dns/lookup?name=leader.mesos").await;
        assert_eq!(status, 502, "{v}");
    }

    /// The plane of node-1, forwarding off, with `max_amplification`.
    fn plane(max_amplification: usize) -> Dns {
        Dns::new(
            Config {
                records: RecordConfig {
                    this_node: Some(NodeId("node-1".into())),
                    ..Default::default()
                },
                forward: None,
                tcp: TcpLimits::default(),
                max_amplification,
            },
            Metrics::register(&prometheus::Registry::new()).unwrap(),
        )
    }

    /// A DNS plane serving `st` on a loopback UDP socket, with `max_amplification`; its
    /// address, the token that stops it and its task.
    async fn serving(
        st: ClusterState,
        max_amplification: usize,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(Arc::new(st));
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let dns = plane(max_amplification);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            dns.run(rx, vec![server], Vec::new(), || {}, stop).await;
            drop(tx);
        });
        (addr, shutdown, task)
    }

    /// A truncated UDP answer from the general path (hickory's encoder; ANY goes that way)
    /// holds whole records only, and its header counts what it holds.
    #[tokio::test]
    async fn a_truncated_general_answer_holds_whole_records() {
        use crate::records::tests::{app, node, state, task};
        let big = app(r#"{"id": "/big", "cmd": "x", "portDefinitions": [{"port": 0}]}"#);
        let tasks = (0..120u16)
            .map(|i| task(&format!("big.{i}"), &big, "node-1", &[31100 + i], None))
            .collect();
        let mut st = state(vec![big], tasks, vec![]);
        let n1 = node("node-1", "192.0.2.1");
        st.nodes.insert(n1.id.clone(), Arc::new(n1));
        // 120 distinct addresses: an A set longer than 1232 bytes.
        let ids: Vec<_> = st.tasks.keys().cloned().collect();
        for (i, id) in ids.iter().enumerate() {
            if let Some(t) = st.tasks.get_mut(id) {
                Arc::make_mut(t).ip_addresses = vec![dcnet_node_core::model::IpAddress::new(
                    std::net::IpAddr::from([10, 128, 1, u8::try_from(i + 2).unwrap()]),
                )];
            }
        }
        let big = st.apps.values().next().unwrap().clone();
        let mut container = (*big).clone();
        container.networks = vec![dcnet_node_core::model::Network {
            mode: dcnet_node_core::model::NetworkMode::Container,
            ..serde_json::from_str(r#"{"mode": "container"}"#).unwrap()
        }];
        st.apps.insert(container.id.clone(), Arc::new(container));
        let (addr, shutdown, serving) = serving(st, usize::MAX).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        for (edns, limit) in [(None, 512), (Some(800u16), 800), (Some(8192), 1232)] {
            let mut q = Message::new(9, MessageType::Query, OpCode::Query);
            q.add_query(Query::query(
                Name::from_ascii("big.marathon.mesos.").unwrap(),
                RecordType::ANY,
            ));
            if let Some(size) = edns {
                let mut e = hickory_proto::op::Edns::new();
                e.set_max_payload(size);
                q.set_edns(e);
            }
            client.send(&q.to_vec().unwrap()).await.unwrap();
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            let reply = &buf[..n];
            assert!(n <= limit, "{edns:?}: {n} bytes");
            let msg = Message::from_vec(reply)
                .unwrap_or_else(|e| panic!("{edns:?}: the answer does not parse: {e}"));
            assert!(msg.metadata.truncation, "{edns:?}");
            let counts = [
                u16::from_be_bytes([reply[6], reply[7]]),
                u16::from_be_bytes([reply[8], reply[9]]),
                u16::from_be_bytes([reply[10], reply[11]]),
            ];
            assert_eq!(
                msg.edns.is_some(),
                edns.is_some(),
                "{edns:?}: the OPT record survives truncation"
            );
            let opt = u16::from(msg.edns.is_some());
            let parsed = [
                msg.answers.len() as u16,
                msg.authorities.len() as u16,
                msg.additionals.len() as u16 + opt,
            ];
            assert_eq!(counts, parsed, "{edns:?}: the header counts what is there");
            assert!(
                !msg.answers.is_empty() && msg.answers.len() < 120,
                "{edns:?}"
            );
        }
        shutdown.cancel();
        serving.await.unwrap();
    }

    /// Without a cookie of ours a UDP answer is at most ten times its query (TC beyond); a
    /// client cookie gets a server cookie back, and with it the next answer is whole.
    #[tokio::test]
    async fn unverified_sources_get_small_answers_and_a_cookie_makes_them_whole() {
        use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};

        use crate::records::tests::{app, node, state, task};
        let big = app(r#"{"id": "/big", "cmd": "x", "networks": [{"mode": "container"}]}"#);
        let tasks = (0..120u8)
            .map(|i| {
                task(
                    &format!("big.{i}"),
                    &big,
                    "node-1",
                    &[],
                    Some(&format!("10.128.1.{}", i + 2)),
                )
            })
            .collect();
        let mut st = state(vec![big], tasks, vec![]);
        let n1 = node("node-1", "192.0.2.1");
        st.nodes.insert(n1.id.clone(), Arc::new(n1));
        let (addr, shutdown, serving) = serving(st, 10).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        let ask = |cookie: Option<Vec<u8>>| {
            let mut q = Message::new(11, MessageType::Query, OpCode::Query);
            q.add_query(Query::query(
                Name::from_ascii("big.marathon.mesos.").unwrap(),
                RecordType::A,
            ));
            let mut e = hickory_proto::op::Edns::new();
            e.set_max_payload(1232);
            if let Some(c) = cookie {
                e.options_mut().insert(EdnsOption::Unknown(10, c));
            }
            q.set_edns(e);
            q.to_vec().unwrap()
        };
        let exchange = |query: Vec<u8>| {
            let client = &client;
            async move {
                client.send(&query).await.unwrap();
                let mut buf = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                    .await
                    .expect("an answer")
                    .unwrap();
                let parsed = Message::from_vec(&buf[..n]).unwrap_or_else(|e| {
                    panic!(
                        "{e}: {n} bytes, counts {:?}, tail {:02x?}",
                        &buf[4..12],
                        &buf[n.saturating_sub(60)..n]
                    )
                });
                (query.len(), parsed, n)
            }
        };
        // No cookie: at most ten times the query, truncated.
        let (qlen, plain, n) = exchange(ask(None)).await;
        assert!(n <= 10 * qlen, "{n} bytes for a {qlen}-byte query");
        assert!(plain.metadata.truncation);
        // A client cookie: still bounded, and the answer carries our server cookie.
        let client_cookie = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let (qlen, first, n) = exchange(ask(Some(client_cookie.clone()))).await;
        assert!(n <= 10 * qlen && first.metadata.truncation, "{n} bytes");
        let Some(EdnsOption::Unknown(10, returned)) = first
            .edns
            .as_ref()
            .and_then(|e| e.options().get(EdnsCode::Cookie))
            .cloned()
        else {
            panic!("no cookie in {first:?}");
        };
        assert_eq!(returned.len(), 24);
        assert_eq!(returned[..8], client_cookie[..], "our client cookie echoed");
        // Returning it: verified, the whole buffer.
        let (_, whole, n) = exchange(ask(Some(returned.clone()))).await;
        assert!(n > 1000 && n <= 1232, "{n} bytes");
        assert!(whole.answers.len() > 60, "{}", whole.answers.len());
        // A forged server cookie is no better than none.
        let mut forged = returned;
        forged[23] ^= 0xff;
        let (qlen, _, n) = exchange(ask(Some(forged))).await;
        assert!(n <= 10 * qlen, "{n} bytes with a forged cookie");
        shutdown.cancel();
        serving.await.unwrap();
    }
}

//! The forwarder: names dcnet is not authoritative for go to upstream resolvers. Two upstreams
//! are asked at once and the first good answer wins; answers are cached for their TTL and
//! served with what is left of it; an upstream that answers truncated is asked again over
//! TCP; no answer in time is SERVFAIL.
//!
//! Bounded, so that one container cannot exhaust the agent with names that never resolve:
//! queries leave through a fixed pool of UDP sockets (`pool_size` per address family, never a
//! socket per query), at most `max_inflight` are waiting upstream at once (SERVFAIL past it,
//! counted), and an answer is taken only from the upstream that was asked, with the ID and
//! the question that were sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// Resolvers for every name without a zone of its own.
    pub upstreams: Vec<SocketAddr>,
    /// Resolvers per zone (`corp.example.` -> ...), the longest match wins.
    pub zones: Vec<(String, Vec<SocketAddr>)>,
    pub timeout: Duration,
    /// Answers kept at most.
    pub cache_size: usize,
    /// Queries waiting for an upstream at once; past it, SERVFAIL.
    pub max_inflight: usize,
    /// UDP sockets per address family that every query leaves through.
    pub pool_size: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct Answer {
    pub rcode: ResponseCode,
    pub truncated: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    fn fail() -> Self {
        Self {
            rcode: ResponseCode::ServFail,
            truncated: false,
            answers: vec![],
            authorities: vec![],
            additionals: vec![],
        }
    }
}

struct Cached {
    stored: Instant,
    expires: Instant,
    answer: Answer,
}

pub(crate) struct Forwarder {
    cfg: ForwardConfig,
    cache: Mutex<HashMap<(String, RecordType), Cached>>,
    inflight: Arc<Semaphore>,
    v4: Option<Pool>,
    v6: Option<Pool>,
    metrics: Metrics,
}

impl Forwarder {
    /// Binds the socket pools (for the address families the upstreams use); their receive
    /// loops stop with `shutdown`.
    pub(crate) fn new(
        cfg: ForwardConfig,
        metrics: Metrics,
        shutdown: &CancellationToken,
    ) -> std::io::Result<Self> {
        let all = || {
            cfg.upstreams
                .iter()
                .chain(cfg.zones.iter().flat_map(|(_, u)| u))
        };
        let v4 = all()
            .any(SocketAddr::is_ipv4)
            .then(|| Pool::bind("0.0.0.0:0", cfg.pool_size, shutdown))
            .transpose()?;
        let v6 = all()
            .any(SocketAddr::is_ipv6)
            .then(|| Pool::bind("[::]:0", cfg.pool_size, shutdown))
            .transpose()?;
        Ok(Self {
            inflight: Arc::new(Semaphore::new(cfg.max_inflight)),
            cfg,
            cache: Mutex::new(HashMap::new()),
            v4,
            v6,
            metrics,
        })
    }

    fn upstreams_for(&self, qname: &str) -> &[SocketAddr] {
        self.cfg
            .zones
            .iter()
            .filter(|(zone, _)| qname == zone || qname.ends_with(&format!(".{zone}")))
            .max_by_key(|(zone, _)| zone.len())
            .map_or(&self.cfg.upstreams, |(_, u)| u)
    }

    pub(crate) async fn forward(
        &self,
        _request: &Request,
        qname: &str,
        qtype: RecordType,
    ) -> Answer {
        let key = (qname.to_string(), qtype);
        if let Some(answer) = self.cached(&key) {
            self.metrics.forward("cached");
            return answer;
        }
        let Ok(name) = Name::from_ascii(qname) else {
            return Answer::fail();
        };
        let upstreams: Vec<SocketAddr> =
            self.upstreams_for(qname).iter().take(2).copied().collect();
        if upstreams.is_empty() {
            self.metrics.forward("no_upstream");
            return Answer::fail();
        }
        let Ok(_slot) = self.inflight.clone().try_acquire_owned() else {
            self.metrics.forward("inflight_limit");
            return Answer::fail();
        };
        let asks = upstreams.iter().map(|u| {
            let pool = if u.is_ipv4() { &self.v4 } else { &self.v6 };
            Box::pin(ask(
                pool.as_ref(),
                *u,
                name.clone(),
                qtype,
                self.cfg.timeout,
            ))
        });
        let answer = match first_good(asks.collect()).await {
            Some(a) => {
                self.metrics.forward("answered");
                a
            }
            None => {
                self.metrics.forward("failed");
                return Answer::fail();
            }
        };
        if !answer.truncated {
            let ttl = cache_ttl(&answer);
            let now = Instant::now();
            let mut cache = self.cache.lock().expect("cache lock");
            if cache.len() >= self.cfg.cache_size {
                cache.retain(|_, c| c.expires > now);
                if cache.len() >= self.cfg.cache_size {
                    cache.clear();
                }
            }
            cache.insert(
                key,
                Cached {
                    stored: now,
                    expires: now + ttl,
                    answer: answer.clone(),
                },
            );
        }
        answer
    }

    fn cached(&self, key: &(String, RecordType)) -> Option<Answer> {
        self.cached_at(key, Instant::now())
    }

    /// A cached answer at `now`, its TTLs lowered by the time it has been kept.
    fn cached_at(&self, key: &(String, RecordType), now: Instant) -> Option<Answer> {
        let cache = self.cache.lock().expect("cache lock");
        let c = cache.get(key)?;
        if c.expires <= now {
            return None;
        }
        let age = u32::try_from(now.duration_since(c.stored).as_secs()).unwrap_or(u32::MAX);
        let mut answer = c.answer.clone();
        for r in answer
            .answers
            .iter_mut()
            .chain(&mut answer.authorities)
            .chain(&mut answer.additionals)
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(answer)
    }
}

/// A query sent from a pool socket, waiting for its answer.
struct Pending {
    upstream: SocketAddr,
    question: Query,
    tx: oneshot::Sender<Message>,
}

struct PoolSocket {
    socket: UdpSocket,
    pending: Mutex<HashMap<u16, Pending>>,
}

/// The UDP sockets every query of one address family leaves through.
struct Pool {
    sockets: Vec<Arc<PoolSocket>>,
    next: AtomicUsize,
}

impl Pool {
    fn bind(addr: &str, size: usize, shutdown: &CancellationToken) -> std::io::Result<Self> {
        let mut sockets = Vec::with_capacity(size.max(1));
        for _ in 0..size.max(1) {
            let std = std::net::UdpSocket::bind(addr)?;
            std.set_nonblocking(true)?;
            let socket = Arc::new(PoolSocket {
                socket: UdpSocket::from_std(std)?,
                pending: Mutex::new(HashMap::new()),
            });
            tokio::spawn(receive(socket.clone(), shutdown.clone()));
            sockets.push(socket);
        }
        Ok(Self {
            sockets,
            next: AtomicUsize::new(0),
        })
    }

    /// Sends `msg` to `upstream` and waits for the answer that matches it.
    async fn exchange(
        &self,
        upstream: SocketAddr,
        msg: &mut Message,
        timeout: Duration,
    ) -> Option<Message> {
        let socket = &self.sockets[self.next.fetch_add(1, Ordering::Relaxed) % self.sockets.len()];
        let question = msg.queries.first()?.clone();
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut pending = socket.pending.lock().expect("pending lock");
            let id = (0..16)
                .map(|_| rand::random::<u16>())
                .find(|id| !pending.contains_key(id))?;
            pending.insert(
                id,
                Pending {
                    upstream,
                    question,
                    tx,
                },
            );
            id
        };
        msg.metadata.id = id;
        // Whatever way this ends, the query is no longer pending.
        struct Forget<'a>(&'a PoolSocket, u16);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.pending.lock().expect("pending lock").remove(&self.1);
            }
        }
        let _forget = Forget(socket, id);
        let bytes = msg.to_vec().ok()?;
        socket.socket.send_to(&bytes, upstream).await.ok()?;
        tokio::time::timeout(timeout, rx).await.ok()?.ok()
    }
}

/// Hands each answer to the query it answers: same upstream, ID and question; anything else
/// is dropped.
async fn receive(socket: Arc<PoolSocket>, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from) = tokio::select! {
            r = socket.socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "an upstream socket failed to receive");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(msg) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut pending = socket.pending.lock().expect("pending lock");
        let matches = pending.get(&msg.metadata.id).is_some_and(|p| {
            p.upstream == from
                && msg.queries.len() == 1
                && msg.queries[0].query_type() == p.question.query_type()
                && msg.queries[0].name().eq_case(p.question.name())
        });
        if matches && let Some(p) = pending.remove(&msg.metadata.id) {
            let _ = p.tx.send(msg);
        }
    }
}

/// The first answer that is NOERROR or NXDOMAIN; errors of one upstream leave the others.
async fn first_good<F>(mut asks: Vec<std::pin::Pin<Box<F>>>) -> Option<Answer>
where
    F: std::future::Future<Output = Option<Answer>>,
{
    while !asks.is_empty() {
        let (result, _, rest) = futures_select_all(asks).await;
        if let Some(a) =
            result.filter(|a| matches!(a.rcode, ResponseCode::NoError | ResponseCode::NXDomain))
        {
            return Some(a);
        }
        asks = rest;
    }
    None
}

async fn futures_select_all<F>(
    asks: Vec<std::pin::Pin<Box<F>>>,
) -> (F::Output, usize, Vec<std::pin::Pin<Box<F>>>)
where
    F: std::future::Future,
{
    let mut asks = asks;
    std::future::poll_fn(move |cx| {
        for i in 0..asks.len() {
            if let std::task::Poll::Ready(out) = asks[i].as_mut().poll(cx) {
                let rest: Vec<_> = asks
                    .drain(..)
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, f)| f)
                    .collect();
                return std::task::Poll::Ready((out, i, rest));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn cache_ttl(answer: &Answer) -> Duration {
    let ttl = match answer.answers.iter().map(|r| r.ttl).min() {
        Some(ttl) => ttl,
        // Negative answers: the SOA minimum, as RFC 2308 says.
        None => answer
            .authorities
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
                _ => None,
            })
            .unwrap_or(5),
    };
    Duration::from_secs(u64::from(ttl.min(300)))
}

fn query(name: Name, qtype: RecordType) -> Message {
    let mut msg = Message::query();
    msg.add_query(Query::query(name, qtype));
    msg.metadata.recursion_desired = true;
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    msg.set_edns(edns);
    msg
}

fn to_answer(msg: Message) -> Answer {
    Answer {
        rcode: msg.metadata.response_code,
        truncated: msg.metadata.truncation,
        answers: msg.answers,
        authorities: msg.authorities,
        additionals: msg
            .additionals
            .into_iter()
            .filter(|r| r.record_type() != RecordType::OPT)
            .collect(),
    }
}

/// One upstream: UDP through the pool, and TCP again if the answer came back truncated.
async fn ask(
    pool: Option<&Pool>,
    upstream: SocketAddr,
    name: Name,
    qtype: RecordType,
    timeout: Duration,
) -> Option<Answer> {
    let mut msg = query(name, qtype);
    let answer = pool?.exchange(upstream, &mut msg, timeout).await?;
    if !answer.metadata.truncation {
        return Some(to_answer(answer));
    }
    let bytes = msg.to_vec().ok()?;
    let tcp = async {
        let mut stream = TcpStream::connect(upstream).await.ok()?;
        let len = u16::try_from(bytes.len()).ok()?;
        stream.write_all(&len.to_be_bytes()).await.ok()?;
        stream.write_all(&bytes).await.ok()?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.ok()?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.ok()?;
        Message::from_vec(&buf)
            .ok()
            .filter(|m| m.metadata.id == msg.metadata.id && m.queries == msg.queries)
    };
    let answer = tokio::time::timeout(timeout, tcp).await.ok()??;
    Some(to_answer(answer))
}

/// The nameservers of a resolv.conf, without `skip` (our own addresses).
pub fn upstreams_from_resolv_conf(text: &str, skip: &[std::net::IpAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| !skip.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::rdata::A;

    use super::*;

    fn answer_to(query: &Message, id: u16, name: &str, ip: [u8; 4]) -> Vec<u8> {
        let mut msg = Message::new(id, MessageType::Response, OpCode::Query);
        let name = Name::from_ascii(name).unwrap();
        msg.add_query(Query::query(name.clone(), query.queries[0].query_type()));
        msg.add_answer(Record::from_rdata(
            name,
            300,
            RData::A(A(Ipv4Addr::from(ip))),
        ));
        msg.to_vec().unwrap()
    }

    fn config(upstream: SocketAddr, max_inflight: usize) -> ForwardConfig {
        ForwardConfig {
            upstreams: vec![upstream],
            zones: Vec::new(),
            timeout: Duration::from_secs(2),
            cache_size: 16,
            max_inflight,
            pool_size: 2,
        }
    }

    fn request() -> Request {
        let mut q = Message::new(1, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(
            Name::from_ascii("x.example.").unwrap(),
            RecordType::A,
        ));
        Request::from_bytes(
            q.to_vec().unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            hickory_server::net::xfer::Protocol::Udp,
        )
        .unwrap()
    }

    /// An upstream that first sends three answers that must not be taken (another ID,
    /// another question, another source), then the real one.
    #[tokio::test]
    async fn only_the_answer_from_the_upstream_with_the_id_and_question_is_taken() {
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            let impostor = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut buf = [0u8; 1500];
            let (n, from) = upstream.recv_from(&mut buf).unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let id = q.metadata.id;
            let name = q.queries[0].name().to_string();
            upstream
                .send_to(
                    &answer_to(&q, id.wrapping_add(1), &name, [6, 6, 6, 1]),
                    from,
                )
                .unwrap();
            upstream
                .send_to(&answer_to(&q, id, "other.example.", [6, 6, 6, 2]), from)
                .unwrap();
            impostor
                .send_to(&answer_to(&q, id, &name, [6, 6, 6, 3]), from)
                .unwrap();
            upstream
                .send_to(&answer_to(&q, id, &name, [192, 0, 2, 7]), from)
                .unwrap();
        });
        let shutdown = CancellationToken::new();
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let fwd = Forwarder::new(config(addr, 4), metrics, &shutdown).unwrap();
        let answer = fwd.forward(&request(), "x.example.", RecordType::A).await;
        assert_eq!(answer.rcode, ResponseCode::NoError);
        assert_eq!(answer.answers.len(), 1);
        assert_eq!(
            answer.answers[0].data,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 7)))
        );
        // Served from the cache with what is left of its TTL.
        let key = ("x.example.".to_string(), RecordType::A);
        let later = fwd
            .cached_at(&key, Instant::now() + Duration::from_secs(100))
            .unwrap();
        assert!(
            (199..=200).contains(&later.answers[0].ttl),
            "{}",
            later.answers[0].ttl
        );
        assert!(
            fwd.cached_at(&key, Instant::now() + Duration::from_secs(301))
                .is_none()
        );
        shutdown.cancel();
    }

    /// A silent upstream: at most `max_inflight` queries wait for it; the rest are SERVFAIL
    /// at once, and nothing opens a socket per query.
    #[tokio::test]
    async fn queries_in_flight_are_capped() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let reg = prometheus::Registry::new();
        let shutdown = CancellationToken::new();
        let mut cfg = config(silent.local_addr().unwrap(), 3);
        cfg.timeout = Duration::from_millis(300);
        let fwd =
            Arc::new(Forwarder::new(cfg, Metrics::register(&reg).unwrap(), &shutdown).unwrap());
        let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = fds();
        let mut asks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let fwd = fwd.clone();
            asks.spawn(async move {
                fwd.forward(&request(), &format!("n{i}.example."), RecordType::A)
                    .await
                    .rcode
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            fds() <= before + 2,
            "a socket per query: {} -> {}",
            before,
            fds()
        );
        while let Some(rcode) = asks.join_next().await {
            assert_eq!(rcode.unwrap(), ResponseCode::ServFail);
        }
        let limited: u64 = reg
            .gather()
            .iter()
            .filter(|f| f.name() == "dcnet_dns_forwarded_total")
            .flat_map(|f| f.get_metric())
            .filter(|m| m.get_label().iter().any(|l| l.value() == "inflight_limit"))
            .map(|m| m.get_counter().get_value() as u64)
            .sum();
        assert_eq!(limited, 47, "all but three refused at the cap");
        assert!(
            fwd.v4.as_ref().unwrap().sockets[0]
                .pending
                .lock()
                .unwrap()
                .is_empty()
        );
        shutdown.cancel();
    }
}

//! The forwarder: names dcnet is not authoritative for go to upstream resolvers. Two upstreams
//! are asked at once and the first good answer wins; answers are cached for their TTL; an
//! upstream that answers truncated is asked again over TCP; no answer in time is SERVFAIL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

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

pub(crate) struct Forwarder {
    cfg: ForwardConfig,
    cache: Mutex<HashMap<(String, RecordType), (Instant, Answer)>>,
    metrics: Metrics,
}

impl Forwarder {
    pub(crate) fn new(cfg: ForwardConfig, metrics: Metrics) -> Self {
        Self {
            cfg,
            cache: Mutex::new(HashMap::new()),
            metrics,
        }
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
        if let Some((expires, answer)) = self.cache.lock().expect("cache lock").get(&key)
            && *expires > Instant::now()
        {
            self.metrics.forward("cached");
            return answer.clone();
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
        let asks = upstreams
            .iter()
            .map(|u| Box::pin(ask(*u, name.clone(), qtype, self.cfg.timeout)));
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
            let mut cache = self.cache.lock().expect("cache lock");
            if cache.len() >= self.cfg.cache_size {
                let now = Instant::now();
                cache.retain(|_, (exp, _)| *exp > now);
                if cache.len() >= self.cfg.cache_size {
                    cache.clear();
                }
            }
            cache.insert(key, (Instant::now() + ttl, answer.clone()));
        }
        answer
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

fn query_bytes(name: Name, qtype: RecordType) -> Option<(u16, Vec<u8>)> {
    let mut msg = Message::query();
    msg.add_query(Query::query(name, qtype));
    msg.metadata.recursion_desired = true;
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    msg.set_edns(edns);
    let id = msg.metadata.id;
    msg.to_vec().ok().map(|b| (id, b))
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

/// One upstream: UDP, and TCP again if the answer came back truncated.
async fn ask(
    upstream: SocketAddr,
    name: Name,
    qtype: RecordType,
    timeout: Duration,
) -> Option<Answer> {
    let (id, bytes) = query_bytes(name, qtype)?;
    let udp = async {
        let bind: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let socket = UdpSocket::bind(bind).await.ok()?;
        socket.connect(upstream).await.ok()?;
        socket.send(&bytes).await.ok()?;
        let mut buf = vec![0u8; 65535];
        loop {
            let n = socket.recv(&mut buf).await.ok()?;
            if let Ok(msg) = Message::from_vec(&buf[..n])
                && msg.metadata.id == id
            {
                return Some(msg);
            }
        }
    };
    let msg = tokio::time::timeout(timeout, udp).await.ok()??;
    if !msg.metadata.truncation {
        return Some(to_answer(msg));
    }
    let tcp = async {
        let mut stream = TcpStream::connect(upstream).await.ok()?;
        let len = u16::try_from(bytes.len()).ok()?;
        stream.write_all(&len.to_be_bytes()).await.ok()?;
        stream.write_all(&bytes).await.ok()?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.ok()?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.ok()?;
        Message::from_vec(&buf).ok()
    };
    let msg = tokio::time::timeout(timeout, tcp).await.ok()??;
    Some(to_answer(msg))
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

//! Mesos-DNS's HTTP API over the served zone, in its JSON shapes, plus `/v1/records`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hickory_proto::op::{Message, Query as DnsQuery};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Config;
use crate::records::listing;
use crate::zone::Zone;

#[derive(Clone)]
struct Api {
    zone: Arc<ArcSwap<Zone>>,
    cfg: Config,
    /// Where `/v1/dns/lookup` asks: this agent's own DNS server, over TCP.
    server: Option<SocketAddr>,
}

pub(crate) fn router(zone: Arc<ArcSwap<Zone>>, cfg: Config, server: Option<SocketAddr>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/config", get(config))
        .route("/v1/hosts/{host}", get(hosts))
        .route("/v1/services/{service}", get(services))
        .route("/v1/enumerate", get(enumerate))
        .route("/v1/axfr", get(enumerate))
        .route("/v1/records", get(records))
        .route("/v1/dns/lookup", get(lookup))
        .with_state(Api { zone, cfg, server })
}

fn fqdn(name: &str) -> String {
    let mut n = name.to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

async fn version() -> Json<Value> {
    Json(
        json!({"Service": "dcnet-dns", "Version": env!("CARGO_PKG_VERSION"), "URL": "https://example.invalid/dcnet"}),
    )
}

async fn config(State(api): State<Api>) -> Json<Value> {
    let forward = api.cfg.forward.as_ref();
    Json(json!({
        "Domain": api.cfg.records.domain,
        "TTL": api.cfg.records.ttl,
        "Resolvers": forward.map(|f| f.upstreams.iter().map(|u| u.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
        "ExternalOn": forward.is_some(),
        "Timeout": forward.map(|f| f.timeout.as_secs()).unwrap_or_default(),
    }))
}

/// `[{"host": "web.marathon.mesos.", "ip": "10.0.0.1"}]`, as Mesos-DNS answers.
async fn hosts(State(api): State<Api>, Path(host): Path<String>) -> Json<Value> {
    let name = fqdn(&host);
    let zone = api.zone.load();
    let out: Vec<Value> = zone
        .names
        .get(name.as_str())
        .map(|sets| {
            sets.a
                .iter()
                .map(ToString::to_string)
                .chain(sets.aaaa.iter().map(ToString::to_string))
                .map(|ip| json!({"host": name, "ip": ip}))
                .collect()
        })
        .unwrap_or_else(|| vec![json!({"host": "", "ip": ""})]);
    Json(json!(out))
}

/// `[{"service": .., "host": .., "ip": .., "port": ..}]`, as Mesos-DNS answers.
async fn services(State(api): State<Api>, Path(service): Path<String>) -> Json<Value> {
    let name = fqdn(&service);
    let zone = api.zone.load();
    let mut out = Vec::new();
    if let Some(sets) = zone.names.get(name.as_str()) {
        for srv in &sets.srv {
            let target = srv.target.to_string();
            let ip = zone
                .names
                .get(target.as_str())
                .and_then(|t| t.a.first().map(ToString::to_string))
                .unwrap_or_default();
            out.push(
                json!({"service": name, "host": target, "ip": ip, "port": srv.port.to_string()}),
            );
        }
    }
    if out.is_empty() {
        out.push(json!({"service": "", "host": "", "ip": "", "port": ""}));
    }
    Json(json!(out))
}

/// Every name and its records.
async fn enumerate(State(api): State<Api>) -> Json<Value> {
    let zone = api.zone.load();
    Json(json!({"revision": zone.revision, "records": listing(&zone, None)}))
}

#[derive(Deserialize)]
struct RecordsQuery {
    name: Option<String>,
}

async fn records(State(api): State<Api>, Query(q): Query<RecordsQuery>) -> Json<Value> {
    let zone = api.zone.load();
    Json(
        json!({"revision": zone.revision, "count": zone.records, "records": listing(&zone, q.name.as_deref())}),
    )
}

#[derive(Deserialize)]
struct LookupQuery {
    name: String,
    #[serde(rename = "type", default = "default_type")]
    qtype: String,
}

fn default_type() -> String {
    "A".into()
}

/// How long `/v1/dns/lookup` waits for its own server (which may be forwarding).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// `/v1/dns/lookup?name=web.marathon.l4lb&type=A`: the question asked of this agent's own DNS
/// server, over TCP (so nothing is truncated), and its answer as that server gave it: names
/// it serves from the zone, the rest forwarded as any client's would be.
async fn lookup(State(api): State<Api>, Query(q): Query<LookupQuery>) -> Response {
    let error = |status: StatusCode, message: String| {
        (status, Json(json!({"message": message, "details": []}))).into_response()
    };
    let name = match Name::from_ascii(q.name.trim()) {
        Ok(n) if !q.name.trim().is_empty() => n,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("`{}` is not a DNS name", q.name),
            );
        }
    };
    let qtype: RecordType = match q.qtype.to_ascii_uppercase().parse() {
        Ok(t) => t,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "`{}` is not a record type (A, AAAA, SRV, PTR, ...)",
                    q.qtype
                ),
            );
        }
    };
    let Some(server) = api.server else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this agent's DNS server has no address to ask".into(),
        );
    };
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(LOOKUP_TIMEOUT, ask(server, name.clone(), qtype)).await {
        Ok(Ok(msg)) => {
            let records = |section: &[hickory_proto::rr::Record]| -> Vec<Value> {
                section
                    .iter()
                    .map(|r| {
                        json!({
                            "name": r.name.to_string(),
                            "type": r.record_type().to_string(),
                            "ttl": r.ttl,
                            "data": r.data.to_string(),
                        })
                    })
                    .collect()
            };
            Json(json!({
                "name": name.to_string(),
                "type": qtype.to_string(),
                "server": server.to_string(),
                "rcode": msg.metadata.response_code.to_string(),
                "authoritative": msg.metadata.authoritative,
                "truncated": msg.metadata.truncation,
                "answers": records(&msg.answers),
                "authority": records(&msg.authorities),
                "ms": started.elapsed().as_secs_f64() * 1000.0,
            }))
            .into_response()
        }
        Ok(Err(e)) => error(
            StatusCode::BAD_GATEWAY,
            format!("asking this agent's DNS server at {server}: {e}"),
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("this agent's DNS server at {server} did not answer in {LOOKUP_TIMEOUT:?}"),
        ),
    }
}

/// One question over TCP, as RFC 1035 frames it.
async fn ask(server: SocketAddr, name: Name, qtype: RecordType) -> std::io::Result<Message> {
    let invalid =
        |e: hickory_proto::ProtoError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(DnsQuery::query(name, qtype));
    let wire = msg.to_bytes().map_err(invalid)?;
    let mut stream = tokio::net::TcpStream::connect(server).await?;
    let mut framed = Vec::with_capacity(wire.len() + 2);
    framed.extend_from_slice(&u16::try_from(wire.len()).unwrap_or(u16::MAX).to_be_bytes());
    framed.extend_from_slice(&wire);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut buf = vec![0; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Message::from_bytes(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

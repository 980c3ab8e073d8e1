//! Mesos-DNS's HTTP API over the served zone, in its JSON shapes, plus `/v1/records`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use hickory_proto::rr::{RData, RecordType};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Config;
use crate::records::listing;
use crate::zone::Zone;

#[derive(Clone)]
struct Api {
    zone: Arc<ArcSwap<Zone>>,
    cfg: Config,
}

pub(crate) fn router(zone: Arc<ArcSwap<Zone>>, cfg: Config) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/config", get(config))
        .route("/v1/hosts/{host}", get(hosts))
        .route("/v1/services/{service}", get(services))
        .route("/v1/enumerate", get(enumerate))
        .route("/v1/axfr", get(enumerate))
        .route("/v1/records", get(records))
        .with_state(Api { zone, cfg })
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
        .get(&name)
        .map(|sets| {
            sets.a
                .iter()
                .chain(&sets.aaaa)
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0.to_string()),
                    RData::AAAA(a) => Some(a.0.to_string()),
                    _ => None,
                })
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
    if let Some(sets) = zone.names.get(&name) {
        for r in &sets.srv {
            if let RData::SRV(srv) = &r.data {
                let target = srv.target.to_string().to_ascii_lowercase();
                let ip = zone
                    .names
                    .get(&target)
                    .and_then(|t| t.get(RecordType::A).first().map(|a| a.data.to_string()))
                    .unwrap_or_default();
                out.push(json!({"service": name, "host": target, "ip": ip, "port": srv.port.to_string()}));
            }
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

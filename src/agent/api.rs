//! The HTTP API: every plane's routes merged, `/metrics`, `/ready`, and the guard every
//! request passes first (its Host one of this agent's names, no page of another origin, a
//! body that is JSON and arrives in time and within size, the bearer token); every error is
//! JSON. The server is a supervised plane with a bound on connections and a header timeout;
//! its listener is bound once, at start, and handed to each attempt.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dcnet_node_core::slots::ConnectionSlots;
use dcnet_node_core::{ApiError, Planes, Supervisor};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{Encoder, Registry, TextEncoder};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::AgentConfig;

/// Set to `1` in the agent's environment by the netns tests: adds
/// `POST /v1/debug/fault/{plane}`, which makes that plane's running attempt panic.
pub(crate) const TEST_FAULTS_ENV: &str = "DCNET_TEST_FAULTS";

pub(super) fn bind(cfg: &AgentConfig) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(cfg.api.listen).with_context(|| {
        format!(
            "binding the API to {}; is another agent running?",
            cfg.api.listen
        )
    })?;
    listener
        .set_nonblocking(true)
        .context("making the API listener non-blocking")?;
    Ok(listener)
}

pub(super) fn router(
    cfg: &AgentConfig,
    node: &super::Node,
    routes: axum::Router,
    registry: Registry,
    planes: Planes,
    refused: Refused,
) -> axum::Router {
    let mut app = routes
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut buf = Vec::new();
                    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf)
                }
            }),
        )
        .merge(
            axum::Router::new()
                .route("/ready", get(ready))
                .with_state(planes.clone()),
        );
    if std::env::var(TEST_FAULTS_ENV).as_deref() == Ok("1") {
        tracing::warn!("test hooks are on: POST /v1/debug/fault/{{plane}} breaks a plane");
        app = app.merge(
            axum::Router::new()
                .route("/v1/debug/fault/{plane}", post(fault))
                .with_state(planes),
        );
    }
    let guard = Arc::new(Guard::new(cfg, node, refused));
    app.layer(middleware::from_fn(move |req: Request, next: Next| {
        let guard = guard.clone();
        async move { guard.check(req, next).await }
    }))
}

/// Serves `app` on `listener` as the `api` plane: at most `api.max_connections` at once and
/// `api.max_per_client` from one address (a new one past either is closed at once), each given
/// `api.header_timeout` to send its headers.
pub(super) fn start(
    cfg: &AgentConfig,
    listener: std::net::TcpListener,
    app: axum::Router,
    refused: Refused,
    supervisor: &mut Supervisor,
) {
    let limits = Limits {
        max_connections: cfg.api.max_connections,
        max_per_client: cfg.api.max_per_client,
        header_timeout: cfg.api.header_timeout,
    };
    supervisor.spawn("api", move |ready, stop| {
        let (app, listener, refused) = (app.clone(), listener.try_clone(), refused.clone());
        async move {
            let listener = tokio::net::TcpListener::from_std(listener?)?;
            ready.serving();
            serve(listener, app, limits, refused, stop).await;
            Ok(())
        }
    });
}

#[derive(Clone, Copy)]
struct Limits {
    max_connections: usize,
    max_per_client: usize,
    header_timeout: Duration,
}

async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    refused: Refused,
    stop: CancellationToken,
) {
    let Limits {
        max_connections,
        max_per_client,
        header_timeout,
    } = limits;
    let slots = ConnectionSlots::new(max_connections, max_per_client);
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = stop.cancelled() => break,
        };
        let slot = match slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(bound) => {
                debug!(client = %peer.ip(), bound = bound.as_str(), "API connection refused at a bound");
                refused.count(bound.as_str());
                drop(stream);
                continue;
            }
        };
        // The kernel holds at most this much that a client has not read: a stalled reader of
        // a stream (`/v2/events`) is found out, and dropped, after that much, not after the
        // megabytes the kernel would otherwise let its buffer grow to.
        if let Err(e) = nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::SndBuf,
            &API_SEND_BUFFER,
        ) {
            debug!(error = %e, "cannot bound an API connection's send buffer");
        }
        // Routes that say who asked (Marathon's events) read the peer from the request.
        let app = tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(dcnet_node_core::ClientAddr(peer));
                req
            },
        );
        let (service, stop) = (TowerToHyperService::new(app), stop.clone());
        connections.spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        debug!(error = %e, "API connection ended");
                    }
                }
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    // Open requests finish within the shutdown grace period.
    while connections.join_next().await.is_some() {}
}

/// Requests and connections refused at one of the API's bounds, by bound: a fixed set of
/// `&'static str` labels.
#[derive(Clone)]
pub(super) struct Refused(prometheus::IntCounterVec);

impl Refused {
    pub(super) fn register(registry: &Registry) -> anyhow::Result<Self> {
        let counter = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "dcnet_api_refused_total",
                "API connections and requests refused at a bound or by the guard",
            ),
            &["bound"],
        )?;
        registry.register(Box::new(counter.clone()))?;
        Ok(Self(counter))
    }

    fn count(&self, bound: &'static str) {
        self.0.with_label_values(&[bound]).inc();
    }
}

/// Bytes the kernel may hold for one API connection that its client has not read yet.
const API_SEND_BUFFER: usize = 256 * 1024;

/// The longest request target accepted; longer ones get 414.
const MAX_URI: usize = 8 * 1024;

/// What every request is checked against before a route sees it.
struct Guard {
    /// Lower-case host names and addresses the API answers to, without ports.
    hosts: BTreeSet<String>,
    token: Option<String>,
    body_timeout: Duration,
    max_body: usize,
    refused: Refused,
}

// === impl Guard ===

impl Guard {
    fn new(cfg: &AgentConfig, node: &super::Node, refused: Refused) -> Self {
        let mut hosts: BTreeSet<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .map(str::to_string)
            .collect();
        hosts.insert(cfg.api.listen.ip().to_string());
        hosts.insert(node.node.ip.to_string());
        if let Some(ip6) = node.node.ip6 {
            hosts.insert(ip6.to_string());
        }
        hosts.insert(node.node.hostname.to_ascii_lowercase());
        hosts.extend(cfg.api.hosts.iter().map(|h| h.to_ascii_lowercase()));
        Self {
            hosts,
            token: cfg.api.token.clone().filter(|t| !t.is_empty()),
            body_timeout: cfg.api.body_timeout,
            max_body: cfg.api.max_body,
            refused,
        }
    }

    async fn check(&self, req: Request, next: Next) -> Response {
        match self.admit(req).await {
            Ok(req) => as_json_error(next.run(req).await).await,
            Err(refused) => {
                self.refused.count(match refused.status {
                    StatusCode::URI_TOO_LONG => "uri_too_long",
                    StatusCode::FORBIDDEN => "foreign_host_or_origin",
                    StatusCode::UNAUTHORIZED => "token",
                    StatusCode::PAYLOAD_TOO_LARGE => "max_body",
                    StatusCode::REQUEST_TIMEOUT => "body_timeout",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "not_json",
                    _ => "other",
                });
                refused.into_response()
            }
        }
    }

    /// The request, its body read whole, or why it is refused.
    async fn admit(&self, req: Request) -> Result<Request, ApiError> {
        if req.uri().to_string().len() > MAX_URI {
            return Err(ApiError::new(
                StatusCode::URI_TOO_LONG,
                format!("the request target is longer than {MAX_URI} bytes"),
            ));
        }
        // DNS rebinding: a page whose name resolves to this node still sends its own name.
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "no Host header"))?;
        if !self.is_own_host(host) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("`{host}` is not a name of this agent; add it to api.hosts to allow it"),
            ));
        }
        // A browser names the page a request comes from; only pages of this agent's own
        // names may call it.
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("null");
            let origin_host = origin
                .split_once("://")
                .map(|(_, rest)| rest.split('/').next().unwrap_or_default());
            if !origin_host.is_some_and(|h| self.is_own_host(h)) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("requests from the page of `{origin}` are refused (cross-origin)"),
                ));
            }
        }
        let is_page = matches!(*req.method(), Method::GET | Method::HEAD)
            && crate::ui::is_asset(req.uri().path());
        if req.uri().path() != "/ping" && !is_page {
            self.check_token(&req)?;
        }
        let is_write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        if !is_write {
            return Ok(req);
        }
        let (parts, body) = req.into_parts();
        let bytes = match tokio::time::timeout(
            self.body_timeout,
            axum::body::to_bytes(body, self.max_body),
        )
        .await
        {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(_)) => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the body is larger than {} bytes (api.max_body)",
                        self.max_body
                    ),
                ));
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {:?}", self.body_timeout),
                ));
            }
        };
        // A body is JSON, said so: a form or text/plain post (what a page can send without
        // asking) never gets through.
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let is_json = content_type.is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        if (!bytes.is_empty() || content_type.is_some()) && !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "a request body must be sent as Content-Type: application/json, not `{}`",
                    content_type.unwrap_or("none")
                ),
            ));
        }
        Ok(Request::from_parts(parts, Body::from(bytes)))
    }

    fn is_own_host(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.rsplit_once(':').map_or(host, |(name, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            }),
        };
        self.hosts.contains(&name.to_ascii_lowercase())
    }

    /// `Authorization: Bearer <token>`, the scheme in any case, the token compared in
    /// constant time.
    fn check_token(&self, req: &Request) -> Result<(), ApiError> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match given {
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
            _ => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <api.token>)",
            )),
        }
    }
}

/// Equal, in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

/// An error that a route or axum made without a JSON body (a 404, 405, a rejected path)
/// gets one: `{"message", "details"}`, as every other error.
async fn as_json_error(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// Each plane's state; 200 when every one serves, else 503.
async fn ready(State(planes): State<Planes>) -> Response {
    let is_ready = planes.is_ready();
    let status = if is_ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"ready": is_ready, "planes": planes.statuses()});
    (status, Json(body)).into_response()
}

async fn fault(State(planes): State<Planes>, Path(plane): Path<String>) -> Response {
    if planes.inject_fault(&plane) {
        (StatusCode::ACCEPTED, Json(json!({"plane": plane}))).into_response()
    } else {
        ApiError::new(StatusCode::NOT_FOUND, format!("no plane `{plane}`")).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret!", b"s3cret"));
        assert!(!constant_time_eq(b"s3creT", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
    }
}

//! The HTTP API: every plane's routes merged, `/metrics`, `/ready`, the bearer token, and the
//! server itself as a supervised plane (its listener is bound once, at start, and handed to
//! each attempt).

use std::sync::Arc;

use anyhow::Context;
use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dcnet_node_core::{ApiError, Planes, Supervisor};
use prometheus::{Encoder, Registry, TextEncoder};
use serde_json::json;

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
    routes: axum::Router,
    registry: Registry,
    planes: Planes,
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
    if let Some(token) = cfg.api.token.clone().filter(|t| !t.is_empty()) {
        let expected: Arc<str> = format!("Bearer {token}").into();
        app = app.layer(middleware::from_fn(move |req: Request, next: Next| {
            let expected = expected.clone();
            async move { require_token(&expected, req, next).await }
        }));
    }
    app
}

/// Serves `app` on `listener` as the `api` plane.
pub(super) fn start(
    listener: std::net::TcpListener,
    app: axum::Router,
    supervisor: &mut Supervisor,
) {
    supervisor.spawn("api", move |ready, stop| {
        let (app, listener) = (app.clone(), listener.try_clone());
        async move {
            let listener = tokio::net::TcpListener::from_std(listener?)?;
            ready.serving();
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await?;
            Ok(())
        }
    });
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

async fn require_token(expected: &str, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if req.uri().path() == "/ping" || given == Some(expected) {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token (Authorization: Bearer <api.token>)",
    )
    .into_response()
}

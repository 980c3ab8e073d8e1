//! Marathon's own example app definitions (`testdata/marathon/`), posted unchanged: each is
//! accepted, or refused with a 422 that names every field it cannot take and why; never a
//! 5xx. What an accepted one gives that dcnet does not act on is named in a warning.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use crate::api::tests::api;

fn testdata(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/marathon")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

/// The status, the warnings and the JSON answer of `method path` with `body`.
async fn send(
    router: &axum::Router,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<String>, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let warnings = resp
        .headers()
        .get_all("Dcnet-Warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, warnings, v)
}

/// A refusal names each field with a reason.
fn check_refusal(name: &str, v: &Value) -> Result<(), String> {
    let details = v["details"].as_array().cloned().unwrap_or_default();
    if details.is_empty() {
        return Err(format!("{name}: a 422 naming no field: {v}"));
    }
    for d in &details {
        let path = d["path"].as_str().unwrap_or_default();
        let errors = d["errors"].as_array().cloned().unwrap_or_default();
        if path.is_empty()
            || errors.is_empty()
            || errors.iter().any(|e| e.as_str().is_none_or(str::is_empty))
        {
            return Err(format!("{name}: a detail without a path or a reason: {d}"));
        }
    }
    Ok(())
}

/// Every example app of Marathon's system tests and of its specification, posted as it is.
#[tokio::test]
async fn marathon_s_example_apps_are_taken_or_refused_naming_each_field() {
    let (router, _store, shutdown, _dir) = api().await;
    let mut outcomes = Vec::new();
    let mut problems = Vec::new();
    let mut examples = testdata("example-apps");
    examples.extend(["app.json", "app-check-http-example.json"].iter().map(|f| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/marathon/examples")
            .join(f)
    }));
    assert!(examples.len() >= 22, "{examples:?}");
    for file in &examples {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let body = std::fs::read(file).unwrap();
        let (status, warnings, v) = send(&router, Method::POST, "/v2/apps", body).await;
        match status.as_u16() {
            201 => {
                let id = v["id"].as_str().unwrap_or_default().to_string();
                let (got, _, read) =
                    send(&router, Method::GET, &format!("/v2/apps{id}"), Vec::new()).await;
                if got != StatusCode::OK || read["app"]["id"] != id.as_str() {
                    problems.push(format!("{name}: accepted but not readable: {got} {read}"));
                }
                outcomes.push(format!("{name}: accepted, warnings {warnings:?}"));
                // Several examples share an id: each is posted to a store without it.
                send(
                    &router,
                    Method::DELETE,
                    &format!("/v2/apps{id}"),
                    Vec::new(),
                )
                .await;
            }
            422 => {
                if let Err(e) = check_refusal(&name, &v) {
                    problems.push(e);
                }
                outcomes.push(format!("{name}: refused: {}", v["message"]));
            }
            other => problems.push(format!("{name}: {other}: {v}")),
        }
    }
    // The multi-app and group bodies of the specification, to their routes.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/marathon/examples");
    for (method, path, file) in [
        (Method::PUT, "/v2/apps", "apps_create.json"),
        (Method::PATCH, "/v2/apps", "apps_patch.json"),
        // The root group exists always: Marathon's own answer to a POST of it is a 409.
        (Method::PUT, "/v2/groups", "group.json"),
    ] {
        let body = std::fs::read(examples.join(file)).unwrap();
        let (status, warnings, v) = send(&router, method.clone(), path, body).await;
        match status.as_u16() {
            200 | 201 => {
                if v["deploymentId"].as_str().is_none() {
                    problems.push(format!("{file}: no deployment id: {v}"));
                }
                outcomes.push(format!("{file}: accepted, warnings {warnings:?}"));
            }
            422 => {
                if let Err(e) = check_refusal(file, &v) {
                    problems.push(e);
                }
                outcomes.push(format!("{file}: refused: {}", v["message"]));
            }
            other => problems.push(format!("{method} {path} {file}: {other}: {v}")),
        }
    }
    let body = std::fs::read(examples.join("group.json")).unwrap();
    let (status, _, v) = send(&router, Method::POST, "/v2/groups", body).await;
    if status != StatusCode::CONFLICT {
        problems.push(format!(
            "POST /v2/groups group.json: {status}, not 409: {v}"
        ));
    }
    println!("{}", outcomes.join("\n"));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Most of them are apps dcnet runs.
    let accepted = outcomes.iter().filter(|o| o.contains("accepted")).count();
    assert!(accepted >= outcomes.len() / 2, "{}", outcomes.join("\n"));
    shutdown.cancel();
}

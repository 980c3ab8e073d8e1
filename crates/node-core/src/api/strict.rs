//! A strict reader of Marathon's `/v2` shapes, built from the RAML type libraries of
//! Marathon's specification (`marathon_types.json`, written from them by
//! `scripts/marathon-types.py`): a response with a field its type does not have, without a
//! field its type requires, or with a value of the wrong type, is refused with the path of
//! each. RAML lets an object carry fields it does not name; this reader does not, so that
//! nothing a Marathon client does not expect reaches it.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde_json::Value;

static TYPES: LazyLock<BTreeMap<String, Value>> = LazyLock::new(|| {
    let all: Value = serde_json::from_str(include_str!("marathon_types.json"))
        .expect("marathon_types.json is JSON");
    let mut types: BTreeMap<String, Value> = all["types"]
        .as_object()
        .expect("a map of types")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The RAML's `ErrorDetail` lacks the `path` that every 400 and 422 example of the same
    // specification (and Marathon itself) writes beside `errors`: the examples win.
    if let Some(props) = types
        .get_mut("error.raml#ErrorDetail")
        .and_then(|t| t.pointer_mut("/object/props"))
        .and_then(Value::as_object_mut)
    {
        props.insert(
            "path".into(),
            serde_json::json!({"type": "string", "required": false}),
        );
    }
    types
});

/// The problems of `value` read as the type `name` (`file#Type`, as in the RAML
/// libraries: `app.raml#AppInfo`); empty when it is exactly that type.
pub(crate) fn problems(value: &Value, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    check(value, &reference(name), "", &mut out);
    out
}

fn reference(name: &str) -> Value {
    serde_json::json!({ "ref": name })
}

fn check(value: &Value, node: &Value, at: &str, out: &mut Vec<String>) {
    let here = if at.is_empty() { "/" } else { at };
    let describe = |v: &Value| {
        let s = v.to_string();
        if s.len() > 60 {
            format!("{}...", &s[..60])
        } else {
            s
        }
    };
    match node {
        Value::String(kind) => {
            let ok = match kind.as_str() {
                "string" => value.is_string(),
                "number" => value.is_number(),
                "integer" => value.is_i64() || value.is_u64(),
                "boolean" => value.is_boolean(),
                "nil" => value.is_null(),
                _ => true,
            };
            if !ok {
                out.push(format!("{here}: {} is not a {kind}", describe(value)));
            }
        }
        Value::Object(o) if o.contains_key("ref") => {
            let name = o["ref"].as_str().unwrap_or_default();
            match TYPES.get(name) {
                Some(t) => check(value, t, at, out),
                None => out.push(format!("{here}: the specification has no type {name}")),
            }
        }
        Value::Object(o) if o.contains_key("enum") => {
            let allowed = o["enum"].as_array().cloned().unwrap_or_default();
            if !allowed.contains(value) {
                out.push(format!(
                    "{here}: {} is not one of {}",
                    describe(value),
                    describe(&o["enum"])
                ));
            }
        }
        Value::Object(o) if o.contains_key("array") => match value.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check(item, &o["array"], &format!("{at}/{i}"), out);
                }
            }
            None => out.push(format!("{here}: {} is not an array", describe(value))),
        },
        Value::Object(o) if o.contains_key("union") => {
            let variants = o["union"].as_array().cloned().unwrap_or_default();
            let mut best: Option<Vec<String>> = None;
            for v in &variants {
                let mut mine = Vec::new();
                check(value, v, at, &mut mine);
                if mine.is_empty() {
                    return;
                }
                if best.as_ref().is_none_or(|b| mine.len() < b.len()) {
                    best = Some(mine);
                }
            }
            out.extend(best.unwrap_or_default());
        }
        Value::Object(o) if o.contains_key("object") => {
            let Some(fields) = value.as_object() else {
                out.push(format!("{here}: {} is not an object", describe(value)));
                return;
            };
            let mut props = BTreeMap::new();
            let mut extra = None;
            collect(node, &mut props, &mut extra);
            for (name, prop) in &props {
                if prop["required"] == true && !fields.contains_key(name) {
                    out.push(format!("{at}/{name}: missing"));
                }
            }
            for (name, v) in fields {
                let path = format!("{at}/{name}");
                match props.get(name) {
                    Some(prop) => check(v, &prop["type"], &path, out),
                    None => match &extra {
                        Some(t) => check(v, t, &path, out),
                        None => out.push(format!("{path}: not a field of this type")),
                    },
                }
            }
        }
        _ => {}
    }
}

/// The properties of an object node and of its bases, and what other keys may hold.
fn collect(node: &Value, props: &mut BTreeMap<String, Value>, extra: &mut Option<Value>) {
    let node = match node.get("ref").and_then(Value::as_str) {
        Some(name) => match TYPES.get(name) {
            Some(t) => t,
            None => return,
        },
        None => node,
    };
    let Some(obj) = node.get("object") else {
        return;
    };
    for base in obj["base"].as_array().into_iter().flatten() {
        collect(base, props, extra);
    }
    if let Some(p) = obj["props"].as_object() {
        for (k, v) in p {
            props.insert(k.clone(), v.clone());
        }
    }
    if !obj["extra"].is_null() {
        *extra = Some(obj["extra"].clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The reader refuses a field too many, one too few, and a wrong type, naming each.
    #[test]
    fn the_reader_refuses_an_extra_a_missing_and_a_mistyped_field() {
        let task = json!({"id": "t", "appId": "/a", "host": "h", "state": "TASK_RUNNING",
                          "role": "*", "ports": [1]});
        assert_eq!(problems(&task, "task.raml#Task"), Vec::<String>::new());
        let mut extra = task.clone();
        extra["goal"] = json!("run");
        assert_eq!(
            problems(&extra, "task.raml#Task"),
            ["/goal: not a field of this type"]
        );
        let mut missing = task.clone();
        missing.as_object_mut().unwrap().remove("host");
        assert_eq!(problems(&missing, "task.raml#Task"), ["/host: missing"]);
        let mut mistyped = task.clone();
        mistyped["ports"] = json!(["x"]);
        assert_eq!(problems(&mistyped, "task.raml#Task").len(), 1);
        // A base type's fields count: AppInfo is an App with counts.
        let app = json!({"id": "/a", "cmd": "x", "tasksRunning": 1});
        assert_eq!(problems(&app, "app.raml#AppInfo"), Vec::<String>::new());
        assert_eq!(
            problems(&json!({"id": "/a", "warnings": []}), "app.raml#AppInfo"),
            ["/warnings: not a field of this type"]
        );
    }
}

/// Every `/v2` route, read with the strict reader: the answer of each is exactly the RAML
/// type of its route, its errors Marathon's `Error`.
#[cfg(test)]
mod routes {
    use axum::Router;
    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::problems;
    use crate::api::tests::{api, put_task};
    use crate::keys;
    use crate::model::{AppId, Health};
    use crate::store::Precondition;

    /// `method path` with a body: the status and the JSON answer (`null` for none).
    async fn ask(router: &Router, method: Method, path: &str, body: &Value) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(if body.is_null() {
                String::new()
            } else {
                body.to_string()
            }))
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v)
    }

    /// Asks, and checks the status and the answer's type; the answer, for what follows.
    struct Reader {
        router: Router,
        problems: Vec<String>,
        routes: usize,
    }

    impl Reader {
        async fn read(
            &mut self,
            method: Method,
            path: &str,
            body: Value,
            status: u16,
            ty: &str,
        ) -> Value {
            let (got, v) = ask(&self.router, method.clone(), path, &body).await;
            self.routes += 1;
            let route = format!("{method} {path}");
            if got.as_u16() != status {
                self.problems
                    .push(format!("{route}: status {got}, not {status}: {v}"));
                return v;
            }
            let found = match ty {
                // Types the RAML writes inline rather than naming.
                "app" => {
                    let mut p = problems(&v["app"], "app.raml#AppInfo");
                    if v.as_object().is_none_or(|o| o.len() != 1) {
                        p.push("/: not exactly {\"app\": ..}".into());
                    }
                    p
                }
                "versions" => v
                    .as_array()
                    .is_none_or(|a| a.iter().any(|x| !x.is_string()))
                    .then(|| "/: not a list of versions".to_string())
                    .into_iter()
                    .collect(),
                "none" => {
                    if v.is_null() {
                        Vec::new()
                    } else {
                        vec![format!("/: a body where none is due: {v}")]
                    }
                }
                "steps[]" => {
                    let mut p = Vec::new();
                    match v.as_array() {
                        Some(items) => {
                            for (i, item) in items.iter().enumerate() {
                                p.extend(
                                    problems(item, "deploymentEventsInfo.raml#DeploymentStepInfo")
                                        .into_iter()
                                        .map(|e| format!("/{i}{e}")),
                                );
                            }
                        }
                        None => p.push("/: not a list".into()),
                    }
                    p
                }
                ty => problems(&v, ty),
            };
            self.problems
                .extend(found.into_iter().map(|p| format!("{route}: {p}")));
            v
        }
    }

    /// Creates, reads, changes, kills and removes through every `/v2` route, with a task
    /// running and health-checked, a deployment in progress, a group and a leader, and reads
    /// every answer strictly.
    #[tokio::test]
    async fn every_v2_answer_is_its_raml_type() {
        let (router, store, shutdown, _dir) = api().await;
        let node = json!({"id": "n1", "hostname": "n1", "ip": "127.0.0.1",
            "resources": {"cpus": 4.0, "mem": 4096.0, "disk": 4096.0,
                          "ports": [{"begin": 31000, "end": 31999}]}});
        store
            .put(
                &format!("{}n1", keys::NODES),
                node.to_string().into_bytes(),
                Precondition::Any,
            )
            .await
            .unwrap();
        store
            .put(keys::LEADER, b"\"n1\"".to_vec(), Precondition::Any)
            .await
            .unwrap();
        let mut r = Reader {
            router,
            problems: Vec::new(),
            routes: 0,
        };
        use Method as M;
        let app = json!({
            "id": "/web", "cmd": "python3 -m http.server $PORT0", "instances": 2,
            "cpus": 0.1, "mem": 32, "env": {"A": "1"}, "labels": {"HAPROXY_GROUP": "external"},
            "portDefinitions": [{"port": 10000, "name": "http", "labels": {"VIP_0": "/web:80"}}],
            "healthChecks": [{"protocol": "HTTP", "path": "/", "portIndex": 0}],
            "readinessChecks": [{"name": "ready", "portName": "http", "path": "/"}],
            "constraints": [["hostname", "UNIQUE"]],
            "upgradeStrategy": {"minimumHealthCapacity": 0.5, "maximumOverCapacity": 0.5}
        });
        r.read(M::POST, "/v2/apps", app.clone(), 201, "app.raml#AppInfo")
            .await;
        // One task of it runs and passes its check.
        let mut task = crate::test_util::task("web.t1", &AppId::parse("/web").unwrap(), "n1");
        task.version = r
            .read(M::GET, "/v2/apps/web", Value::Null, 200, "app")
            .await["app"]["versionInfo"]["lastConfigChangeAt"]
            .as_str()
            .unwrap()
            .to_string();
        task.ports = vec![31000];
        task.started_at = Some("2026-12-03T00:00:00.000Z".into());
        task.health = Health {
            alive: Some(true),
            last_success: Some("2026-12-03T00:00:01.000Z".into()),
            ..Default::default()
        };
        task.ready = Some(false);
        put_task(&store, &task).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;

        r.read(M::GET, "/v2/apps", Value::Null, 200, "app.raml#AppList")
            .await;
        r.read(
            M::GET,
            "/v2/apps?embed=apps.tasks&label=HAPROXY_GROUP==external",
            Value::Null,
            200,
            "app.raml#AppList",
        )
        .await;
        r.read(M::GET, "/v2/apps/web", Value::Null, 200, "app")
            .await;
        r.read(
            M::GET,
            "/v2/apps/web/tasks",
            Value::Null,
            200,
            "task.raml#TaskList",
        )
        .await;
        r.read(M::GET, "/v2/tasks", Value::Null, 200, "task.raml#TaskList")
            .await;
        let versions = r
            .read(
                M::GET,
                "/v2/apps/web/versions",
                Value::Null,
                200,
                "app.raml#VersionList",
            )
            .await;
        let first = versions["versions"][0]
            .as_str()
            .unwrap_or_default()
            .to_string();
        r.read(
            M::GET,
            &format!("/v2/apps/web/versions/{first}"),
            Value::Null,
            200,
            "app.raml#App",
        )
        .await;
        r.read(M::GET, "/v2/deployments", Value::Null, 200, "steps[]")
            .await;
        r.read(M::GET, "/v2/queue", Value::Null, 200, "queue.raml#Queue")
            .await;
        r.read(
            M::GET,
            "/v2/info",
            Value::Null,
            200,
            "info.raml#MarathonInfo",
        )
        .await;
        r.read(
            M::GET,
            "/v2/leader",
            Value::Null,
            200,
            "info.raml#LeaderInfo",
        )
        .await;
        r.read(
            M::PUT,
            "/v2/apps/web",
            json!({"instances": 3}),
            200,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;
        r.read(
            M::PATCH,
            "/v2/apps/web",
            json!({"env": {"A": "2"}}),
            200,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;
        r.read(
            M::POST,
            "/v2/apps/web/restart",
            Value::Null,
            200,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;
        // Roll back to the oldest version still kept.
        let kept = r
            .read(
                M::GET,
                "/v2/apps/web/versions",
                Value::Null,
                200,
                "app.raml#VersionList",
            )
            .await;
        let oldest = kept["versions"]
            .as_array()
            .and_then(|v| v.last())
            .cloned()
            .unwrap_or_default();
        r.read(
            M::PUT,
            "/v2/apps/web",
            json!({"version": oldest}),
            200,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;
        let running = r
            .read(M::GET, "/v2/deployments", Value::Null, 200, "steps[]")
            .await;
        if running.as_array().is_none_or(Vec::is_empty) {
            r.problems
                .push("GET /v2/deployments: no deployment listed while one runs".into());
        }
        let dep = running[0]["id"].as_str().unwrap_or("none").to_string();
        r.read(
            M::DELETE,
            &format!("/v2/deployments/{dep}"),
            Value::Null,
            200,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;
        let dep = r
            .read(M::GET, "/v2/deployments", Value::Null, 200, "steps[]")
            .await[0]["id"]
            .as_str()
            .unwrap_or("none")
            .to_string();
        r.read(
            M::DELETE,
            &format!("/v2/deployments/{dep}?force=true"),
            Value::Null,
            202,
            "none",
        )
        .await;

        // Groups.
        let group = json!({"id": "/shop", "apps": [
            {"id": "db", "cmd": "sleep 600"},
            {"id": "api", "cmd": "sleep 600", "dependencies": ["db"]}
        ], "groups": [{"id": "tools", "dependencies": ["/shop/db"]}]});
        r.read(
            M::POST,
            "/v2/groups",
            group.clone(),
            201,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;
        r.read(
            M::GET,
            "/v2/groups",
            Value::Null,
            200,
            "group.raml#GroupInfo",
        )
        .await;
        r.read(
            M::GET,
            "/v2/groups/shop?embed=group.apps&embed=group.apps.tasks&embed=group.groups",
            Value::Null,
            200,
            "group.raml#GroupInfo",
        )
        .await;
        r.read(
            M::GET,
            "/v2/groups/shop/versions",
            Value::Null,
            200,
            "versions",
        )
        .await;
        r.read(M::GET, "/v2/deployments", Value::Null, 200, "steps[]")
            .await;
        r.read(
            M::PUT,
            "/v2/groups/shop?dryRun=true",
            json!({"apps": [{"id": "db", "cmd": "sleep 601"}]}),
            200,
            "deploymentSteps.raml#DeploymentSteps",
        )
        .await;
        r.read(
            M::PUT,
            "/v2/groups/shop",
            json!({"scaleBy": 2}),
            200,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;
        r.read(
            M::POST,
            "/v2/groups",
            group.clone(),
            409,
            "error.raml#Error",
        )
        .await;
        r.read(
            M::DELETE,
            "/v2/groups/shop",
            Value::Null,
            200,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;

        // Kills.
        r.read(
            M::DELETE,
            "/v2/apps/web/tasks/web.t1",
            Value::Null,
            200,
            "task.raml#TaskSingle",
        )
        .await;
        put_task(&store, &task).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        r.read(
            M::DELETE,
            "/v2/apps/web/tasks",
            Value::Null,
            200,
            "task.raml#TaskList",
        )
        .await;
        put_task(&store, &task).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        r.read(
            M::POST,
            "/v2/tasks/delete",
            json!({"ids": ["web.t1"]}),
            200,
            "task.raml#TaskList",
        )
        .await;
        put_task(&store, &task).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        r.read(
            M::DELETE,
            "/v2/apps/web/tasks/web.t1?scale=true",
            Value::Null,
            200,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;

        // Errors.
        r.read(
            M::GET,
            "/v2/apps/nope",
            Value::Null,
            404,
            "error.raml#Error",
        )
        .await;
        r.read(
            M::POST,
            "/v2/apps",
            json!({"id": "/bad", "cmd": "x", "cpus": -1}),
            422,
            "error.raml#Error",
        )
        .await;
        r.read(M::POST, "/v2/apps", app.clone(), 409, "error.raml#Error")
            .await;
        r.read(
            M::GET,
            "/v2/groups/nope",
            Value::Null,
            404,
            "error.raml#Error",
        )
        .await;
        r.read(
            M::DELETE,
            "/v2/deployments/nope",
            Value::Null,
            404,
            "error.raml#Error",
        )
        .await;

        r.read(
            M::DELETE,
            "/v2/apps/web",
            Value::Null,
            200,
            "deploymentResult.raml#DeploymentResult",
        )
        .await;
        r.read(
            M::DELETE,
            "/v2/leader",
            Value::Null,
            200,
            "stringTypes.raml#Message",
        )
        .await;
        assert!(r.routes >= 40, "{} answers read", r.routes);
        assert!(
            r.problems.is_empty(),
            "{} problems:\n{}",
            r.problems.len(),
            r.problems.join("\n")
        );
        shutdown.cancel();
    }
}

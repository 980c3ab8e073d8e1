//! The dashboard in a real browser: Debian's chromium, headless, driven over WebDriver by
//! Debian's chromedriver, both in the agent's namespace (so the page is served on its
//! loopback and nothing the browser sends leaves it). Each page is checked against the API's
//! answers, an app is scaled and a task killed from the page and the page follows live, and a
//! screenshot of every page is saved under the test's output directory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Agent, NetNs, wait_until};

const NODE_IP: &str = "192.0.2.10";
const TOKEN: &str = "ui-test-token";
/// chromedriver's port, on the namespace's own loopback.
const DRIVER: &str = "http://127.0.0.1:9515";
/// What the page's element ids and data attributes are looked up by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless chromium session through chromedriver. Dropping it ends the session and the
/// driver's whole process group (the driver and the browser it started), by the driver's PID.
struct Browser {
    driver: Child,
    session: String,
    http: ureq::Agent,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        let driver = Command::new("chromedriver")
            .args(["--port=9515", "--allowed-ips=127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting chromedriver (Debian's chromium-driver)");
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            session: String::new(),
            http,
            _profile: profile,
        };
        let up = wait_until(Duration::from_secs(10), || {
            browser
                .http
                .get(format!("{DRIVER}/status"))
                .call()
                .is_ok_and(|r| r.status() == 200)
        });
        assert!(up, "chromedriver did not answer on {DRIVER}");
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,900",
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": args.iter().map(|a| a.to_string())
                    .chain([format!("--user-data-dir={}", browser._profile.path().display())])
                    .collect::<Vec<_>>(),
            },
        }}});
        let v = browser.call("POST", "/session", Some(caps));
        browser.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        browser
    }

    /// A WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.try_call(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    /// A WebDriver command; its status and whole answer.
    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{DRIVER}{path}");
        let resp = match method {
            "GET" => self.http.get(&url).call(),
            "DELETE" => self.http.delete(&url).call(),
            _ => self.http.post(&url).send_json(body.unwrap_or(json!({}))),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_json().unwrap_or(Value::Null))
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({"url": url})));
    }

    /// Runs `script` in the page (a function body; `return` gives the value).
    fn js(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Polls `script` until it returns something truthy (not null, false, 0, "" or []), up to
    /// 20 s; that value.
    fn wait_for(&self, what: &str, script: &str) -> Value {
        let mut last = Value::Null;
        let shown = wait_until(Duration::from_secs(20), || {
            last = self.js(script);
            match &last {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                Value::Object(_) => true,
            }
        });
        assert!(
            shown,
            "the page never showed {what}; main is: {}; toasts: {}",
            self.js("return document.getElementById('main').innerText"),
            self.js("return document.getElementById('toasts').innerText")
        );
        last
    }

    fn element(&self, css: &str) -> String {
        let v = self.session_call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    /// A real click (through the browser's input, as a user's). The page redraws its rows
    /// as the state changes: an element redrawn between finding and clicking it is found
    /// again, as a user would click the row they see.
    fn click(&self, css: &str) {
        for _ in 0..5 {
            let id = self.element(css);
            let path = format!("/session/{}/element/{id}/click", self.session);
            let (status, v) = self.try_call("POST", &path, None);
            if status == 200 {
                return;
            }
            assert_eq!(
                v["value"]["error"], "stale element reference",
                "POST {path}: {v}"
            );
        }
        panic!("{css} was redrawn before each of 5 clicks");
    }

    /// Clears the input at `css` and types `text` into it.
    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.session_call("POST", &format!("/element/{id}/clear"), None);
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        );
    }

    /// Saves a PNG of the window, after checking that the page showed no error.
    fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let errors = self.js(
            "return [...document.querySelectorAll('.toast.bad')].map(t => t.innerText).join('; ')",
        );
        assert_eq!(errors, "", "the page showed an error");
        let png = self.session_call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a base64 PNG"))
            .expect("valid base64");
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .http
                .delete(format!("{DRIVER}/session/{}", self.session))
                .call();
        }
        // The driver leads its own group, and the browser it started is in it.
        let pgid = nix::unistd::Pid::from_raw(self.driver.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

/// Where the screenshots go: the test's output directory under the target dir.
fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Numbers the page shows in `tr[data-app=ID] td[data-field=FIELD]`.
fn app_field(app: &str, field: &str) -> String {
    format!(
        "const c = document.querySelector('tr[data-app=\"{app}\"] td[data-field=\"{field}\"]'); return c && c.innerText;"
    )
}

#[test]
fn the_dashboard_shows_every_page_as_the_api_answers_and_acts_through_it() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (make test)"
    );
    let ns = NetNs::new("ui");
    ns.add_node_address("node0", &format!("{NODE_IP}/24"));
    ns.enter();
    let mut agent = Agent::start_with(
        &ns,
        NODE_IP,
        &format!(
            "[api]\nlisten = \"127.0.0.1:8080\"\ntoken = \"{TOKEN}\"\n[l4lb]\ndata_plane = \"ebpf\"\n"
        ),
    );
    agent.token = Some(TOKEN.into());
    agent.put_and_wait("/web", &crate::l4lb::web(2));
    agent.put_and_wait(
        "/batch/worker",
        &json!({"id": "/batch/worker", "cmd": "exec sleep 600", "cpus": 0.05, "mem": 16}),
    );
    // One that can never be placed: the apps page says why it waits.
    let (status, v) = agent
        .http(
            "PUT",
            "/v2/apps/huge",
            Some(r#"{"id": "/huge", "cmd": "exec sleep 600", "cpus": 64, "mem": 16}"#),
        )
        .unwrap();
    assert!(status == 200 || status == 201, "{status}: {v}");
    let dir = shots();
    let browser = Browser::start();
    let base = "http://127.0.0.1:8080/ui/";

    // Without the token the page asks for it and shows nothing of the cluster.
    browser.goto(&format!("{base}#/apps"));
    browser.wait_for(
        "the token dialog",
        "return document.getElementById('token').open",
    );
    let rows = browser.js("return document.querySelectorAll('tr[data-app]').length");
    assert_eq!(rows, 0);
    // A link that carries the token in its fragment (no server sees it), which the page
    // keeps for the tab and takes out of the address.
    browser.goto(&format!("{base}#/apps?token={TOKEN}"));
    browser.js("location.reload()");

    // Apps: the same apps and counts as /v1/apps.
    let api = agent.get("/v1/apps");
    let apps = api["apps"].as_array().unwrap();
    let shown = browser.wait_for(
        "three apps",
        "const r = [...document.querySelectorAll('tr[data-app]')].map(r => r.dataset.app); return r.length === 3 && r",
    );
    let ids: Vec<&str> = apps.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(shown, json!(ids));
    assert_eq!(browser.js(&app_field("/web", "running")), "2");
    assert!(
        !location_has_token(&browser),
        "the token stays in the address"
    );
    let huge = browser.wait_for(
        "why /huge waits",
        "const r = document.querySelector('tr[data-app=\"/huge\"]'); return r && r.innerText.includes('waits:') && r.innerText",
    );
    assert!(
        huge.as_str().unwrap().contains("cpus"),
        "the reason names the resource: {huge}"
    );
    let huge_api = &apps.iter().find(|a| a["id"] == "/huge").unwrap()["waiting"];
    assert!(huge_api.is_string(), "{api}");
    browser.screenshot(&dir.join("apps.png"));

    // Scale /web to 3 from the page; the page follows without being loaded again.
    browser.js("window.__sameDocument = true");
    browser.click("tr[data-app=\"/web\"] button[data-action=\"scale\"]");
    browser.wait_for(
        "the scale dialog",
        "return document.getElementById('confirm').open",
    );
    browser.type_into("#confirm-input", "3");
    browser.click("#confirm-ok");
    browser.wait_for(
        "3 running tasks of /web",
        &app_field("/web", "running").replace(
            "return c && c.innerText;",
            "return c && c.innerText === '3';",
        ),
    );
    assert_eq!(browser.js("return window.__sameDocument === true"), true);
    assert_eq!(agent.get("/v2/apps/web")["app"]["instances"], 3);
    assert_eq!(agent.running("/web").len(), 3);

    // An app's tasks: the same tasks as the API, with node, address and health.
    browser.goto(&format!("{base}#/apps/web"));
    let tasks = agent.running("/web");
    let shown = browser.wait_for(
        "the tasks of /web",
        "const r = [...document.querySelectorAll('tr[data-task]')]; return r.length === 3 && r.map(r => r.innerText)",
    );
    for task in &tasks {
        let ip = task["ipAddresses"][0]["ipAddress"].as_str().unwrap();
        let id = task["id"].as_str().unwrap();
        let row = shown
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r.as_str().unwrap().contains(id))
            .unwrap_or_else(|| panic!("{id} is not on the page: {shown}"));
        let row = row.as_str().unwrap();
        assert!(
            row.contains(ip) && row.contains("node-1") && row.contains("running"),
            "{row}"
        );
    }
    browser.wait_for(
        "every task healthy",
        "return [...document.querySelectorAll('tr[data-task]')].filter(r => r.innerText.includes('healthy') && !r.innerText.includes('unhealthy')).length === 3",
    );
    browser.screenshot(&dir.join("app-tasks.png"));

    // Kill one from the page: the API marks it killed by the user, the app replaces it, and
    // the page shows the replacement.
    let victim = tasks[0]["id"].as_str().unwrap().to_string();
    browser.click(&format!(
        "tr[data-task=\"{victim}\"] button[data-action=\"kill\"]"
    ));
    browser.wait_for(
        "the kill dialog",
        "return document.getElementById('confirm').open",
    );
    browser.click("#confirm-ok");
    let replaced = wait_until(Duration::from_secs(30), || {
        let running = agent.running("/web");
        running.len() == 3 && running.iter().all(|t| t["id"] != victim.as_str())
    });
    assert!(replaced, "{:?}", agent.tasks("/web"));
    let killed = agent
        .tasks("/web")
        .into_iter()
        .find(|t| t["id"] == victim.as_str());
    if let Some(killed) = killed {
        assert_eq!(killed["killReason"], "user", "{killed}");
    }
    browser.wait_for(
        "the replacement, without the killed task running",
        &format!(
            "const r = [...document.querySelectorAll('tr[data-task]')]; const running = r.filter(x => x.querySelector('td[data-field=state]').innerText === 'running'); return running.length === 3 && !running.some(x => x.dataset.task === '{victim}')"
        ),
    );

    // VIPs: the address, data plane and backends that /v1/vips serves.
    let vips = agent.get("/v1/vips");
    let vip = &vips[0];
    browser.goto(&format!("{base}#/vips"));
    let ip = format!("{}:{}", vip["ip"].as_str().unwrap(), vip["port"]);
    let row = browser.wait_for(
        "the VIP with 3 healthy backends",
        "const r = document.querySelector('tr[data-vip]'); return r && (r.innerText.match(/healthy/g) || []).length >= 3 && r.innerText",
    );
    let row = row.as_str().unwrap();
    assert!(
        row.contains(&ip) && row.contains("ebpf") && row.contains("/web"),
        "{row} vs {vips}"
    );
    browser.screenshot(&dir.join("vips.png"));

    // DNS: records served as /v1/records counts them, and a lookup answered by the agent's
    // own server: the VIP for web.marathon.l4lb.
    let records = agent.get("/v1/records");
    browser.goto(&format!("{base}#/dns"));
    browser.wait_for(
        "the record count",
        &format!(
            "return document.querySelector('.card b') && document.querySelector('.card b').innerText === '{}'",
            records["count"]
        ),
    );
    browser.type_into("#lookup input[name=name]", "web.marathon.l4lb");
    browser.click("#lookup button");
    let answer = browser.wait_for(
        "the lookup's answer",
        "const r = document.getElementById('lookup-result'); return r && r.innerText",
    );
    let answer = answer.as_str().unwrap();
    assert!(
        answer.contains(vip["ip"].as_str().unwrap()) && answer.contains("authoritative"),
        "{answer}"
    );
    browser.screenshot(&dir.join("dns.png"));

    // Nodes: this node, its resources in use as /v1/nodes counts them, and the leader.
    let nodes = agent.get("/v1/nodes");
    browser.goto(&format!("{base}#/nodes"));
    let row = browser.wait_for(
        "node-1",
        "const r = document.querySelector('tr[data-node=\"node-1\"]'); return r && r.innerText",
    );
    let row = row.as_str().unwrap();
    let used = nodes["nodes"][0]["used"]["tasks"].as_u64().unwrap();
    let subnet = nodes["nodes"][0]["subnet"].as_str().unwrap();
    assert!(
        row.contains("leader")
            && row.contains(NODE_IP)
            && row.contains(subnet)
            && row.contains(&format!("\t{used}\t")),
        "{row} vs {nodes}"
    );
    browser.screenshot(&dir.join("nodes.png"));

    // Deployments: every one the API lists, the scale and the kill's among them.
    let deployments = agent.get("/v1/deployments?all=true");
    browser.goto(&format!("{base}#/deployments"));
    let count = deployments.as_array().unwrap().len();
    browser.wait_for(
        "every deployment",
        &format!("return document.querySelectorAll('tr[data-deployment]').length === {count}"),
    );
    let huge_row = browser.js(
        "return [...document.querySelectorAll('tr[data-deployment]')].map(r => r.innerText).find(t => t.includes('/huge'))",
    );
    assert!(
        huge_row
            .as_str()
            .is_some_and(|r| r.contains("running") && r.contains("waits:")),
        "{huge_row}"
    );
    browser.screenshot(&dir.join("deployments.png"));

    // The CLI kills through the same route, and names a task it does not know.
    let worker = agent.running("/batch/worker").remove(0);
    let worker = worker["id"].as_str().unwrap();
    let (ok, out, err) = agent.cli(&["task", "kill", worker]);
    assert!(ok, "{err}");
    assert!(
        out.contains(worker) && out.contains("/batch/worker"),
        "{out}"
    );
    // With --scale the app goes down by it instead of replacing it.
    let web_task = agent.running("/web").remove(0);
    let web_task = web_task["id"].as_str().unwrap();
    let (ok, out, err) = agent.cli(&["task", "kill", web_task, "--scale"]);
    assert!(ok && out.contains("scaling it down"), "{out}{err}");
    assert_eq!(agent.get("/v2/apps/web")["app"]["instances"], 2);
    let (ok, _, err) = agent.cli(&["task", "kill", "no.such.task"]);
    assert!(!ok && err.contains("no task `no.such.task`"), "{err}");
    let killed = agent
        .tasks("/batch/worker")
        .into_iter()
        .find(|t| t["id"] == worker);
    assert!(
        killed.is_none_or(|t| t["killReason"] == "user"),
        "{:?}",
        agent.tasks("/batch/worker")
    );

    // The page's files need no token, and say what the page may load; the API still asks.
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let page = http.get(base).call().unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    let refused = http.get("http://127.0.0.1:8080/v1/apps").call().unwrap();
    assert_eq!(refused.status(), 401);

    // The agent goes away: the page says so, keeps what it showed, and comes back with it.
    browser.goto(&format!("{base}#/apps"));
    browser.wait_for(
        "live",
        "return document.getElementById('live').dataset.state === 'live'",
    );
    agent.stop(nix::sys::signal::Signal::SIGTERM);
    browser.wait_for(
        "unreachable",
        "return document.getElementById('live').dataset.state === 'down' && !document.getElementById('banner').hidden",
    );
    assert_eq!(
        browser.js("return document.querySelectorAll('tr[data-app]').length"),
        3
    );
    browser.screenshot(&dir.join("unreachable.png"));
    agent.restart();
    browser.wait_for(
        "live again",
        "return document.getElementById('live').dataset.state === 'live' && document.getElementById('banner').hidden",
    );
    eprintln!("dashboard screenshots: {}", dir.display());
}

fn location_has_token(browser: &Browser) -> bool {
    browser.js("return location.href.includes('token=')") == true
}

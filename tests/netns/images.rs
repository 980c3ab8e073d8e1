//! Tasks from images: a registry from Debian's `docker-registry` with htpasswd auth on the
//! node namespace's loopback, an image built from Debian's `busybox-static` with `umoci` and
//! pushed with `skopeo`; pulls, failures, the OCI runtime, `fetch` and persistent volumes.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Agent, NetNs, wait_until};

const NODE_IP: &str = "192.0.2.10";
const USER: &str = "dcnet";
const PASSWORD: &str = "s3cret";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A registry on the loopback of the namespace this thread is in, on 0.0.0.0:5000 (so that
/// 127.0.0.1 and 127.0.0.2 both reach it), with htpasswd auth; killed by its pid on drop.
struct Registry {
    dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = run(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]));
        fs::write(dir.path().join("htpasswd"), htpasswd).unwrap();
        let config = format!(
            "version: 0.1\nlog: {{ level: warn }}\nstorage: {{ filesystem: {{ rootdirectory: {root} }} }}\n\
             http: {{ addr: 0.0.0.0:5000 }}\nauth: {{ htpasswd: {{ realm: dcnet-test, path: {pw} }} }}\n",
            root = dir.path().join("data").display(),
            pw = dir.path().join("htpasswd").display(),
        );
        fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (Debian's docker-registry package)");
        let up = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect("127.0.0.1:5000").is_ok()
        });
        assert!(up, "the registry did not listen");
        Registry { dir, child }
    }

    /// Pushes an OCI layout's `tag` as `name` (`busybox:1`).
    fn push(&self, layout: &Path, tag: &str, name: &str) {
        self.push_as(layout, tag, name, "oci");
    }

    /// Pushes with the manifest format `format`: `oci`, or `v2s2` (Docker's schema 2).
    fn push_as(&self, layout: &Path, tag: &str, name: &str, format: &str) {
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--format",
            format,
            "--dest-creds",
            &format!("{USER}:{PASSWORD}"),
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://127.0.0.1:5000/{name}"),
        ]));
    }

    /// The blob files the registry keeps.
    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OCI layout with the image `scripts/busybox-image.sh` builds (tag `bb`: busybox, a user
/// `www`, the entrypoint `/bin/serve`), and a second tag `extra` with one more layer.
fn build_image(at: &Path) -> PathBuf {
    let layout = at.join("oci");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/busybox-image.sh");
    run(Command::new(script).arg(&layout));
    let bundle = at.join("bundle2");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:bb", layout.display()))
        .arg(&bundle));
    fs::write(bundle.join("rootfs/www/extra"), vec![b'x'; 300_000]).unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image"])
        .arg(format!("{}:extra", layout.display()))
        .arg(&bundle));
    layout
}

/// The digest of the top layer of `tag` in an OCI layout.
fn top_layer(layout: &Path, tag: &str) -> String {
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(manifest)).unwrap())
            .unwrap();
    manifest["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn registries(bad_host: bool) -> String {
    let mut out = format!(
        "[[images.registries]]\nhost = \"127.0.0.1:5000\"\nusername = \"{USER}\"\npassword = \"{PASSWORD}\"\ninsecure = true\n"
    );
    if bad_host {
        out.push_str(&format!(
            "[[images.registries]]\nhost = \"127.0.0.2:5000\"\nusername = \"{USER}\"\npassword = \"wrong\"\ninsecure = true\n"
        ));
    }
    out
}

/// A node namespace with a registry that holds `busybox:1` (and `busybox:extra`), and an
/// agent that knows the registry.
fn node(tag: &str) -> (NetNs, Registry, tempfile::TempDir, PathBuf, Agent) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the netns tests need root (make test)"
    );
    let ns = NetNs::new(tag);
    ns.add_node_address("node0", &format!("{NODE_IP}/24"));
    ns.enter();
    let registry = Registry::start();
    let build = tempfile::tempdir().unwrap();
    let layout = build_image(build.path());
    registry.push(&layout, "bb", "busybox:1");
    registry.push_as(&layout, "bb", "busybox:docker", "v2s2");
    registry.push(&layout, "extra", "busybox:extra");
    let agent = Agent::start_with(&ns, NODE_IP, &registries(true));
    (ns, registry, build, layout, agent)
}

/// Runs `args` inside a task's container (the OCI runtime's `exec`).
fn in_container(agent: &Agent, task: &str, args: &[&str]) -> String {
    let id: String = task
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let runtime = dcnet_node_core::runtime::pick_oci_runtime(None).expect("crun or runc");
    let out = Command::new(runtime)
        .arg("--root")
        .arg(agent.dir.path().join("state/oci"))
        .arg("exec")
        .arg(&id)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exec {args:?} in {task}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn web(id: &str, image: &str, instances: u32) -> Value {
    json!({
        "id": id, "instances": instances, "cpus": 0.1, "mem": 64,
        "container": {
            "type": "DOCKER",
            "docker": {"image": image},
            "portMappings": [{"containerPort": 8080, "name": "http", "labels": {"VIP_0": "/img-web:80"}}]
        },
        "networks": [{"mode": "container"}],
        "env": {"PORT": "8080"},
        "healthChecks": [{"protocol": "MESOS_HTTP", "portIndex": 0, "path": "/", "gracePeriodSeconds": 10, "intervalSeconds": 1, "timeoutSeconds": 1}]
    })
}

#[test]
fn an_app_from_an_image_runs_its_entrypoint_resolves_its_vip_and_is_reached_through_it() {
    let (_ns, _registry, _build, _layout, mut agent) = node("img");
    agent.put_and_wait("/img/web", &web("/img/web", "127.0.0.1:5000/busybox:1", 2));
    let tasks = agent.running("/img/web");
    assert_eq!(tasks.len(), 2);
    // Two tasks, one pull: the second waited for the first's.
    assert_eq!(agent.metric("images_pulls_total{result=\"pulled\"}"), 1.0);
    let id = tasks[0]["id"].as_str().unwrap();
    // The image's entrypoint runs with the image's env under the task's.
    let page = in_container(&agent, id, &["cat", "/www/index.html"]);
    assert!(
        page.contains(&format!("hello from {id} mode image")),
        "{page}"
    );
    // The container resolves the VIP's name with its own resolv.conf and reaches it.
    let dns = in_container(&agent, id, &["nslookup", "img-web.marathon.l4lb"]);
    assert!(
        dns.contains("Address: 198.18.") || dns.contains("Address: 198.19."),
        "{dns}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        // busybox's nc: its wget crashes in a static build without NSS modules.
        let body = in_container(
            &agent,
            id,
            &[
                "sh",
                "-c",
                "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 img-web.marathon.l4lb 80",
            ],
        );
        if let Some(task) = body
            .lines()
            .last()
            .and_then(|l| l.split_whitespace().nth(2))
        {
            seen.insert(task.to_string());
        }
    }
    assert_eq!(seen.len(), 2, "the VIP reaches both tasks: {seen:?}");
    // Docker's capabilities, not the node's; the container's own hostname, hosts and PID 1.
    let status = in_container(&agent, id, &["cat", "/proc/self/status"]);
    assert!(status.contains("CapEff:\t00000000a80425fb"), "{status}");
    let hostname = in_container(&agent, id, &["hostname"]);
    assert_eq!(hostname.trim(), "web-img");
    let hosts = in_container(&agent, id, &["cat", "/etc/hosts"]);
    let ip = tasks[0]["ipAddresses"][0]["ipAddress"].as_str().unwrap();
    assert!(hosts.contains(&format!("{ip}\tweb-img")), "{hosts}");
    // Seccomp refuses what the capabilities allow but Docker's profile does not: a user
    // namespace (unprivileged elsewhere on this kernel).
    let userns = in_container(
        &agent,
        id,
        &[
            "sh",
            "-c",
            "unshare -U true 2>&1 && echo made || echo refused",
        ],
    );
    assert!(userns.trim_end().ends_with("refused"), "{userns}");
    let init = in_container(&agent, id, &["cat", "/proc/1/cmdline"]);
    assert!(init.starts_with("httpd"), "{init:?}");
    // Nothing of the image is mounted on the node: the overlay lives in the task's mount
    // namespace.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = agent.dir.path().display().to_string();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(" - overlay ") && l.contains(&dir)),
        "an overlay of the agent's is mounted on the node"
    );
    // ...while the task's own mount namespace has it as its root.
    let root = in_container(&agent, id, &["cat", "/proc/self/mountinfo"]);
    assert!(
        root.lines().next().unwrap_or_default().contains(" / / "),
        "{root}"
    );
    assert!(root.contains(" - overlay overlay "), "{root}");
    // An agent that crashes and comes back adopts the containers as they run.
    let before: std::collections::BTreeSet<String> = tasks
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    agent.crash_and_restart();
    // Long enough for a restarted agent to find a task gone and say so.
    std::thread::sleep(Duration::from_secs(3));
    let after: std::collections::BTreeSet<String> = agent
        .running("/img/web")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(before, after, "the containers were not adopted");
    let page = in_container(&agent, id, &["cat", "/www/index.html"]);
    assert!(page.contains(id), "{page}");
    // Gone means gone: the OCI runtime's state and every cgroup of the tasks.
    let (status, _) = agent.http("DELETE", "/v2/apps/img/web", None).unwrap();
    assert_eq!(status, 200);
    let oci = agent.dir.path().join("state/oci");
    let clean = wait_until(Duration::from_secs(30), || {
        agent.get("/v2/tasks")["tasks"]
            .as_array()
            .is_some_and(Vec::is_empty)
            && fs::read_dir(&oci).map_or(true, |d| d.count() == 0)
            && agent.cgroup_dirs().is_empty()
    });
    assert!(
        clean,
        "left: {:?} {:?}",
        fs::read_dir(&oci).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>()),
        agent.cgroup_dirs()
    );
}

/// The message of the app's last task failure, once there is one.
fn failure(agent: &Agent, app: &str) -> String {
    let mut message = String::new();
    wait_until(Duration::from_secs(30), || {
        let v = agent.get(&format!("/v2/apps/{}", app.trim_matches('/')));
        message = v["app"]["lastTaskFailure"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        !message.is_empty()
    });
    message
}

fn sleeper(id: &str, image: &str) -> Value {
    json!({
        "id": id, "cpus": 0.1, "mem": 32, "cmd": "sleep 600",
        "container": {"docker": {"image": image}},
        "networks": [{"mode": "container"}],
        "backoffSeconds": 60
    })
}

#[test]
fn a_wrong_password_a_missing_tag_and_a_corrupted_blob_fail_with_the_reason_and_leave_no_layer() {
    let (_ns, registry, _build, layout, agent) = node("imgbad");
    let cases = [
        (
            "/bad/password",
            "127.0.0.2:5000/busybox:1",
            "refused the credentials",
        ),
        (
            "/bad/tag",
            "127.0.0.1:5000/busybox:nope",
            "no such image or tag",
        ),
    ];
    for (app, image, why) in cases {
        let (status, v) = agent
            .http(
                "PUT",
                &format!("/v2/apps{app}"),
                Some(&sleeper(app, image).to_string()),
            )
            .unwrap();
        assert!(status == 200 || status == 201, "{v}");
        let message = failure(&agent, app);
        assert!(
            message.contains(why) && message.contains(image),
            "{app}: {message}"
        );
        assert!(
            !message.contains(PASSWORD) && !message.contains("wrong"),
            "{message}"
        );
    }
    // Corrupt the extra layer's blob in the registry: same size, other bytes.
    let digest = top_layer(&layout, "extra");
    let data = registry.blob_data(&digest);
    let mut bytes = fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&data, bytes).unwrap();
    let app = "/bad/blob";
    let (status, _) = agent
        .http(
            "PUT",
            &format!("/v2/apps{app}"),
            Some(&sleeper(app, "127.0.0.1:5000/busybox:extra").to_string()),
        )
        .unwrap();
    assert!(status == 200 || status == 201);
    let message = failure(&agent, app);
    assert!(message.contains("does not match its digest"), "{message}");
    let store = agent.dir.path().join("state/images");
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        !store.join("layers").join(hex).exists(),
        "a corrupt layer was kept"
    );
    let tmp: Vec<_> = fs::read_dir(store.join("tmp")).unwrap().flatten().collect();
    assert!(tmp.is_empty(), "half-done work left: {tmp:?}");
    // The good base layer that came with it is whole, and no container or address is held.
    assert!(agent.cgroup_dirs().is_empty(), "{:?}", agent.cgroup_dirs());
}

/// A tar entry written as a hostile producer would (raw name fields: `tar` itself refuses
/// `..` in `set_path`).
fn raw_entry(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    link: &str,
    body: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(body.len() as u64);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    tar.append(&h, body).unwrap();
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// A tar entry: its path, its kind and what it links to.
type Entry<'a> = (&'a str, tar::EntryType, &'a str);

/// An OCI layout (written by hand, as any producer may) whose one image `tag` has one layer
/// made of `entries`; returns the layer's digest.
fn hostile_image(layout: &Path, tag: &str, entries: &[Entry<'_>]) -> String {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, kind, link) in entries {
        let body: &[u8] = if *kind == tar::EntryType::Regular {
            b"owned\n"
        } else {
            b""
        };
        raw_entry(&mut tar, path, *kind, link, body);
    }
    let plain = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    let layer = gz.finish().unwrap();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&plain)]}
    })
    .to_string()
    .into_bytes();
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = sha256(bytes);
        fs::write(blobs.join(digest.trim_start_matches("sha256:")), bytes).unwrap();
        digest
    };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(&layer), "size": layer.len()}]
    })
    .to_string()
    .into_bytes();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(&manifest), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }]
    });
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
    sha256(&layer)
}

#[test]
fn layers_that_reach_outside_are_refused_and_write_nothing_outside_the_store() {
    let (_ns, registry, build, _layout, agent) = node("imgevil");
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().display().to_string();
    let dotdot = format!("../../../../../../../..{target}/dotdot");
    let cases: Vec<(&str, Vec<Entry<'_>>, &str)> = vec![
        (
            "dotdot",
            vec![(dotdot.as_str(), tar::EntryType::Regular, "")],
            "leaves the layer",
        ),
        (
            "symlink",
            vec![
                ("escape", tar::EntryType::Symlink, target.as_str()),
                ("escape/owned", tar::EntryType::Regular, ""),
            ],
            "through the symlink",
        ),
        (
            "hardlink",
            vec![(
                "passwd",
                tar::EntryType::Link,
                "../../../../../../etc/passwd",
            )],
            "leaves the layer",
        ),
    ];
    for (name, entries, why) in cases {
        let layout = build.path().join(format!("evil-{name}"));
        let digest = hostile_image(&layout, name, &entries);
        registry.push(&layout, name, &format!("evil:{name}"));
        let app = format!("/evil/{name}");
        let image = format!("127.0.0.1:5000/evil:{name}");
        let (status, v) = agent
            .http(
                "PUT",
                &format!("/v2/apps{app}"),
                Some(&sleeper(&app, &image).to_string()),
            )
            .unwrap();
        assert!(status == 200 || status == 201, "{v}");
        let message = failure(&agent, &app);
        assert!(message.contains(why), "{name}: {message}");
        let store = agent.dir.path().join("state/images");
        assert!(
            !store
                .join("layers")
                .join(digest.trim_start_matches("sha256:"))
                .exists(),
            "{name}: the layer was kept"
        );
        assert_eq!(
            fs::read_dir(store.join("tmp")).unwrap().count(),
            0,
            "{name}"
        );
    }
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        0,
        "a layer wrote outside the store"
    );
    assert!(fs::read_to_string("/etc/passwd").unwrap().contains("root:"));
}

/// A loopback HTTP server that serves `body` for any path and counts the requests.
fn artifact_server(body: Vec<u8>) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            counter.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/gzip\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    (port, hits)
}

fn site_tgz() -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let body = b"fetched and extracted\n";
    let mut h = tar::Header::new_gnu();
    h.set_path("site/hello.txt").unwrap();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    tar.append(&h, &body[..]).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

#[test]
fn fetch_extracts_into_the_sandbox_from_a_cache_and_a_persistent_volume_outlives_kills_and_updates()
{
    let (_ns, _registry, _build, _layout, agent) = node("imgvol");
    let (port, hits) = artifact_server(site_tgz());
    let conf = tempfile::tempdir().unwrap();
    fs::write(conf.path().join("app.conf"), "from the node\n").unwrap();
    let conf_dir = conf.path().display().to_string();
    let def = |marker: &str| {
        json!({
            "id": "/img/store", "cpus": 0.1, "mem": 32,
            "cmd": "test -f $MESOS_SANDBOX/site/hello.txt && echo $MARKER >> $MESOS_SANDBOX/data/log && exec sleep 600",
            "env": {"MARKER": marker},
            "fetch": [{"uri": format!("http://127.0.0.1:{port}/site.tgz"), "cache": true}],
            "container": {
                "type": "MESOS",
                "docker": {"image": "127.0.0.1:5000/busybox:docker"},
                "volumes": [
                    {"containerPath": "data", "mode": "RW", "persistent": {"size": 16}},
                    {"containerPath": "/etc/conf", "hostPath": conf_dir, "mode": "RO"}
                ]
            },
            "networks": [{"mode": "container"}]
        })
    };
    agent.put_and_wait("/img/store", &def("first"));
    let task = agent.running("/img/store")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sandbox = agent.dir.path().join("state/sandboxes").join(&task);
    assert_eq!(
        fs::read_to_string(sandbox.join("site/hello.txt")).unwrap(),
        "fetched and extracted\n"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let log = |t: &str| in_container(&agent, t, &["cat", "/mnt/mesos/sandbox/data/log"]);
    assert_eq!(log(&task), "first\n");
    // A node path, read-only (the image came with Docker's manifest format).
    assert_eq!(
        in_container(&agent, &task, &["cat", "/etc/conf/app.conf"]),
        "from the node\n"
    );
    let written = in_container(
        &agent,
        &task,
        &[
            "sh",
            "-c",
            "echo x > /etc/conf/new 2>&1 && echo wrote || echo refused",
        ],
    );
    assert_eq!(written.trim(), "refused");
    assert!(!conf.path().join("new").exists());
    // A killed task's replacement finds the volume as it was, and the artifact in the cache.
    let (status, _) = agent
        .http("DELETE", &format!("/v2/apps/img/store/tasks/{task}"), None)
        .unwrap();
    assert_eq!(status, 200);
    let mut next = String::new();
    let replaced = wait_until(Duration::from_secs(60), || {
        next = agent
            .running("/img/store")
            .first()
            .and_then(|t| t["id"].as_str().map(String::from))
            .unwrap_or_default();
        !next.is_empty() && next != task
    });
    assert!(replaced, "no replacement for {task}");
    wait_until(Duration::from_secs(10), || log(&next).lines().count() == 2);
    assert_eq!(log(&next), "first\nfirst\n");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the cache was not used");
    // An update replaces the task; the volume stays.
    agent.put_and_wait("/img/store", &def("second"));
    let updated = agent.running("/img/store")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until(Duration::from_secs(10), || {
        log(&updated).lines().count() == 3
    });
    assert_eq!(log(&updated), "first\nfirst\nsecond\n");
    // Removing the app removes its volume.
    let volumes = agent.dir.path().join("state/volumes");
    assert_eq!(fs::read_dir(&volumes).unwrap().count(), 1);
    let (status, _) = agent.http("DELETE", "/v2/apps/img/store", None).unwrap();
    assert_eq!(status, 200);
    let gone = wait_until(Duration::from_secs(30), || {
        fs::read_dir(&volumes).unwrap().count() == 0
    });
    assert!(gone, "the volume outlived its app");
}

//! Tasks from images: the app's image is pulled into the layer store (dcnet-images), stacked
//! with overlayfs under a writable layer in the task's sandbox, and run by an OCI runtime
//! (crun or runc) from a bundle whose spec joins the network namespace, address and
//! resolv.conf the container runtime made, in a cgroup below the task's own.
//!
//! Why the overlay is mounted by `dcnet container-exec` in a mount namespace of its own rather
//! than by the agent: nothing is ever mounted on the node, so an agent that dies leaves no
//! mount behind, and the mount ends with the task's last process.
//!
//! What a task holds is in `image.json` in its sandbox, for clean-up and adoption.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcnet_images::{Artifact, Bind, Fetcher, Image, Images, RunSpec};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{LaunchSpec, RuntimeError, sandbox_err};
use crate::model::{AppId, TaskId, VolumeMode};

/// Where the sandbox appears inside a container from an image, as Mesos mounts it.
pub const SANDBOX_IN_CONTAINER: &str = "/mnt/mesos/sandbox";

#[derive(Clone, Debug)]
pub struct ImageSupport {
    images: Arc<Images>,
    fetcher: Arc<Fetcher>,
    /// `crun` or `runc`.
    oci_runtime: PathBuf,
    /// The OCI runtime's state (`--root`), one per agent.
    oci_root: PathBuf,
    /// Persistent volumes: `<dir>/<app key>/<slot>/<containerPath>`.
    volumes_dir: PathBuf,
    /// The apps with volumes on this node and their directories; read from `volumes_dir`
    /// once, then kept here, so that checking them on every state change costs no I/O.
    volume_apps: Arc<Mutex<Option<BTreeMap<AppId, PathBuf>>>>,
}

/// What an image task holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct HeldImage {
    /// The OCI runtime's container id.
    pub id: String,
    /// Layer digests, for the store's clean-up.
    pub layers: Vec<String>,
}

/// Persistent volume slots in use on this node: per app, slot to task.
#[derive(Debug, Default)]
pub(super) struct Slots(Mutex<BTreeMap<AppId, BTreeMap<u32, TaskId>>>);

impl Slots {
    /// The lowest slot of `app` below `limit` (its instances) that no other task holds.
    fn take(&self, app: &AppId, task: &TaskId, limit: u32) -> Option<u32> {
        let mut all = self.0.lock().expect("slots lock");
        let held = all.entry(app.clone()).or_default();
        let slot = (0..limit.max(1)).find(|s| !held.contains_key(s))?;
        held.insert(slot, task.clone());
        Some(slot)
    }

    /// A slot, waiting (up to `patience`) for a task that is being replaced to let go of
    /// its own: a replacement takes over the volume of the task it replaces.
    async fn wait_for(
        &self,
        app: &AppId,
        task: &TaskId,
        limit: u32,
        patience: Duration,
    ) -> Option<u32> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if let Some(slot) = self.take(app, task, limit) {
                return Some(slot);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn hold(&self, app: &AppId, slot: u32, task: &TaskId) {
        self.0
            .lock()
            .expect("slots lock")
            .entry(app.clone())
            .or_default()
            .insert(slot, task.clone());
    }

    pub(super) fn release(&self, task: &TaskId) {
        let mut all = self.0.lock().expect("slots lock");
        for held in all.values_mut() {
            held.retain(|_, t| t != task);
        }
        // Only apps with a task here keep an entry.
        all.retain(|_, held| !held.is_empty());
    }
}

/// A task's volume slot, in its sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct HeldSlot {
    pub app: AppId,
    pub slot: u32,
}

pub(super) fn held_image(sandbox: &Path) -> Option<HeldImage> {
    serde_json::from_slice(&fs::read(sandbox.join("image.json")).ok()?).ok()
}

pub(super) fn held_slot(sandbox: &Path) -> Option<HeldSlot> {
    serde_json::from_slice(&fs::read(sandbox.join("volume-slot.json")).ok()?).ok()
}

/// `text` with every character `keep` refuses replaced by `with`.
fn replace_other(text: &str, keep: impl Fn(char) -> bool, with: char) -> String {
    text.chars()
        .map(|c| if keep(c) { c } else { with })
        .collect()
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

/// A short file-system-safe key for an app id.
fn app_key(app: &AppId) -> String {
    replace_other(app.as_str().trim_matches('/'), is_name_char, '_')
        .chars()
        .take(100)
        .collect()
}

impl ImageSupport {
    pub fn new(
        images: Arc<Images>,
        fetcher: Arc<Fetcher>,
        oci_runtime: PathBuf,
        oci_root: PathBuf,
        volumes_dir: PathBuf,
    ) -> Self {
        Self {
            images,
            fetcher,
            oci_runtime,
            oci_root,
            volumes_dir,
            volume_apps: Arc::default(),
        }
    }

    /// Removes images no task uses once the store is past its limit; `in_use`: layer
    /// digests of the tasks that exist.
    pub(super) fn collect(&self, in_use: &BTreeSet<String>) {
        self.images.collect(in_use);
    }

    /// The apps with volumes on this node, read from disk the first time.
    fn with_volume_apps<R>(&self, f: impl FnOnce(&mut BTreeMap<AppId, PathBuf>) -> R) -> R {
        let mut known = self.volume_apps.lock().expect("volume apps lock");
        let apps = known.get_or_insert_with(|| {
            let Ok(entries) = fs::read_dir(&self.volumes_dir) else {
                return BTreeMap::new();
            };
            entries
                .flatten()
                .filter_map(|e| {
                    let id = fs::read_to_string(e.path().join("app")).ok()?;
                    Some((AppId::parse(id.trim()).ok()?, e.path()))
                })
                .collect()
        });
        f(apps)
    }

    /// Fetches the app's `fetch` URIs into the sandbox.
    pub(super) async fn fetch(
        &self,
        spec: &LaunchSpec,
        sandbox: &Path,
    ) -> Result<(), RuntimeError> {
        if spec.app.fetch.is_empty() {
            return Ok(());
        }
        let artifacts: Vec<Artifact> = spec
            .app
            .fetch
            .iter()
            .map(|f| Artifact {
                uri: f.uri.clone(),
                extract: f.extract,
                executable: f.executable,
                cache: f.cache,
                dest_path: f.dest_path.clone(),
            })
            .collect();
        let names: Vec<&str> = artifacts.iter().map(|a| a.uri.as_str()).collect();
        spec.staging.say(format!("fetching {}", names.join(", ")));
        self.fetcher.fetch_all(&artifacts, sandbox).await?;
        Ok(())
    }

    /// The app's volumes as binds: node paths as they are, persistent volumes from this
    /// node's volume directory (made if new). Relative container paths are in the sandbox.
    pub(super) async fn volumes(
        &self,
        spec: &LaunchSpec,
        sandbox: &Path,
        slots: &Slots,
    ) -> Result<Vec<Bind>, RuntimeError> {
        let mut binds = Vec::new();
        let slot = if spec.app.is_resident() {
            let patience = spec.app.kill_grace_period() + Duration::from_secs(30);
            let found = slots
                .wait_for(&spec.app.id, &spec.task, spec.app.instances, patience)
                .await;
            Some(found.ok_or_else(|| {
                RuntimeError::Container(format!(
                    "all {} persistent volume slots of {} on this node are held by tasks that did not end in {} s",
                    spec.app.instances.max(1),
                    spec.app.id,
                    patience.as_secs()
                ))
            })?)
        } else {
            None
        };
        for v in spec.app.volumes() {
            let destination = if v.container_path.starts_with('/') {
                v.container_path.clone()
            } else {
                format!("{SANDBOX_IN_CONTAINER}/{}", v.container_path)
            };
            let source = match (&v.host_path, &v.persistent) {
                (Some(host), _) if host.starts_with('/') => PathBuf::from(host),
                // Relative: a directory of the task's sandbox, as Mesos has it.
                (Some(host), _) => {
                    let dir = sandbox.join(host);
                    fs::create_dir_all(&dir).map_err(sandbox_err(&dir))?;
                    dir
                }
                (None, Some(_)) => {
                    let slot = slot.expect("a resident app has a slot");
                    let app_dir = self.volumes_dir.join(app_key(&spec.app.id));
                    let dir = app_dir.join(slot.to_string()).join(&v.container_path);
                    let made = !dir.exists();
                    fs::create_dir_all(&dir).map_err(sandbox_err(&dir))?;
                    fs::write(app_dir.join("app"), spec.app.id.as_str())
                        .map_err(sandbox_err(&app_dir))?;
                    self.with_volume_apps(|apps| apps.insert(spec.app.id.clone(), app_dir.clone()));
                    if made {
                        info!(task = %spec.task, volume = %dir.display(), "persistent volume created");
                    }
                    dir
                }
                (None, None) => continue,
            };
            binds.push(Bind {
                source,
                destination,
                read_only: v.mode == VolumeMode::ReadOnly,
            });
        }
        if let Some(slot) = slot {
            let held = HeldSlot {
                app: spec.app.id.clone(),
                slot,
            };
            fs::write(
                sandbox.join("volume-slot.json"),
                serde_json::to_vec(&held).expect("a slot serializes"),
            )
            .map_err(sandbox_err(sandbox))?;
        }
        Ok(binds)
    }

    /// For a task without an image: each volume whose container path is relative appears in
    /// the sandbox as a symlink to its directory (the task shares the node's filesystem).
    pub(super) fn link_volumes(&self, binds: &[Bind], sandbox: &Path) -> Result<(), RuntimeError> {
        for b in binds {
            let Some(rel) = b
                .destination
                .strip_prefix(&format!("{SANDBOX_IN_CONTAINER}/"))
            else {
                return Err(RuntimeError::Container(format!(
                    "volume {}: a task without an image mounts volumes only at paths relative to its sandbox",
                    b.destination
                )));
            };
            let link = sandbox.join(rel);
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent).map_err(sandbox_err(parent))?;
            }
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&b.source, &link).map_err(sandbox_err(&link))?;
        }
        Ok(())
    }

    /// Pulls the app's image (or finds it in the store), saying how far it is.
    pub(super) async fn pull(&self, spec: &LaunchSpec) -> Result<Image, RuntimeError> {
        let docker = spec.app.image().expect("called for an app with an image");
        let staging = spec.staging.clone();
        let last = Mutex::new((tokio::time::Instant::now(), usize::MAX));
        let image = self
            .images
            .ensure(&docker.image, docker.force_pull_image, &|p| {
                // A layer done is said at once; bytes at most once a second.
                let mut last = last.lock().expect("progress lock");
                let now = tokio::time::Instant::now();
                if p.layers_done != last.1 || now.duration_since(last.0).as_secs() >= 1 {
                    *last = (now, p.layers_done);
                    staging.say(p.to_string());
                }
            })
            .await?;
        Ok(image)
    }

    /// Writes the bundle for `image`. Returns the shim's arguments (after `container-exec`)
    /// and the OCI runtime's command line.
    #[expect(clippy::too_many_arguments, reason = "one call site, each part named")]
    pub(super) fn bundle(
        &self,
        spec: &LaunchSpec,
        image: &Image,
        sandbox: &Path,
        net: Option<(&Path, Ipv4Addr)>,
        env: &[(String, String)],
        binds: Vec<Bind>,
        resolv_conf: &Path,
        cgroup_parent: &str,
    ) -> Result<(Vec<String>, Vec<String>), RuntimeError> {
        let docker = spec.app.image().expect("called for an app with an image");
        let lowers = self.images.lower_dirs(image);
        let bundle = sandbox.join("bundle");
        let rootfs = bundle.join("rootfs");
        let upper = sandbox.join("overlay/upper");
        let work = sandbox.join("overlay/work");
        for dir in [&rootfs, &upper, &work] {
            fs::create_dir_all(dir).map_err(sandbox_err(dir))?;
        }
        let etc = sandbox.join("etc");
        fs::create_dir_all(&etc).map_err(sandbox_err(&etc))?;
        let hostname: String = replace_other(&spec.app.id.task_name(), is_name_char, '-')
            .chars()
            .take(63)
            .collect();
        let netns = net.map(|(netns, _)| netns);
        let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
        if let Some((_, ip)) = net {
            hosts.push_str(&format!("{ip}\t{hostname}\n"));
        }
        fs::write(etc.join("hosts"), hosts).map_err(sandbox_err(&etc))?;
        fs::write(etc.join("hostname"), format!("{hostname}\n")).map_err(sandbox_err(&etc))?;
        let mut all_binds = vec![
            Bind {
                source: resolv_conf.to_path_buf(),
                destination: "/etc/resolv.conf".into(),
                read_only: true,
            },
            Bind {
                source: etc.join("hosts"),
                destination: "/etc/hosts".into(),
                read_only: true,
            },
            Bind {
                source: etc.join("hostname"),
                destination: "/etc/hostname".into(),
                read_only: true,
            },
            Bind {
                source: sandbox.to_path_buf(),
                destination: SANDBOX_IN_CONTAINER.into(),
                read_only: false,
            },
        ];
        all_binds.extend(binds);
        let id = oci_id(&spec.task);
        let cgroups_path = format!("/{cgroup_parent}/{}/ctr", spec.task.as_str());
        let runtime_spec = dcnet_images::runtime_spec(&RunSpec {
            image: &image.config,
            layers: &lowers,
            cmd: spec.app.cmd.as_deref(),
            args: spec.app.args.as_deref(),
            env,
            hostname: &hostname,
            netns,
            cgroups_path: &cgroups_path,
            binds: &all_binds,
            default_cwd: SANDBOX_IN_CONTAINER,
        })
        .map_err(|e| RuntimeError::Container(format!("{}: {e}", docker.image)))?;
        let config = serde_json::to_vec_pretty(&runtime_spec).expect("a spec serializes");
        // It holds the task's env, secrets among them: for the agent's eyes only.
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let path = bundle.join("config.json");
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(&config))
                .map_err(sandbox_err(&bundle))?;
        }
        let held = HeldImage {
            id: id.clone(),
            layers: image.layers.iter().map(|l| l.digest.clone()).collect(),
        };
        fs::write(
            sandbox.join("image.json"),
            serde_json::to_vec(&held).expect("held serializes"),
        )
        .map_err(sandbox_err(sandbox))?;
        let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        // The network namespace is joined by the OCI runtime, from the spec: the shim only
        // mounts the root, in a mount namespace of its own.
        let shim = vec![
            "--lower".to_string(),
            lower.join(":"),
            "--upper".into(),
            upper.display().to_string(),
            "--work".into(),
            work.display().to_string(),
            "--rootfs".into(),
            rootfs.display().to_string(),
        ];
        let _ = fs::remove_file(sandbox.join("container.pid"));
        let argv = vec![
            self.oci_runtime.display().to_string(),
            "--root".into(),
            self.oci_root.display().to_string(),
            "run".into(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--pid-file".into(),
            sandbox.join("container.pid").display().to_string(),
            id,
        ];
        Ok((shim, argv))
    }

    /// Removes what the OCI runtime keeps of the task (its state; its cgroups are removed by
    /// the caller). Safe to call for a task that has none.
    pub(super) async fn cleanup(&self, sandbox: &Path) {
        let Some(held) = held_image(sandbox) else {
            return;
        };
        let out = tokio::process::Command::new(&self.oci_runtime)
            .arg("--root")
            .arg(&self.oci_root)
            .args(["delete", "--force", &held.id])
            .stdin(std::process::Stdio::null())
            .output()
            .await;
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stderr);
                if !text.contains("does not exist") && !text.contains("not found") {
                    warn!(id = %held.id, error = %text.trim(), "the OCI runtime could not delete the container");
                }
            }
            Err(e) => {
                warn!(error = %e, runtime = %self.oci_runtime.display(), "could not run the OCI runtime")
            }
        }
        let _ = fs::remove_dir_all(sandbox.join("overlay/work"));
    }

    /// Layer digests that tasks in `sandboxes` use.
    pub(super) fn layers_in_use<'a>(sandboxes: impl Iterator<Item = &'a Path>) -> BTreeSet<String> {
        sandboxes
            .filter_map(held_image)
            .flat_map(|h| h.layers)
            .collect()
    }

    /// Removes the persistent volumes of apps that no longer exist.
    pub(super) fn release_volumes(&self, exists: &dyn Fn(&AppId) -> bool) -> usize {
        self.with_volume_apps(|apps| {
            let gone: Vec<AppId> = apps.keys().filter(|a| !exists(a)).cloned().collect();
            let mut removed = 0;
            for app in gone {
                let dir = &apps[&app];
                if fs::remove_dir_all(dir).is_ok() || !dir.exists() {
                    info!(app = %app, "removed the persistent volumes of a removed app");
                    apps.remove(&app);
                    removed += 1;
                }
            }
            removed
        })
    }
}

/// The OCI runtime's id for a task: letters, digits, `_`, `-`, `.`.
fn oci_id(task: &TaskId) -> String {
    replace_other(
        task.as_str(),
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'),
        '_',
    )
}

/// The OCI runtime to use: `configured` if given, else crun where it can run (crun refuses
/// a hybrid cgroup layout whose v2 hierarchy has controllers), else runc.
pub fn pick_oci_runtime(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = configured {
        return Some(path.to_path_buf());
    }
    let find = |name: &str| {
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(name))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.is_file())
    };
    let hybrid_with_controllers = fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|c| !c.trim().is_empty());
    if !hybrid_with_controllers && let Some(crun) = find("crun") {
        return Some(crun);
    }
    find("runc").or_else(|| find("crun"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_lowest_free_and_come_back() {
        let slots = Slots::default();
        let app = AppId::parse("/db").unwrap();
        let (a, b, c) = (TaskId("a".into()), TaskId("b".into()), TaskId("c".into()));
        assert_eq!(slots.take(&app, &a, 2), Some(0));
        assert_eq!(slots.take(&app, &b, 2), Some(1));
        // Both of two instances' slots are held: a third task waits for one.
        assert_eq!(slots.take(&app, &c, 2), None);
        slots.release(&a);
        assert_eq!(slots.take(&app, &c, 2), Some(0));
        assert_eq!(slots.take(&AppId::parse("/other").unwrap(), &a, 1), Some(0));
        for t in [&a, &b, &c] {
            slots.release(t);
        }
        assert!(slots.0.lock().unwrap().is_empty());
    }

    #[test]
    fn ids_and_keys_are_safe_names() {
        assert_eq!(oci_id(&TaskId("web_group.1a2b".into())), "web_group.1a2b");
        assert_eq!(oci_id(&TaskId("a/b c".into())), "a_b_c");
        assert_eq!(app_key(&AppId::parse("/group/db").unwrap()), "group_db");
    }
}

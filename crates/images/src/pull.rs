//! Pulling an image into the store: the manifest for this machine's platform (an index or a
//! manifest list is resolved by `oci-client`), the config, then each layer that is not here
//! yet, downloaded with its digest checked, unpacked with its `diff_id` checked, and renamed
//! into place. Pulls of one name are one at a time: a task that asks while another pulls
//! waits and takes that pull's result.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use serde::Deserialize;
use tokio::io::AsyncWrite;
use tracing::{debug, info, warn};

use crate::store::{Image, ImageConfig, Layer, Store};
use crate::unpack::{UnpackError, unpack_layer};
use crate::{Config, Registry};

/// Why an image could not be had. Every message names the image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    #[error("{name:?} is not an image name: {why}")]
    Name { name: String, why: String },
    #[error("{image}: the registry {registry} refused the credentials{given}")]
    Unauthorized {
        image: String,
        registry: String,
        given: &'static str,
    },
    #[error("{image}: no such image or tag in its registry")]
    NotFound { image: String },
    #[error("{image}: a blob does not match its digest: {detail}")]
    Digest { image: String, detail: String },
    #[error("{image}: layer {digest}: {error}")]
    Layer {
        image: String,
        digest: String,
        error: UnpackError,
    },
    #[error("{image}: the image is for {platform}, this node runs linux/{arch}")]
    Platform {
        image: String,
        platform: String,
        arch: &'static str,
    },
    #[error("{image}: {detail}")]
    Registry { image: String, detail: String },
    #[error("{image}: the layer store: {error}")]
    Store {
        image: String,
        error: std::io::Error,
    },
    #[error("{image}: the pull took longer than {secs} s")]
    Timeout { image: String, secs: u64 },
}

/// How far a pull is, for the task's status and `dcnet app deploy --wait`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub image: String,
    pub layers_done: usize,
    pub layers: usize,
    pub bytes_done: u64,
    pub bytes: u64,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / 1e6;
        write!(
            f,
            "pulling {}: {} of {} layers, {:.1} of {:.1} MB",
            self.image,
            self.layers_done,
            self.layers,
            mb(self.bytes_done),
            mb(self.bytes)
        )
    }
}

pub struct Metrics {
    pulls: IntCounterVec,
    pull_seconds: HistogramVec,
    store_bytes: IntGauge,
    pub(crate) fetches: IntCounterVec,
    pub(crate) cache_bytes: IntGauge,
}

impl Metrics {
    pub fn register(reg: &prometheus::Registry) -> prometheus::Result<Self> {
        let pulls = IntCounterVec::new(
            Opts::new(
                "images_pulls_total",
                "Image pulls by result (pulled, present, failed)",
            ),
            &["result"],
        )?;
        let pull_seconds = HistogramVec::new(
            HistogramOpts::new("images_pull_seconds", "Time to pull an image").buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0,
            ]),
            &["result"],
        )?;
        let store_bytes = IntGauge::new("images_store_bytes", "Bytes of unpacked layers kept")?;
        let fetches = IntCounterVec::new(
            Opts::new(
                "fetch_artifacts_total",
                "Artifacts fetched by result (downloaded, cached, failed)",
            ),
            &["result"],
        )?;
        let cache_bytes = IntGauge::new("fetch_cache_bytes", "Bytes of cached artifacts")?;
        reg.register(Box::new(pulls.clone()))?;
        reg.register(Box::new(pull_seconds.clone()))?;
        reg.register(Box::new(store_bytes.clone()))?;
        reg.register(Box::new(fetches.clone()))?;
        reg.register(Box::new(cache_bytes.clone()))?;
        Ok(Self {
            pulls,
            pull_seconds,
            store_bytes,
            fetches,
            cache_bytes,
        })
    }
}

/// The image side of the runtime: one per agent.
pub struct Images {
    cfg: Config,
    store: Store,
    client: Client,
    /// Per name being pulled: when its last pull finished (seconds since the epoch), behind
    /// a lock that one pull holds at a time. A name leaves once no task waits for it, so
    /// this holds only what is in flight.
    pulls: Mutex<HashMap<String, Arc<tokio::sync::Mutex<u64>>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Images")
            .field("dir", &self.cfg.dir)
            .finish()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The image config, as Docker and OCI write it.
#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawRun>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRun {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    working_dir: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// A writer that counts what it writes, for progress: its own bytes and the pull's total.
struct Counting<'a> {
    file: tokio::fs::File,
    count: &'a AtomicU64,
    total: &'a AtomicU64,
}

impl AsyncWrite for Counting<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.file).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            this.count.fetch_add(*n as u64, Ordering::Relaxed);
            this.total.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_shutdown(cx)
    }
}

/// Layers of one image downloaded and unpacked at once.
const PARALLEL_LAYERS: usize = 3;

const ARCH: &str = match std::env::consts::ARCH.as_bytes() {
    b"x86_64" => "amd64",
    b"aarch64" => "arm64",
    _ => std::env::consts::ARCH,
};

impl Images {
    pub fn new(cfg: Config, metrics: Metrics) -> std::io::Result<Self> {
        crate::tls_provider();
        let store = Store::open(&cfg.dir)?;
        let mut extra = Vec::new();
        for r in &cfg.registries {
            if let Some(ca) = &r.ca_file {
                let data = std::fs::read(ca).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("reading {}: {e}", ca.display()))
                })?;
                extra.push(Certificate {
                    encoding: CertificateEncoding::Pem,
                    data,
                });
            }
        }
        let insecure: Vec<String> = cfg
            .registries
            .iter()
            .filter(|r| r.insecure)
            .map(|r| r.host.clone())
            .collect();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            extra_root_certificates: extra,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..ClientConfig::default()
        });
        let images = Self {
            cfg,
            store,
            client,
            pulls: Mutex::new(HashMap::new()),
            metrics: Arc::new(metrics),
        };
        images.metrics.store_bytes.set(images.store_bytes() as i64);
        Ok(images)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The directories of an image's layers, top first (overlayfs' `lowerdir` order).
    pub fn lower_dirs(&self, image: &Image) -> Vec<std::path::PathBuf> {
        image
            .layers
            .iter()
            .rev()
            .map(|l| self.store.layer_dir(&l.digest))
            .collect()
    }

    fn store_bytes(&self) -> u64 {
        self.store.layers().iter().map(|(_, s)| s).sum()
    }

    /// Removes images that no task uses once the store is past its limit (see
    /// [`Config::store_limit`]); `in_use` holds the layer digests of the tasks that exist.
    pub fn collect(&self, in_use: &BTreeSet<String>) -> Vec<String> {
        let removed = self.store.collect(in_use, self.cfg.store_limit);
        if !removed.is_empty() {
            info!(images = ?removed, "removed images no task uses");
        }
        self.metrics.store_bytes.set(self.store_bytes() as i64);
        removed
    }

    fn auth_for(&self, reference: &Reference) -> (RegistryAuth, &'static str) {
        let host = reference.registry();
        let resolved = reference.resolve_registry();
        match self
            .cfg
            .registries
            .iter()
            .find(|r| r.host == host || r.host == resolved)
        {
            Some(Registry {
                username: Some(u),
                password,
                ..
            }) => (
                RegistryAuth::Basic(
                    u.clone(),
                    password.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
                ),
                " (the agent's configured user)",
            ),
            _ => (RegistryAuth::Anonymous, " (no credentials are configured)"),
        }
    }

    /// The image `name`, pulled unless it is here already (or `force`, Marathon's
    /// `forcePullImage`). `progress` hears how far a pull is, a few times a second.
    pub async fn ensure(
        &self,
        name: &str,
        force: bool,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<Image, PullError> {
        let reference: Reference = name.parse().map_err(|e| PullError::Name {
            name: name.to_string(),
            why: format!("{e}"),
        })?;
        let lock = crate::turn_for(&self.pulls, name);
        let result = self
            .ensure_in_turn(name, &reference, force, progress, &lock)
            .await;
        crate::forget_if_idle(&self.pulls, name, &lock);
        result
    }

    /// [`Images::ensure`] with the name's turn: `lock` holds when its last pull ended.
    async fn ensure_in_turn(
        &self,
        name: &str,
        reference: &Reference,
        force: bool,
        progress: &(dyn Fn(&Progress) + Send + Sync),
        lock: &tokio::sync::Mutex<u64>,
    ) -> Result<Image, PullError> {
        let asked_at = now_secs();
        let mut last_pull = lock.lock().await;
        if let Some(image) = self.store.image(name)
            && (!force || *last_pull >= asked_at)
        {
            self.metrics.pulls.with_label_values(&["present"]).inc();
            return Ok(image);
        }
        let timer = tokio::time::Instant::now();
        let secs = self.cfg.pull_timeout.as_secs();
        let result =
            match tokio::time::timeout(self.cfg.pull_timeout, self.pull(name, reference, progress))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(PullError::Timeout {
                    image: name.to_string(),
                    secs,
                }),
            };
        let label = if result.is_ok() { "pulled" } else { "failed" };
        self.metrics.pulls.with_label_values(&[label]).inc();
        self.metrics
            .pull_seconds
            .with_label_values(&[label])
            .observe(timer.elapsed().as_secs_f64());
        self.metrics.store_bytes.set(self.store_bytes() as i64);
        if result.is_ok() {
            *last_pull = now_secs();
        }
        result
    }

    async fn pull(
        &self,
        name: &str,
        reference: &Reference,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<Image, PullError> {
        let (auth, given) = self.auth_for(reference);
        let oci = |e: OciDistributionError| self.oci_error(name, reference, given, e);
        let (manifest, digest, config) = self
            .client
            .pull_manifest_and_config(reference, &auth)
            .await
            .map_err(oci)?;
        let raw: RawConfig = serde_json::from_str(&config).map_err(|e| PullError::Registry {
            image: name.to_string(),
            detail: format!("the image config is not valid: {e}"),
        })?;
        if (!raw.os.is_empty() && raw.os != "linux")
            || (!raw.architecture.is_empty() && raw.architecture != ARCH)
        {
            return Err(PullError::Platform {
                image: name.to_string(),
                platform: format!("{}/{}", raw.os, raw.architecture),
                arch: ARCH,
            });
        }
        let diff_ids = raw.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        let size_of = |l: &OciDescriptor| u64::try_from(l.size).unwrap_or(0);
        let (present, missing): (Vec<_>, Vec<_>) = manifest
            .layers
            .iter()
            .enumerate()
            .partition(|(_, l)| self.store.has_layer(&l.digest));
        debug!(
            image = name,
            present = present.len(),
            missing = missing.len(),
            "layers"
        );
        // What is here counts as done; the rest is downloaded and unpacked a few at a time.
        let bytes_done = AtomicU64::new(present.iter().map(|(_, l)| size_of(l)).sum());
        let layers_done = AtomicUsize::new(present.len());
        let state = || Progress {
            image: name.to_string(),
            layers: manifest.layers.len(),
            bytes: manifest.layers.iter().map(size_of).sum(),
            layers_done: layers_done.load(Ordering::Relaxed),
            bytes_done: bytes_done.load(Ordering::Relaxed),
        };
        progress(&state());
        let gate = tokio::sync::Semaphore::new(PARALLEL_LAYERS);
        let mut each = Vec::with_capacity(missing.len());
        for &(i, layer) in &missing {
            let (gate, bytes_done, layers_done, diff_id) =
                (&gate, &bytes_done, &layers_done, diff_ids.get(i));
            each.push(async move {
                let _turn = gate.acquire().await.expect("the gate is never closed");
                let result = self
                    .pull_layer(name, reference, given, layer, diff_id, bytes_done)
                    .await;
                layers_done.fetch_add(1, Ordering::Relaxed);
                result.map(|size| (layer.digest.clone(), size))
            });
        }
        let pulls = futures::future::join_all(each);
        tokio::pin!(pulls);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let results = loop {
            tokio::select! {
                done = &mut pulls => break done,
                _ = tick.tick() => progress(&state()),
            }
        };
        progress(&state());
        // Every pull ran to its end (each cleans up after itself); the first error is the
        // answer.
        let mut sizes = HashMap::new();
        for result in results {
            let (digest, size) = result?;
            sizes.insert(digest, size);
        }
        // The sizes of layers that other images brought, read once.
        if !present.is_empty() {
            for layer in self.store.images().into_iter().flat_map(|i| i.layers) {
                sizes.entry(layer.digest).or_insert(layer.size);
            }
        }
        let layers: Vec<Layer> = manifest
            .layers
            .iter()
            .map(|l| Layer {
                digest: l.digest.clone(),
                size: sizes.get(&l.digest).copied().unwrap_or(0),
            })
            .collect();
        let run = raw.config.unwrap_or_default();
        let image = Image {
            reference: name.to_string(),
            digest,
            layers,
            config: ImageConfig {
                entrypoint: run.entrypoint.unwrap_or_default(),
                cmd: run.cmd.unwrap_or_default(),
                env: run.env.unwrap_or_default(),
                user: run.user.unwrap_or_default(),
                working_dir: run.working_dir.unwrap_or_default(),
            },
            pulled_at: now_secs(),
        };
        self.store
            .put_image(&image)
            .map_err(|error| PullError::Store {
                image: name.to_string(),
                error,
            })?;
        info!(image = name, digest = %image.digest, layers = image.layers.len(), bytes = image.size(), "image pulled");
        Ok(image)
    }

    async fn pull_layer(
        &self,
        name: &str,
        reference: &Reference,
        given: &'static str,
        layer: &OciDescriptor,
        diff_id: Option<&String>,
        bytes_done: &AtomicU64,
    ) -> Result<u64, PullError> {
        let store_err = |error| PullError::Store {
            image: name.to_string(),
            error,
        };
        let blob = self.store.tmp("blob");
        let count = AtomicU64::new(0);
        let file = tokio::fs::File::create(&blob).await.map_err(store_err)?;
        let out = Counting {
            file,
            count: &count,
            total: bytes_done,
        };
        let downloaded = self.client.pull_blob(reference, layer, out).await;
        if let Err(e) = downloaded {
            let _ = tokio::fs::remove_file(&blob).await;
            // What this layer had counted does not stay in the progress.
            bytes_done.fetch_sub(count.load(Ordering::Relaxed), Ordering::Relaxed);
            return Err(self.oci_error(name, reference, given, e));
        }
        let dest = self.store.layer_dir(&layer.digest);
        let staging = self.store.tmp("layer");
        let (limit, diff_id) = (self.cfg.image_limit, diff_id.cloned());
        let staged = staging.clone();
        let blob_path = blob.clone();
        let unpacked = tokio::task::spawn_blocking(move || {
            unpack_layer(&blob_path, &staged, diff_id.as_deref(), limit)
        })
        .await
        .map_err(|e| store_err(std::io::Error::other(e)))?;
        let _ = tokio::fs::remove_file(&blob).await;
        let unpacked = unpacked.map_err(|error| PullError::Layer {
            image: name.to_string(),
            digest: layer.digest.clone(),
            error,
        })?;
        match std::fs::rename(&staging, &dest) {
            Ok(()) => {}
            // Another image brought the same layer meanwhile.
            Err(_) if dest.is_dir() => {
                let _ = std::fs::remove_dir_all(&staging);
            }
            Err(error) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(store_err(error));
            }
        }
        Ok(unpacked.bytes)
    }

    fn oci_error(
        &self,
        name: &str,
        reference: &Reference,
        given: &'static str,
        e: OciDistributionError,
    ) -> PullError {
        let image = name.to_string();
        let unauthorized = || PullError::Unauthorized {
            image: image.clone(),
            registry: reference.registry().to_string(),
            given,
        };
        match e {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => unauthorized(),
            OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => unauthorized(),
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => PullError::NotFound { image },
            OciDistributionError::RegistryError { ref envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    unauthorized()
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    PullError::NotFound { image }
                } else {
                    PullError::Registry {
                        image,
                        detail: e.to_string(),
                    }
                }
            }
            OciDistributionError::DigestError(d) => PullError::Digest {
                image,
                detail: d.to_string(),
            },
            other => {
                warn!(image = name, error = %other, "pull failed");
                PullError::Registry {
                    image,
                    detail: other.to_string(),
                }
            }
        }
    }
}

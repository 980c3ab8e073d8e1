//! Images and artifacts for dcnet's container tasks: pulling OCI and Docker images from a
//! registry (through `oci-client`), a layer store on disk whose layers overlayfs stacks into
//! a task's root, the OCI runtime spec that runs the task in it, and the fetcher that brings a
//! task's `fetch` URIs into its sandbox.
//!
//! Nothing here knows dcnet's model: the runtime in node-core says what to pull and run.

#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

mod fetch;
mod pull;
mod spec;
mod store;
mod unpack;

use std::path::PathBuf;
use std::time::Duration;

pub use self::fetch::{Artifact, FetchError, Fetched, Fetcher, check_dest_path, check_uri};
pub use self::pull::{Images, Metrics, Progress, PullError};
pub use self::spec::{Bind, RunSpec, runtime_spec};
pub use self::store::{Image, ImageConfig, Layer};
pub use self::unpack::UnpackError;

/// A password: never in a log, `Debug` says `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How to reach one registry.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    /// As images name it: `127.0.0.1:5000`, `registry.example.com`, `docker.io`.
    pub host: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Plain HTTP instead of HTTPS.
    pub insecure: bool,
    /// PEM certificates to trust for this registry, besides the system's.
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The layer store (`<state>/images`).
    pub dir: PathBuf,
    pub registries: Vec<Registry>,
    /// Past this many bytes of layers, images no task uses are removed, oldest pull first.
    pub store_limit: u64,
    /// The most one image may unpack to.
    pub image_limit: u64,
    /// How long one pull may take, all layers together.
    pub pull_timeout: Duration,
    /// Artifacts kept for `cache: true` (`<state>/fetch-cache`).
    pub cache_dir: PathBuf,
    /// Past this many bytes the oldest cached artifacts are removed.
    pub cache_limit: u64,
    /// The largest artifact a task may fetch.
    pub artifact_limit: u64,
    /// How long one artifact may take to download.
    pub fetch_timeout: Duration,
}

impl Config {
    /// Defaults under `state_dir`.
    pub fn under(state_dir: &std::path::Path) -> Self {
        Self {
            dir: state_dir.join("images"),
            registries: Vec::new(),
            store_limit: 10 << 30,
            image_limit: 8 << 30,
            pull_timeout: Duration::from_secs(600),
            cache_dir: state_dir.join("fetch-cache"),
            cache_limit: 2 << 30,
            artifact_limit: 2 << 30,
            fetch_timeout: Duration::from_secs(300),
        }
    }
}

/// Whether `name` is an image name a registry can be asked for; why not if it is not.
pub fn check_name(name: &str) -> Result<(), String> {
    name.parse::<oci_client::Reference>()
        .map(|_| ())
        .map_err(|e| format!("{name:?} is not an image name: {e}"))
}

/// The turn of `key` in a map of per-key locks (made if it is not there).
pub(crate) fn turn_for<T: Default>(
    map: &std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<T>>>,
    key: &str,
) -> std::sync::Arc<T> {
    map.lock()
        .expect("turns lock")
        .entry(key.to_string())
        .or_default()
        .clone()
}

/// Drops `key` from a map of per-key locks once no one but the map and `held` has it: the
/// map holds only what is in flight.
pub(crate) fn forget_if_idle<T>(
    map: &std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<T>>>,
    key: &str,
    held: &std::sync::Arc<T>,
) {
    let mut map = map.lock().expect("turns lock");
    if std::sync::Arc::strong_count(held) <= 2 {
        map.remove(key);
    }
}

/// One process-wide TLS provider for reqwest's rustls (ring, as the rest of the tree uses).
pub(crate) fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

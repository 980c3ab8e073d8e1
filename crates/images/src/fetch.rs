//! Marathon's `fetch`: each URI lands in the task's sandbox before the task starts, the way the
//! Mesos fetcher does it. `http`, `https`, `file` and plain absolute paths; archives (`.tar`,
//! `.tar.gz`, `.tgz`, `.tar.zst`, `.zip`) are extracted into the sandbox when `extract`
//! (the default), anything else is kept under its own name, made executable when asked.
//! With `cache`, the download is kept per node, keyed by URI, and the next task copies it
//! instead of downloading again.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read as _};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use crate::Config;
use crate::pull::Metrics;
use crate::store::key;
use crate::unpack::extract_tar;

/// One `fetch` entry of an app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    pub uri: String,
    pub extract: bool,
    pub executable: bool,
    pub cache: bool,
    /// Where in the sandbox, relative; the URI's last segment when absent.
    pub dest_path: Option<String>,
}

/// What fetching one artifact did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub from_cache: bool,
    pub extracted: bool,
}

/// Why an artifact could not be fetched; the task fails with it.
#[derive(Debug, thiserror::Error)]
#[error("fetching {uri}: {reason}")]
pub struct FetchError {
    pub uri: String,
    pub reason: String,
}

pub struct Fetcher {
    cfg: Config,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    /// One download per URI at a time, so that tasks that start together share the cache;
    /// only URIs in flight are here.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("cache", &self.cfg.cache_dir)
            .finish()
    }
}

enum Source {
    Http(String),
    File(PathBuf),
}

fn source(uri: &str) -> Result<Source, String> {
    if uri.starts_with("http://") || uri.starts_with("https://") {
        Ok(Source::Http(uri.to_string()))
    } else if let Some(path) = uri.strip_prefix("file://") {
        Ok(Source::File(PathBuf::from(path)))
    } else if uri.starts_with('/') {
        Ok(Source::File(PathBuf::from(uri)))
    } else {
        Err("only http, https, file and absolute paths can be fetched".into())
    }
}

/// The file name a URI downloads to: its last path segment, without a query.
fn file_name(uri: &str) -> Result<String, String> {
    let path = uri.split(['?', '#']).next().unwrap_or(uri);
    let path = path.split_once("://").map_or(path, |(_, rest)| rest);
    let name = path.rsplit('/').next().unwrap_or_default();
    if name.is_empty() || name == "." || name == ".." {
        return Err("the URI names no file".into());
    }
    Ok(name.to_string())
}

/// A relative path without `..`.
fn relative(dest: &str) -> Result<PathBuf, String> {
    let path = Path::new(dest);
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err("must be relative to the sandbox, without '..'".into());
    }
    Ok(path.to_path_buf())
}

/// Whether `uri` is one the fetcher can fetch; why not if it is not (for the app's
/// validation, which must refuse what the fetcher would).
pub fn check_uri(uri: &str) -> Result<(), String> {
    source(uri).map(|_| ())
}

/// Whether `dest` is a `destPath` the fetcher takes; why not if it is not.
pub fn check_dest_path(dest: &str) -> Result<(), String> {
    relative(dest).map(|_| ())
}

enum Kind {
    Tar,
    Zip,
    Plain,
}

fn kind(name: &str) -> Kind {
    let lower = name.to_ascii_lowercase();
    if [".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst"]
        .iter()
        .any(|s| lower.ends_with(s))
    {
        Kind::Tar
    } else if lower.ends_with(".zip") {
        Kind::Zip
    } else {
        Kind::Plain
    }
}

impl Fetcher {
    pub fn new(cfg: Config, metrics: Arc<Metrics>) -> io::Result<Self> {
        crate::tls_provider();
        fs::create_dir_all(&cfg.cache_dir)?;
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(io::Error::other)?;
        let fetcher = Self {
            cfg,
            http,
            metrics,
            locks: Mutex::new(HashMap::new()),
        };
        fetcher
            .metrics
            .cache_bytes
            .set(fetcher.cache_bytes() as i64);
        Ok(fetcher)
    }

    /// Fetches every artifact into `sandbox`, in order; the first that fails stops it.
    pub async fn fetch_all(
        &self,
        artifacts: &[Artifact],
        sandbox: &Path,
    ) -> Result<Vec<Fetched>, FetchError> {
        let mut done = Vec::new();
        for a in artifacts {
            let result = self.fetch(a, sandbox).await;
            let label = match &result {
                Ok(f) if f.from_cache => "cached",
                Ok(_) => "downloaded",
                Err(_) => "failed",
            };
            self.metrics.fetches.with_label_values(&[label]).inc();
            done.push(result?);
        }
        Ok(done)
    }

    async fn fetch(&self, a: &Artifact, sandbox: &Path) -> Result<Fetched, FetchError> {
        let fail = |reason: String| FetchError {
            uri: a.uri.clone(),
            reason,
        };
        let src = source(&a.uri).map_err(fail)?;
        let name = file_name(&a.uri).map_err(fail)?;
        let dest_rel = match &a.dest_path {
            Some(d) if !d.is_empty() => {
                relative(d).map_err(|why| fail(format!("destPath {d:?} {why}")))?
            }
            _ => PathBuf::from(&name),
        };
        let (file, from_cache) = if a.cache {
            self.cached(&a.uri, &name, &src).await.map_err(fail)?
        } else {
            let tmp = sandbox.join(format!(".fetch-{}", key(&a.uri)));
            self.download(&src, &tmp).await.map_err(fail)?;
            (tmp, false)
        };
        let extracting = a.extract && !matches!(kind(&name), Kind::Plain);
        let result = if extracting {
            let into = match &a.dest_path {
                Some(d) if !d.is_empty() => sandbox.join(&dest_rel),
                _ => sandbox.to_path_buf(),
            };
            self.extract(&file, &name, &into).map(|()| into)
        } else {
            let path = sandbox.join(&dest_rel);
            (|| {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                if a.cache {
                    fs::copy(&file, &path).map(|_| ())?;
                } else {
                    fs::rename(&file, &path)?;
                }
                if a.executable {
                    use std::os::unix::fs::PermissionsExt;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
                }
                Ok(path)
            })()
            .map_err(|e: io::Error| e.to_string())
        };
        // A download of its own goes; the cache's copy stays.
        if !a.cache {
            let _ = fs::remove_file(&file);
        }
        let path = result.map_err(fail)?;
        debug!(uri = %a.uri, path = %path.display(), from_cache, "fetched");
        Ok(Fetched {
            path,
            from_cache,
            extracted: extracting,
        })
    }

    fn extract(&self, file: &Path, name: &str, into: &Path) -> Result<(), String> {
        fs::create_dir_all(into).map_err(|e| format!("creating {}: {e}", into.display()))?;
        match kind(name) {
            Kind::Tar => extract_tar(file, into, self.cfg.artifact_limit)
                .map(|_| ())
                .map_err(|e| format!("extracting: {e}")),
            Kind::Zip => extract_zip(file, into, self.cfg.artifact_limit),
            Kind::Plain => Ok(()),
        }
    }

    /// The artifact from the cache, downloading it there first if it is not.
    async fn cached(&self, uri: &str, name: &str, src: &Source) -> Result<(PathBuf, bool), String> {
        let lock = crate::turn_for(&self.locks, uri);
        let result = self.cached_in_turn(uri, name, src, &lock).await;
        crate::forget_if_idle(&self.locks, uri, &lock);
        result
    }

    async fn cached_in_turn(
        &self,
        uri: &str,
        name: &str,
        src: &Source,
        lock: &tokio::sync::Mutex<()>,
    ) -> Result<(PathBuf, bool), String> {
        let _held = lock.lock().await;
        let dir = self.cfg.cache_dir.join(key(uri));
        let file = dir.join(name);
        if file.is_file() {
            // Its age orders the cache's clean-up: a hit makes it young again.
            let _ = fs::File::options()
                .append(true)
                .open(&file)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok((file, true));
        }
        let tmp = self.cfg.cache_dir.join(format!(".tmp-{}", key(uri)));
        self.download(src, &tmp).await?;
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        fs::rename(&tmp, &file).map_err(|e| e.to_string())?;
        self.trim_cache(&dir);
        Ok((file, false))
    }

    fn cache_entries(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let Ok(dirs) = fs::read_dir(&self.cfg.cache_dir) else {
            return Vec::new();
        };
        dirs.flatten()
            .filter(|d| d.path().is_dir())
            .filter_map(|d| {
                let (mut size, mut newest) = (0, std::time::UNIX_EPOCH);
                for f in fs::read_dir(d.path()).ok()?.flatten() {
                    let meta = f.metadata().ok()?;
                    size += meta.len();
                    newest = newest.max(meta.modified().ok()?);
                }
                Some((d.path(), size, newest))
            })
            .collect()
    }

    fn cache_bytes(&self) -> u64 {
        self.cache_entries().iter().map(|(_, s, _)| s).sum()
    }

    /// Removes the oldest cached artifacts, never `keep`, while the cache is past its limit.
    fn trim_cache(&self, keep: &Path) {
        let mut entries = self.cache_entries();
        entries.sort_by_key(|(_, _, t)| *t);
        let mut total: u64 = entries.iter().map(|(_, s, _)| s).sum();
        for (path, size, _) in entries {
            if total <= self.cfg.cache_limit {
                break;
            }
            if path != keep && fs::remove_dir_all(&path).is_ok() {
                info!(path = %path.display(), "removed a cached artifact (cache full)");
                total -= size;
            }
        }
        self.metrics.cache_bytes.set(total as i64);
    }

    /// Downloads or copies `src` to `to`, at most `artifact_limit` bytes, within the fetch
    /// timeout; on error nothing is left at `to`.
    async fn download(&self, src: &Source, to: &Path) -> Result<(), String> {
        let limit = self.cfg.artifact_limit;
        let work = async {
            match src {
                Source::File(path) => {
                    let meta = tokio::fs::metadata(path)
                        .await
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    if meta.len() > limit {
                        return Err(format!("larger than the limit of {limit} bytes"));
                    }
                    tokio::fs::copy(path, to)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("copying {}: {e}", path.display()))
                }
                Source::Http(url) => {
                    let response = self
                        .http
                        .get(url)
                        .send()
                        .await
                        .map_err(|e| format!("{e}"))?;
                    let status = response.status();
                    if !status.is_success() {
                        return Err(format!("the server answered {status}"));
                    }
                    let mut out = tokio::fs::File::create(to)
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut stream = response.bytes_stream();
                    let mut written: u64 = 0;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|e| format!("reading the body: {e}"))?;
                        written += chunk.len() as u64;
                        if written > limit {
                            return Err(format!("larger than the limit of {limit} bytes"));
                        }
                        out.write_all(&chunk).await.map_err(|e| e.to_string())?;
                    }
                    out.flush().await.map_err(|e| e.to_string())
                }
            }
        };
        let result = match tokio::time::timeout(self.cfg.fetch_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "took longer than {} s",
                self.cfg.fetch_timeout.as_secs()
            )),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(to).await;
        }
        result
    }
}

/// Extracts a zip into `into`: entries with an unsafe name (absolute, `..`) are refused.
fn extract_zip(file: &Path, into: &Path, limit: u64) -> Result<(), String> {
    let reader = fs::File::open(file).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| format!("not a zip: {e}"))?;
    let mut total: u64 = 0;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| e.to_string())?;
        let Some(rel) = entry.enclosed_name() else {
            return Err(format!(
                "entry {:?} leaves the sandbox (an absolute path or '..')",
                entry.name()
            ));
        };
        // No symlinks are created from a zip, so no parent can be one unless the sandbox
        // had it: check anyway.
        let path = into.join(&rel);
        let mut at = into.to_path_buf();
        for part in rel.parent().into_iter().flat_map(|p| p.components()) {
            at.push(part);
            if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(format!(
                    "entry {:?} would be written through a symlink",
                    rel
                ));
            }
        }
        if entry.is_dir() {
            fs::create_dir_all(&path).map_err(|e| e.to_string())?;
            continue;
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        total = total.saturating_add(entry.size());
        if total > limit {
            return Err(format!("the archive unpacks to more than {limit} bytes"));
        }
        let mut out = fs::File::create(&path).map_err(|e| e.to_string())?;
        let size = entry.size();
        io::copy(&mut (&mut entry).take(size), &mut out).map_err(|e| e.to_string())?;
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_destinations_are_checked() {
        assert_eq!(file_name("http://h:1/a/b/app.tgz?x=1").unwrap(), "app.tgz");
        assert_eq!(file_name("file:///srv/x.zip").unwrap(), "x.zip");
        assert!(file_name("http://h/").is_err());
        assert!(relative("bin/tool").is_ok());
        assert!(relative("../x").unwrap_err().contains("without '..'"));
        assert!(relative("/etc/x").is_err());
        assert!(source("hdfs://x/y").is_err());
        assert!(matches!(kind("a.TGZ"), Kind::Tar));
        assert!(matches!(kind("a.zip"), Kind::Zip));
        assert!(matches!(kind("a.jar"), Kind::Plain));
    }

    fn fetcher(dir: &Path, cache_limit: u64) -> Fetcher {
        let mut cfg = Config::under(dir);
        cfg.cache_limit = cache_limit;
        let metrics = Arc::new(Metrics::register(&prometheus::Registry::new()).unwrap());
        Fetcher::new(cfg, metrics).unwrap()
    }

    fn tgz(at: &Path, files: &[(&str, &[u8])]) {
        let gz = flate2::write::GzEncoder::new(fs::File::create(at).unwrap(), Default::default());
        let mut tar = tar::Builder::new(gz);
        for (name, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_path(name).unwrap();
            h.set_size(body.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            tar.append(&h, *body).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }

    #[tokio::test]
    async fn zips_extract_with_their_modes_and_unsafe_names_are_refused() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), 1 << 20);
        let zip_at = |name: &str, entries: &[(&str, u32)]| {
            let path = dir.path().join(name);
            let mut w = zip::ZipWriter::new(fs::File::create(&path).unwrap());
            for (entry, mode) in entries {
                let opts = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
                w.start_file(*entry, opts).unwrap();
                w.write_all(b"zipped\n").unwrap();
            }
            w.finish().unwrap();
            path
        };
        let good = zip_at("tool.zip", &[("bin/tool", 0o755), ("README", 0o644)]);
        let sandbox = dir.path().join("sandbox");
        fs::create_dir_all(&sandbox).unwrap();
        let artifact = |p: &Path| Artifact {
            uri: p.display().to_string(),
            extract: true,
            executable: false,
            cache: false,
            dest_path: None,
        };
        f.fetch_all(&[artifact(&good)], &sandbox).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(sandbox.join("bin/tool"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_to_string(sandbox.join("README")).unwrap(),
            "zipped\n"
        );
        let evil = zip_at("evil.zip", &[("../../escape", 0o644)]);
        let err = f.fetch_all(&[artifact(&evil)], &sandbox).await.unwrap_err();
        assert!(err.to_string().contains("leaves the sandbox"), "{err}");
        assert!(!dir.path().join("escape").exists());
    }

    #[tokio::test]
    async fn local_archives_extract_plain_files_keep_their_name_and_the_cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), 300);
        let src = dir.path().join("app.tgz");
        tgz(&src, &[("app/run.sh", b"#!/bin/sh\necho hi\n")]);
        let big = dir.path().join("big.bin");
        fs::write(&big, vec![7u8; 280]).unwrap();
        let sandbox = dir.path().join("sandbox");
        fs::create_dir_all(&sandbox).unwrap();
        let artifact = |uri: &Path, cache| Artifact {
            uri: format!("file://{}", uri.display()),
            extract: true,
            executable: true,
            cache,
            dest_path: None,
        };
        let done = f
            .fetch_all(&[artifact(&src, true), artifact(&big, false)], &sandbox)
            .await
            .unwrap();
        assert!(done[0].extracted && !done[0].from_cache);
        assert!(sandbox.join("app/run.sh").is_file());
        assert_eq!(fs::read(sandbox.join("big.bin")).unwrap().len(), 280);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(sandbox.join("big.bin"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        // The second time the archive comes from the cache, even with the source gone.
        fs::remove_file(&src).unwrap();
        let again = f
            .fetch_all(&[artifact(&src, true)], &sandbox)
            .await
            .unwrap();
        assert!(again[0].from_cache);
        // A cached 280-byte file with the 300-byte limit pushes the archive out.
        f.fetch_all(&[artifact(&big, true)], &sandbox)
            .await
            .unwrap();
        assert!(f.cache_bytes() <= 300, "{}", f.cache_bytes());
        // Only downloads in flight hold a lock: none now.
        assert!(f.locks.lock().unwrap().is_empty());
        // An artifact past the size limit is refused, and nothing of it stays.
        let mut small = Config::under(dir.path());
        small.artifact_limit = 100;
        small.cache_dir = dir.path().join("cache2");
        let metrics = Arc::new(Metrics::register(&prometheus::Registry::new()).unwrap());
        let limited = Fetcher::new(small, metrics).unwrap();
        let err = limited
            .fetch_all(&[artifact(&big, false)], &sandbox)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("larger than the limit of 100 bytes"),
            "{err}"
        );
        let gone = f.fetch_all(&[artifact(&src, true)], &sandbox).await;
        assert!(gone.unwrap_err().to_string().contains("app.tgz"));
        // A missing file fails with its URI and leaves nothing behind.
        let err = f
            .fetch_all(&[artifact(&dir.path().join("nope.tgz"), false)], &sandbox)
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("fetching file://"), "{err}");
        assert!(
            !fs::read_dir(&sandbox)
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".fetch-"))
        );
    }
}

//! The layer store on disk:
//!
//! ```text
//! <dir>/layers/<hex>/      one unpacked layer, by the digest of its blob
//! <dir>/images/<key>.json  one image: its name, manifest digest, layers and config
//! <dir>/tmp/               downloads and unpacks in progress; emptied at start
//! ```
//!
//! A layer or an image appears only by a rename once it is whole, so a crash or a failed pull
//! leaves nothing but `tmp/`, which the next start empties.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What the image's config says about running it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub working_dir: String,
}

/// One layer of an image, bottom first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    /// Bytes of content unpacked.
    pub size: u64,
}

/// An image in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The name it was pulled by (`127.0.0.1:5000/busybox:1`).
    pub reference: String,
    /// `sha256:<hex>` of the manifest that was chosen for this platform.
    pub digest: String,
    pub layers: Vec<Layer>,
    pub config: ImageConfig,
    /// Seconds since the epoch of the pull.
    pub pulled_at: u64,
}

impl Image {
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

pub(crate) fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

pub(crate) fn key(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))[..24].to_string()
}

#[derive(Clone, Debug)]
pub(crate) struct Store {
    dir: PathBuf,
}

impl Store {
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        for sub in ["layers", "images", "tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        // What a crash left half-done.
        for entry in fs::read_dir(dir.join("tmp"))?.flatten() {
            let path = entry.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub(crate) fn layer_dir(&self, digest: &str) -> PathBuf {
        self.dir.join("layers").join(hex(digest))
    }

    pub(crate) fn has_layer(&self, digest: &str) -> bool {
        self.layer_dir(digest).is_dir()
    }

    /// A fresh path under `tmp/` for work in progress.
    pub(crate) fn tmp(&self, what: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        self.dir.join("tmp").join(format!(
            "{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn image_path(&self, reference: &str) -> PathBuf {
        self.dir
            .join("images")
            .join(format!("{}.json", key(reference)))
    }

    /// The image pulled by this name, if it and all of its layers are here.
    pub(crate) fn image(&self, reference: &str) -> Option<Image> {
        let image: Image =
            serde_json::from_slice(&fs::read(self.image_path(reference)).ok()?).ok()?;
        (image.reference == reference && image.layers.iter().all(|l| self.has_layer(&l.digest)))
            .then_some(image)
    }

    pub(crate) fn put_image(&self, image: &Image) -> io::Result<()> {
        let tmp = self.tmp("image");
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(image).map_err(io::Error::other)?,
        )?;
        fs::rename(&tmp, self.image_path(&image.reference))
    }

    pub(crate) fn images(&self) -> Vec<Image> {
        let Ok(entries) = fs::read_dir(self.dir.join("images")) else {
            return Vec::new();
        };
        let mut images: Vec<Image> = entries
            .flatten()
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect();
        images.sort_by(|a: &Image, b| a.reference.cmp(&b.reference));
        images
    }

    /// Bytes of every layer on disk.
    pub(crate) fn layers(&self) -> Vec<(String, u64)> {
        let sizes: std::collections::BTreeMap<String, u64> = self
            .images()
            .into_iter()
            .flat_map(|i| i.layers)
            .map(|l| (hex(&l.digest).to_string(), l.size))
            .collect();
        let Ok(entries) = fs::read_dir(self.dir.join("layers")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let size = sizes.get(&name).copied().unwrap_or(0);
                (format!("sha256:{name}"), size)
            })
            .collect()
    }

    /// Removes images, oldest pull first, that no task uses (`in_use`: layer digests of
    /// tasks that exist), until the layers take at most `limit` bytes; then every layer no
    /// image names and no task uses. Returns the images removed.
    pub(crate) fn collect(&self, in_use: &BTreeSet<String>, limit: u64) -> Vec<String> {
        let mut images = self.images();
        images.sort_by_key(|i| i.pulled_at);
        let total = |images: &[Image]| -> u64 {
            let named: BTreeSet<&str> = images
                .iter()
                .flat_map(|i| i.layers.iter().map(|l| l.digest.as_str()))
                .collect();
            self.layers()
                .iter()
                .filter(|(d, _)| named.contains(d.as_str()) || in_use.contains(d))
                .map(|(_, s)| s)
                .sum()
        };
        let mut removed = Vec::new();
        let mut i = 0;
        while total(&images) > limit && i < images.len() {
            let used = images[i].layers.iter().any(|l| in_use.contains(&l.digest));
            if used {
                i += 1;
                continue;
            }
            let image = images.remove(i);
            let _ = fs::remove_file(self.image_path(&image.reference));
            removed.push(image.reference);
        }
        let named: BTreeSet<String> = images
            .iter()
            .flat_map(|i| i.layers.iter().map(|l| l.digest.clone()))
            .collect();
        for (digest, _) in self.layers() {
            if !named.contains(&digest) && !in_use.contains(&digest) {
                let _ = fs::remove_dir_all(self.layer_dir(&digest));
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(store: &Store, name: &str, layers: &[(&str, u64)], at: u64) {
        for (d, _) in layers {
            fs::create_dir_all(store.layer_dir(d)).unwrap();
        }
        store
            .put_image(&Image {
                reference: name.into(),
                digest: format!("sha256:{name}"),
                layers: layers
                    .iter()
                    .map(|(d, s)| Layer {
                        digest: d.to_string(),
                        size: *s,
                    })
                    .collect(),
                config: ImageConfig::default(),
                pulled_at: at,
            })
            .unwrap();
    }

    #[test]
    fn collection_keeps_what_tasks_use_and_goes_oldest_first_down_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        image(&store, "base", &[("sha256:aa", 100)], 1);
        image(&store, "app", &[("sha256:aa", 100), ("sha256:bb", 50)], 2);
        image(&store, "old", &[("sha256:cc", 300)], 0);
        image(&store, "new", &[("sha256:dd", 300)], 3);
        assert_eq!(store.images().len(), 4);
        // Nothing past the limit: nothing goes.
        assert!(store.collect(&BTreeSet::new(), 10_000).is_empty());
        // "old" is the oldest but in use; "base" goes next, then "app"; "new" fits.
        let in_use: BTreeSet<String> = ["sha256:cc".to_string()].into();
        let removed = store.collect(&in_use, 650);
        assert_eq!(removed, vec!["base".to_string(), "app".to_string()]);
        assert!(store.image("old").is_some() && store.image("new").is_some());
        assert!(!store.has_layer("sha256:aa") && !store.has_layer("sha256:bb"));
        assert!(store.has_layer("sha256:cc"));
        // An image whose layer went missing is not taken as present.
        fs::remove_dir_all(store.layer_dir("sha256:dd")).unwrap();
        assert!(store.image("new").is_none());
    }

    #[test]
    fn opening_empties_what_a_crash_left_in_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let half = store.tmp("layer");
        fs::create_dir_all(half.join("etc")).unwrap();
        fs::write(store.tmp("blob"), b"partial").unwrap();
        Store::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}

//! Unpacking one layer tarball into a directory of its own, in the form overlayfs reads as a
//! lower layer: OCI whiteouts (`.wh.NAME`) become 0/0 character devices and opaque markers
//! (`.wh..wh..opq`) the `trusted.overlay.opaque` attribute.
//!
//! Safety: the directory is new and only this code writes in it, one entry at a time, so a
//! check of what is already there cannot be raced. An entry is refused when its path is
//! absolute or has a `..`, when any of its parents is a symlink (the write would follow it
//! wherever it points), and a hardlink when its target is such a path or not in the layer.
//! A symlink's own target is kept as written, absolute or not: real images are full of them
//! (`/bin/sh -> /bin/busybox`), and a symlink is only ever resolved inside the container's
//! root, never while unpacking.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{PermissionsExt, lchown, symlink};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use sha2::{Digest, Sha256};

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    #[error("entry {path:?} leaves the layer (an absolute path or '..')")]
    Escapes { path: String },
    #[error("entry {path:?} would be written through the symlink {through:?}")]
    ThroughSymlink { path: String, through: String },
    #[error("hardlink {path:?} -> {target:?}: {why}")]
    BadHardlink {
        path: String,
        target: String,
        why: &'static str,
    },
    #[error("the layer unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the layer's content is {actual}, its image says {expected}")]
    DiffId { expected: String, actual: String },
    #[error("reading the layer: {0}")]
    Read(io::Error),
    #[error("writing {path:?}: {error}")]
    Write { path: String, error: io::Error },
}

/// What unpacking found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// `sha256:<hex>` of the uncompressed tarball (the image config's `diff_id`).
    pub diff_id: String,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Opens a layer blob: gzip, zstd or plain tar, told apart by their magic numbers (media
/// types are set by whoever pushed the image and are often wrong).
fn decompress(mut file: fs::File) -> io::Result<Box<dyn Read>> {
    use std::io::{Seek, SeekFrom};
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    let reader = io::BufReader::new(file);
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(reader)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            ruzstd::decoding::StreamingDecoder::new(reader)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
        ),
        _ => Box::new(reader),
    })
}

/// Unpacks the layer blob `blob` into `dest` (which must not exist), checking its
/// uncompressed digest against `diff_id` when the image names one. On error `dest` is
/// removed: nothing half-unpacked stays.
pub fn unpack_layer(
    blob: &Path,
    dest: &Path,
    diff_id: Option<&str>,
    limit: u64,
) -> Result<Unpacked, UnpackError> {
    let result = (|| {
        fs::create_dir(dest).map_err(|error| write_err(dest, error))?;
        let file = fs::File::open(blob).map_err(UnpackError::Read)?;
        let mut reader = Hashing {
            inner: decompress(file).map_err(UnpackError::Read)?,
            hasher: Sha256::new(),
        };
        let bytes = unpack_tar(&mut reader, dest, limit, true)?;
        // Whatever follows the tar's end marker belongs to the digest too.
        io::copy(&mut reader, &mut io::sink()).map_err(UnpackError::Read)?;
        let actual = format!("sha256:{:x}", reader.hasher.finalize());
        if let Some(expected) = diff_id
            && expected != actual
        {
            return Err(UnpackError::DiffId {
                expected: expected.to_string(),
                actual,
            });
        }
        Ok(Unpacked {
            diff_id: actual,
            bytes,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    result
}

fn write_err(path: &Path, error: io::Error) -> UnpackError {
    UnpackError::Write {
        path: path.display().to_string(),
        error,
    }
}

/// The entry's path inside the layer: relative, without `.` or `..`. `None` for the root.
fn inside(path: &Path) -> Result<Option<PathBuf>, UnpackError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(UnpackError::Escapes {
                    path: path.display().to_string(),
                });
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Makes sure every parent of `rel` under `root` is a real directory (created if missing),
/// never a symlink.
fn parents(root: &Path, rel: &Path) -> Result<(), UnpackError> {
    let mut at = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink {
                    path: rel.display().to_string(),
                    through: at.strip_prefix(root).unwrap_or(&at).display().to_string(),
                });
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&at).map_err(|e| write_err(&at, e))?;
                fs::create_dir(&at).map_err(|e| write_err(&at, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&at).map_err(|e| write_err(&at, e))?;
            }
            Err(e) => return Err(write_err(&at, e)),
        }
    }
    Ok(())
}

/// Removes whatever is at `path` (a later entry replaces an earlier one), keeping a
/// directory when the new entry is one too.
fn clear(path: &Path, keep_dir: bool) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() && keep_dir => Ok(()),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).map_err(|e| write_err(path, e)),
        Ok(_) => fs::remove_file(path).map_err(|e| write_err(path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(write_err(path, e)),
    }
}

/// Extracts a tarball (gzip, zstd or plain) into the existing directory `dir`, with the same
/// refusals as a layer but no whiteouts: a fetched artifact's `.wh.` files are files.
pub(crate) fn extract_tar(archive: &Path, dir: &Path, limit: u64) -> Result<u64, UnpackError> {
    let file = fs::File::open(archive).map_err(UnpackError::Read)?;
    let mut reader = decompress(file).map_err(UnpackError::Read)?;
    unpack_tar(&mut reader, dir, limit, false)
}

fn unpack_tar(
    reader: &mut dyn Read,
    root: &Path,
    limit: u64,
    whiteouts: bool,
) -> Result<u64, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut bytes: u64 = 0;
    // Directory modes are set at the end: a read-only directory must still take its entries.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let raw = entry.path().map_err(UnpackError::Read)?.into_owned();
        let Some(rel) = inside(&raw)? else {
            continue;
        };
        parents(root, &rel)?;
        let dest = root.join(&rel);
        let header = entry.header();
        let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
        // An empty owner field (some producers write none) is root.
        let uid = header.uid().unwrap_or(0) as u32;
        let gid = header.gid().unwrap_or(0) as u32;
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if whiteouts && name == ".wh..wh..opq" {
            // The parent directory hides everything of the layers below it.
            let dir = dest.parent().unwrap_or(root);
            xattr::set(dir, "trusted.overlay.opaque", b"y").map_err(|e| write_err(dir, e))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.").filter(|_| whiteouts) {
            let target = dest.with_file_name(hidden);
            clear(&target, false)?;
            mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
                .map_err(|e| write_err(&target, e.into()))?;
            continue;
        }
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Directory => {
                clear(&dest, true)?;
                if !dest.exists() {
                    fs::create_dir(&dest).map_err(|e| write_err(&dest, e))?;
                }
                lchown(&dest, Some(uid), Some(gid)).map_err(|e| write_err(&dest, e))?;
                dir_modes.push((dest, mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                clear(&dest, false)?;
                let size = header.size().map_err(UnpackError::Read)?;
                bytes = bytes.saturating_add(size);
                if bytes > limit {
                    return Err(UnpackError::TooLarge { limit });
                }
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .map_err(|e| write_err(&dest, e))?;
                io::copy(&mut (&mut entry).take(size), &mut out).map_err(UnpackError::Read)?;
                drop(out);
                lchown(&dest, Some(uid), Some(gid)).map_err(|e| write_err(&dest, e))?;
                // After chown, which clears set-id bits.
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                    .map_err(|e| write_err(&dest, e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                clear(&dest, false)?;
                symlink(&target, &dest).map_err(|e| write_err(&dest, e))?;
                lchown(&dest, Some(uid), Some(gid)).map_err(|e| write_err(&dest, e))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let bad = |why| UnpackError::BadHardlink {
                    path: rel.display().to_string(),
                    target: target.display().to_string(),
                    why,
                };
                let Some(target_rel) =
                    inside(&target).map_err(|_| bad("the target leaves the layer"))?
                else {
                    return Err(bad("the target is the layer's root"));
                };
                if parents_are_symlinks(root, &target_rel) {
                    return Err(bad("the target lies behind a symlink"));
                }
                let source = root.join(&target_rel);
                match fs::symlink_metadata(&source) {
                    Ok(meta) if !meta.is_dir() => {}
                    Ok(_) => return Err(bad("the target is a directory")),
                    Err(_) => return Err(bad("the target is not in this layer")),
                }
                clear(&dest, false)?;
                // link(2) does not follow a symlink target: the link is to the entry itself.
                fs::hard_link(&source, &dest).map_err(|e| write_err(&dest, e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let flag = match kind {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                clear(&dest, false)?;
                mknod(
                    &dest,
                    flag,
                    Mode::from_bits_truncate(mode),
                    makedev(u64::from(major), u64::from(minor)),
                )
                .map_err(|e| write_err(&dest, e.into()))?;
                lchown(&dest, Some(uid), Some(gid)).map_err(|e| write_err(&dest, e))?;
            }
            // PAX and GNU headers are read by the tar crate itself; nothing else is a file.
            _ => {}
        }
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
            .map_err(|e| write_err(&dir, e))?;
    }
    Ok(bytes)
}

/// Whether any parent of `rel` under `root` is a symlink.
fn parents_are_symlinks(root: &Path, rel: &Path) -> bool {
    let mut at = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return false;
    };
    parent.components().any(|part| {
        at.push(part);
        fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A tar built entry by entry, with headers set as a hostile producer would.
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }
        fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            // Written into the raw name field: `set_path` itself refuses `..`, a hostile
            // producer does not.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            h
        }
        fn file(mut self, path: &str, body: &[u8]) -> Self {
            let h = Self::header(path, tar::EntryType::Regular, body.len() as u64, 0o644);
            self.0.append(&h, body).unwrap();
            self
        }
        fn dir(mut self, path: &str, mode: u32) -> Self {
            let h = Self::header(path, tar::EntryType::Directory, 0, mode);
            self.0.append(&h, io::empty()).unwrap();
            self
        }
        fn link(mut self, path: &str, target: &str, kind: tar::EntryType) -> Self {
            let mut h = Self::header(path, kind, 0, 0o777);
            let name = &mut h.as_old_mut().linkname;
            name[..target.len()].copy_from_slice(target.as_bytes());
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }
        fn gzip(self, at: &Path) -> PathBuf {
            let bytes = self.0.into_inner().unwrap();
            let path = at.join("layer.tar.gz");
            let mut gz =
                flate2::write::GzEncoder::new(fs::File::create(&path).unwrap(), Default::default());
            gz.write_all(&bytes).unwrap();
            gz.finish().unwrap();
            path
        }
    }

    fn unpack(tar: Tar) -> (tempfile::TempDir, Result<Unpacked, UnpackError>) {
        let dir = tempfile::tempdir().unwrap();
        let blob = tar.gzip(dir.path());
        let result = unpack_layer(&blob, &dir.path().join("layer"), None, 1 << 20);
        (dir, result)
    }

    #[test]
    fn files_dirs_links_and_whiteouts_land_as_overlayfs_reads_them() {
        let (dir, result) = unpack(
            Tar::new()
                .dir("etc/", 0o755)
                .file("etc/hostname", b"box\n")
                .dir("ro/", 0o555)
                .file("ro/inside", b"x")
                .link("bin/sh", "/bin/busybox", tar::EntryType::Symlink)
                .file("bin/busybox", b"elf")
                .link("bin/hard", "bin/busybox", tar::EntryType::Link)
                .file("var/.wh.gone", b"")
                .file("opaque/.wh..wh..opq", b""),
        );
        let unpacked = result.unwrap();
        assert_eq!(unpacked.bytes, 4 + 1 + 3);
        assert!(unpacked.diff_id.starts_with("sha256:"));
        let l = dir.path().join("layer");
        assert_eq!(fs::read_to_string(l.join("etc/hostname")).unwrap(), "box\n");
        assert_eq!(
            fs::read_link(l.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(l.join("bin/hard")).unwrap().ino(),
            fs::metadata(l.join("bin/busybox")).unwrap().ino()
        );
        let gone = fs::symlink_metadata(l.join("var/gone")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(gone.file_type().is_char_device());
        assert_eq!(gone.rdev(), 0);
        assert_eq!(
            xattr::get(l.join("opaque"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert_eq!(
            fs::metadata(l.join("ro")).unwrap().permissions().mode() & 0o777,
            0o555
        );
    }

    #[test]
    fn entries_that_leave_the_layer_are_refused_and_nothing_stays() {
        let outside = tempfile::tempdir().unwrap();
        let out = outside.path().display().to_string();
        let cases: Vec<(Tar, &str)> = vec![
            (Tar::new().file("../escape", b"x"), "leaves the layer"),
            (Tar::new().file("a/../../escape", b"x"), "leaves the layer"),
            (
                Tar::new()
                    .link("link", &out, tar::EntryType::Symlink)
                    .file("link/written", b"x"),
                "through the symlink",
            ),
            (
                Tar::new()
                    .link("rel", "../../../../../../../", tar::EntryType::Symlink)
                    .file("rel/tmp/written", b"x"),
                "through the symlink",
            ),
            (
                Tar::new().link("hard", "/etc/passwd", tar::EntryType::Link),
                "leaves the layer",
            ),
            (
                Tar::new().link("hard", "../../etc/passwd", tar::EntryType::Link),
                "leaves the layer",
            ),
            (
                Tar::new().link("link", &out, tar::EntryType::Symlink).link(
                    "hard",
                    "link/x",
                    tar::EntryType::Link,
                ),
                "behind a symlink",
            ),
            (
                Tar::new().link("hard", "not/here", tar::EntryType::Link),
                "not in this layer",
            ),
        ];
        for (tar, why) in cases {
            let (dir, result) = unpack(tar);
            let err = result.expect_err(why).to_string();
            assert!(err.contains(why), "{err} (wanted {why})");
            assert!(
                !dir.path().join("layer").exists(),
                "{err}: layer left behind"
            );
            assert!(!dir.path().parent().unwrap().join("escape").exists());
        }
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_layer_past_its_bound_or_with_another_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let blob = Tar::new().file("big", &[0u8; 4096]).gzip(dir.path());
        let err = unpack_layer(&blob, &dir.path().join("l1"), None, 1000).unwrap_err();
        assert!(
            matches!(err, UnpackError::TooLarge { limit: 1000 }),
            "{err}"
        );
        assert!(!dir.path().join("l1").exists());
        let err =
            unpack_layer(&blob, &dir.path().join("l2"), Some("sha256:00"), 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains("its image says sha256:00"),
            "{err}"
        );
        assert!(!dir.path().join("l2").exists());
        let ok = unpack_layer(&blob, &dir.path().join("l3"), None, 1 << 20).unwrap();
        let again =
            unpack_layer(&blob, &dir.path().join("l4"), Some(&ok.diff_id), 1 << 20).unwrap();
        assert_eq!(ok, again);
    }
}

//! Where pins live: a bpffs. Each mount of one is its own instance, so an agent (or a test)
//! mounts one on its own pin directory when that is not on a bpffs yet.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use tracing::info;

/// `statfs(2)`'s type of a bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| {
        #[allow(
            clippy::useless_conversion,
            reason = "fsword_t is i64 here, i32 on 32-bit targets"
        )]
        let kind = i64::from(s.filesystem_type().0);
        kind == BPF_FS_MAGIC
    })
}

/// Makes `dir` a directory on a bpffs: as it is when it already is one; else a bpffs is
/// mounted on `/sys/fs/bpf` when `dir` is under it (the kernel's usual place, where nothing
/// can be made until one is mounted), or on `dir` itself.
pub(crate) fn ensure(dir: &Path) -> io::Result<()> {
    if dir.exists() && is_bpffs(dir) {
        return Ok(());
    }
    let mut ancestor: PathBuf = dir.to_path_buf();
    while !ancestor.exists() {
        if !ancestor.pop() {
            break;
        }
    }
    if is_bpffs(&ancestor) {
        return std::fs::create_dir_all(dir);
    }
    let sys = Path::new("/sys/fs/bpf");
    let target = if dir.starts_with(sys) && ancestor == sys {
        sys.to_path_buf()
    } else {
        std::fs::create_dir_all(dir)?;
        dir.to_path_buf()
    };
    mount(
        Some("bpf"),
        &target,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("mounting a bpffs on {}: {e}", target.display())))?;
    info!(dir = %target.display(), "mounted a bpffs for the L4LB's pins");
    std::fs::create_dir_all(dir)
}

/// Whether `dir` is a bpffs mounted on itself (its parent is not that filesystem).
pub(crate) fn is_own_mount(dir: &Path) -> bool {
    is_bpffs(dir) && dir.parent().is_some_and(|p| !is_bpffs(p))
}

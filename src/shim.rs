//! `dcnet container-exec`: the first process of a container task. It runs single-threaded,
//! before anything else, so that `setns` and `unshare` apply to the whole process: it joins the
//! task's network namespace, takes a mount namespace of its own with the task's resolv.conf
//! bound over /etc/resolv.conf, and then becomes the task's command.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};

/// An image's root: overlayfs of its layers under a writable layer.
pub struct Overlay {
    /// Layer directories, top first, `:`-separated.
    pub lower: String,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub target: PathBuf,
}

/// Never returns on success: the process becomes `argv`.
pub fn exec(
    netns: Option<&Path>,
    resolv_conf: Option<&Path>,
    overlay: Option<&Overlay>,
    ready_file: Option<&Path>,
    argv: &[String],
) -> anyhow::Error {
    match enter(netns, resolv_conf, overlay) {
        Ok(()) => {
            // The agent reports the task RUNNING once this exists: its network is in place.
            if let Some(ready) = ready_file
                && let Err(e) = std::fs::write(ready, b"")
            {
                return anyhow!("writing {}: {e}", ready.display());
            }
            let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
            anyhow!("running {}: {err}", argv[0])
        }
        Err(e) => e,
    }
}

fn enter(
    netns: Option<&Path>,
    resolv_conf: Option<&Path>,
    overlay: Option<&Overlay>,
) -> anyhow::Result<()> {
    if let Some(netns) = netns {
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
            .context("joining the task's network namespace")?;
    }
    unshare(CloneFlags::CLONE_NEWNS).context("creating the task's mount namespace")?;
    // Mounts made here must not propagate back to the node.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    if let Some(resolv_conf) = resolv_conf {
        mount(
            Some(resolv_conf),
            "/etc/resolv.conf",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .context("binding the task's resolv.conf")?;
    }
    if let Some(o) = overlay {
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            o.lower,
            o.upper.display(),
            o.work.display()
        );
        // The kernel takes one page of options: past it, many layers need shorter paths.
        anyhow::ensure!(
            options.len() < 4000,
            "the image has too many layers for one overlay mount ({} bytes of options)",
            options.len()
        );
        mount(
            Some("overlay"),
            &o.target,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .with_context(|| format!("mounting the image's layers at {}", o.target.display()))?;
    }
    Ok(())
}

/// `dcnet task-wait`: starts `argv` as its child, in a process group of its own (the agent
/// signals that group, never this waiter), reports the child's pid in `pid`, waits for it,
/// records its exit status in `status`, and exits as it did. Both files are written whole (a
/// temporary file, then a rename). This is what lets an agent that restarted know how an
/// adopted task ended: it is no longer the task's parent, the waiter is.
pub fn wait(status: &Path, pid: &Path, argv: &[String]) -> anyhow::Error {
    let mut child = match std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return anyhow!("running {}: {e}", argv[0]),
    };
    if let Err(e) = write_whole(pid, child.id().to_string().as_bytes()) {
        let _ = child.kill();
        return e.context(format!("reporting the task's pid in {}", pid.display()));
    }
    let exit = match child.wait() {
        Ok(exit) => exit,
        Err(e) => return anyhow!("waiting for {}: {e}", argv[0]),
    };
    let record = dcnet_node_core::runtime::ExitStatus::of(exit);
    let written = serde_json::to_vec(&record)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| write_whole(status, &bytes));
    if let Err(e) = written {
        eprintln!(
            "dcnet task-wait: recording the exit status in {}: {e:#}",
            status.display()
        );
    }
    use std::os::unix::process::ExitStatusExt;
    let code = exit
        .code()
        .unwrap_or_else(|| 128 + exit.signal().unwrap_or(0));
    std::process::exit(code)
}

fn write_whole(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

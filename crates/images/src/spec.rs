//! The OCI runtime spec (`config.json`) that runs a task from its image: the process merged
//! from the image config and the app as Marathon and Docker merge them, Docker's default
//! capabilities, a seccomp filter that refuses what Docker's profile refuses (as a deny list),
//! a minimal `/proc` and `/dev`, the paths Docker masks, the agent's own
//! resource limits (rlimits are inherited, never raised past what the node allows), and the network
//! namespace that dcnet made for the task (the runtime joins it; it never makes one).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::store::ImageConfig;

/// A bind mount into the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// What a task runs with, besides its image.
#[derive(Clone, Debug)]
pub struct RunSpec<'a> {
    pub image: &'a ImageConfig,
    /// The image's layer directories, top first: where `/etc/passwd` is looked up.
    pub layers: &'a [PathBuf],
    /// Marathon's `cmd` (run by `/bin/sh -c`, in place of the image's entrypoint and cmd).
    pub cmd: Option<&'a str>,
    /// Marathon's `args` (after the image's entrypoint, in place of its cmd).
    pub args: Option<&'a [String]>,
    /// The task's environment, over the image's.
    pub env: &'a [(String, String)],
    pub hostname: &'a str,
    /// The task's network namespace; `None` shares the node's (host networking).
    pub netns: Option<&'a Path>,
    /// The cgroup the runtime puts the container in, below the task's own.
    pub cgroups_path: &'a str,
    pub binds: &'a [Bind],
    /// Where the process starts when the image names no working directory.
    pub default_cwd: &'a str,
}

/// Docker's default capability set.
fn docker_capabilities() -> Vec<&'static str> {
    vec![
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ]
}

/// System calls a container is refused (EPERM), beyond what its capabilities refuse: the ones
/// Docker's default seccomp profile leaves out for a container without CAP_SYS_ADMIN,
/// written as a deny list (kernel modules and kexec, mounts and namespaces, keyrings, BPF,
/// perf, clock setting, reboot, swap, quotas, handles, cross-process memory). `clone3` stays
/// allowed: threads need it, and namespace flags to it need CAP_SYS_ADMIN anyway.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process's argv, as Marathon and Docker merge the app and the image.
fn argv(spec: &RunSpec<'_>) -> Result<Vec<String>, String> {
    let argv: Vec<String> = match (spec.cmd, spec.args) {
        (Some(cmd), _) => vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        (None, Some(args)) => spec
            .image
            .entrypoint
            .iter()
            .chain(args.iter())
            .cloned()
            .collect(),
        (None, None) => spec
            .image
            .entrypoint
            .iter()
            .chain(spec.image.cmd.iter())
            .cloned()
            .collect(),
    };
    if argv.is_empty() {
        return Err(
            "the image names no entrypoint or cmd, and the app gives no cmd or args".into(),
        );
    }
    Ok(argv)
}

/// The image's environment with the task's over it, and a `PATH` if neither has one.
fn env(spec: &RunSpec<'_>) -> Vec<String> {
    let mut out: Vec<(String, String)> = spec
        .image
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    for (k, v) in spec.env {
        match out.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => out.push((k.clone(), v.clone())),
        }
    }
    if !out.iter().any(|(k, _)| k == "PATH") {
        out.insert(0, ("PATH".into(), DEFAULT_PATH.into()));
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// A file of the image, from the top-most layer that has it.
fn image_file(layers: &[PathBuf], rel: &str) -> Option<String> {
    layers
        .iter()
        .find_map(|l| fs::read_to_string(l.join(rel)).ok())
}

/// `user`, `uid`, `user:group` or `uid:gid`, names looked up in the image's passwd and group.
fn user(spec: &RunSpec<'_>) -> Result<(u32, u32), String> {
    let given = spec.image.user.trim();
    if given.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match given.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (given, None),
    };
    let lookup = |file: &str, name: &str, field: usize| -> Option<(u32, Option<u32>)> {
        let text = image_file(spec.layers, file)?;
        text.lines().find_map(|line| {
            let parts: Vec<&str> = line.split(':').collect();
            (parts.first() == Some(&name)).then(|| {
                (
                    parts.get(2).and_then(|p| p.parse().ok()).unwrap_or(0),
                    parts.get(field).and_then(|p| p.parse().ok()),
                )
            })
        })
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => lookup("etc/passwd", u, 3)
            .ok_or_else(|| format!("the image's user {u:?} is not in its /etc/passwd"))?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                lookup("etc/group", g, 2)
                    .ok_or_else(|| format!("the image's group {g:?} is not in its /etc/group"))?
                    .0
            }
        },
        None => primary.unwrap_or(0),
    };
    Ok((uid, gid))
}

/// The runtime spec for `spec`, with the root at `rootfs` beside `config.json`.
pub fn runtime_spec(spec: &RunSpec<'_>) -> Result<Value, String> {
    let (uid, gid) = user(spec)?;
    let cwd = if spec.image.working_dir.is_empty() {
        spec.default_cwd.to_string()
    } else {
        spec.image.working_dir.clone()
    };
    let caps = docker_capabilities();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
    ];
    // sysfs can only be mounted in a network namespace of one's own; with the node's, the
    // node's /sys is bound read-only, as Docker does for host networking.
    mounts.push(match spec.netns {
        Some(_) => json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                          "options": ["nosuid", "noexec", "nodev", "ro"]}),
        None => json!({"destination": "/sys", "type": "bind", "source": "/sys",
                       "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}),
    });
    for b in spec.binds {
        let mut options = vec!["rbind", "nosuid", "nodev"];
        options.push(if b.read_only { "ro" } else { "rw" });
        mounts.push(json!({
            "destination": b.destination,
            "type": "bind",
            "source": b.source,
            "options": options,
        }));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if let Some(netns) = spec.netns {
        namespaces.push(json!({"type": "network", "path": netns}));
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": argv(spec)?,
            "env": env(spec),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "noNewPrivileges": false,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": spec.cgroups_path,
            "namespaces": namespaces,
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
                "syscalls": [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
            },
            "maskedPaths": [
                "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/bin/httpd".into(), "-f".into()],
            cmd: vec!["-p".into(), "80".into()],
            env: vec!["PATH=/bin".into(), "MODE=image".into()],
            user: String::new(),
            working_dir: "/www".into(),
        }
    }

    fn spec<'a>(image: &'a ImageConfig, layers: &'a [PathBuf]) -> RunSpec<'a> {
        RunSpec {
            image,
            layers,
            cmd: None,
            args: None,
            env: &[],
            hostname: "web",
            netns: Some(Path::new("/run/dcnet/netns/t")),
            cgroups_path: "/dcnet/t/ctr",
            binds: &[],
            default_cwd: "/mnt/mesos/sandbox",
        }
    }

    #[test]
    fn the_process_merges_app_and_image_as_marathon_does() {
        let img = image();
        let base = spec(&img, &[]);
        let v = runtime_spec(&base).unwrap();
        assert_eq!(
            v["process"]["args"],
            json!(["/bin/httpd", "-f", "-p", "80"])
        );
        assert_eq!(v["process"]["cwd"], "/www");
        let args = vec!["-p".to_string(), "8080".to_string()];
        let with_args = RunSpec {
            args: Some(&args),
            ..base.clone()
        };
        assert_eq!(
            runtime_spec(&with_args).unwrap()["process"]["args"],
            json!(["/bin/httpd", "-f", "-p", "8080"])
        );
        let with_cmd = RunSpec {
            cmd: Some("echo $PORT0"),
            ..base.clone()
        };
        assert_eq!(
            runtime_spec(&with_cmd).unwrap()["process"]["args"],
            json!(["/bin/sh", "-c", "echo $PORT0"])
        );
        let env = vec![
            ("MODE".to_string(), "task".to_string()),
            ("PORT0".to_string(), "80".to_string()),
        ];
        let with_env = RunSpec {
            env: &env,
            ..base.clone()
        };
        assert_eq!(
            runtime_spec(&with_env).unwrap()["process"]["env"],
            json!(["PATH=/bin", "MODE=task", "PORT0=80"])
        );
        let empty = ImageConfig::default();
        let none = spec(&empty, &[]);
        assert!(runtime_spec(&none).unwrap_err().contains("no entrypoint"));
        let with_cmd = RunSpec {
            cmd: Some("true"),
            ..none
        };
        let v = runtime_spec(&with_cmd).unwrap();
        assert_eq!(v["process"]["cwd"], "/mnt/mesos/sandbox");
        assert!(
            v["process"]["env"][0]
                .as_str()
                .unwrap()
                .starts_with("PATH=")
        );
    }

    #[test]
    fn namespaces_caps_and_users_are_as_docker_gives_them() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().to_path_buf();
        fs::create_dir_all(layer.join("etc")).unwrap();
        fs::write(
            layer.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nwww:x:33:34::/:/bin/sh\n",
        )
        .unwrap();
        fs::write(layer.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let layers = [layer];
        let mut img = image();
        let v = runtime_spec(&spec(&img, &layers)).unwrap();
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(caps.len(), 14);
        assert!(!caps.contains(&json!("CAP_SYS_ADMIN")));
        assert!(
            v["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .contains(&json!({"type": "network", "path": "/run/dcnet/netns/t"}))
        );
        assert_eq!(v["linux"]["cgroupsPath"], "/dcnet/t/ctr");
        let denied = &v["linux"]["seccomp"]["syscalls"][0];
        assert_eq!(denied["action"], "SCMP_ACT_ERRNO");
        for call in ["mount", "unshare", "setns", "kexec_load", "bpf"] {
            assert!(
                denied["names"].as_array().unwrap().contains(&json!(call)),
                "{call}"
            );
        }
        assert!(
            !denied["names"]
                .as_array()
                .unwrap()
                .contains(&json!("clone3"))
        );
        for (given, want) in [("www", (33, 34)), ("www:staff", (33, 50)), ("7:8", (7, 8))] {
            img.user = given.into();
            let v = runtime_spec(&spec(&img, &layers)).unwrap();
            assert_eq!(
                (
                    v["process"]["user"]["uid"].clone(),
                    v["process"]["user"]["gid"].clone()
                ),
                (json!(want.0), json!(want.1)),
                "{given}"
            );
        }
        img.user = "nobody".into();
        assert!(
            runtime_spec(&spec(&img, &layers))
                .unwrap_err()
                .contains("\"nobody\" is not in its /etc/passwd")
        );
        // Host networking: no network namespace, the node's /sys bound read-only.
        img.user = String::new();
        let host = RunSpec {
            netns: None,
            ..spec(&img, &layers)
        };
        let v = runtime_spec(&host).unwrap();
        assert!(
            !v["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["type"] == "network")
        );
        assert!(
            v["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["destination"] == "/sys" && m["type"] == "bind")
        );
    }
}

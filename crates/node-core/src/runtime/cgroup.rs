//! Cgroups for tasks, on whatever hierarchy this machine mounts.
//!
//! Machines differ: pure cgroup v2, or hybrid (v2 mounted beside v1 hierarchies, as here:
//! `/sys/fs/cgroup/unified` with only `hugetlb`, and `cpu` and `memory` as v1). We read
//! `/proc/self/mountinfo` and put each limit where its controller is: v2 if its root lists the
//! controller, else the v1 hierarchy that carries it, as runc does. Every task also gets a v2
//! directory when v2 is mounted at all, because v2 membership is what BPF socket hooks attach
//! to and what lists every process of the task.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where this machine mounts its cgroup hierarchies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hierarchies {
    pub v2: Option<PathBuf>,
    pub v1_cpu: Option<PathBuf>,
    pub v1_memory: Option<PathBuf>,
    /// Every cgroup hierarchy mounted, v1 and v2: an OCI runtime makes a container's cgroup
    /// in each, and clean-up must find it there.
    pub all: Vec<PathBuf>,
}

impl Hierarchies {
    pub fn detect() -> io::Result<Self> {
        Ok(Self::from_mountinfo(&fs::read_to_string(
            "/proc/self/mountinfo",
        )?))
    }

    /// Parses mountinfo lines: `... mountpoint opts [optional...] - fstype source superopts`.
    pub fn from_mountinfo(mountinfo: &str) -> Self {
        let mut found = Self::default();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mountpoint) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let (fstype, _source, superopts) = (right.next(), right.next(), right.next());
            if matches!(fstype, Some("cgroup" | "cgroup2")) {
                found.all.push(mountpoint.into());
            }
            match fstype {
                Some("cgroup2") if found.v2.is_none() => found.v2 = Some(mountpoint.into()),
                Some("cgroup") => {
                    let opts: Vec<&str> = superopts.unwrap_or_default().split(',').collect();
                    if opts.contains(&"cpu") && found.v1_cpu.is_none() {
                        found.v1_cpu = Some(mountpoint.into());
                    }
                    if opts.contains(&"memory") && found.v1_memory.is_none() {
                        found.v1_memory = Some(mountpoint.into());
                    }
                }
                _ => {}
            }
        }
        found
    }

    fn v2_has(&self, controller: &str) -> bool {
        self.v2.as_ref().is_some_and(|root| {
            fs::read_to_string(root.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == controller))
        })
    }
}

/// Limits for one task.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// CPU shares as Marathon counts them: 0.5 = half a core, enforced as a CFS quota.
    pub cpus: f64,
    /// Memory in MiB; 0 = no limit.
    pub mem_mib: f64,
}

const CFS_PERIOD_US: u64 = 100_000;

/// The cgroups of one parent (`dcnet`, or `dcnet-test-<pid>` in tests) on every hierarchy used.
#[derive(Clone, Debug)]
pub struct Cgroups {
    hierarchies: Hierarchies,
    parent: String,
    cpu_on_v2: bool,
    memory_on_v2: bool,
}

/// One task's cgroup directories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskCgroup {
    pub dirs: Vec<PathBuf>,
}

impl Cgroups {
    pub fn new(hierarchies: Hierarchies, parent: &str) -> Self {
        let cpu_on_v2 = hierarchies.v2_has("cpu");
        let memory_on_v2 = hierarchies.v2_has("memory");
        Self {
            hierarchies,
            parent: parent.to_string(),
            cpu_on_v2,
            memory_on_v2,
        }
    }

    /// The parent's path inside each hierarchy (`dcnet` or `dcnet-test-123/agent`).
    pub fn parent(&self) -> &str {
        &self.parent
    }

    /// Removes what an OCI runtime made for task `name` in every hierarchy, ours or not.
    pub fn remove_everywhere(&self, name: &str) {
        for root in &self.hierarchies.all {
            let dir = root.join(&self.parent).join(name);
            for sub in subdirs(&dir).iter().rev() {
                let _ = fs::remove_dir(sub);
            }
        }
    }

    /// The directories of the parent on every hierarchy in use.
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        let mut push = |root: &Option<PathBuf>| {
            if let Some(root) = root {
                let dir = root.join(&self.parent);
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        };
        push(&self.hierarchies.v2);
        if !self.cpu_on_v2 {
            push(&self.hierarchies.v1_cpu);
        }
        if !self.memory_on_v2 {
            push(&self.hierarchies.v1_memory);
        }
        dirs
    }

    /// A short description for logs: which controller lives where.
    pub fn describe(&self) -> String {
        let place = |on_v2: bool, v1: &Option<PathBuf>| match (on_v2, v1) {
            (true, _) => "v2".to_string(),
            (false, Some(p)) => format!("v1 {}", p.display()),
            (false, None) => "none".to_string(),
        };
        format!(
            "cpu: {}, memory: {}, v2: {}",
            place(self.cpu_on_v2, &self.hierarchies.v1_cpu),
            place(self.memory_on_v2, &self.hierarchies.v1_memory),
            self.hierarchies
                .v2
                .as_ref()
                .map_or("not mounted".into(), |p| p.display().to_string()),
        )
    }

    /// Creates the task's directories and writes its limits. Processes join by writing their
    /// pid to each `cgroup.procs` (see [`TaskCgroup::procs_files`]).
    pub fn create(&self, name: &str, limits: Limits) -> io::Result<TaskCgroup> {
        let mut dirs = Vec::new();
        for parent in self.parent_dirs() {
            fs::create_dir_all(&parent)?;
            let dir = parent.join(name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            dirs.push(dir);
        }
        let quota = ((limits.cpus * CFS_PERIOD_US as f64) as u64).max(1000);
        let mem_bytes = (limits.mem_mib * 1024.0 * 1024.0) as u64;
        if let (true, Some(v2)) = (self.cpu_on_v2 || self.memory_on_v2, &self.hierarchies.v2) {
            self.enable_v2_controllers(v2)?;
        }
        if self.cpu_on_v2 {
            let dir = self.task_dir(&self.hierarchies.v2, name);
            write(&dir.join("cpu.max"), &format!("{quota} {CFS_PERIOD_US}"))?;
        } else if self.hierarchies.v1_cpu.is_some() {
            let dir = self.task_dir(&self.hierarchies.v1_cpu, name);
            write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        if mem_bytes > 0 {
            if self.memory_on_v2 {
                let dir = self.task_dir(&self.hierarchies.v2, name);
                write(&dir.join("memory.max"), &mem_bytes.to_string())?;
                // No swap: a task over its limit is OOM-killed rather than slowed down.
                let _ = write(&dir.join("memory.swap.max"), "0");
            } else if self.hierarchies.v1_memory.is_some() {
                let dir = self.task_dir(&self.hierarchies.v1_memory, name);
                write(&dir.join("memory.limit_in_bytes"), &mem_bytes.to_string())?;
            }
        }
        Ok(TaskCgroup { dirs })
    }

    fn task_dir(&self, root: &Option<PathBuf>, name: &str) -> PathBuf {
        root.as_ref()
            .expect("checked by the caller")
            .join(&self.parent)
            .join(name)
    }

    fn enable_v2_controllers(&self, v2: &Path) -> io::Result<()> {
        let mut wanted = Vec::new();
        if self.cpu_on_v2 {
            wanted.push("+cpu");
        }
        if self.memory_on_v2 {
            wanted.push("+memory");
        }
        for dir in [v2.to_path_buf(), v2.join(&self.parent)] {
            let current =
                fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
            for w in &wanted {
                if !current.split_whitespace().any(|c| c == &w[1..]) {
                    write(&dir.join("cgroup.subtree_control"), w)?;
                }
            }
        }
        Ok(())
    }

    /// The task's cgroup, whether or not it exists.
    pub fn task(&self, name: &str) -> TaskCgroup {
        TaskCgroup {
            dirs: self
                .parent_dirs()
                .into_iter()
                .map(|p| p.join(name))
                .collect(),
        }
    }

    /// Names of the task directories under the parent (on any hierarchy).
    pub fn list(&self) -> Vec<String> {
        let mut names = Vec::new();
        for parent in self.parent_dirs() {
            let Ok(entries) = fs::read_dir(&parent) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names.sort();
        names
    }

    /// Removes the parent directories; they must hold no task directories any more.
    pub fn remove_parent(&self) -> io::Result<()> {
        for dir in self.parent_dirs() {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl TaskCgroup {
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Every process in the task's cgroups.
    /// The processes in the task's cgroups. A cgroup that is not there has none; one that
    /// cannot be read (no file descriptor left, say) is an error, never "empty", so that a
    /// task whose processes may still run is not taken for gone.
    pub fn pids(&self) -> std::io::Result<Vec<i32>> {
        let mut pids = Vec::new();
        // With the cgroups below (an OCI runtime's container cgroup): v1 lists only a
        // cgroup's own members.
        let mut files = Vec::new();
        for dir in &self.dirs {
            for sub in subdirs(dir) {
                files.push(sub.join("cgroup.procs"));
            }
        }
        for file in files {
            let text = match fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for pid in text.lines().filter_map(|l| l.trim().parse().ok()) {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        Ok(pids)
    }

    /// Whether the kernel OOM-killed a process of the task (v2 `memory.events`, v1
    /// `memory.oom_control`).
    pub fn was_oom_killed(&self) -> bool {
        self.dirs.iter().any(|d| {
            let read = |f: &str| fs::read_to_string(d.join(f)).unwrap_or_default();
            let count = |text: String, key: &str| {
                text.lines()
                    .filter_map(|l| l.strip_prefix(key))
                    .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
            };
            count(read("memory.events"), "oom_kill ")
                || count(read("memory.oom_control"), "oom_kill ")
        })
    }

    /// Removes the directories, and those below them, deepest first; they must be empty of
    /// processes.
    pub fn remove(&self) -> io::Result<()> {
        let mut first_err = None;
        let all: Vec<PathBuf> = self.dirs.iter().flat_map(|d| subdirs(d)).collect();
        for dir in all.iter().rev() {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// `dir` and every directory below it, parents before children; empty if `dir` is gone.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return out;
    }
    let mut i = 0;
    out.push(dir.to_path_buf());
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing `{value}` to {}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_mountinfo_puts_cpu_and_memory_on_v1() {
        let mountinfo = "\
30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:5 - cgroup cgroup rw,cpu,cpuacct";
        let h = Hierarchies::from_mountinfo(mountinfo);
        assert_eq!(h.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(h.v1_cpu.as_deref(), Some(Path::new("/sys/fs/cgroup/cpu")));
        assert_eq!(
            h.v1_memory.as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        // Every cgroup mount, for what an OCI runtime makes everywhere; not the tmpfs.
        assert_eq!(h.all.len(), 4);
        assert!(!h.all.contains(&PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn pure_v2_mountinfo_has_no_v1() {
        let h = Hierarchies::from_mountinfo(
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate",
        );
        assert_eq!(h.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert_eq!(h.v1_cpu, None);
    }
}

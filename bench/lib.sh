# Shared by the benchmark scripts (source it): removal of a cgroup parent of the run's own and
# everything under it, on every hierarchy, killing what still runs there first.
remove_cgroup_parent() {
    local cg=$1 root t p
    for root in /sys/fs/cgroup/unified /sys/fs/cgroup/cpu /sys/fs/cgroup/memory /sys/fs/cgroup; do
        [[ -d "$root/$cg" ]] || continue
        for t in "$root/$cg"/*/; do
            [[ -d "$t" ]] || continue
            for _ in $(seq 50); do p=$(cat "$t/cgroup.procs" 2>/dev/null); [[ -z "$p" ]] && break; kill -9 $p; sleep 0.05; done
            rmdir "$t" 2>/dev/null
        done
        # A task's cgroup the agent removes at the same moment is fine; the parent may need
        # a moment more.
        for _ in $(seq 20); do rmdir "$root/$cg" 2>/dev/null && break; sleep 0.1; done
        if [[ -d "$root/$cg" ]]; then echo "could not remove $root/$cg" >&2; fi
    done
}

# Shared by the benchmark scripts (source it): removal of a cgroup parent of the run's own and
# everything under it, on every hierarchy, killing what still runs there first.
remove_cgroup_parent() {
    local cg=$1 root f p
    # Every hierarchy: an OCI runtime makes a container's cgroup (and its parents) in each.
    for root in $(awk '$9 == "cgroup" || $9 == "cgroup2" { print $5 }' /proc/self/mountinfo); do
        [[ -d "$root/$cg" ]] || continue
        for _ in $(seq 50); do
            p=$(find "$root/$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)
            [[ -z "$p" ]] && break
            kill -9 $p 2>/dev/null; sleep 0.05
        done
        # A task's cgroup the agent removes at the same moment is fine; the parent may need
        # a moment more.
        for _ in $(seq 20); do
            find "$root/$cg" -depth -type d -exec rmdir {} + 2>/dev/null
            [[ -d "$root/$cg" ]] || break
            sleep 0.1
        done
        if [[ -d "$root/$cg" ]]; then echo "could not remove $root/$cg" >&2; fi
    done
}

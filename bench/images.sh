#!/usr/bin/env bash
# Start time of a task from an image, through dcnet and through Debian's podman, in one run,
# inside a throw-away network namespace: a registry (Debian's docker-registry) on its loopback
# holds an image built from busybox-static with umoci (about 1 MB compressed). Cold: the image
# is not on the node (dcnet's layer store, podman's storage emptied first); warm: it is.
# dcnet: from the PUT of the app to the task's RUNNING in /v2/apps/{id}/tasks (scheduling, the
# pull, the container's namespace, address and veth, the overlay, runc); podman: `podman run
# -d` to its return (the pull, its own namespace with --network none, the overlay, runc).
# Both use runc (crun refuses this machine's hybrid cgroups). Prints medians and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
RUNS=${RUNS:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
scripts/install-deps.sh docker-registry umoci skopeo busybox-static podman runc python3 curl
cargo build --release -q --bin dcnet
DCNET=$CARGO_TARGET_DIR/release/dcnet
NS=dcnet-bench-img-$$
CG=dcnet-bench-$$
WORK=$(mktemp -d /tmp/dcnet-bench-images.XXXXXX)
AGENT=
REGISTRY=
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }
podman_() {
    in_ns podman --root "$WORK/podman/root" --runroot "$WORK/podman/run" --tmpdir "$WORK/podman/tmp" \
        --storage-driver overlay --cgroup-manager cgroupfs --runtime runc --events-backend file "$@"
}
cleanup() {
    set +e
    [[ -n "${KEEP_LOG:-}" ]] && cp "$WORK/agent.log" "$KEEP_LOG"
    podman_ rm -f -a >/dev/null 2>&1
    if [[ -n "$AGENT" ]]; then
        in_ns "$DCNET" app remove /bench/img --wait --timeout 30s >/dev/null 2>&1
        kill "$AGENT"; wait "$AGENT" 2>/dev/null
    fi
    [[ -n "$REGISTRY" ]] && kill "$REGISTRY" && wait "$REGISTRY" 2>/dev/null
    remove_cgroup_parent "$CG"
    remove_cgroup_parent "$CG-podman"
    for m in $(awk -v w="$WORK" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r); do umount -l "$m"; done
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS"
ip -n "$NS" link add node0 type veth peer name node0p
ip -n "$NS" addr add 192.0.2.10/24 dev node0
ip -n "$NS" link set node0p up
ip -n "$NS" link set node0 up
ip -n "$NS" link set lo up

echo "building the image (busybox-static, umoci) and a registry on the namespace's loopback"
L=$WORK/oci
scripts/busybox-image.sh "$L"
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log: { level: error }
storage: { filesystem: { rootdirectory: $WORK/registry } }
http: { addr: 127.0.0.1:5000 }
EOF
# nsenter itself, not the in_ns function (a subshell): $! is then the process to stop.
nsenter --net="/run/netns/$NS" docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REGISTRY=$!
for _ in $(seq 100); do in_ns curl -sf http://127.0.0.1:5000/v2/ >/dev/null && break; sleep 0.1; done
in_ns skopeo copy --quiet --dest-tls-verify=false "oci:$L:bb" docker://127.0.0.1:5000/bench/busybox:1

cat >"$WORK/agent.toml" <<EOF
state_dir = "$WORK/state"
[node]
id = "bench"
ip = "192.0.2.10"
cpus = 8
[api]
listen = "127.0.0.1:8080"
[runtime]
cgroup_parent = "$CG"
[dns]
forward = false
[l4lb]
data_plane = "userspace"
[images]
oci_runtime = "$(command -v runc)"
[[images.registries]]
host = "127.0.0.1:5000"
insecure = true
EOF
nsenter --net="/run/netns/$NS" "$DCNET" agent --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 &
AGENT=$!
for _ in $(seq 100); do in_ns curl -sf http://127.0.0.1:8080/ready >/dev/null && break; sleep 0.1; done

# One dcnet start: PUT the app, poll until its task is RUNNING; prints milliseconds.
dcnet_start() {
    in_ns python3 - <<'EOF'
import json, time, urllib.request
api = "http://127.0.0.1:8080"
app = {"id": "/bench/img", "cpus": 0.1, "mem": 32, "networks": [{"mode": "container"}],
       "container": {"docker": {"image": "127.0.0.1:5000/bench/busybox:1"}}}
start = time.monotonic()
req = urllib.request.Request(api + "/v2/apps/bench/img", data=json.dumps(app).encode(), method="PUT",
                             headers={"Content-Type": "application/json"})
urllib.request.urlopen(req).read()
while True:
    tasks = json.load(urllib.request.urlopen(api + "/v2/apps/bench/img/tasks"))["tasks"]
    if any(t["state"] == "TASK_RUNNING" for t in tasks):
        break
    if any(t["state"] in ("TASK_FAILED", "TASK_ERROR") for t in tasks):
        raise SystemExit("the task failed: " + json.dumps(tasks))
    time.sleep(0.002)
print(round((time.monotonic() - start) * 1000, 1))
EOF
}
dcnet_stop() {
    in_ns "$DCNET" app remove /bench/img --wait --timeout 30s >/dev/null 2>&1
}
podman_start() {
    local t0 t1
    t0=$(date +%s%N)
    # Limits below the machine's: podman's defaults (and even the node's own values, from
    # conmon) are refused here by runc with EPERM; dcnet's tasks inherit the agent's.
    podman_ run -d --quiet --network none --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --tls-verify=false \
        --cgroup-parent "/$CG-podman" 127.0.0.1:5000/bench/busybox:1 >/dev/null ||
        { echo "podman run failed" >&2; exit 1; }
    t1=$(date +%s%N)
    echo $(( (t1 - t0) / 100000 )) | awk '{ printf "%.1f\n", $1 / 10 }'
}
podman_stop() {
    podman_ rm -f -a -t 0 >/dev/null
}
median() { tr ' ' '\n' | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A results
for run in $(seq "$RUNS"); do
    # Cold: nothing of the image on the node.
    rm -rf "$WORK/state/images/layers/"* "$WORK/state/images/images/"*
    t=$(dcnet_start) || exit 1; results[dcnet_cold]+=" $t"; dcnet_stop
    t=$(dcnet_start) || exit 1; results[dcnet_warm]+=" $t"; dcnet_stop
    podman_ rmi -a -f >/dev/null 2>&1 || true
    t=$(podman_start) || exit 1; results[podman_cold]+=" $t"; podman_stop
    t=$(podman_start) || exit 1; results[podman_warm]+=" $t"; podman_stop
    echo "run $run of $RUNS: dcnet cold/warm ${results[dcnet_cold]##* }/${results[dcnet_warm]##* } ms, podman ${results[podman_cold]##* }/${results[podman_warm]##* } ms"
done
printf '\n%-6s %12s %12s %16s\n' "start" "dcnet ms" "podman ms" "dcnet / podman"
for kind in cold warm; do
    d=$(median <<<"${results[dcnet_$kind]# }")
    p=$(median <<<"${results[podman_$kind]# }")
    printf '%-6s %12s %12s %15.2fx\n' "$kind" "$d" "$p" "$(awk -v a="$d" -v b="$p" 'BEGIN { print a / b }')"
done
echo "(medians of $RUNS runs; dcnet's includes scheduling and a veth and address of the task's own)"

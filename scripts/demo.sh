#!/usr/bin/env bash
# The README's demo: a single-node agent in a throw-away network namespace, the example app
# deployed with a progress bar, a page fetched from one of its tasks, a VIP served by the eBPF
# socket load balancer to a container, then everything removed: the namespace, the agent, its
# tasks, their cgroups, the BPF programs and pins, and the state dir, also on failure.
set -euo pipefail

DCNET=${DCNET:-target/debug/dcnet}
DCNET=$(readlink -f "$DCNET")
cd "$(dirname "$0")/.."

NS="dcnet-demo-$$"
CGROUP_PARENT="dcnet-demo-$$"
WORK=$(mktemp -d /tmp/dcnet-demo.XXXXXX)
AGENT_PID=

in_ns() { nsenter --net="/run/netns/$NS" "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() {
    printf '\033[36m$ dcnet %s\033[0m\n' "$*"
    in_ns "$DCNET" "$@"
}

cleanup() {
    set +e
    if [[ -n "$AGENT_PID" ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID"
        wait "$AGENT_PID" 2>/dev/null
    fi
    # The BPF programs and their pins outlive a stopped agent by design; the demo's go.
    [[ -f "$WORK/agent.toml" ]] && "$DCNET" agent --cleanup --config "$WORK/agent.toml" >/dev/null
    # Tasks outlive a stopped agent by design; the demo's go with it.
    for root in /sys/fs/cgroup/unified /sys/fs/cgroup/cpu /sys/fs/cgroup/memory /sys/fs/cgroup; do
        parent="$root/$CGROUP_PARENT"
        [[ -d "$parent" ]] || continue
        for task in "$parent"/*/; do
            [[ -d "$task" ]] || continue
            for _ in $(seq 50); do
                pids=$(cat "$task/cgroup.procs" 2>/dev/null)
                [[ -z "$pids" ]] && break
                kill -9 $pids 2>/dev/null
                sleep 0.05
            done
            rmdir "$task"
        done
        rmdir "$parent"
    done
    # A container task's namespace file stays mounted when the demo stops before its removal.
    for f in "$WORK"/state/netns/*; do [[ -e "$f" ]] && umount "$f" 2>/dev/null; done
    ip netns del "$NS" 2>/dev/null
    left=$(ip netns list | grep -c "^$NS" ; ls -d /sys/fs/cgroup/*/"$CGROUP_PARENT" 2>/dev/null | wc -l; ls "$WORK/bpf" 2>/dev/null | wc -l)
    if [[ "$(echo $left | tr -d ' ')" == "000" ]]; then
        echo "left behind: nothing (namespace, agent, tasks, cgroups and BPF pins are gone)"
    else
        echo "warning: something was left behind: $left" >&2
    fi
    if [[ -n "${KEEP_LOG:-}" ]]; then
        echo "agent log kept in $WORK/agent.log"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "a throw-away network namespace: $NS"
ip netns add "$NS"
ip -n "$NS" link set lo up
# The node's own address, not loopback (a veth pair with both ends in the namespace; no default
# route): host-network tasks listen there, where containers reach them too.
NODE_IP=192.0.2.10
ip -n "$NS" link add node0 type veth peer name node0p
ip -n "$NS" addr add "$NODE_IP/24" dev node0
ip -n "$NS" link set node0p up
ip -n "$NS" link set node0 up

cat >"$WORK/agent.toml" <<EOF
state_dir = "$WORK/state"
[node]
id = "demo-node"
hostname = "demo-node"
ip = "$NODE_IP"
[api]
listen = "127.0.0.1:8080"
[runtime]
cgroup_parent = "$CGROUP_PARENT"
[l4lb]
# The eBPF data plane pins under the demo's own directory, on a bpffs it mounts there.
bpf_pin_dir = "$WORK/bpf"
EOF

say "starting the agent (log: $WORK/agent.log)"
# nsenter execs the agent, so $! is the agent itself.
nsenter --net="/run/netns/$NS" "$DCNET" agent --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 100); do
    in_ns curl -sf http://127.0.0.1:8080/ping >/dev/null && break
    if ! kill -0 "$AGENT_PID" 2>/dev/null; then
        cat "$WORK/agent.log"
        echo "the agent exited" >&2
        exit 1
    fi
    sleep 0.1
done
run node list

say "deploying examples/hello.json: 3 instances of a small HTTP server on host ports"
run app deploy examples/hello.json --wait --timeout 2m
run app list
run task list

say "resolving the app's names with dig against the agent's DNS server"
for query in "hello-demo.marathon.mesos" "_hello-demo._tcp.marathon.mesos SRV"; do
    printf '\033[36m$ dig @127.0.0.1 +noall +answer %s\033[0m\n' "$query"
    # shellcheck disable=SC2086
    in_ns dig @127.0.0.1 +noall +answer $query
done
run dns lookup leader.mesos

say "fetching a page from one of the tasks on its host port"
port=$(in_ns "$DCNET" task list --app /demo/hello --json |
    python3 -c 'import json,sys; t=[t for t in json.load(sys.stdin)["tasks"] if t["state"]=="TASK_RUNNING"]; print(t[0]["ports"][0])')
printf '\033[36m$ curl http://%s:%s/\033[0m\n' "$NODE_IP" "$port"
in_ns curl -sS "http://$NODE_IP:$port/" | head -n 4

say "a container task, with its own network namespace, address and resolv.conf"
run app deploy examples/client.json --wait --timeout 1m
read -r client_pid client_id < <(in_ns "$DCNET" task list --app /demo/client --json |
    python3 -c 'import json,sys; t=[t for t in json.load(sys.stdin)["tasks"] if t["state"]=="TASK_RUNNING"]; print(t[0]["process"]["pid"], t[0]["id"])')
CG2=$(findmnt -n -t cgroup2 -o TARGET | head -1)
# Into the container as `docker exec` goes: its cgroup (where the eBPF programs act), then its
# network and mount namespaces.
in_client() {
    sh -c 'echo $$ > "$0/cgroup.procs" && pid=$1 && shift && exec nsenter --target "$pid" --net --mount "$@"' \
        "$CG2/$CGROUP_PARENT/$client_id" "$client_pid" "$@"
}
for _ in $(seq 50); do in_client grep -q nameserver /etc/resolv.conf 2>/dev/null && break; sleep 0.1; done
printf '\033[36m[container]$ cat /etc/resolv.conf\033[0m\n'
in_client cat /etc/resolv.conf

say "from inside the container: the VIP name resolves, and connect() to it is sent to a backend in the kernel (eBPF)"
printf '\033[36m[container]$ getent hosts hello.marathon.l4lb\033[0m\n'
for _ in $(seq 50); do in_client getent hosts hello.marathon.l4lb >/dev/null && break; sleep 0.1; done
in_client getent hosts hello.marathon.l4lb
for i in 1 2 3 4 5 6; do
    printf '\033[36m[container]$ curl http://hello.marathon.l4lb/\033[0m  '
    in_client curl -sS --max-time 3 http://hello.marathon.l4lb/
done
run vip list

say "removing the apps"
run app remove /demo/client --wait --timeout 1m
run app remove /demo/hello --wait --timeout 1m
run task list

say "cleaning up: agent, namespace, cgroups, state"

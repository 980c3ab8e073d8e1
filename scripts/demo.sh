#!/usr/bin/env bash
# The README's demo: two nodes in throw-away network namespaces on an underlay of their own,
# their state in an etcd member the demo starts, a dcnet agent on each; the example apps
# deployed with a progress bar and spread over both nodes, a page fetched from one of their
# tasks, VIPs served by the eBPF socket load balancer to a container, a container on the other
# node reached over the WireGuard overlay; then everything removed: the namespaces, the agents,
# etcd, the tasks, their cgroups, the BPF programs and pins, the WireGuard sockets and the state
# dirs, also on failure. The dashboard of node-1's agent is relayed to this machine's loopback
# (socat) and its address printed; DEMO_KEEP=1 keeps everything up for a look until Enter.
# An image built from busybox-static is pushed to a registry (Debian's docker-registry) on the
# underlay, and an app runs from it on both nodes.
set -euo pipefail

DCNET=${DCNET:-target/debug/dcnet}
DCNET=$(readlink -f "$DCNET")
cd "$(dirname "$0")/.."

NS="dcnet-demo-$$"
CTL="$NS-ctl"
CGROUP_PARENT="dcnet-demo-$$"
WORK=$(mktemp -d /tmp/dcnet-demo.XXXXXX)
ETCD_IP=192.0.2.1
ETCD_PID=
REGISTRY_PID=
RELAY_PID=
AGENT_PIDS=()
NODES=(1 2)
node_ip() { echo "192.0.2.1$1"; }
device() { echo "dd$$n$1"; }

in_node() { local n=$1; shift; nsenter --net="/run/netns/$NS-$n" "$@"; }
in_ctl() { nsenter --net="/run/netns/$CTL" "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# The CLI against node 1's agent (every agent answers for the whole cluster).
run() {
    printf '\033[36m$ dcnet %s\033[0m\n' "$*"
    in_node 1 "$DCNET" "$@"
}

cleanup() {
    set +e
    # The relay leads a session of its own (setsid), with a child per open connection.
    [[ -n "$RELAY_PID" ]] && kill -TERM -- "-$RELAY_PID" 2>/dev/null && wait "$RELAY_PID" 2>/dev/null
    for pid in "${AGENT_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" && wait "$pid" 2>/dev/null
    done
    for n in "${NODES[@]}"; do
        # The BPF programs and their pins outlive a stopped agent by design; the demo's go.
        [[ -f "$WORK/node-$n/agent.toml" ]] &&
            "$DCNET" agent --cleanup --config "$WORK/node-$n/agent.toml" >/dev/null
        rm -f "/var/run/wireguard/$(device "$n").sock"
    done
    [[ -n "$ETCD_PID" ]] && kill -TERM "$ETCD_PID" 2>/dev/null && wait "$ETCD_PID" 2>/dev/null
    [[ -n "$REGISTRY_PID" ]] && kill -TERM "$REGISTRY_PID" 2>/dev/null && wait "$REGISTRY_PID" 2>/dev/null
    # Tasks outlive a stopped agent by design; the demo's go with it.
    # (Deepest first, again until gone: a cgroup whose last process just died can be busy for
    # a moment.)
    # Every hierarchy: the OCI runtime makes a container's cgroup in each.
    for root in $(awk '$9 == "cgroup" || $9 == "cgroup2" { print $5 }' /proc/self/mountinfo); do
        parent="$root/$CGROUP_PARENT"
        for _ in $(seq 100); do
            [[ -d "$parent" ]] || break
            for dir in $(find "$parent" -type d 2>/dev/null | sort -r); do
                pids=$(cat "$dir/cgroup.procs" 2>/dev/null)
                [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null
                rmdir "$dir" 2>/dev/null
            done
            sleep 0.05
        done
    done
    # A container task's namespace file stays mounted when the demo stops before its removal.
    for f in "$WORK"/node-*/state/netns/*; do [[ -e "$f" ]] && umount "$f" 2>/dev/null; done
    for n in "${NODES[@]}"; do ip netns del "$NS-$n" 2>/dev/null; done
    ip netns del "$CTL" 2>/dev/null
    alive=0
    for pid in "${AGENT_PIDS[@]}" $ETCD_PID $REGISTRY_PID $RELAY_PID; do kill -0 "$pid" 2>/dev/null && alive=$((alive + 1)); done
    left=$(ip netns list | grep -c "^$NS" ; ls -d /sys/fs/cgroup/*/"$CGROUP_PARENT" 2>/dev/null | wc -l;
        ls "$WORK"/node-*/bpf 2>/dev/null | grep -vc ':$' ; ls /var/run/wireguard/ 2>/dev/null | grep -c "^dd$$n"; echo $alive)
    if [[ "$(echo $left | tr -d ' ')" == "00000" ]]; then
        echo "left behind: nothing (namespaces, agents, etcd, the registry, the relay, tasks, cgroups, BPF pins and WireGuard sockets are gone)"
    else
        echo "warning: something was left behind: $left" >&2
    fi
    if [[ -n "${KEEP_LOG:-}" ]]; then
        echo "logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "two nodes in throw-away network namespaces on a bridge of their own (no default route), and etcd"
ip netns add "$CTL"
ip -n "$CTL" link add br0 type bridge
ip -n "$CTL" addr add "$ETCD_IP/24" dev br0
ip -n "$CTL" link set br0 up
ip -n "$CTL" link set lo up
for n in "${NODES[@]}"; do
    ip netns add "$NS-$n"
    ip -n "$CTL" link add "n$n" type veth peer name eth0 netns "$NS-$n"
    ip -n "$CTL" link set "n$n" master br0 up
    ip -n "$NS-$n" addr add "$(node_ip "$n")/24" dev eth0
    ip -n "$NS-$n" link set eth0 up
    ip -n "$NS-$n" link set lo up
    echo "node-$n: namespace $NS-$n, address $(node_ip "$n")"
done
# nsenter execs what it runs, so $! is etcd (and below, each agent) itself, not a subshell.
nsenter --net="/run/netns/$CTL" etcd --name demo --data-dir "$WORK/etcd" \
    --listen-client-urls "http://$ETCD_IP:2379" --advertise-client-urls "http://$ETCD_IP:2379" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster demo=http://127.0.0.1:2380 --logger zap --log-level warn >"$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 100); do
    in_ctl etcdctl --dial-timeout=1s --endpoints="http://$ETCD_IP:2379" endpoint health >/dev/null 2>&1 && break
    sleep 0.1
done
echo "etcd: $(in_ctl etcdctl --endpoints="http://$ETCD_IP:2379" endpoint health 2>&1)"
# A registry beside etcd, and an image in it (busybox-static, built with umoci, pushed with skopeo).
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log: { level: error }
storage: { filesystem: { rootdirectory: $WORK/registry } }
http: { addr: "$ETCD_IP:5000" }
EOF
nsenter --net="/run/netns/$CTL" docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REGISTRY_PID=$!
scripts/busybox-image.sh "$WORK/oci" >/dev/null
for _ in $(seq 100); do in_ctl curl -sf "http://$ETCD_IP:5000/v2/" >/dev/null && break; sleep 0.1; done
in_ctl skopeo copy --quiet --dest-tls-verify=false "oci:$WORK/oci:bb" "docker://$ETCD_IP:5000/demo/busybox:1"
echo "registry: $ETCD_IP:5000 holds demo/busybox:1"

for n in "${NODES[@]}"; do
    mkdir -p "$WORK/node-$n"
    cat >"$WORK/node-$n/agent.toml" <<EOF
state_dir = "$WORK/node-$n/state"
[node]
id = "node-$n"
hostname = "node-$n"
ip = "$(node_ip "$n")"
[api]
listen = "127.0.0.1:8080"
[runtime]
cgroup_parent = "$CGROUP_PARENT/node-$n"
[l4lb]
# The eBPF data plane pins under the demo's own directory, on a bpffs it mounts there.
bpf_pin_dir = "$WORK/node-$n/bpf"
[overlay]
device = "$(device "$n")"
[[images.registries]]
host = "$ETCD_IP:5000"
insecure = true
EOF
done

say "starting an agent on each node with --etcd (logs: $WORK/node-*/agent.log)"
for n in "${NODES[@]}"; do
    printf '\033[36m[node-%s]$ dcnet agent --config agent.toml --etcd http://%s:2379\033[0m\n' "$n" "$ETCD_IP"
    nsenter --net="/run/netns/$NS-$n" "$DCNET" agent --config "$WORK/node-$n/agent.toml" --etcd "http://$ETCD_IP:2379" \
        >"$WORK/node-$n/agent.log" 2>&1 &
    AGENT_PIDS+=($!)
done
for n in "${NODES[@]}"; do
    for _ in $(seq 100); do
        in_node "$n" curl -sf http://127.0.0.1:8080/ping >/dev/null && break
        if ! kill -0 "${AGENT_PIDS[$((n - 1))]}" 2>/dev/null; then
            cat "$WORK/node-$n/agent.log"
            echo "the agent of node-$n exited" >&2
            exit 1
        fi
        sleep 0.1
    done
done
for _ in $(seq 100); do
    [[ $(in_node 1 "$DCNET" node list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["nodes"]))') == 2 ]] && break
    sleep 0.1
done
run node list

say "deploying examples/hello.json: 3 instances of a small HTTP server on host ports, spread over the nodes"
run app deploy examples/hello.json --wait --timeout 2m
run app list
run task list

say "resolving the app's names with dig against node-1's DNS server"
for query in "hello-demo.marathon.mesos" "_hello-demo._tcp.marathon.mesos SRV"; do
    printf '\033[36m$ dig @127.0.0.1 +noall +answer %s\033[0m\n' "$query"
    # shellcheck disable=SC2086
    in_node 1 dig @127.0.0.1 +noall +answer $query
done
run dns lookup leader.mesos

say "fetching a page from one of the tasks on its node's address and host port"
read -r ip port < <(in_node 1 "$DCNET" task list --app /demo/hello --json |
    python3 -c 'import json,sys; t=[t for t in json.load(sys.stdin)["tasks"] if t["state"]=="TASK_RUNNING"][0]; print(t["ipAddresses"][0]["ipAddress"], t["ports"][0])')
printf '\033[36m$ curl http://%s:%s/\033[0m\n' "$ip" "$port"
in_node 1 curl -sS "http://$ip:$port/" | head -n 4

say "a container task, with its own network namespace, address and resolv.conf"
run app deploy examples/client.json --wait --timeout 1m
read -r client_pid client_id client_node < <(in_node 1 "$DCNET" task list --app /demo/client --json |
    python3 -c 'import json,sys; t=[t for t in json.load(sys.stdin)["tasks"] if t["state"]=="TASK_RUNNING"][0]; print(t["process"]["pid"], t["id"], t["nodeId"])')
CG2=$(findmnt -n -t cgroup2 -o TARGET | head -1)
echo "the client runs on $client_node"
# Into the container as `docker exec` goes: its cgroup (where the eBPF programs act), then its
# network and mount namespaces.
in_client() {
    sh -c 'echo $$ > "$0/cgroup.procs" && pid=$1 && shift && exec nsenter --target "$pid" --net --mount "$@"' \
        "$CG2/$CGROUP_PARENT/$client_node/$client_id" "$client_pid" "$@"
}
for _ in $(seq 50); do in_client grep -q nameserver /etc/resolv.conf 2>/dev/null && break; sleep 0.1; done
printf '\033[36m[container]$ cat /etc/resolv.conf\033[0m\n'
in_client cat /etc/resolv.conf

say "from inside the container: the VIP name resolves, and connect() to it is sent to a backend in the kernel (eBPF)"
printf '\033[36m[container]$ getent hosts hello.marathon.l4lb\033[0m\n'
for _ in $(seq 50); do in_client getent hosts hello.marathon.l4lb >/dev/null && break; sleep 0.1; done
in_client getent hosts hello.marathon.l4lb
for i in 1 2 3 4; do
    printf '\033[36m[container]$ curl http://hello.marathon.l4lb/\033[0m  '
    in_client curl -sS --max-time 3 http://hello.marathon.l4lb/
done

say "containers on both nodes (examples/web.json), reached from the client over the WireGuard overlay"
run app deploy examples/web.json --wait --timeout 1m
for _ in $(seq 50); do in_client getent hosts web.marathon.l4lb >/dev/null && break; sleep 0.1; done
for i in 1 2 3 4 5 6; do
    printf '\033[36m[container]$ curl http://web.marathon.l4lb/\033[0m  '
    in_client curl -sS --max-time 3 http://web.marathon.l4lb/
done
say "an app from an image (examples/image.json): pulled from the registry by each node, run by runc"
run app deploy examples/image.json --wait --timeout 1m
for _ in $(seq 50); do in_client getent hosts image.marathon.l4lb >/dev/null && break; sleep 0.1; done
for i in 1 2 3 4; do
    printf '\033[36m[container]$ curl http://image.marathon.l4lb/\033[0m  '
    in_client curl -sS --max-time 3 http://image.marathon.l4lb/
done
run overlay status
printf '\033[36m$ wg show %s\033[0m\n' "$(device 1)"
wg show "$(device 1)"
run vip list

say "the dashboard: node-1's agent serves it under /ui/, relayed here to this machine's loopback"
# A free loopback port of this machine; each connection to it is carried into node-1's
# namespace, to the agent's own loopback address (nothing is routed, no address is added).
RELAY_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
setsid socat "TCP-LISTEN:$RELAY_PORT,bind=127.0.0.1,reuseaddr,fork" \
    "EXEC:nsenter --net=/run/netns/$NS-1 socat STDIO TCP\:127.0.0.1\:8080" 2>"$WORK/relay.log" &
RELAY_PID=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$RELAY_PORT/ping" >/dev/null && break; sleep 0.1; done
printf '\033[36m$ curl http://127.0.0.1:%s/ui/\033[0m  ' "$RELAY_PORT"
curl -sS "http://127.0.0.1:$RELAY_PORT/ui/" | grep -o '<title>.*</title>'
echo "dashboard: http://127.0.0.1:$RELAY_PORT/ui/  (pages: apps, VIPs, DNS, nodes, deployments; live)"
if [[ "${DEMO_KEEP:-}" == 1 ]]; then
    echo "DEMO_KEEP=1: the cluster stays up; open the address above (ssh -L $RELAY_PORT:127.0.0.1:$RELAY_PORT from elsewhere)."
    read -r -p "press Enter to remove the apps and clean up " _ || true
else
    echo "(DEMO_KEEP=1 make demo keeps the cluster up to look at it)"
fi

say "removing the apps"
run app remove /demo/image --wait --timeout 1m
run app remove /demo/web --wait --timeout 1m
run app remove /demo/client --wait --timeout 1m
run app remove /demo/hello --wait --timeout 1m
run task list

say "cleaning up: agents, etcd, namespaces, cgroups, state"

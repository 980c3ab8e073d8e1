# dcnet: `make demo` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Debian packages the build, the tests and the demo use.
DEBIAN_PACKAGES := clang libbpf-dev bpftool cmake protobuf-compiler libprotobuf-dev etcd-server etcd-client openssl wireguard-tools wireguard-go iperf3 tcpdump iproute2 nftables dnsutils curl python3 util-linux procps socat chromium chromium-driver crun runc docker-registry apache2-utils umoci skopeo busybox-static podman
# One target dir for every build, test and demo: nothing is built twice.
export CARGO_TARGET_DIR ?= $(CURDIR)/target
CARGO ?= cargo
DCNET := $(CARGO_TARGET_DIR)/debug/dcnet

.PHONY: help deps build test demo bench soak lint fmt

help:
	@echo "make demo   - build, run two nodes on etcd in throw-away netns (DNS, eBPF VIPs, the overlay), deploy examples/, clean up"
	@echo "make test   - every test: unit, integration and the netns end-to-end tests (as root)"
	@echo "make bench  - benchmarks: placement, DNS (vs Knot, NSD), convergence (embedded, 3 nodes on etcd), scale (simulated nodes), L4LB (vs HAProxy, direct), overlay (vs wireguard-go), images (vs podman)"
	@echo "make soak   - a minute of DNS and API floods from a container while apps deploy; peak RSS and fds"
	@echo "make lint   - cargo fmt --check and clippy -D warnings"

deps:
	@scripts/install-deps.sh $(DEBIAN_PACKAGES)

build: deps
	$(CARGO) build --workspace --all-targets

test: build
	CARGO=$(CARGO) scripts/test.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

demo: deps
	$(CARGO) build --bin dcnet
	DCNET=$(DCNET) scripts/demo.sh

bench: deps
	$(CARGO) run --release -p dcnet-bench --bin placement
	bench/dns.sh
	bench/convergence.sh
	bench/scale.sh
	bench/l4lb.sh
	bench/overlay.sh
	bench/images.sh

soak: deps
	bench/soak.sh

/* dcnet's socket-level load balancer: a connect() or sendmsg() to a VIP becomes one to a
 * backend before any packet exists, so there is no per-packet work, no proxy hop and no SNAT;
 * getpeername() and recvmsg() show the VIP again. Attached to the cgroup v2 directories that
 * hold the tasks. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "dcnet_lb.h"

/* From linux/socket.h, which this target cannot include. */
#define AF_INET 2
#define AF_INET6 10

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct dcnet_service_key);
	__type(value, struct dcnet_service);
} dcnet_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct dcnet_backend);
} dcnet_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct dcnet_reverse_key);
	__type(value, struct dcnet_reverse);
} dcnet_reverse SEC(".maps");

/* Connections (UDP: datagrams sent with sendmsg, plus connects) per backend id. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} dcnet_connects SEC(".maps");

/* A socket that closes takes its reverse entry along (cookies are never reused, so this is
 * about the map's room, not correctness): the LRU map then holds the sockets that are open,
 * and a busy node's connects do not pay for evictions. Unconnected UDP sockets' entries, one
 * per backend they sent to, age out by LRU.
 *
 * It comes first in this file on purpose: clang 14 writes struct bpf_sock into BTF whole only
 * if it meets it here before it meets it as a pointer inside struct bpf_sock_addr (then only as
 * a forward declaration, which the verifier refuses as this program's argument type). */
SEC("cgroup/sock_release")
int dcnet_sock_release(struct bpf_sock *sk)
{
	struct dcnet_reverse_key rk = {};
	if (sk->dst_port == 0)
		return 1;
	rk.cookie = bpf_get_socket_cookie(sk);
	/* Each context field is read straight off `sk` (the barriers keep clang from sharing one
	 * load through a moved pointer, which the verifier refuses). */
	__u32 family = sk->family;
	if (family == AF_INET) {
		__u32 d = sk->dst_ip4;
		asm volatile("" : "+r"(d));
		rk.ip.w[2] = bpf_htonl(0xffff);
		rk.ip.w[3] = d;
	} else if (family == AF_INET6) {
		__u32 d0 = sk->dst_ip6[0];
		asm volatile("" : "+r"(d0));
		__u32 d1 = sk->dst_ip6[1];
		asm volatile("" : "+r"(d1));
		__u32 d2 = sk->dst_ip6[2];
		asm volatile("" : "+r"(d2));
		__u32 d3 = sk->dst_ip6[3];
		asm volatile("" : "+r"(d3));
		rk.ip.w[0] = d0;
		rk.ip.w[1] = d1;
		rk.ip.w[2] = d2;
		rk.ip.w[3] = d3;
	} else {
		return 1;
	}
	rk.port = (__u16)sk->dst_port;
	bpf_map_delete_elem(&dcnet_reverse, &rk);
	return 1;
}

static __always_inline int is_v4_mapped(const struct dcnet_addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

/* A 64-bit mix (splitmix64's finaliser): spreads netns cookies over the Maglev table. */
static __always_inline __u64 mix(__u64 x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

/* The backend for a VIP, or NULL when `key` is no VIP or has no backend to give. Maglev
 * keys on the client's network namespace: one client (a container, or the host) keeps its
 * backend while others come and go. */
static __always_inline const struct dcnet_backend *
pick(struct bpf_sock_addr *ctx, const struct dcnet_service_key *key, __u32 *id_out)
{
	const struct dcnet_service *svc = bpf_map_lookup_elem(&dcnet_services, key);
	if (!svc)
		return NULL;
	__u32 count = svc->count;
	if (count == 0 || count > DCNET_MAX_SLOTS)
		return NULL;
	__u32 idx;
	if (svc->flags & DCNET_SVC_MAGLEV)
		idx = (__u32)(mix(bpf_get_netns_cookie(ctx)) % count);
	else
		idx = bpf_get_prandom_u32() % count;
	/* The verifier does not follow `% count`: hide idx from the compiler so that this
	 * bound, which it could prove redundant, stays in for the verifier. */
	asm volatile("" : "+r"(idx));
	if (idx >= DCNET_MAX_SLOTS)
		return NULL;
	__u32 id = svc->slots[idx];
	*id_out = id;
	return bpf_map_lookup_elem(&dcnet_backends, &id);
}

static __always_inline void remember(struct bpf_sock_addr *ctx, const struct dcnet_backend *be,
				     const struct dcnet_service_key *vip, __u32 id)
{
	struct dcnet_reverse_key rk = {};
	struct dcnet_reverse rv = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.ip = be->ip;
	rk.port = be->port;
	rv.ip = vip->ip;
	rv.port = vip->port;
	bpf_map_update_elem(&dcnet_reverse, &rk, &rv, BPF_ANY);
	__u64 *n = bpf_map_lookup_elem(&dcnet_connects, &id);
	if (n)
		*n += 1;
}

static __always_inline int forward4(struct bpf_sock_addr *ctx)
{
	struct dcnet_service_key key = {};
	key.ip.w[2] = bpf_htonl(0xffff);
	key.ip.w[3] = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	__u32 id = 0;
	const struct dcnet_backend *be = pick(ctx, &key, &id);
	/* An IPv4 socket can reach only an IPv4 backend. */
	if (!be || !is_v4_mapped(&be->ip))
		return 1;
	remember(ctx, be, &key, id);
	ctx->user_ip4 = be->ip.w[3];
	ctx->user_port = be->port;
	return 1;
}

static __always_inline int forward6(struct bpf_sock_addr *ctx)
{
	struct dcnet_service_key key = {};
	key.ip.w[0] = ctx->user_ip6[0];
	key.ip.w[1] = ctx->user_ip6[1];
	key.ip.w[2] = ctx->user_ip6[2];
	key.ip.w[3] = ctx->user_ip6[3];
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	__u32 id = 0;
	const struct dcnet_backend *be = pick(ctx, &key, &id);
	if (!be)
		return 1;
	remember(ctx, be, &key, id);
	ctx->user_ip6[0] = be->ip.w[0];
	ctx->user_ip6[1] = be->ip.w[1];
	ctx->user_ip6[2] = be->ip.w[2];
	ctx->user_ip6[3] = be->ip.w[3];
	ctx->user_port = be->port;
	return 1;
}

/* The peer a socket sees: the VIP it asked for, where the load balancer placed it. */
static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	struct dcnet_reverse_key rk = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.ip.w[2] = bpf_htonl(0xffff);
	rk.ip.w[3] = ctx->user_ip4;
	rk.port = (__u16)ctx->user_port;
	const struct dcnet_reverse *rv = bpf_map_lookup_elem(&dcnet_reverse, &rk);
	if (rv && is_v4_mapped(&rv->ip)) {
		ctx->user_ip4 = rv->ip.w[3];
		ctx->user_port = rv->port;
	}
	return 1;
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	struct dcnet_reverse_key rk = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.ip.w[0] = ctx->user_ip6[0];
	rk.ip.w[1] = ctx->user_ip6[1];
	rk.ip.w[2] = ctx->user_ip6[2];
	rk.ip.w[3] = ctx->user_ip6[3];
	rk.port = (__u16)ctx->user_port;
	const struct dcnet_reverse *rv = bpf_map_lookup_elem(&dcnet_reverse, &rk);
	if (rv) {
		ctx->user_ip6[0] = rv->ip.w[0];
		ctx->user_ip6[1] = rv->ip.w[1];
		ctx->user_ip6[2] = rv->ip.w[2];
		ctx->user_ip6[3] = rv->ip.w[3];
		ctx->user_port = rv->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int dcnet_connect4(struct bpf_sock_addr *ctx) { return forward4(ctx); }

SEC("cgroup/sendmsg4")
int dcnet_sendmsg4(struct bpf_sock_addr *ctx) { return forward4(ctx); }

SEC("cgroup/recvmsg4")
int dcnet_recvmsg4(struct bpf_sock_addr *ctx) { return reverse4(ctx); }

SEC("cgroup/getpeername4")
int dcnet_getpeername4(struct bpf_sock_addr *ctx) { return reverse4(ctx); }

SEC("cgroup/connect6")
int dcnet_connect6(struct bpf_sock_addr *ctx) { return forward6(ctx); }

SEC("cgroup/sendmsg6")
int dcnet_sendmsg6(struct bpf_sock_addr *ctx) { return forward6(ctx); }

SEC("cgroup/recvmsg6")
int dcnet_recvmsg6(struct bpf_sock_addr *ctx) { return reverse6(ctx); }

SEC("cgroup/getpeername6")
int dcnet_getpeername6(struct bpf_sock_addr *ctx) { return reverse6(ctx); }

char LICENSE[] SEC("license") = "Dual BSD/GPL";

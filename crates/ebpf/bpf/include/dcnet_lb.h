/* The layout of every map the socket load balancer shares with the agent. The agent mirrors
 * each struct in Rust (crates/ebpf/src/layout.rs), and a test compares both sides' sizes and
 * offsets, which build.rs reads off this header.
 *
 * Addresses are 16 bytes in network order; an IPv4 address is stored IPv4-mapped
 * (::ffff:a.b.c.d), so one map serves both families and a dual-stack socket connecting to
 * ::ffff:VIP finds the VIP. Ports are in network order.
 */
#ifndef DCNET_LB_H
#define DCNET_LB_H

#include <linux/types.h>

/* Slots per VIP: the backend ids a connection picks from. Also the Maglev table size (a
 * prime), so a VIP has at most this many backends. */
#define DCNET_MAX_SLOTS 1021

/* dcnet_service.flags */
#define DCNET_SVC_MAGLEV 1u

struct dcnet_addr {
	__u32 w[4];
};

/* dcnet_services: VIP, port and protocol -> the slots. */
struct dcnet_service_key {
	struct dcnet_addr ip;
	__u16 port;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

/* Replaced whole by one map update, so a reader never sees half a table. Random balancing:
 * `count` slots, each backend as often as its weight; Maglev: DCNET_MAX_SLOTS slots. */
struct dcnet_service {
	__u32 count;
	__u32 flags;
	__u32 slots[DCNET_MAX_SLOTS];
};

/* dcnet_backends: backend id -> address. */
struct dcnet_backend {
	struct dcnet_addr ip;
	__u16 port;
	__u16 pad;
};

/* dcnet_reverse (LRU): which VIP a socket reached a backend through, so that getpeername()
 * and recvfrom() show the VIP. */
struct dcnet_reverse_key {
	__u64 cookie;
	struct dcnet_addr ip;
	__u16 port;
	__u16 pad[3];
};

struct dcnet_reverse {
	struct dcnet_addr ip;
	__u16 port;
	__u16 pad;
};

#endif

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Tandem XDP program: hands the frames the dataplane owns to its AF_XDP
// socket for the interface, lets everything else go to the kernel.
//
// Mode per ingress ifindex (if_mode map, written by the loader):
//   DATA   - IPv4, IPv6 and ARP go to the socket (the dataplane answers ARP
//            and ND for its addresses and VIPs), untagged or with one
//            802.1Q tag (the dataplane maps the tag to its unit, or drops
//            and counts it); other ethertypes pass.
//   FABRIC - only fabric-encapsulated frames (ethertype 0x88b5) go to the
//            socket; heartbeats and sync (IP) on the fabric link pass.
// The socket's slot in xsks is in the upper bits of the mode value.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MODE_DATA 1
#define MODE_FABRIC 2
#define ETH_P_FABRIC 0x88b5
#define ETH_P_VLAN 0x8100

// One socket per (port slot, RX queue): key = slot << QUEUE_BITS | queue.
// The loader refuses configurations beyond these bounds.
#define QUEUE_BITS 6
#define MAX_QUEUES (1 << QUEUE_BITS)
#define MAX_PORTS 32
#define MAX_SOCKETS (MAX_PORTS * MAX_QUEUES)

struct {
    __uint(type, BPF_MAP_TYPE_XSKMAP);
    __uint(max_entries, MAX_SOCKETS);
    __type(key, __u32);
    __type(value, __u32);
} xsks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, MAX_PORTS);
    __type(key, __u32);
    __type(value, __u32);
} if_mode SEC(".maps");

// 0: redirected, 1: passed (not ours), 2: passed (unknown interface),
// 3: too short, 4: ours but no socket on its queue (passed to the kernel),
// 5: queue index beyond MAX_QUEUES (passed).
#define C_REDIRECTED 0
#define C_NOT_OURS 1
#define C_UNKNOWN_IF 2
#define C_TOO_SHORT 3
#define C_NO_SOCKET 4
#define C_QUEUE_RANGE 5
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 6);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

// Per socket key: frames redirected to it, and frames of its queue that
// found no socket (so the dataplane can tell a dead or missing socket
// from an idle link).
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, MAX_SOCKETS);
    __type(key, __u32);
    __type(value, __u64);
} per_socket_redirected SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, MAX_SOCKETS);
    __type(key, __u32);
    __type(value, __u64);
} per_socket_unserved SEC(".maps");

static __always_inline void bump(void *map, __u32 i)
{
    __u64 *c = bpf_map_lookup_elem(map, &i);
    if (c)
        *c += 1;
}

static __always_inline void count(__u32 i)
{
    bump(&counters, i);
}

SEC("xdp")
int xdp_tandem(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end) {
        count(C_TOO_SHORT);
        return XDP_PASS;
    }
    __u32 ifindex = ctx->ingress_ifindex;
    __u32 *mode = bpf_map_lookup_elem(&if_mode, &ifindex);
    if (!mode) {
        count(C_UNKNOWN_IF);
        return XDP_PASS;
    }
    __u32 slot = *mode >> 8;
    __u16 proto = bpf_ntohs(eth->h_proto);
    if (proto == ETH_P_VLAN && (*mode & 0xff) == MODE_DATA) {
        // The encapsulated ethertype follows the tag control information.
        __be16 *inner = (void *)(eth + 1) + 2;
        if ((void *)(inner + 1) > data_end) {
            count(C_TOO_SHORT);
            return XDP_PASS;
        }
        proto = bpf_ntohs(*inner);
    }
    int ours;
    if ((*mode & 0xff) == MODE_FABRIC)
        ours = proto == ETH_P_FABRIC;
    else
        ours = proto == ETH_P_IP || proto == ETH_P_IPV6 || proto == ETH_P_ARP;
    if (!ours) {
        count(C_NOT_OURS);
        return XDP_PASS;
    }
    __u32 queue = ctx->rx_queue_index;
    if (queue >= MAX_QUEUES || slot >= MAX_PORTS) {
        count(C_QUEUE_RANGE);
        return XDP_PASS;
    }
    __u32 key = (slot << QUEUE_BITS) | queue;
    int act = bpf_redirect_map(&xsks, key, XDP_PASS);
    if (act == XDP_REDIRECT) {
        count(C_REDIRECTED);
        bump(&per_socket_redirected, key);
    } else {
        count(C_NO_SOCKET);
        bump(&per_socket_unserved, key);
    }
    return act;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

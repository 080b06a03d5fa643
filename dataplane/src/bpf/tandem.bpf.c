// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// Tandem XDP program: hands the frames the dataplane owns to its AF_XDP
// socket for the interface, lets everything else go to the kernel.
//
// Mode per ingress ifindex (if_mode map, written by the loader):
//   DATA   - IPv4, IPv6 and ARP go to the socket (the dataplane answers ARP
//            and ND for its addresses and VIPs); other ethertypes pass.
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

struct {
    __uint(type, BPF_MAP_TYPE_XSKMAP);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, __u32);
} xsks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, __u32);
} if_mode SEC(".maps");

// 0: redirected, 1: passed (not ours), 2: passed (unknown interface),
// 3: too short.
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 i)
{
    __u64 *c = bpf_map_lookup_elem(&counters, &i);
    if (c)
        *c += 1;
}

SEC("xdp")
int xdp_tandem(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end) {
        count(3);
        return XDP_PASS;
    }
    __u32 ifindex = ctx->ingress_ifindex;
    __u32 *mode = bpf_map_lookup_elem(&if_mode, &ifindex);
    if (!mode) {
        count(2);
        return XDP_PASS;
    }
    __u32 slot = *mode >> 8;
    __u16 proto = bpf_ntohs(eth->h_proto);
    int ours;
    if ((*mode & 0xff) == MODE_FABRIC)
        ours = proto == ETH_P_FABRIC;
    else
        ours = proto == ETH_P_IP || proto == ETH_P_IPV6 || proto == ETH_P_ARP;
    if (!ours) {
        count(1);
        return XDP_PASS;
    }
    count(0);
    return bpf_redirect_map(&xsks, slot, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

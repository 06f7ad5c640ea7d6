// Connection guard: cgroup/connect4, connect6, sendmsg4 and sendmsg6 programs that refuse (EPERM)
// every destination the policy does not allow, and report each refusal through a ring buffer.
//
// Loaded by guard.py (a governed cgroup, default deny) and host.py (the root cgroup, deny only
// what iptables redirection cannot cover). Compile-time parameters, passed as -D cflags:
//   GUARD_HOST      0: sandbox policy; 1: host policy
//   MAX_ENTRIES     capacity of each address map
//   RINGBUF_PAGES   ring buffer size in pages (a power of two)
//   CGROUP_DEPTH    how many ancestor levels the host policy checks for an exempt cgroup
// Everything else (addresses, ports, flags) is data in the maps below, written by the loader.
//
// Only UAPI types are read (struct bpf_sock_addr): the kernel headers bcc compiles against may
// not match the running kernel, so kernel-internal structs are off limits.
#include <uapi/linux/bpf.h>

#ifndef GUARD_HOST
#define GUARD_HOST 0
#endif
#ifndef MAX_ENTRIES
#define MAX_ENTRIES 1024
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 16
#endif
#ifndef CGROUP_DEPTH
#define CGROUP_DEPTH 8
#endif

#define ALLOW 1
#define DENY 0  // the kernel turns 0 into EPERM for connect() and sendmsg()

#define PROTO_TCP 6
#define PROTO_UDP 17

#define HOOK_CONNECT4 1
#define HOOK_CONNECT6 2
#define HOOK_SENDMSG4 3
#define HOOK_SENDMSG6 4

// Why a destination was refused; names in candela_mitm/bypass.py REASONS.
#define R_NOT_ALLOWED 1
#define R_UDP_PORT 2
#define R_IPV6 3
#define R_DNS 4
#define R_PROVIDER_PORT 5
#define R_FOREIGN_NETNS 6
#define R_PROVIDER_IPV6 7
#define R_IPV6_REDIRECTED_PORT 8
#define N_REASONS 9

#define F_DENY_ALL_V6 1
#define F_DNS_RESTRICTED 2
#define F_NETNS_RESTRICTED 4

struct guard_config {
    u32 flags;
    u32 dns_port;
};

// An IPv6 address in network byte order; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d), so one
// key type serves connect4 and connect6 and a v4-mapped connect6 meets the IPv4 policy.
struct addr {
    u32 w[4];
};

struct addr_port {
    struct addr a;
    u16 port;  // host byte order; 0 matches every port
    u16 pad;
};

// Layout mirrored by candela_mitm/bypass.py EVENT_FORMAT (64 bytes, no holes).
struct guard_event {
    u64 cgroup_id;
    u32 pid;  // thread id
    u32 tgid;  // process id
    u32 uid;
    u32 gid;
    struct addr dst;
    u16 port;
    u8 family;  // 4 or 6: the family of the hook
    u8 protocol;
    u8 hook;
    u8 reason;
    u16 pad;
    char comm[16];
};

BPF_ARRAY(config, struct guard_config, 1);
BPF_HASH(allow, struct addr_port, u8, MAX_ENTRIES);  // sandbox: destinations always allowed
BPF_HASH(tcp_ports, u16, u8, 64);  // sandbox: TCP ports open to any IPv4; host: redirected ports
BPF_HASH(udp_deny, u16, u8, 64);
// host: TCP ports redirected to the proxy for every IPv4 address (443: decided by SNI there);
// IPv6 has no such redirection, so over IPv6 they are refused for every address but loopback
BPF_HASH(v6_tcp_deny, u16, u8, 64);
BPF_HASH(dns, struct addr, u8, MAX_ENTRIES);  // resolvers DNS may go to, when restricted
BPF_HASH(providers, struct addr, u8, MAX_ENTRIES);  // host: provider addresses
BPF_HASH(exempt, u64, u8, 64);  // host: cgroup ids (and their descendants) left alone
BPF_HASH(redirected, u64, u8, 256);  // host: netns cookies whose provider TCP iptables redirects
BPF_HASH(own_netns, u64, u8, 16);  // sandbox: netns cookies of the sandbox (F_NETNS_RESTRICTED)
BPF_ARRAY(counts, u64, N_REASONS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

static __always_inline int is_v4_mapped(const struct addr *a) {
    return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int is_loopback_v6(const struct addr *a) {
    return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 && a->w[3] == bpf_htonl(1);
}

static __always_inline int is_exempt(void) {
#if GUARD_HOST
    u64 id = bpf_get_current_cgroup_id();
    if (exempt.lookup(&id))
        return 1;
#pragma unroll
    for (int level = 1; level <= CGROUP_DEPTH; level++) {
        id = bpf_get_current_ancestor_cgroup_id(level);
        if (id == 0)
            break;
        if (exempt.lookup(&id))
            return 1;
    }
#endif
    return 0;
}

static __always_inline int decide(struct bpf_sock_addr *ctx, struct addr *dst, u16 port,
                                  int udp) {
    int zero = 0;
    struct guard_config *cfg = config.lookup(&zero);
    if (!cfg)
        return R_NOT_ALLOWED;  // no configuration: fail closed
    int v4 = is_v4_mapped(dst);

#if GUARD_HOST
    if (is_exempt())
        return 0;
    if (udp && udp_deny.lookup(&port))
        return R_UDP_PORT;
    if (!v4 && !udp && v6_tcp_deny.lookup(&port) && !is_loopback_v6(dst))
        return R_IPV6_REDIRECTED_PORT;  // an IPv4 connection would have been redirected
    if (!providers.lookup(dst))
        return 0;
    if (!v4)
        return R_PROVIDER_IPV6;  // no IPv6 redirection: refuse
    if (udp || !tcp_ports.lookup(&port))
        return R_PROVIDER_PORT;
    // nat OUTPUT only sees the host namespace; a container's connect would go straight out
    // unless its namespace was registered as redirected (a `candela run` sandbox).
    u64 netns = bpf_get_netns_cookie(ctx);
    if (!redirected.lookup(&netns))
        return R_FOREIGN_NETNS;
    return 0;
#else
    if (udp && udp_deny.lookup(&port))
        return R_UDP_PORT;
    struct addr_port key = {};
    key.a = *dst;
    key.port = port;
    if (allow.lookup(&key))
        return 0;
    key.port = 0;
    if (allow.lookup(&key))
        return 0;
    // A namespace the sandbox made (unshare -Urn) or a process moved into the cgroup from
    // elsewhere is outside the firewall's redirect: nothing but the allow list from there.
    if (cfg->flags & F_NETNS_RESTRICTED) {
        u64 netns = bpf_get_netns_cookie(ctx);
        if (!own_netns.lookup(&netns))
            return R_FOREIGN_NETNS;
    }
    if (port == cfg->dns_port && (cfg->flags & F_DNS_RESTRICTED)) {
        if (dns.lookup(dst))
            return 0;
        if (udp || v4)
            return R_DNS;
    }
    if (!v4)
        return (cfg->flags & F_DENY_ALL_V6) ? R_IPV6 : 0;
    if (udp)
        return 0;  // UDP is refused by port (QUIC, DNS over QUIC); TCP by destination
    if (tcp_ports.lookup(&port))
        return 0;
    return R_NOT_ALLOWED;
#endif
}

static __always_inline int verdict(struct bpf_sock_addr *ctx, struct addr *dst, u8 family,
                                   u8 hook) {
    u16 port = bpf_ntohs((u16)ctx->user_port);
    u8 protocol = ctx->protocol;
    int reason = decide(ctx, dst, port, protocol == PROTO_UDP);
    if (reason == 0)
        return ALLOW;

    counts.atomic_increment(reason);
    struct guard_event ev = {};
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 uid_gid = bpf_get_current_uid_gid();
    ev.cgroup_id = bpf_get_current_cgroup_id();
    ev.pid = (u32)pid_tgid;
    ev.tgid = pid_tgid >> 32;
    ev.uid = (u32)uid_gid;
    ev.gid = uid_gid >> 32;
    ev.dst = *dst;
    ev.port = port;
    ev.family = family;
    ev.protocol = protocol;
    ev.hook = hook;
    ev.reason = reason;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    events.ringbuf_output(&ev, sizeof(ev), 0);  // a full buffer drops the event, never the verdict
    return DENY;
}

static __always_inline void load_v4(struct bpf_sock_addr *ctx, struct addr *dst) {
    dst->w[0] = 0;
    dst->w[1] = 0;
    dst->w[2] = bpf_htonl(0x0000ffff);
    dst->w[3] = ctx->user_ip4;
}

static __always_inline void load_v6(struct bpf_sock_addr *ctx, struct addr *dst) {
    dst->w[0] = ctx->user_ip6[0];
    dst->w[1] = ctx->user_ip6[1];
    dst->w[2] = ctx->user_ip6[2];
    dst->w[3] = ctx->user_ip6[3];
}

int candela_conn4(struct bpf_sock_addr *ctx) {
    struct addr dst = {};
    load_v4(ctx, &dst);
    return verdict(ctx, &dst, 4, HOOK_CONNECT4);
}

int candela_conn6(struct bpf_sock_addr *ctx) {
    struct addr dst = {};
    load_v6(ctx, &dst);
    return verdict(ctx, &dst, 6, HOOK_CONNECT6);
}

int candela_send4(struct bpf_sock_addr *ctx) {
    struct addr dst = {};
    load_v4(ctx, &dst);
    return verdict(ctx, &dst, 4, HOOK_SENDMSG4);
}

int candela_send6(struct bpf_sock_addr *ctx) {
    struct addr dst = {};
    load_v6(ctx, &dst);
    return verdict(ctx, &dst, 6, HOOK_SENDMSG6);
}

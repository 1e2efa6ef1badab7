//! eBPF programs that move an enrolled pod's TCP sockets to the node agent.
//!
//! Outbound: `connect4`/`connect6` (attached to the pod's cgroup) rewrite a TCP connect to the
//! agent's in-pod listener `127.0.0.1:15001` and remember the original destination by socket
//! cookie; `sock_ops` copies it, when the kernel picks the client port, to a map keyed by
//! (netns cookie, client port) that the agent reads on accept; `getpeername4/6` show the
//! application the address it dialled.
//!
//! Inbound: `sk_lookup` (attached to the pod's network namespace) hands new TCP connections to
//! the pod's IP to the agent's in-pod `0.0.0.0:15006` listener, looked up by destination IP.
//!
//! Never captured: loopback destinations, DNS, the agent's own ports, non-TCP sockets, and any
//! socket created by a process outside an enrolled pod's cgroup (the agent's own sockets).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use core::ptr::{read_volatile, write_volatile};

use aya_log_ebpf::warn;
use mesh_common::{
    EXCLUDED_PORTS, FAMILY_INET, FlowKey, InboundKey, OUTBOUND_PORT, OriginalDst, stats,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Verdicts: cgroup sock_addr programs return 1 to let the syscall proceed.
const ALLOW: i32 = 1;
/// ... and 0 to fail it with EPERM.
const DENY: i32 = 0;
/// How many levels below the gated cgroup a pod's cgroup may sit (kubelet: QoS class slice,
/// pod, container); a task's ancestors at these levels are checked against the decisions.
const GATE_MAX_DEPTH: u32 = 4;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

/// 127.0.0.1 as the kernel stores it (network order in a native `u32`).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

#[map]
static ORIG_DST_BY_FLOW: LruHashMap<FlowKey, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

#[map]
static INBOUND_LISTENERS: SockHash<InboundKey> = SockHash::with_max_entries(4096, 0);

/// Pod addresses whose inbound TCP must never reach the app around the agent: a connection
/// to one of them with no live agent listener (the agent died) is refused, not passed.
#[map]
static FAIL_CLOSED_PODS: HashMap<InboundKey, u8> = HashMap::with_max_entries(4096, 0);

/// Pod-level cgroups (by cgroup id) the agent has decided about, enrolled or not: the gate
/// lets their connects through.
#[map]
static DECIDED_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(16384, 0);

/// The gate's settings, written by the agent: `[0]` = level of the gated cgroup (the parent
/// of every pod cgroup, e.g. kubepods.slice) below the cgroup v2 root.
#[map]
static GATE_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Process ids (tgid, as the kernel's initial pid namespace sees them) of running agents:
/// the agent's own pod is gated too, and it must reach the API server to decide anything.
#[map]
static AGENT_TGIDS: HashMap<u32, u8> = HashMap::with_max_entries(16, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn is_excluded_port(port: u16) -> bool {
    let mut i = 0;
    while i < EXCLUDED_PORTS.len() {
        if EXCLUDED_PORTS[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn is_loopback4(addr: u32) -> bool {
    // First byte of the network-order address.
    addr.to_ne_bytes()[0] == 127 || addr == 0
}

/// Records `addr:port` as the original destination of this socket and points it at the
/// agent's outbound listener. `addr` is a network-order IPv4 address, `port` host order.
#[inline(always)]
fn redirect4(ctx: &SockAddrContext, addr: u32, port: u16) -> bool {
    let mut ip = [0u8; 16];
    let octets = addr.to_ne_bytes();
    ip[0] = octets[0];
    ip[1] = octets[1];
    ip[2] = octets[2];
    ip[3] = octets[3];
    let dst = OriginalDst {
        addr: ip,
        port,
        family: FAMILY_INET,
        _pad: [0; 4],
    };
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if ORIG_DST_BY_COOKIE.insert(&cookie, &dst, 0).is_err() {
        // Without a record the agent could not relay the connection: leave it alone.
        warn!(
            ctx,
            "mesh: could not record original destination, connect not captured"
        );
        return false;
    }
    count(stats::OUTBOUND_REDIRECTED);
    true
}

#[inline(always)]
fn is_tcp(sa: *const bpf_sock_addr) -> bool {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    unsafe {
        let ty = read_volatile(&(*sa).type_);
        let proto = read_volatile(&(*sa).protocol);
        ty == SOCK_STREAM && (proto == IPPROTO_TCP || proto == 0)
    }
}

/// The IPv4 destination (network-order address, host-order port) a connect4 asks for.
#[inline(always)]
fn dst4(sa: *mut bpf_sock_addr) -> (u32, u16) {
    // SAFETY: the kernel hands every sock_addr program a valid context; user_port holds the
    // network-order port in its low 16 bits.
    unsafe {
        (
            read_volatile(&(*sa).user_ip4),
            u16::from_be(read_volatile(&(*sa).user_port) as u16),
        )
    }
}

/// The IPv6 destination (four network-order words, host-order port) a connect6 asks for.
#[inline(always)]
fn dst6(sa: *mut bpf_sock_addr) -> ([u32; 4], u16) {
    // SAFETY: as in dst4; each word is read separately, as the verifier wants.
    unsafe {
        (
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ],
            u16::from_be(read_volatile(&(*sa).user_port) as u16),
        )
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    let (addr, port) = dst4(sa);
    if is_loopback4(addr) || is_excluded_port(port) {
        count(stats::EXCLUDED);
        return ALLOW;
    }
    if redirect4(&ctx, addr, port) {
        // SAFETY: connect4 may rewrite user_ip4/user_port.
        unsafe {
            write_volatile(&mut (*sa).user_ip4, LOOPBACK4);
            write_volatile(&mut (*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
        }
    }
    ALLOW
}

/// IPv6 sockets: only IPv4-mapped destinations (`::ffff:a.b.c.d`, what a dual-stack socket
/// uses to reach an IPv4 pod) are captured; native IPv6 pod traffic is not captured yet.
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    let (ip6, port) = dst6(sa);
    if ip6[0] != 0 || ip6[1] != 0 || ip6[2] != V4_MAPPED_PREFIX {
        return ALLOW;
    }
    let addr = ip6[3];
    if is_loopback4(addr) || is_excluded_port(port) {
        count(stats::EXCLUDED);
        return ALLOW;
    }
    if redirect4(&ctx, addr, port) {
        // SAFETY: connect6 may rewrite user_ip6/user_port; each word is written separately.
        unsafe {
            write_volatile(&mut (*sa).user_ip6[3], LOOPBACK4);
            write_volatile(&mut (*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
        }
    }
    ALLOW
}

/// The start-up gate, attached to the parent cgroup of all pods: a TCP connect from a pod
/// the agent has not decided about yet fails with EPERM (the app retries) instead of going
/// out around the mesh. Loopback and the excluded ports (DNS) always pass. Runs after the
/// pod's own programs, so an enrolled pod's connect arrives here already redirected.
#[inline(always)]
fn gate() -> i32 {
    let Some(&root_level) = GATE_CONFIG.get(0) else {
        return ALLOW;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: read-only lookup of a plain value.
    if unsafe { AGENT_TGIDS.get(&tgid) }.is_some() {
        return ALLOW;
    }
    let mut depth = 1;
    while depth <= GATE_MAX_DEPTH {
        // SAFETY: plain helper call; 0 means the task's cgroup is not that deep.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id((root_level + depth) as i32) };
        if id == 0 {
            break;
        }
        // SAFETY: read-only lookup of a plain value.
        if unsafe { DECIDED_CGROUPS.get(&id) }.is_some() {
            return ALLOW;
        }
        depth += 1;
    }
    count(stats::GATE_DENIED);
    DENY
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_gate_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    let (addr, port) = dst4(sa);
    if is_loopback4(addr) || is_excluded_port(port) {
        return ALLOW;
    }
    gate()
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_gate_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    let (ip6, port) = dst6(sa);
    let v6_loopback =
        ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1]);
    let v4_mapped_loopback =
        ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX && is_loopback4(ip6[3]);
    if v6_loopback || v4_mapped_loopback || is_excluded_port(port) {
        return ALLOW;
    }
    gate()
}

/// Shows the application the destination it dialled instead of the agent's listener.
#[inline(always)]
fn original_peer(ctx: &SockAddrContext) -> Option<OriginalDst> {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is copied out before the map can change it.
    unsafe { ORIG_DST_BY_COOKIE.get(&cookie).copied() }
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (addr, port) = dst4(sa);
    if addr != LOOPBACK4 || port != OUTBOUND_PORT {
        return ALLOW;
    }
    if let Some(dst) = original_peer(&ctx) {
        let a = dst.addr;
        // SAFETY: getpeername4 may rewrite the reported address.
        unsafe {
            write_volatile(
                &mut (*sa).user_ip4,
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            );
            write_volatile(&mut (*sa).user_port, u32::from(dst.port.to_be()));
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (ip6, port) = dst6(sa);
    if ip6[0] != 0 || ip6[1] != 0 || ip6[2] != V4_MAPPED_PREFIX || ip6[3] != LOOPBACK4 {
        return ALLOW;
    }
    if port != OUTBOUND_PORT {
        return ALLOW;
    }
    if let Some(dst) = original_peer(&ctx) {
        let a = dst.addr;
        // SAFETY: getpeername6 may rewrite the reported address.
        unsafe {
            write_volatile(
                &mut (*sa).user_ip6[3],
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            );
            write_volatile(&mut (*sa).user_port, u32::from(dst.port.to_be()));
        }
    }
    ALLOW
}

/// When the kernel has chosen the client port of a redirected connect (just before the SYN),
/// file the original destination under (netns cookie, client port), which is what the agent
/// can see from the accepted socket.
#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // Context fields are read one by one with volatile loads: the verifier only accepts
    // constant offsets from the context pointer, and LLVM otherwise merges the branches'
    // loads into one computed address.
    // SAFETY: the kernel hands every sock_ops program a valid context.
    let op = unsafe { read_volatile(&(*ops).op) };
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    let family = unsafe { read_volatile(&(*ops).family) };
    let to_listener = if family == AF_INET {
        unsafe { read_volatile(&(*ops).remote_ip4) == LOOPBACK4 }
    } else if family == AF_INET6 {
        let w0 = unsafe { read_volatile(&(*ops).remote_ip6[0]) };
        let w1 = unsafe { read_volatile(&(*ops).remote_ip6[1]) };
        let w2 = unsafe { read_volatile(&(*ops).remote_ip6[2]) };
        let w3 = unsafe { read_volatile(&(*ops).remote_ip6[3]) };
        w0 == 0 && w1 == 0 && w2 == V4_MAPPED_PREFIX && w3 == LOOPBACK4
    } else {
        false
    };
    if !to_listener {
        return 1;
    }
    // sock_ops reports remote_port in network order shifted left by 16 bits (unlike
    // sock_addr's user_port); accept the unshifted form too in case a kernel changes it.
    let raw_port = unsafe { read_volatile(&(*ops).remote_port) };
    let remote_port = if raw_port & 0xffff == 0 {
        u16::from_be((raw_port >> 16) as u16)
    } else {
        u16::from_be(raw_port as u16)
    };
    if remote_port != OUTBOUND_PORT {
        return 1;
    }
    let local_port = unsafe { read_volatile(&(*ops).local_port) } as u16;
    // SAFETY: the helpers only read the context they are given.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    // SAFETY: the value is copied out at once.
    let Some(dst) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie).copied() }) else {
        // A connect the app aimed at 127.0.0.1:15001 itself; nothing to record.
        count(stats::ORIGINAL_DST_MISSING);
        return 1;
    };
    let key = FlowKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ops.cast()) },
        port: local_port,
        _pad: [0; 6],
    };
    if ORIG_DST_BY_FLOW.insert(&key, &dst, 0).is_ok() {
        count(stats::ORIGINAL_DST_RECORDED);
    }
    1
}

/// Steers a new inbound TCP connection to a pod address to the agent's inbound listener in
/// that pod. Connections to loopback (the agent's own hop to the app), to excluded ports, and
/// to addresses the agent never enrolled are left to the normal socket lookup. An enrolled
/// pod address whose listener is gone (the agent died and nobody took over) gets SK_DROP: the
/// kernel refuses the connection, and nothing reaches the app unauthorized.
#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands every sk_lookup program a valid context.
    let (family, protocol, local_ip4, local_port) = unsafe {
        let l = ctx.lookup;
        (
            read_volatile(&(*l).family),
            read_volatile(&(*l).protocol),
            read_volatile(&(*l).local_ip4),
            read_volatile(&(*l).local_port),
        )
    };
    if family != AF_INET || protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    if is_loopback4(local_ip4) || is_excluded_port(local_port as u16) {
        return SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local_ip4, 0) {
        Ok(()) => {
            count(stats::INBOUND_STEERED);
            SK_PASS
        }
        Err(_) => {
            count(stats::INBOUND_NO_LISTENER);
            // SAFETY: read-only lookup of a plain value.
            if unsafe { FAIL_CLOSED_PODS.get(&local_ip4) }.is_some() {
                SK_DROP
            } else {
                SK_PASS
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

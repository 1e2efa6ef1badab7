//! Types and constants shared by the eBPF programs (`mesh-ebpf`) and the node agent (`mesh-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so that the kernel, the BPF
//! programs and userspace agree on the layout byte for byte.
#![no_std]

/// In-pod listener that receives every redirected outbound TCP connection of the pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod listener that receives inbound TCP connections steered by `sk_lookup`.
pub const INBOUND_PORT: u16 = 15006;
/// In-pod HBONE (HTTP/2 CONNECT over mTLS) listener. Reserved now, served by the mTLS work.
pub const HBONE_PORT: u16 = 15008;
/// Node admin API (localhost only).
pub const ADMIN_PORT: u16 = 15000;
/// Node Prometheus metrics.
pub const METRICS_PORT: u16 = 15020;
/// DNS is never captured.
pub const DNS_PORT: u16 = 53;

/// Ports that are never redirected, in either direction.
pub const EXCLUDED_PORTS: [u16; 6] = [
    OUTBOUND_PORT,
    INBOUND_PORT,
    HBONE_PORT,
    ADMIN_PORT,
    METRICS_PORT,
    DNS_PORT,
];

/// `AF_INET` as the kernel reports it in BPF contexts.
pub const FAMILY_INET: u16 = 2;
/// `AF_INET6` as the kernel reports it in BPF contexts.
pub const FAMILY_INET6: u16 = 10;

/// The destination an application dialled before `connect4`/`connect6` rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// Address bytes in network order; an IPv4 address uses the first four bytes.
    pub addr: [u8; 16],
    /// Port in host byte order.
    pub port: u16,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u16,
    pub _pad: [u8; 4],
}

/// Identifies a redirected connection from the agent's side of the in-pod listener: the pod's
/// network namespace (its cookie, as `SO_NETNS_COOKIE` reports it) and the client's local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    pub netns_cookie: u64,
    /// The application socket's local port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of the inbound listener map: a pod IPv4 address, as the `u32` the kernel keeps in
/// network order (`u32::from_ne_bytes(ip.octets())`).
pub type InboundKey = u32;

/// Indices into the per-CPU `STATS` array the programs count into.
pub mod stats {
    /// Outbound TCP connects rewritten to the in-pod outbound listener.
    pub const OUTBOUND_REDIRECTED: u32 = 0;
    /// Redirected connects whose original destination was recorded for the agent.
    pub const ORIGINAL_DST_RECORDED: u32 = 1;
    /// Redirected connects for which `sock_ops` found no original destination (should stay 0).
    pub const ORIGINAL_DST_MISSING: u32 = 2;
    /// Inbound connections steered to the in-pod inbound listener.
    pub const INBOUND_STEERED: u32 = 3;
    /// Inbound connections to a pod address with no agent listener registered.
    pub const INBOUND_NO_LISTENER: u32 = 4;
    /// Connects left alone because of an exclusion (loopback, DNS, agent ports).
    pub const EXCLUDED: u32 = 5;
    /// Connects the start-up gate failed: a pod the agent had not decided about yet.
    pub const GATE_DENIED: u32 = 6;
    /// Number of slots in the array.
    pub const COUNT: u32 = 8;
    /// Human names, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "outbound_redirected",
        "original_dst_recorded",
        "original_dst_missing",
        "inbound_steered",
        "inbound_no_listener",
        "excluded",
        "gate_denied",
        "unused7",
    ];
}

/// Names of the maps and programs in the eBPF object, so both sides spell them once.
pub mod names {
    pub const MAP_ORIGINAL_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    pub const MAP_ORIGINAL_DST_BY_FLOW: &str = "ORIG_DST_BY_FLOW";
    pub const MAP_INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const MAP_STATS: &str = "STATS";
    pub const MAP_FAIL_CLOSED_PODS: &str = "FAIL_CLOSED_PODS";
    pub const MAP_DECIDED_CGROUPS: &str = "DECIDED_CGROUPS";
    pub const MAP_GATE_CONFIG: &str = "GATE_CONFIG";
    pub const MAP_AGENT_TGIDS: &str = "AGENT_TGIDS";
    pub const PROG_GATE_CONNECT4: &str = "mesh_gate_connect4";
    pub const PROG_GATE_CONNECT6: &str = "mesh_gate_connect6";
    pub const PROG_CONNECT4: &str = "mesh_connect4";
    pub const PROG_CONNECT6: &str = "mesh_connect6";
    pub const PROG_GETPEERNAME4: &str = "mesh_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "mesh_getpeername6";
    pub const PROG_SOCK_OPS: &str = "mesh_sock_ops";
    pub const PROG_SK_LOOKUP: &str = "mesh_sk_lookup";
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: plain-old-data, `#[repr(C)]`, explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::FlowKey {}
}

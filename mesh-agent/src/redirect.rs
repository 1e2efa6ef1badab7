//! Loads the eBPF programs once, attaches them to each enrolled pod, and answers the data
//! path's one question about a redirected connection: where did it mean to go?
//!
//! Per pod the agent attaches `connect4/6`, `getpeername4/6` and `sock_ops` to the pod's
//! cgroup and `sk_lookup` to its network namespace. Every attachment is a BPF link owned by a
//! [`PodAttachment`]: dropping it detaches, and when the agent exits the kernel drops whatever
//! is left, so nothing outlives the process.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, cgroup_sock_addr::CgroupSockAddrLink,
        sk_lookup::SkLookupLink, sock_ops::SockOpsLink,
    },
};
use mesh_common::{FlowKey, InboundKey, OriginalDst, names, stats};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

/// The BPF object built by `mesh-ebpf`, embedded at compile time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// The cgroup-attached programs, in the order they are attached at enrolment. The connect
/// hooks come last so that nothing is redirected before the rest is in place.
const CGROUP_SOCK_ADDR_PROGRAMS: [&str; 4] = [
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
];

/// The loaded programs and the maps the agent uses while attaching.
pub struct Redirector {
    ebpf: Ebpf,
    inbound_listeners: SockHash<MapData, InboundKey>,
}

/// Read-only views of the maps the data path consults; cheap to share.
pub struct RedirectMaps {
    original_dst: HashMap<MapData, FlowKey, OriginalDst>,
    stats: PerCpuArray<MapData, u64>,
}

/// Everything attached for one pod. Dropping it detaches every program from the pod.
pub struct PodAttachment {
    // Field order is drop order: stop capturing (connect hooks, sk_lookup) before the rest.
    sock_addr_links: Vec<CgroupSockAddrLink>,
    sk_lookup_link: SkLookupLink,
    sock_ops_link: SockOpsLink,
    inbound_key: InboundKey,
}

impl Redirector {
    /// Loads the programs into the kernel (attaching nothing yet) and starts forwarding the
    /// programs' `aya-log` records to `tracing`.
    pub fn load() -> anyhow::Result<(Self, Arc<RedirectMaps>)> {
        raise_memlock_limit();
        let mut ebpf =
            Ebpf::load(EBPF_OBJECT).context("loading the eBPF object into the kernel")?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => forward_ebpf_logs(logger),
            Err(e) => warn!(error = %e, "eBPF programs' log records will not be shown"),
        }
        for name in CGROUP_SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, names::PROG_SOCK_OPS)?;
        sock_ops.load().context("verifying program mesh_sock_ops")?;
        let sk_lookup: &mut SkLookup = program(&mut ebpf, names::PROG_SK_LOOKUP)?;
        sk_lookup
            .load()
            .context("verifying program mesh_sk_lookup")?;

        let inbound_listeners =
            SockHash::try_from(take_map(&mut ebpf, names::MAP_INBOUND_LISTENERS)?)?;
        let original_dst =
            HashMap::try_from(take_map(&mut ebpf, names::MAP_ORIGINAL_DST_BY_FLOW)?)?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, names::MAP_STATS)?)?;
        info!("eBPF programs loaded");
        Ok((
            Self {
                ebpf,
                inbound_listeners,
            },
            Arc::new(RedirectMaps {
                original_dst,
                stats,
            }),
        ))
    }

    /// Starts capturing a pod: registers its inbound listener for `sk_lookup`, then attaches
    /// the cgroup programs and the netns program.
    pub fn attach_pod(
        &mut self,
        pod_ip: IpAddr,
        cgroup_dir: &Path,
        netns_file: &File,
        inbound_listener: &impl AsRawFd,
    ) -> anyhow::Result<PodAttachment> {
        let IpAddr::V4(v4) = pod_ip else {
            return Err(anyhow!("IPv6 pod addresses are not supported yet"));
        };
        let inbound_key = inbound_key(v4);
        self.inbound_listeners
            .insert(inbound_key, inbound_listener.as_raw_fd(), 0)
            .context("registering the pod's inbound listener in the sk_lookup map")?;
        match self.attach_programs(cgroup_dir, netns_file) {
            Ok((sock_addr_links, sk_lookup_link, sock_ops_link)) => Ok(PodAttachment {
                sock_addr_links,
                sk_lookup_link,
                sock_ops_link,
                inbound_key,
            }),
            Err(e) => {
                // Links attached so far were dropped (detached) with the error.
                let _ = self.inbound_listeners.remove(&inbound_key);
                Err(e)
            }
        }
    }

    fn attach_programs(
        &mut self,
        cgroup_dir: &Path,
        netns_file: &File,
    ) -> anyhow::Result<(Vec<CgroupSockAddrLink>, SkLookupLink, SockOpsLink)> {
        let cgroup = File::open(cgroup_dir)
            .with_context(|| format!("opening cgroup {}", cgroup_dir.display()))?;
        // "Single" means no flags: cgroup BPF links reject flags, and a link always coexists
        // with other programs on the cgroup (a CNI's, say), like BPF_F_ALLOW_MULTI.

        let sock_ops: &mut SockOps = program(&mut self.ebpf, names::PROG_SOCK_OPS)?;
        let id = sock_ops
            .attach(&cgroup, CgroupAttachMode::Single)
            .context("attaching sock_ops to the pod cgroup")?;
        let sock_ops_link = sock_ops.take_link(id)?;

        let sk_lookup: &mut SkLookup = program(&mut self.ebpf, names::PROG_SK_LOOKUP)?;
        let id = sk_lookup
            .attach(netns_file)
            .context("attaching sk_lookup to the pod network namespace")?;
        let sk_lookup_link = sk_lookup.take_link(id)?;

        let mut sock_addr_links = Vec::with_capacity(CGROUP_SOCK_ADDR_PROGRAMS.len());
        for name in CGROUP_SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to the pod cgroup"))?;
            // The connect hooks, attached last, go first in the list and so detach first.
            sock_addr_links.insert(0, prog.take_link(id)?);
        }
        Ok((sock_addr_links, sk_lookup_link, sock_ops_link))
    }

    /// Stops capturing a pod: detaches its programs, then forgets its inbound listener.
    pub fn detach_pod(&mut self, attachment: PodAttachment) {
        let key = attachment.inbound_key;
        drop(attachment);
        if let Err(e) = self.inbound_listeners.remove(&key) {
            warn!(error = %e, "removing the pod's inbound listener from the sk_lookup map");
        }
    }
}

impl PodAttachment {
    /// Number of BPF links this attachment holds.
    pub fn link_count(&self) -> usize {
        let _ = (&self.sk_lookup_link, &self.sock_ops_link);
        self.sock_addr_links.len() + 2
    }
}

impl RedirectMaps {
    /// The destination a redirected connection was dialled to, looked up by the pod's netns
    /// cookie and the client port the agent sees on the accepted socket.
    pub fn original_dst(&self, netns_cookie: u64, client_port: u16) -> Option<SocketAddr> {
        let key = FlowKey {
            netns_cookie,
            port: client_port,
            _pad: [0; 6],
        };
        let dst = self.original_dst.get(&key, 0).ok()?;
        let ip = match dst.family {
            mesh_common::FAMILY_INET => IpAddr::V4(Ipv4Addr::new(
                dst.addr[0],
                dst.addr[1],
                dst.addr[2],
                dst.addr[3],
            )),
            _ => IpAddr::V6(std::net::Ipv6Addr::from(dst.addr)),
        };
        Some(SocketAddr::new(ip, dst.port))
    }

    /// The programs' counters, summed over CPUs, with their names.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        (0..stats::COUNT)
            .filter_map(|i| {
                let per_cpu = self.stats.get(&i, 0).ok()?;
                Some((stats::NAMES[i as usize], per_cpu.iter().sum()))
            })
            .collect()
    }
}

fn inbound_key(ip: Ipv4Addr) -> InboundKey {
    u32::from_ne_bytes(ip.octets())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    prog.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lifting it is harmless after.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; only matters on kernels before 5.11");
    }
}

fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd holds it.
        let registered =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "cannot poll the eBPF log ring buffer");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

//! Loads the eBPF programs once, attaches them to each enrolled pod, and answers the data
//! path's one question about a redirected connection: where did it mean to go?
//!
//! Per pod the agent attaches `connect4/6`, `getpeername4/6` and `sock_ops` to the pod's
//! cgroup and `sk_lookup` to its network namespace. Every attachment is a BPF link pinned in
//! bpffs (`<pin dir>/pods/<pod>/<program>`), and the maps are pinned too (`<pin dir>/maps`):
//! - unenrolling a pod, or a clean shutdown, unpins (detaches) everything;
//! - a crash leaves the pins: the pod stays captured and fails closed (outbound connects are
//!   refused by the closed in-pod listener, inbound SYNs dropped by `sk_lookup`);
//! - the next agent adopts the pins: it swaps its own programs into the existing links and
//!   reuses the maps, so capture never stops (see [`crate::pinning`] and [`crate::handover`]).
use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, links::FdLink},
};
use mesh_common::{FlowKey, InboundKey, OriginalDst, names, stats};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{pinning, state::PodKey};

/// The BPF object built by `mesh-ebpf`, embedded at compile time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Where bpffs is (or gets) mounted; the pin directory must lie below it.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The cgroup-attached programs of the sock_addr kind.
const CGROUP_SOCK_ADDR_PROGRAMS: [&str; 6] = [
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_GATE_CONNECT4,
    names::PROG_GATE_CONNECT6,
];

/// The start-up gate's links, on the parent cgroup of all pods (see `--gate-cgroup`).
const GATE_LINKS: [&str; 2] = [names::PROG_GATE_CONNECT4, names::PROG_GATE_CONNECT6];

/// Every per-pod link, in attach order: the connect hooks come last so that nothing is
/// redirected before the rest is in place; detaching goes the other way.
const LINK_ORDER: [&str; 6] = [
    names::PROG_SOCK_OPS,
    names::PROG_SK_LOOKUP,
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
];

/// Maps shared across agent generations (pinned by name under `<pin dir>/maps`).
const PINNED_MAPS: [&str; 8] = [
    names::MAP_ORIGINAL_DST_BY_COOKIE,
    names::MAP_ORIGINAL_DST_BY_FLOW,
    names::MAP_INBOUND_LISTENERS,
    names::MAP_FAIL_CLOSED_PODS,
    names::MAP_DECIDED_CGROUPS,
    names::MAP_GATE_CONFIG,
    names::MAP_AGENT_TGIDS,
    names::MAP_STATS,
];

/// The loaded programs and the maps the agent uses while attaching.
pub struct Redirector {
    ebpf: Ebpf,
    inbound_listeners: SockHash<MapData, InboundKey>,
    fail_closed: HashMap<MapData, InboundKey, u8>,
    decided: HashMap<MapData, u64, u8>,
    gate_config: Array<MapData, u32>,
    agent_tgids: HashMap<MapData, u32, u8>,
    pin_dir: PathBuf,
    pods_dir: PathBuf,
}

/// Read-only views of the maps the data path consults; cheap to share.
pub struct RedirectMaps {
    original_dst: HashMap<MapData, FlowKey, OriginalDst>,
    stats: PerCpuArray<MapData, u64>,
}

/// One pod's pinned links. Dropping it leaves them attached (the pod stays captured for a
/// successor, or fails closed); [`Redirector::detach_pod`] removes them.
pub struct PodAttachment {
    dir: PathBuf,
    inbound_key: InboundKey,
    /// Whether the links were taken over from a previous agent rather than created.
    pub adopted: bool,
}

impl Redirector {
    /// Loads the programs into the kernel (attaching nothing yet), reusing the maps pinned
    /// under `pin_dir` by an earlier agent if there are any, and starts forwarding the
    /// programs' `aya-log` records to `tracing`.
    pub fn load(pin_dir: &Path) -> anyhow::Result<(Self, Arc<RedirectMaps>)> {
        raise_memlock_limit();
        if !pin_dir.starts_with(BPFFS_MOUNT) {
            return Err(anyhow!(
                "--bpf-pin-dir {} must lie under {BPFFS_MOUNT}",
                pin_dir.display()
            ));
        }
        let maps_dir = pin_dir.join("maps");
        let pods_dir = pin_dir.join("pods");
        pinning::ensure_dir(Path::new(BPFFS_MOUNT), &maps_dir)?;
        pinning::ensure_dir(Path::new(BPFFS_MOUNT), &pods_dir)?;
        let mut loader = EbpfLoader::new();
        for name in PINNED_MAPS {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object into the kernel")?;
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
        let fail_closed = HashMap::try_from(take_map(&mut ebpf, names::MAP_FAIL_CLOSED_PODS)?)?;
        let decided = HashMap::try_from(take_map(&mut ebpf, names::MAP_DECIDED_CGROUPS)?)?;
        let gate_config = Array::try_from(take_map(&mut ebpf, names::MAP_GATE_CONFIG)?)?;
        let mut agent_tgids: HashMap<MapData, u32, u8> =
            HashMap::try_from(take_map(&mut ebpf, names::MAP_AGENT_TGIDS)?)?;
        // This agent passes the start-up gate (its own pod is gated too); agents that are gone
        // are forgotten.
        let stale: Vec<u32> = agent_tgids
            .keys()
            .flatten()
            .filter(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            .collect();
        for pid in stale {
            let _ = agent_tgids.remove(&pid);
        }
        agent_tgids
            .insert(std::process::id(), 1, 0)
            .context("registering the agent with the start-up gate")?;
        let original_dst =
            HashMap::try_from(take_map(&mut ebpf, names::MAP_ORIGINAL_DST_BY_FLOW)?)?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, names::MAP_STATS)?)?;
        info!(pin_dir = %pin_dir.display(), "eBPF programs loaded");
        Ok((
            Self {
                ebpf,
                inbound_listeners,
                fail_closed,
                decided,
                gate_config,
                agent_tgids,
                pin_dir: pin_dir.to_path_buf(),
                pods_dir,
            },
            Arc::new(RedirectMaps {
                original_dst,
                stats,
            }),
        ))
    }

    /// Starts capturing a pod: registers its inbound listener for `sk_lookup`, then adopts
    /// the pod's pinned links (swapping in this agent's programs) or attaches new ones.
    pub fn attach_pod(
        &mut self,
        pod: &PodKey,
        pod_ip: IpAddr,
        cgroup_dir: &Path,
        netns_file: &File,
        inbound_listener: &impl AsRawFd,
    ) -> anyhow::Result<PodAttachment> {
        let IpAddr::V4(v4) = pod_ip else {
            return Err(anyhow!("IPv6 pod addresses are not supported yet"));
        };
        let inbound_key = inbound_key(v4);
        let cgroup = File::open(cgroup_dir)
            .with_context(|| format!("opening cgroup {}", cgroup_dir.display()))?;
        // The pin directory names the exact cgroup and netns (inode numbers): links pinned for
        // an earlier incarnation of the pod are never mistaken for this one's.
        let cgroup_ino = cgroup.metadata().map(|m| m.ino()).unwrap_or(0);
        let netns_ino = netns_file.metadata().map(|m| m.ino()).unwrap_or(0);
        let dir = self.pods_dir.join(format!(
            "{}_{}_{cgroup_ino}_{netns_ino}",
            pod.namespace, pod.name
        ));
        self.inbound_listeners
            .insert(inbound_key, inbound_listener.as_raw_fd(), 0)
            .context("registering the pod's inbound listener in the sk_lookup map")?;
        self.fail_closed
            .insert(inbound_key, 1, 0)
            .context("marking the pod address fail-closed")?;
        if dir.exists() {
            match self.adopt_links(&dir) {
                Ok(()) => {
                    return Ok(PodAttachment {
                        dir,
                        inbound_key,
                        adopted: true,
                    });
                }
                Err(e) => {
                    warn!(pod = %pod, error = format!("{e:#}"), "cannot adopt the pod's pinned links; attaching new ones");
                    unpin_dir(&dir);
                }
            }
        }
        match self.attach_links(&cgroup, netns_file, &dir) {
            Ok(()) => Ok(PodAttachment {
                dir,
                inbound_key,
                adopted: false,
            }),
            Err(e) => {
                unpin_dir(&dir);
                let _ = self.inbound_listeners.remove(&inbound_key);
                let _ = self.fail_closed.remove(&inbound_key);
                Err(e)
            }
        }
    }

    /// Points every pinned link of a pod at this agent's programs.
    fn adopt_links(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.adopt_links_named(dir, &LINK_ORDER)
    }

    fn adopt_links_named(&mut self, dir: &Path, names: &[&str]) -> anyhow::Result<()> {
        for &name in names {
            let link = pinning::open_pinned(&dir.join(name))?;
            let prog = self
                .ebpf
                .program(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
            let fd = prog
                .fd()
                .with_context(|| format!("program {name} is not loaded"))?;
            let raw = std::os::fd::AsFd::as_fd(fd);
            pinning::update_link(&link, &raw).with_context(|| format!("updating link {name}"))?;
        }
        Ok(())
    }

    fn attach_links(&mut self, cgroup: &File, netns_file: &File, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // "Single" means no flags: cgroup BPF links reject flags, and a link always coexists
        // with other programs on the cgroup (a CNI's, say), like BPF_F_ALLOW_MULTI.
        for name in LINK_ORDER {
            let link: FdLink = if name == names::PROG_SOCK_OPS {
                let prog: &mut SockOps = program(&mut self.ebpf, name)?;
                let id = prog
                    .attach(cgroup, CgroupAttachMode::Single)
                    .context("attaching sock_ops to the pod cgroup")?;
                prog.take_link(id)?
                    .try_into()
                    .context("sock_ops link is not an fd link")?
            } else if name == names::PROG_SK_LOOKUP {
                let prog: &mut SkLookup = program(&mut self.ebpf, name)?;
                let id = prog
                    .attach(netns_file)
                    .context("attaching sk_lookup to the pod network namespace")?;
                prog.take_link(id)?.into()
            } else {
                let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
                let id = prog
                    .attach(cgroup, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name} to the pod cgroup"))?;
                prog.take_link(id)?
                    .try_into()
                    .with_context(|| format!("{name} link is not an fd link"))?
            };
            link.pin(dir.join(name))
                .with_context(|| format!("pinning link {name} in {}", dir.display()))?;
        }
        Ok(())
    }

    /// Stops capturing a pod: unpins (detaches) its programs, then forgets its listener.
    pub fn detach_pod(&mut self, attachment: PodAttachment) {
        unpin_dir(&attachment.dir);
        let key = attachment.inbound_key;
        if let Err(e) = self.inbound_listeners.remove(&key) {
            warn!(error = %e, "removing the pod's inbound listener from the sk_lookup map");
        }
        let _ = self.fail_closed.remove(&key);
    }

    /// Detaches pods pinned by an earlier agent that this one did not adopt (they left the
    /// config while no agent ran), and forgets their addresses.
    pub fn remove_stale(&mut self, kept: &[&PodAttachment]) {
        let keep_dirs: HashSet<&Path> = kept.iter().map(|a| a.dir.as_path()).collect();
        let keep_keys: HashSet<InboundKey> = kept.iter().map(|a| a.inbound_key).collect();
        if let Ok(entries) = std::fs::read_dir(&self.pods_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if !keep_dirs.contains(path.as_path()) {
                    info!(pins = %path.display(), "detaching a pod pinned by an earlier agent");
                    unpin_dir(&path);
                }
            }
        }
        let stale: Vec<InboundKey> = self
            .fail_closed
            .keys()
            .flatten()
            .filter(|k| !keep_keys.contains(k))
            .collect();
        for key in stale {
            let _ = self.fail_closed.remove(&key);
        }
    }

    /// Lets a local pod's connects through the start-up gate: the agent has decided about it
    /// (enrolled, or not meshed). Returns the cgroup id.
    pub fn decide(&mut self, cgroup_dir: &Path) -> anyhow::Result<u64> {
        let id = std::fs::metadata(cgroup_dir)
            .with_context(|| format!("reading cgroup {}", cgroup_dir.display()))?
            .ino();
        self.decided
            .insert(id, 1, 0)
            .context("recording the pod in the start-up gate")?;
        Ok(id)
    }

    /// Forgets decisions about cgroups not in `keep` (pods that left this node).
    pub fn retain_decisions(&mut self, keep: &HashSet<u64>) {
        let stale: Vec<u64> = self
            .decided
            .keys()
            .flatten()
            .filter(|id| !keep.contains(id))
            .collect();
        for id in stale {
            let _ = self.decided.remove(&id);
        }
    }

    /// Attaches the start-up gate to `gated` (the parent cgroup of every pod), or adopts the
    /// gate a previous agent pinned. Call it once the pods of the first snapshot are decided.
    pub fn attach_gate(&mut self, gated: &Path) -> anyhow::Result<bool> {
        let mount = cgroup2_mount()?;
        let level = gated
            .strip_prefix(&mount)
            .with_context(|| {
                format!(
                    "--gate-cgroup {} is not under the cgroup v2 mount {}",
                    gated.display(),
                    mount.display()
                )
            })?
            .components()
            .count() as u32;
        self.gate_config
            .set(0, level, 0)
            .context("configuring the start-up gate")?;
        let dir = self.pin_dir.join("gate");
        if dir.exists() {
            match self.adopt_links_named(&dir, &GATE_LINKS) {
                Ok(()) => return Ok(true),
                Err(e) => {
                    warn!(
                        error = format!("{e:#}"),
                        "cannot adopt the pinned start-up gate; attaching a new one"
                    );
                    unpin_dir(&dir);
                }
            }
        }
        let cgroup =
            File::open(gated).with_context(|| format!("opening cgroup {}", gated.display()))?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for name in GATE_LINKS {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", gated.display()))?;
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .with_context(|| format!("{name} link is not an fd link"))?;
            if let Err(e) = link.pin(dir.join(name)) {
                unpin_dir(&dir);
                return Err(e).with_context(|| format!("pinning link {name}"));
            }
        }
        Ok(false)
    }

    /// Removes the pinned maps and the pin directory (after every pod was detached), so that
    /// a clean shutdown leaves nothing in the kernel.
    pub fn remove_pins(self) {
        unpin_dir(&self.pin_dir.join("gate"));
        let maps_dir = self.pin_dir.join("maps");
        for name in PINNED_MAPS {
            let _ = std::fs::remove_file(maps_dir.join(name));
        }
        let _ = std::fs::remove_dir(&maps_dir);
        let _ = std::fs::remove_dir(&self.pods_dir);
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

/// Where the cgroup v2 hierarchy is mounted (from /proc/self/mountinfo).
fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    text.lines()
        .find_map(|line| {
            // "... mount-point options ... - fstype source super-options"
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 mount found")
}

impl Drop for Redirector {
    fn drop(&mut self) {
        // This process no longer needs to pass the gate (a successor registered itself).
        let _ = self.agent_tgids.remove(&std::process::id());
    }
}

/// Unpins a pod's links in detach order (connect hooks first) and removes the directory.
fn unpin_dir(dir: &Path) {
    for name in LINK_ORDER.iter().rev() {
        let _ = std::fs::remove_file(dir.join(name));
    }
    // Anything else a different agent version pinned there.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(pins = %dir.display(), error = %e, "could not remove a pod's pin directory");
    }
}

impl PodAttachment {
    /// Number of BPF links this attachment holds.
    pub fn link_count(&self) -> usize {
        LINK_ORDER.len()
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

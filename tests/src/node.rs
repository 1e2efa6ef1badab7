//! Nodes and pods made of network namespaces, veths and cgroup v2 directories.
use std::{
    fs,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::run;

/// Prefix of every namespace and cgroup the harness creates.
const PREFIX: &str = "trt";
/// Parent cgroup (under the cgroup v2 mount) of all test pods.
const CGROUP_PARENT: &str = "trellis-test";

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// The cgroup v2 mount point (e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 filesystem is mounted")
}

/// A test node: a network namespace with a bridge that its pods hang off.
pub struct Node {
    /// Unique id, also the middle part of every name this node creates.
    pub id: String,
    /// Network namespace name (under /var/run/netns).
    pub netns: String,
    /// The node's /24: pods get `.2`, `.3`, ...
    pub subnet: [u8; 3],
    cgroup_dir: PathBuf,
    pods: Vec<String>,
}

/// A pod on a [`Node`].
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Network namespace name (under /var/run/netns).
    pub netns: String,
    /// Path of the namespace file, as the agent's config wants it.
    pub netns_path: PathBuf,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
}

impl Node {
    /// Creates a node namespace with its bridge. Also removes leftovers of crashed runs.
    pub fn new() -> anyhow::Result<Self> {
        crate::require_privileges()?;
        remove_stale_leftovers();
        let pid = std::process::id();
        let n = NEXT_NODE.fetch_add(1, Ordering::SeqCst);
        let id = format!("{pid}x{n}");
        // 10.A.B.0/24 with A in 64..=127 and B from pid and counter: unique per live node
        // in practice, and only ever routed between namespaces the harness made.
        let subnet = [
            10,
            64 + (pid % 64) as u8,
            ((pid / 64) as u8).wrapping_mul(16).wrapping_add(n as u8),
        ];
        let netns = format!("{PREFIX}{id}-node");
        let cgroup_dir = cgroup2_root()?.join(CGROUP_PARENT).join(&id);
        let node = Self {
            id,
            netns,
            subnet,
            cgroup_dir,
            pods: Vec::new(),
        };
        run("ip", &["netns", "add", &node.netns])?;
        let gw = node.gateway().to_string();
        node.ip_in_node(&["link", "set", "lo", "up"])?;
        node.ip_in_node(&["link", "add", "br0", "type", "bridge"])?;
        node.ip_in_node(&["addr", "add", &format!("{gw}/24"), "dev", "br0"])?;
        node.ip_in_node(&["link", "set", "br0", "up"])?;
        fs::create_dir_all(&node.cgroup_dir)
            .with_context(|| format!("creating cgroup {}", node.cgroup_dir.display()))?;
        Ok(node)
    }

    /// The node's cgroup: the parent of its pods' cgroups (like kubelet's kubepods.slice).
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// The bridge address, the pods' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1)
    }

    fn ip_in_node(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.netns.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Adds a pod named `name` (at most 12 characters) with the next free address.
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<Pod> {
        if name.is_empty() || name.len() > 12 {
            bail!("pod name {name:?} must have 1 to 12 characters");
        }
        let host_octet = 2 + self.pods.len() as u8;
        let ip = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], host_octet);
        let netns = format!("{PREFIX}{}-{name}", self.id);
        run("ip", &["netns", "add", &netns])?;
        self.pods.push(netns.clone());
        let host_veth = format!("v{host_octet}");
        run(
            "ip",
            &[
                "link",
                "add",
                &host_veth,
                "netns",
                &self.netns,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns,
            ],
        )?;
        self.ip_in_node(&["link", "set", &host_veth, "master", "br0", "up"])?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec![
                "route",
                "add",
                "default",
                "via",
                &self.gateway().to_string(),
            ],
        ] {
            let mut full = vec!["-n", netns.as_str()];
            full.extend(args.iter().copied());
            run("ip", &full)?;
        }
        let cgroup = self.cgroup_dir.join(name);
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Ok(Pod {
            name: name.to_string(),
            ip,
            netns_path: PathBuf::from("/var/run/netns").join(&netns),
            netns,
            cgroup,
        })
    }
}

/// Kubelet's cgroup driver: how it names pod cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice`
    Systemd,
    /// `kubepods/<qos>/pod<uid>`
    Cgroupfs,
}

impl Node {
    /// This node's stand-in for kubelet's cgroup root (the agent's `--kubelet-cgroup-root`):
    /// a directory of its own under the cgroup v2 mount, removed with the node.
    pub fn kubelet_cgroup_root(&self) -> PathBuf {
        self.cgroup_dir.join("kubelet")
    }

    /// Adds a pod as kubelet and a container runtime lay it out: its cgroup is the pod UID's
    /// kubelet cgroup (BestEffort QoS) under [`Self::kubelet_cgroup_root`], and one "container"
    /// (a sleeping process in a child cgroup, in the pod's netns) runs in it, whose pid is
    /// how the agent finds the netns. Kill that process and call [`Pod::start_container`]
    /// again to restart the container.
    pub fn add_kubelet_pod(
        &mut self,
        name: &str,
        uid: &str,
        driver: CgroupDriver,
    ) -> anyhow::Result<(Pod, crate::Background)> {
        let mut pod = self.add_pod(name)?;
        let dir = match driver {
            CgroupDriver::Systemd => self.kubelet_cgroup_root().join(format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            )),
            CgroupDriver::Cgroupfs => self
                .kubelet_cgroup_root()
                .join(format!("kubepods/besteffort/pod{uid}")),
        };
        fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        // The harness made an ordinary cgroup for the pod; the kubelet one replaces it.
        let _ = fs::remove_dir(&pod.cgroup);
        pod.cgroup = dir;
        let container = pod.start_container("app")?;
        Ok((pod, container))
    }
}

/// The veth pair between two linked nodes (the "node network"). Removing either node's
/// namespace removes it.
#[derive(Clone, Debug)]
pub struct NodeLink {
    /// Address of the first node on the link.
    pub a: Ipv4Addr,
    /// Address of the second node on the link.
    pub b: Ipv4Addr,
    /// Interface name of the link inside each node namespace (for packet captures).
    pub interface: String,
}

impl Node {
    /// Connects two nodes with a veth and routes each node's pod subnet through the other,
    /// so pods on `self` and `other` reach each other across the link.
    pub fn link(&self, other: &Node) -> anyhow::Result<NodeLink> {
        let a = Ipv4Addr::new(169, 254, self.subnet[2], 1);
        let b = Ipv4Addr::new(169, 254, self.subnet[2], 2);
        let interface = "nodelink".to_string();
        run(
            "ip",
            &[
                "link",
                "add",
                &interface,
                "netns",
                &self.netns,
                "type",
                "veth",
                "peer",
                "name",
                &interface,
                "netns",
                &other.netns,
            ],
        )?;
        for (node, mine, theirs, remote_subnet) in
            [(self, a, b, other.subnet), (other, b, a, self.subnet)]
        {
            node.ip_in_node(&["addr", "add", &format!("{mine}/30"), "dev", &interface])?;
            node.ip_in_node(&["link", "set", &interface, "up"])?;
            let subnet = format!(
                "{}.{}.{}.0/24",
                remote_subnet[0], remote_subnet[1], remote_subnet[2]
            );
            node.ip_in_node(&["route", "add", &subnet, "via", &theirs.to_string()])?;
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &node.netns,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            )?;
        }
        Ok(NodeLink { a, b, interface })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.cgroup_dir);
        for ns in self.pods.iter().chain(std::iter::once(&self.netns)) {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

impl Pod {
    /// Starts a "container" of this pod: a process sleeping in the child cgroup `name` of the
    /// pod's cgroup and in the pod's netns (as a runtime puts a container's processes).
    pub fn start_container(&self, name: &str) -> anyhow::Result<crate::Background> {
        let mut container = self.clone();
        container.cgroup = self.cgroup.join(format!("cri-containerd-{name}.scope"));
        fs::create_dir_all(&container.cgroup)
            .with_context(|| format!("creating cgroup {}", container.cgroup.display()))?;
        let mut cmd = container.command("sh")?;
        cmd.args(["-c", "echo ready; exec sleep 100000"]);
        crate::Background::spawn_ready(cmd, "ready")
    }

    /// A command that runs inside this pod: in its cgroup (so the mesh's cgroup hooks see it)
    /// and its network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", self.cgroup.display()))?;
        let netns = fs::File::open(&self.netns_path)
            .with_context(|| format!("opening {}", self.netns_path.display()))?;
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe calls (write, setns) between fork and exec; the
        // files stay alive in the closure.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process itself into the cgroup.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `curl` in the pod and returns (HTTP status, body). Fails if curl itself fails.
    pub fn curl(&self, url: &str) -> anyhow::Result<(u16, String)> {
        let out = self
            .command("curl")?
            .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}", url])
            .output()
            .context("running curl in the pod")?;
        if !out.status.success() {
            bail!(
                "curl {url} from pod {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
        Ok((
            code.trim().parse().context("curl status")?,
            body.to_string(),
        ))
    }

    /// Runs a Python script in the pod and returns its stdout; fails with its stderr.
    pub fn python(&self, script: &str) -> anyhow::Result<String> {
        let out = self
            .command("python3")?
            .args(["-c", script])
            .output()
            .context("running python3 in the pod")?;
        if !out.status.success() {
            bail!(
                "python in pod {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The config-file entry for this pod as seen from another node's agent: no netns or
    /// cgroup, just where it runs and who it is.
    pub fn remote_config_entry(
        &self,
        namespace: &str,
        service_account: &str,
        node: &Node,
    ) -> String {
        format!(
            "  - {{name: {}, namespace: {namespace}, serviceAccount: {service_account}, ip: {}, node: {}, enrolled: true}}\n",
            self.name, self.ip, node.id
        )
    }

    /// The config-file entry (YAML flow mapping) for this pod.
    pub fn config_entry(&self, namespace: &str, service_account: &str, enrolled: bool) -> String {
        format!(
            "  - {{name: {}, namespace: {namespace}, serviceAccount: {service_account}, ip: {}, netns: {}, cgroup: {}, labels: {{app: {}}}, enrolled: {enrolled}}}\n",
            self.name,
            self.ip,
            self.netns_path.display(),
            self.cgroup.display(),
            self.name
        )
    }
}

/// Kills everything in a cgroup subtree and removes it (children first).
fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..250 {
        if fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

/// Removes namespaces and cgroups left by harness processes that no longer exist.
fn remove_stale_leftovers() {
    let alive = |id: &str| -> bool {
        let pid = id.split('x').next().unwrap_or("");
        pid.parse::<u32>()
            .map(|p| Path::new(&format!("/proc/{p}")).exists())
            .unwrap_or(true)
    };
    if let Ok(entries) = fs::read_dir("/var/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(PREFIX) {
                let id = rest.split('-').next().unwrap_or("");
                if !alive(id) {
                    let _ = run("ip", &["netns", "del", &name]);
                }
            }
        }
    }
    if let Ok(root) = cgroup2_root()
        && let Ok(entries) = fs::read_dir(root.join(CGROUP_PARENT))
    {
        for e in entries.flatten() {
            if !alive(&e.file_name().to_string_lossy()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}

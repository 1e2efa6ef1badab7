//! Finding a local pod's cgroup and network namespace from its UID, as kubelet lays them out.
//!
//! Kubelet puts each pod in a cgroup named after its UID and QoS class, under the node's
//! cgroup root (`/sys/fs/cgroup` by default):
//!
//! | driver  | Guaranteed                                  | Burstable / BestEffort                                                   |
//! |---------|---------------------------------------------|--------------------------------------------------------------------------|
//! | systemd | `kubepods.slice/kubepods-pod<uid_>.slice`   | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//! | cgroupfs| `kubepods/pod<uid>`                         | `kubepods/burstable/pod<uid>`                                            |
//!
//! (`<uid_>`: the UID with `-` replaced by `_`, as systemd unit names cannot carry dashes.)
//! Every candidate is tried, so neither the driver nor the QoS class needs to be known.
//!
//! The network namespace is that of any process of the pod: a pid from `cgroup.procs` of the
//! pod cgroup or of one of its container cgroups, then `/proc/PID/ns/net`. When the runtime
//! also bind-mounts that namespace under the named-netns directory (`/var/run/netns`, as
//! containerd and CRI-O do), that path is preferred: it stays valid when the process whose
//! pid was read exits (a container restart), so the pod is not re-plumbed for it. Otherwise
//! the `/proc/PID/ns/net` path is kept only while it still names the same namespace, and
//! re-resolved when the process is gone.
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Where a local pod's traffic is captured from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPaths {
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    /// (device, inode) of the namespace, to notice when `netns` stops naming it.
    netns_id: (u64, u64),
}

#[cfg(test)]
impl PodPaths {
    pub(crate) fn for_test(netns: PathBuf, cgroup: PathBuf) -> Self {
        Self {
            netns,
            cgroup,
            netns_id: (0, 0),
        }
    }
}

/// Resolves pod UIDs to [`PodPaths`], remembering earlier answers while they stay valid.
pub struct PodResolver {
    cgroup_root: PathBuf,
    netns_dir: PathBuf,
    cache: HashMap<String, PodPaths>,
}

/// Cgroup directories kubelet may have made for the pod `uid`, relative to the cgroup root.
pub fn kubelet_cgroup_candidates(uid: &str) -> Vec<PathBuf> {
    let underscored = uid.replace('-', "_");
    let mut paths = vec![
        PathBuf::from(format!("kubepods.slice/kubepods-pod{underscored}.slice")),
        PathBuf::from(format!("kubepods/pod{uid}")),
    ];
    for qos in ["burstable", "besteffort"] {
        paths.push(PathBuf::from(format!(
            "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{underscored}.slice"
        )));
        paths.push(PathBuf::from(format!("kubepods/{qos}/pod{uid}")));
    }
    paths
}

impl PodResolver {
    pub fn new(cgroup_root: PathBuf, netns_dir: PathBuf) -> Self {
        Self {
            cgroup_root,
            netns_dir,
            cache: HashMap::new(),
        }
    }

    /// The pod's netns and cgroup, or why they cannot be found (yet).
    pub fn resolve(&mut self, uid: &str) -> Result<PodPaths, String> {
        if let Some(cached) = self.cache.get(uid)
            && netns_id(&cached.netns) == Some(cached.netns_id)
            && cached.cgroup.join("cgroup.procs").is_file()
        {
            return Ok(cached.clone());
        }
        let found = self.find(uid);
        match &found {
            Ok(paths) => {
                self.cache.insert(uid.to_string(), paths.clone());
            }
            Err(_) => {
                self.cache.remove(uid);
            }
        }
        found
    }

    /// The pod's kubelet cgroup alone (for pods the mesh does not capture, which the start-up
    /// gate must still let through), if kubelet made it.
    pub fn cgroup_of(&self, uid: &str) -> Option<PathBuf> {
        if uid.is_empty() || uid.contains('/') || uid.contains("..") {
            return None;
        }
        kubelet_cgroup_candidates(uid)
            .into_iter()
            .map(|p| self.cgroup_root.join(p))
            .find(|p| p.join("cgroup.procs").is_file())
    }

    /// Forgets pods that are not in `uids` any more.
    pub fn retain(&mut self, uids: &std::collections::HashSet<String>) {
        self.cache.retain(|uid, _| uids.contains(uid));
    }

    fn find(&self, uid: &str) -> Result<PodPaths, String> {
        if uid.is_empty() || uid.contains('/') || uid.contains("..") {
            return Err(format!("{uid:?} is not a pod UID"));
        }
        let cgroup = kubelet_cgroup_candidates(uid)
            .into_iter()
            .map(|p| self.cgroup_root.join(p))
            .find(|p| p.join("cgroup.procs").is_file())
            .ok_or_else(|| {
                format!(
                    "no kubelet cgroup for pod UID {uid} under {} (systemd or cgroupfs layout)",
                    self.cgroup_root.display()
                )
            })?;
        let pid = first_pid(&cgroup, 3)
            .ok_or_else(|| format!("no process in {} yet", cgroup.display()))?;
        let proc_netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let id =
            netns_id(&proc_netns).ok_or_else(|| format!("cannot open {}", proc_netns.display()))?;
        let netns = self.named_netns(id).unwrap_or(proc_netns);
        Ok(PodPaths {
            netns,
            cgroup,
            netns_id: id,
        })
    }

    /// The bind-mounted namespace file with this identity, if the runtime made one.
    fn named_netns(&self, id: (u64, u64)) -> Option<PathBuf> {
        fs::read_dir(&self.netns_dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| netns_id(p) == Some(id))
    }
}

/// (device, inode) of a namespace file; None when it cannot be read.
fn netns_id(path: &Path) -> Option<(u64, u64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// A pid from `cgroup.procs` of `dir`, else of its descendants (container cgroups), breadth
/// first, at most `depth` levels down.
fn first_pid(dir: &Path, depth: u32) -> Option<u32> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse::<u32>().ok()) {
        return Some(pid);
    }
    if depth == 0 {
        return None;
    }
    let mut children: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    children.sort();
    children.iter().find_map(|c| first_pid(c, depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_cover_both_drivers_and_every_qos_class() {
        let c = kubelet_cgroup_candidates("1a2b-3c");
        let s: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
        assert!(s.contains(&"kubepods.slice/kubepods-pod1a2b_3c.slice".to_string()));
        assert!(
            s.contains(
                &"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_3c.slice"
                    .to_string()
            )
        );
        assert!(s.contains(&"kubepods/besteffort/pod1a2b-3c".to_string()));
        assert!(s.contains(&"kubepods/pod1a2b-3c".to_string()));
        assert_eq!(c.len(), 6);
    }

    #[test]
    fn finds_a_pid_in_a_container_cgroup_and_its_netns() {
        // A fake cgroup tree (plain directories and files): the pod cgroup has no process of
        // its own, its container's has ours.
        let root = tempfile::tempdir().expect("tempdir");
        let uid = "0c5d6d37-6d0e-4bc1-9a34-5b1e0f6a0001";
        let pod = root
            .path()
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ));
        let container = pod.join("cri-containerd-abc.scope");
        fs::create_dir_all(&container).expect("mkdir");
        fs::write(pod.join("cgroup.procs"), "").expect("write");
        fs::write(
            container.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .expect("write");
        let netns_dir = tempfile::tempdir().expect("tempdir");
        let mut r = PodResolver::new(root.path().to_path_buf(), netns_dir.path().to_path_buf());
        let paths = r.resolve(uid).expect("resolves");
        assert_eq!(paths.cgroup, pod);
        assert_eq!(
            paths.netns,
            PathBuf::from(format!("/proc/{}/ns/net", std::process::id()))
        );
        // Cached while valid.
        assert_eq!(r.resolve(uid).expect("still resolves"), paths);
        let e = r
            .resolve("ffffffff-0000-0000-0000-000000000000")
            .unwrap_err();
        assert!(e.contains("no kubelet cgroup"), "{e}");
        assert!(r.resolve("../etc").is_err());
    }

    #[test]
    fn an_empty_pod_cgroup_is_not_resolved_yet() {
        let root = tempfile::tempdir().expect("tempdir");
        let pod = root.path().join("kubepods/burstable/podabc");
        fs::create_dir_all(&pod).expect("mkdir");
        fs::write(pod.join("cgroup.procs"), "").expect("write");
        let mut r = PodResolver::new(root.path().to_path_buf(), root.path().to_path_buf());
        let e = r.resolve("abc").unwrap_err();
        assert!(e.contains("no process"), "{e}");
    }
}

//! Keeps the set of enrolled pods equal to what the live snapshot asks for.
//!
//! Enrolling a pod: enter its netns (a dedicated thread), open the in-pod listeners (or take
//! the ones a predecessor agent handed over), start their accept loops, then attach the eBPF
//! programs or adopt the pinned ones (capture starts last, when everything that serves it is
//! in place). Unenrolling runs the same steps backwards; connections already being relayed
//! are left to finish.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::Arc,
    thread::JoinHandle,
};

use anyhow::Context as _;
use mesh_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use tokio::task::AbortHandle;
use tracing::{debug, error, info};

use crate::{
    handover::PodListeners,
    inpod::PodNetns,
    proxy::{self, PodContext, ProxyInputs},
    redirect::{PodAttachment, Redirector},
    state::{Mesh, PodKey, Workload},
};

struct EnrolledPod {
    workload: Workload,
    context: Arc<PodContext>,
    // Declared first so that it is dropped (programs detached) before the listeners close.
    attachment: Option<PodAttachment>,
    accept_loops: Vec<AbortHandle>,
    /// Outbound, inbound and HBONE listeners, for a handover. Each worker accepts on its
    /// own dup of them.
    listeners: [std::net::TcpListener; 3],
}

pub struct Enrolment {
    redirector: Redirector,
    /// Why pods that should be enrolled are not, for the admin API.
    pub failures: Arc<std::sync::Mutex<BTreeMap<PodKey, String>>>,
    inputs: Arc<ProxyInputs>,
    pods: BTreeMap<PodKey, EnrolledPod>,
    netns_threads: Vec<JoinHandle<()>>,
    /// Whether pins left by an earlier agent were reconciled (after the first apply).
    stale_pins_removed: bool,
    /// Listeners handed over by the previous agent, taken by the first apply.
    inherited: HashMap<PodKey, PodListeners>,
}

impl Enrolment {
    pub fn new(
        redirector: Redirector,
        inputs: Arc<ProxyInputs>,
        inherited: HashMap<PodKey, PodListeners>,
    ) -> Self {
        Self {
            redirector,
            failures: Default::default(),
            inputs,
            pods: BTreeMap::new(),
            netns_threads: Vec::new(),
            stale_pins_removed: false,
            inherited,
        }
    }

    /// Number of pods currently enrolled.
    pub fn enrolled_count(&self) -> usize {
        self.pods.len()
    }

    /// Enrols and unenrols pods until the enrolled set matches `mesh`. A pod that fails to
    /// enrol is logged and skipped; the others are unaffected.
    pub async fn apply(&mut self, mesh: &Mesh) {
        let wanted: BTreeMap<&PodKey, &Workload> =
            mesh.enrolled_here().map(|w| (&w.key, w)).collect();
        let stale: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|(key, pod)| match wanted.get(key) {
                None => true,
                Some(w) => pod.workload.plumbing_differs(w),
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.unenrol(&key);
        }
        for (key, workload) in wanted {
            if let Some(pod) = self.pods.get_mut(key) {
                // Same plumbing: take the new labels / identity as they are.
                pod.workload = workload.clone();
                continue;
            }
            match self.enrol(workload).await {
                Ok(()) => {
                    self.failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(key);
                }
                Err(e) => {
                    error!(pod = %key, error = format!("{e:#}"), "pod enrolment failed; its traffic is not captured");
                    self.failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone(), format!("{e:#}"));
                }
            }
        }
        self.decide_local_pods(mesh);
        {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            failures.retain(|key, _| {
                mesh.pods
                    .get(key)
                    .is_some_and(|w| w.enrolled && w.is_on(&mesh.node))
            });
        }
        if !self.stale_pins_removed {
            let kept: Vec<&PodAttachment> = self
                .pods
                .values()
                .filter_map(|p| p.attachment.as_ref())
                .collect();
            self.redirector.remove_stale(&kept);
            self.stale_pins_removed = true;
            // Listeners of pods the predecessor served but this config does not: close them.
            self.inherited.clear();
        }
        self.publish();
        self.netns_threads.retain(|t| !t.is_finished());
    }

    /// Lets this node's pods through the start-up gate once the agent knows what to do with
    /// them: enrolled pods only once their programs are attached (a pod whose enrolment
    /// failed stays gated: fail closed), pods left out of the mesh at once. Pods no longer
    /// listed here are forgotten (gated again).
    fn decide_local_pods(&mut self, mesh: &Mesh) {
        let mut decided = HashSet::new();
        for w in mesh.pods.values() {
            if !w.is_on(&mesh.node) || w.cgroup.as_os_str().is_empty() {
                continue;
            }
            if w.enrolled && !self.pods.contains_key(&w.key) {
                continue;
            }
            match self.redirector.decide(&w.cgroup) {
                Ok(id) => {
                    decided.insert(id);
                }
                Err(e) => {
                    debug!(pod = %w.key, error = format!("{e:#}"), "pod not recorded in the start-up gate")
                }
            }
        }
        // Pods the mesh never captures (host network) are decided from the start.
        for cgroup in &mesh.passthrough_cgroups {
            if let Ok(id) = self.redirector.decide(cgroup) {
                decided.insert(id);
            }
        }
        self.redirector.retain_decisions(&decided);
    }

    /// Attaches the start-up gate to the parent cgroup of all pods (see `--gate-cgroup`);
    /// after the first apply, so that the pods already running are decided.
    pub fn attach_gate(&mut self, gated: &std::path::Path) -> anyhow::Result<()> {
        let adopted = self.redirector.attach_gate(gated)?;
        info!(cgroup = %gated.display(), adopted, "start-up gate attached: undecided pods cannot connect");
        Ok(())
    }

    /// Makes the enrolled set visible to the data path, and lets go of certificates and
    /// pooled connections of identities that no longer have a pod here.
    fn publish(&self) {
        let local: HashMap<_, _> = self
            .pods
            .values()
            .map(|p| (p.workload.ip, p.context.clone()))
            .collect();
        self.inputs.metrics.set_enrolled_pods(local.len() as i64);
        let links: usize = self
            .pods
            .values()
            .filter_map(|p| p.attachment.as_ref())
            .map(|a| a.link_count())
            .sum();
        self.inputs.metrics.set_ebpf_links(links as i64);
        self.inputs.local_pods.store(Arc::new(local));
        let held: HashSet<_> = self
            .pods
            .values()
            .map(|p| p.workload.identity.clone())
            .collect();
        self.inputs.certs.retain(&held);
        self.inputs.pool.retain_sources(&held);
    }

    async fn enrol(&mut self, workload: &Workload) -> anyhow::Result<()> {
        let (netns, thread) = PodNetns::enter(&workload.netns, &workload.key.name)?;
        self.netns_threads.push(thread);
        let [outbound, inbound, hbone] = match self.inherited.remove(&workload.key) {
            Some(fds) => adopt_listeners(fds).context("adopting the handed-over listeners")?,
            None => [
                netns
                    .listen(SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)))
                    .await
                    .context("opening the outbound listener 127.0.0.1:15001 in the pod")?,
                netns
                    .listen(SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT)))
                    .await
                    .context("opening the inbound listener 0.0.0.0:15006 in the pod")?,
                netns
                    .listen(SocketAddr::from(([0, 0, 0, 0], HBONE_PORT)))
                    .await
                    .context("opening the HBONE listener 0.0.0.0:15008 in the pod")?,
            ],
        };
        // The pod's certificate must exist before anything can be served for it.
        let cert = self
            .inputs
            .certs
            .ensure(&workload.identity)
            .with_context(|| format!("issuing a certificate for {}", workload.identity))?;
        let netns_file = File::open(&workload.netns)
            .with_context(|| format!("opening {}", workload.netns.display()))?;
        // Register and attach before the accept loops own the listeners; a failure here
        // drops everything opened so far.
        let attachment = self.redirector.attach_pod(
            &workload.key,
            workload.ip,
            &workload.cgroup,
            &netns_file,
            &inbound,
        )?;
        let adopted = attachment.adopted;
        let links = attachment.link_count();

        let pod = Arc::new(PodContext::new(workload.clone(), netns));
        let accept_loops = [
            spawn_accept_loops(
                &outbound,
                "outbound",
                &pod,
                &self.inputs,
                proxy::outbound::handle,
            )?,
            spawn_accept_loops(
                &inbound,
                "inbound",
                &pod,
                &self.inputs,
                proxy::inbound_plain::handle,
            )?,
            spawn_accept_loops(
                &hbone,
                "hbone",
                &pod,
                &self.inputs,
                proxy::inbound_hbone::handle,
            )?,
        ]
        .concat();
        let listeners = [outbound, inbound, hbone];
        info!(
            pod = %workload.key,
            identity = %workload.identity,
            ip = %workload.ip,
            bpf_links = links,
            adopted_links = adopted,
            cert_expires_in_s = cert.seconds_to_expiry() as u64,
            "pod enrolled"
        );
        self.pods.insert(
            workload.key.clone(),
            EnrolledPod {
                workload: workload.clone(),
                context: pod,
                attachment: Some(attachment),
                accept_loops,
                listeners,
            },
        );
        Ok(())
    }

    fn unenrol(&mut self, key: &PodKey) {
        let Some(mut pod) = self.pods.remove(key) else {
            return;
        };
        if let Some(attachment) = pod.attachment.take() {
            self.redirector.detach_pod(attachment);
        }
        for task in pod.accept_loops.drain(..) {
            task.abort();
        }
        info!(pod = %key, "pod unenrolled");
    }

    /// Every enrolled pod's listening sockets, to hand to a successor.
    pub fn listener_fds(&self) -> Vec<(PodKey, [RawFd; 3])> {
        self.pods
            .iter()
            .map(|(key, pod)| (key.clone(), pod.listeners.each_ref().map(|l| l.as_raw_fd())))
            .collect()
    }

    /// Stops accepting and lets go of every pod without detaching anything: the pinned
    /// links, the reply routes and the listening sockets (held by a successor, if any) stay.
    /// Returns the pods, whose connections are still being served, and their netns threads.
    pub fn release(mut self) -> (Vec<Arc<PodContext>>, Vec<JoinHandle<()>>) {
        let mut contexts = Vec::with_capacity(self.pods.len());
        for pod in self.pods.values_mut() {
            pod.context.netns.keep_route_on_exit();
            for task in pod.accept_loops.drain(..) {
                task.abort();
            }
            contexts.push(pod.context.clone());
        }
        // Dropping the attachments closes nothing in the kernel (see PodAttachment).
        self.pods.clear();
        self.publish_metrics_only();
        (contexts, std::mem::take(&mut self.netns_threads))
    }

    /// Ends this agent's part. With `detach`, every pod is unenrolled and every pin removed:
    /// nothing is left in the kernel and the pods' traffic flows unmeshed. Without it, the
    /// pods stay captured (pinned links, reply routes) for a successor: until one comes,
    /// their new connections fail closed.
    ///
    /// Returns the pods' netns threads; connections still being relayed must have been
    /// dropped (runtime shut down) for them to finish.
    pub fn shutdown(mut self, detach: bool) -> Vec<JoinHandle<()>> {
        if !detach {
            return self.release().1;
        }
        let keys: Vec<PodKey> = self.pods.keys().cloned().collect();
        for key in keys {
            self.unenrol(&key);
        }
        self.publish();
        self.redirector.remove_pins();
        std::mem::take(&mut self.netns_threads)
    }

    /// After a release the data path keeps its view of the pods (connections in flight still
    /// deliver to them); only the gauges change.
    fn publish_metrics_only(&self) {
        self.inputs.metrics.set_enrolled_pods(0);
        self.inputs.metrics.set_ebpf_links(0);
    }
}

/// The accept loops of one pod listener: one per worker, each on its own dup of the socket.
fn spawn_accept_loops<F, Fut>(
    listener: &std::net::TcpListener,
    name: &'static str,
    pod: &Arc<PodContext>,
    inputs: &Arc<ProxyInputs>,
    handle: F,
) -> anyhow::Result<Vec<AbortHandle>>
where
    F: Fn(tokio::net::TcpStream, SocketAddr, Arc<PodContext>, Arc<ProxyInputs>) -> Fut
        + Copy
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // Duplicated here, so that running out of fds fails the enrolment instead of a worker.
    let mut dups = (0..crate::workers::count())
        .map(|_| listener.try_clone())
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("duplicating the {name} listener for the workers"))?;
    Ok(crate::workers::spawn_on_each(|worker| {
        let dup = dups.pop();
        let (pod, inputs) = (pod.clone(), inputs.clone());
        async move {
            if let Some(dup) = dup {
                proxy::serve(dup, name, worker, pod, inputs, handle).await;
            }
        }
    }))
}

/// Turns handed-over descriptors back into (non-blocking) listeners.
fn adopt_listeners(fds: PodListeners) -> std::io::Result<[std::net::TcpListener; 3]> {
    let [a, b, c] = fds;
    let adopt = |fd: OwnedFd| -> std::io::Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    Ok([adopt(a)?, adopt(b)?, adopt(c)?])
}

//! Keeps the set of enrolled pods equal to what the live snapshot asks for.
//!
//! Enrolling a pod: enter its netns (a dedicated thread), open the in-pod listeners, start
//! their accept loops, then attach the eBPF programs (capture starts last, when everything
//! that serves it is in place). Unenrolling runs the same steps backwards; connections
//! already being relayed are left to finish.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    net::SocketAddr,
    sync::Arc,
    thread::JoinHandle,
};

use anyhow::Context as _;
use mesh_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use tokio::task::AbortHandle;
use tracing::{error, info};

use crate::{
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
}

pub struct Enrolment {
    redirector: Redirector,
    /// Why pods that should be enrolled are not, for the admin API.
    pub failures: Arc<std::sync::Mutex<BTreeMap<PodKey, String>>>,
    inputs: Arc<ProxyInputs>,
    pods: BTreeMap<PodKey, EnrolledPod>,
    netns_threads: Vec<JoinHandle<()>>,
}

impl Enrolment {
    pub fn new(redirector: Redirector, inputs: Arc<ProxyInputs>) -> Self {
        Self {
            redirector,
            failures: Default::default(),
            inputs,
            pods: BTreeMap::new(),
            netns_threads: Vec::new(),
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
        {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            failures.retain(|key, _| {
                mesh.pods
                    .get(key)
                    .is_some_and(|w| w.enrolled && w.is_on(&mesh.node))
            });
        }
        self.publish();
        self.netns_threads.retain(|t| !t.is_finished());
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
        let outbound = netns
            .listen(SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)))
            .await
            .context("opening the outbound listener 127.0.0.1:15001 in the pod")?;
        let inbound = netns
            .listen(SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT)))
            .await
            .context("opening the inbound listener 0.0.0.0:15006 in the pod")?;
        let hbone = netns
            .listen(SocketAddr::from(([0, 0, 0, 0], HBONE_PORT)))
            .await
            .context("opening the HBONE listener 0.0.0.0:15008 in the pod")?;
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
        let attachment =
            self.redirector
                .attach_pod(workload.ip, &workload.cgroup, &netns_file, &inbound)?;
        let links = attachment.link_count();

        let pod = Arc::new(PodContext {
            workload: workload.clone(),
            netns,
            active_connections: Default::default(),
            http_clients: Default::default(),
        });
        let inputs = &self.inputs;
        let accept_loops = vec![
            tokio::spawn(proxy::serve(
                outbound,
                "outbound",
                pod.clone(),
                inputs.clone(),
                proxy::outbound::handle,
            ))
            .abort_handle(),
            tokio::spawn(proxy::serve(
                inbound,
                "inbound",
                pod.clone(),
                inputs.clone(),
                proxy::inbound_plain::handle,
            ))
            .abort_handle(),
            tokio::spawn(proxy::serve(
                hbone,
                "hbone",
                pod.clone(),
                inputs.clone(),
                proxy::inbound_hbone::handle,
            ))
            .abort_handle(),
        ];
        info!(
            pod = %workload.key,
            identity = %workload.identity,
            ip = %workload.ip,
            bpf_links = links,
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

    /// Unenrols every pod and waits for the pods' netns threads to remove their routes.
    /// Connections still being relayed must have been dropped (runtime shut down) for the
    /// threads to finish; this waits at most a few seconds for them.
    pub fn shutdown(mut self) -> Vec<JoinHandle<()>> {
        let keys: Vec<PodKey> = self.pods.keys().cloned().collect();
        for key in keys {
            self.unenrol(&key);
        }
        self.publish();
        drop(self.redirector);
        std::mem::take(&mut self.netns_threads)
    }
}

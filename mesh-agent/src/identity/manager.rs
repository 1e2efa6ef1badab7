//! The certificates this node holds: one per service account that has a pod here, issued on
//! first use and re-issued in the background before it expires.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::ca::{CaError, CertificateAuthority};
use crate::state::Identity;

/// Default point of a certificate's life at which it is re-issued.
pub const DEFAULT_ROTATE_FRACTION: f64 = 0.5;

/// An X.509 SVID and its private key.
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then the signing certificate and its intermediates (roots left out).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key, PKCS#8.
    pub key: PrivateKeyDer<'static>,
    /// Backdated by [`super::ca::CLOCK_SKEW`] from `issued_at`.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the CA signed it; rotation is measured from here, not from `not_before`.
    pub issued_at: SystemTime,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("not_before", &unix_secs(self.not_before))
            .field("not_after", &unix_secs(self.not_after))
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// When this certificate should be replaced: `fraction` (0..1) of the way from its issue
    /// time to its expiry.
    pub fn rotation_due(&self, fraction: f64) -> SystemTime {
        let fraction = sanitize_fraction(fraction);
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life.mul_f64(fraction)
    }

    /// Seconds until `not_after`; negative once expired.
    pub fn seconds_to_expiry(&self) -> f64 {
        match self.not_after.duration_since(SystemTime::now()) {
            Ok(left) => left.as_secs_f64(),
            Err(past) => -past.duration().as_secs_f64(),
        }
    }
}

/// Signs SVIDs for the [`CertManager`]: a CA in this process ([`CertificateAuthority`]) or
/// the cluster CA over HTTPS ([`super::remote::ClusterCaClient`]).
pub trait Issuer: Send + Sync + fmt::Debug {
    /// A certificate (and its private key) for `id`, valid for about `lifetime`.
    fn issue(&self, id: &Identity, lifetime: Duration) -> Result<WorkloadCert, CaError>;
    /// Trust anchors peers' certificates are verified against.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
}

impl Issuer for CertificateAuthority {
    fn issue(&self, id: &Identity, lifetime: Duration) -> Result<WorkloadCert, CaError> {
        CertificateAuthority::issue(self, id, lifetime)
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        CertificateAuthority::roots(self).to_vec()
    }
}

/// Holds a certificate only for service accounts with a pod on this node.
pub struct CertManager {
    ca: Arc<dyn Issuer>,
    lifetime: Duration,
    rotate_fraction: f64,
    certs: Mutex<HashMap<Identity, Arc<WorkloadCert>>>,
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("ca", &self.ca)
            .field("lifetime", &self.lifetime)
            .field("rotate_fraction", &self.rotate_fraction)
            .field("held", &self.lock().len())
            .finish()
    }
}

impl CertManager {
    /// `rotate_fraction` outside (0, 1) falls back to [`DEFAULT_ROTATE_FRACTION`].
    pub fn new(
        ca: Arc<CertificateAuthority>,
        lifetime: Duration,
        rotate_fraction: f64,
    ) -> Arc<Self> {
        Self::with_issuer(ca, lifetime, rotate_fraction)
    }

    /// Like [`Self::new`], with any [`Issuer`].
    pub fn with_issuer(ca: Arc<dyn Issuer>, lifetime: Duration, rotate_fraction: f64) -> Arc<Self> {
        Arc::new(Self {
            ca,
            lifetime,
            rotate_fraction: sanitize_fraction(rotate_fraction),
            certs: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, Arc<WorkloadCert>>> {
        // The map is always consistent (single inserts/removes), so a panic elsewhere while
        // holding the lock does not make it unusable.
        self.certs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The certificate for `id`, issued now if this node does not hold one yet.
    pub fn ensure(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CaError> {
        if let Some(cert) = self.get(id) {
            return Ok(cert);
        }
        // Issue outside the lock; if another caller won the race, keep theirs.
        let fresh = Arc::new(self.ca.issue(id, self.lifetime)?);
        let mut certs = self.lock();
        let held = certs.entry(id.clone()).or_insert_with(|| {
            tracing::info!(identity = %id, not_after = unix_secs(fresh.not_after), "certificate issued");
            fresh.clone()
        });
        Ok(held.clone())
    }

    /// The certificate held for `id`, if any.
    pub fn get(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        self.lock().get(id).cloned()
    }

    /// Issues a new certificate for `id` now and holds it instead of the current one.
    #[cfg(test)]
    pub fn reissue(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CaError> {
        let fresh = Arc::new(self.ca.issue(id, self.lifetime)?);
        self.lock().insert(id.clone(), fresh.clone());
        Ok(fresh)
    }

    /// Forgets the certificates of identities not in `wanted` (no pod on this node any more).
    pub fn retain(&self, wanted: &HashSet<Identity>) {
        self.lock().retain(|id, _| {
            let keep = wanted.contains(id);
            if !keep {
                tracing::debug!(identity = %id, "certificate dropped: no pod with this identity");
            }
            keep
        });
    }

    /// Every certificate held.
    pub fn held(&self) -> Vec<Arc<WorkloadCert>> {
        self.lock().values().cloned().collect()
    }

    /// Trust anchors peers are verified against.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.ca.roots()
    }

    /// How often the rotation task looks for due certificates: every second, or every
    /// twentieth of the lifetime if that is shorter, but not more often than every 100 ms.
    pub fn check_interval(&self) -> Duration {
        (self.lifetime / 20)
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(100))
    }

    /// Re-issues every certificate whose rotation is due; returns how many were rotated.
    /// A failure is logged and retried at the next check.
    pub fn rotate_due(&self) -> usize {
        let now = SystemTime::now();
        let due: Vec<Arc<WorkloadCert>> = self
            .lock()
            .values()
            .filter(|cert| cert.rotation_due(self.rotate_fraction) <= now)
            .cloned()
            .collect();
        let mut rotated = 0;
        for old in due {
            let id = &old.identity;
            let fresh = match self.ca.issue(id, self.lifetime) {
                Ok(cert) => Arc::new(cert),
                Err(error) => {
                    tracing::warn!(
                        identity = %id,
                        %error,
                        expires_in_s = old.seconds_to_expiry(),
                        "certificate rotation failed; will retry"
                    );
                    continue;
                }
            };
            let mut certs = self.lock();
            // Replace only what was examined: the identity may have been dropped by
            // `retain` or re-issued meanwhile.
            if let Some(held) = certs.get_mut(id)
                && Arc::ptr_eq(held, &old)
            {
                *held = fresh.clone();
                drop(certs);
                rotated += 1;
                tracing::info!(
                    identity = %id,
                    not_after = unix_secs(fresh.not_after),
                    previous_not_after = unix_secs(old.not_after),
                    "certificate rotated"
                );
            }
        }
        rotated
    }

    /// Background task that re-issues each certificate when its rotation is due (see
    /// [`Self::check_interval`]). Holders of an old certificate keep a valid `Arc` to it; new
    /// lookups get the new one. The task ends when the manager is dropped.
    pub fn spawn_rotation(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager: Weak<Self> = Arc::downgrade(self);
        let period = self.check_interval();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                // Issuing signs with the CA key: keep it off the async workers' hot path.
                let result = tokio::task::spawn_blocking(move || manager.rotate_due()).await;
                if let Err(error) = result {
                    tracing::error!(%error, "certificate rotation check panicked");
                }
            }
        })
    }
}

fn sanitize_fraction(fraction: f64) -> f64 {
    if fraction.is_finite() && fraction > 0.0 && fraction < 1.0 {
        fraction
    } else {
        DEFAULT_ROTATE_FRACTION
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::tests::{id, local_ca};

    #[test]
    fn ensure_issues_once_and_retain_forgets() {
        let (_dir, ca) = local_ca();
        let manager = CertManager::new(Arc::new(ca), Duration::from_secs(3600), 0.5);
        let a = id("shop", "frontend");
        let b = id("shop", "backend");
        assert!(manager.get(&a).is_none());
        let first = manager.ensure(&a).expect("issue");
        let again = manager.ensure(&a).expect("held");
        assert!(Arc::ptr_eq(&first, &again));
        manager.ensure(&b).expect("issue");
        assert_eq!(manager.held().len(), 2);
        manager.retain(&HashSet::from([b.clone()]));
        assert!(manager.get(&a).is_none());
        assert!(manager.get(&b).is_some());
        assert_eq!(manager.roots().len(), 1);
    }

    #[test]
    fn rotation_is_measured_from_issue_time() {
        let (_dir, ca) = local_ca();
        let cert = ca
            .issue(&id("a", "b"), Duration::from_secs(100))
            .expect("issue");
        let due = cert.rotation_due(0.5);
        let half = due.duration_since(cert.issued_at).expect("after issue");
        // not_after is whole seconds, so the life is 99..100 s.
        assert!(
            half >= Duration::from_millis(49_500) && half <= Duration::from_secs(50),
            "{half:?}"
        );
        assert!(cert.seconds_to_expiry() > 98.0 && cert.seconds_to_expiry() <= 100.0);
        assert_eq!(
            cert.rotation_due(f64::NAN),
            due,
            "bad fractions fall back to 0.5"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_lived_certificates_rotate_and_old_ones_stay_usable() {
        let (_dir, ca) = local_ca();
        let manager = CertManager::new(Arc::new(ca), Duration::from_secs(2), 0.5);
        let identity = id("shop", "frontend");
        let old = manager.ensure(&identity).expect("issue");
        let task = manager.spawn_rotation();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let new = loop {
            let current = manager.get(&identity).expect("still held");
            if !Arc::ptr_eq(&current, &old) && current.not_after > old.not_after {
                break current;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no rotation within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(new.identity, identity);
        assert_ne!(new.chain[0], old.chain[0]);
        // The old certificate is intact for whoever still holds it.
        assert_eq!(old.identity, identity);
        assert!(!old.chain.is_empty());
        drop(manager);
        // The task notices the manager is gone and ends.
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("rotation task ends after the manager is dropped")
            .expect("task did not panic");
    }
}

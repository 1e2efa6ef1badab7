//! The agent's live state as the admin API shows it: readiness, the snapshot, pods,
//! certificates and metrics.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::{admin::AdminSource, proxy::ProxyInputs, state::PodKey};

pub struct LiveState {
    pub inputs: Arc<ProxyInputs>,
    /// Why pods that should be enrolled are not (shared with the enrolment).
    pub failures: Arc<Mutex<BTreeMap<PodKey, String>>>,
    /// Set once the programs are loaded and the first config has been applied.
    pub started: AtomicBool,
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = crate::logformat::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl AdminSource for LiveState {
    fn ready(&self) -> Result<(), String> {
        if !self.started.load(Ordering::Acquire) {
            return Err("starting: programs not loaded or config not applied yet".into());
        }
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((pod, why)) = failures.iter().next() {
            return Err(format!("pod {pod} could not be enrolled: {why}"));
        }
        drop(failures);
        let mesh = self.inputs.mesh.load();
        for w in mesh.enrolled_here() {
            if self.inputs.certs.get(&w.identity).is_none() {
                return Err(format!("no certificate loaded for {}", w.identity));
            }
        }
        Ok(())
    }

    fn config_dump(&self) -> Value {
        match serde_json::to_value(&**self.inputs.mesh.load()) {
            Ok(v) => v,
            Err(e) => json!({ "error": format!("the snapshot does not serialize: {e}") }),
        }
    }

    fn pods(&self) -> Value {
        let mesh = self.inputs.mesh.load();
        let local = self.inputs.local_pods.load();
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let pods: Vec<Value> = mesh
            .pods
            .values()
            .filter(|w| w.is_on(&mesh.node))
            .map(|w| {
                let ctx = local.get(&w.ip).filter(|c| c.workload.key == w.key);
                let state = match (ctx, failures.get(&w.key)) {
                    (Some(_), _) => "enrolled".to_string(),
                    (None, Some(why)) => format!("failed: {why}"),
                    (None, None) => "not enrolled".to_string(),
                };
                json!({
                    "pod": w.key.name,
                    "namespace": w.key.namespace,
                    "identity": w.identity.to_string(),
                    "ip": w.ip.to_string(),
                    "node": w.node,
                    "enrolled": ctx.is_some(),
                    "state": state,
                    "connections_active": ctx.map(|c| c.active_connections.load(Ordering::Relaxed)).unwrap_or(0),
                })
            })
            .collect();
        Value::Array(pods)
    }

    fn certs(&self) -> Value {
        let mut certs: Vec<Value> = self
            .inputs
            .certs
            .held()
            .iter()
            .map(|c| {
                json!({
                    "identity": c.identity.to_string(),
                    "not_before": rfc3339(c.not_before),
                    "not_after": rfc3339(c.not_after),
                    "seconds_to_expiry": c.seconds_to_expiry(),
                })
            })
            .collect();
        certs.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        Value::Array(certs)
    }

    fn metrics_text(&self) -> String {
        let counters = self.inputs.maps.counters();
        let certs: Vec<(String, f64)> = self
            .inputs
            .certs
            .held()
            .iter()
            .map(|c| (c.identity.to_string(), c.seconds_to_expiry()))
            .collect();
        self.inputs.metrics.encode(&counters, &certs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_serializes_to_json() {
        let text = "node: n1\npods:\n  - {name: a, namespace: shop, ip: 10.0.0.2, node: n2}\n";
        let mesh = crate::config::parse(text).expect("valid");
        let v = serde_json::to_value(&mesh).expect("serializes");
        assert_eq!(v["node"], "n1");
        assert_eq!(v["pods"][0]["key"]["name"], "a");
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_712_764)),
            "2026-11-26T17:06:04Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}

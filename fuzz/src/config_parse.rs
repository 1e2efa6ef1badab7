//! The config file parser and validator (`config::parse`) on arbitrary text: YAML syntax,
//! serde's shapes and every section's validation (pods, identity, policies, services,
//! routes). Beyond "never panics and never hangs": an accepted file is a consistent snapshot
//! (each pod reachable by its one IPv4 address) that `/config_dump` can serialize, and a
//! refusal names a field.

/// Runs one input; see the module documentation.
pub fn check(data: &[u8]) {
    // The agent reads the file as UTF-8 (`read_to_string`); anything else never gets here.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match mesh_agent::config::parse(text) {
        Ok(mesh) => {
            assert!(!mesh.node.trim().is_empty());
            assert_eq!(
                mesh.pods.len(),
                mesh.pod_by_ip.len(),
                "pods and addresses differ"
            );
            for (key, pod) in &mesh.pods {
                assert_eq!(key, &pod.key);
                assert!(pod.ip.is_ipv4());
                assert_eq!(mesh.pod_by_ip.get(&pod.ip), Some(key));
                assert_eq!(pod.identity.namespace, key.namespace);
            }
            // The admin server's /config_dump serializes the snapshot as JSON.
            serde_json::to_string(&mesh).expect("the snapshot does not serialize");
        }
        Err(e) => {
            assert!(!e.field.is_empty(), "an error without a field: {e}");
            assert!(!e.message.is_empty(), "an error without a message: {e}");
        }
    }
}

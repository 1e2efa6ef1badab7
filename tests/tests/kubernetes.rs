//! End-to-end tests of `mesh-agent run --kubernetes` against the API server stand-in
//! (`mesh_tests::kube_api`: the real list/watch protocol with real Kubernetes JSON objects;
//! there is no real API server on these machines), with pods laid out as kubelet lays them
//! out (cgroups at kubelet's paths for the pods' UIDs, a "container" process in each), real
//! eBPF programs and the real agent binary.
use std::time::Duration;

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Agent, Background, CgroupDriver, Node, Pod,
    agent::{AGENT_DEADLINE, field, message},
    kube_api::{self, KubeApi},
    wait_until,
};
use serde_json::{Value, json};

const PEER_ECHO: &str = env!("CARGO_BIN_EXE_peer-echo");
const APP_PORT: u16 = 8080;
const TOKEN: &str = "agent-token-7f3a";
const LABEL: &str = "trellis.dev/dataplane";

fn namespace(name: &str, enabled: bool) -> Value {
    let labels = if enabled {
        json!({ LABEL: "enabled" })
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": name, "labels": labels },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    })
}

/// A scheduled, running pod as the API server holds it once kubelet has reported it.
fn pod_object(pod: &Pod, uid: &str, service_account: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": "shop", "uid": uid,
            "labels": { "app": pod.name },
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "containers": [{ "name": "app", "image": "example/app:1" }],
        },
        "status": {
            "phase": "Running",
            "qosClass": "BestEffort",
            "hostIP": "192.0.2.10",
            "podIP": pod.ip.to_string(),
            "podIPs": [{ "ip": pod.ip.to_string() }],
        },
    })
}

fn http_server(pod: &Pod, port: u16) -> anyhow::Result<Background> {
    let mut cmd = pod.command(PEER_ECHO)?;
    cmd.args(["http", &port.to_string()]);
    Background::spawn_ready(cmd, "listening")
}

/// One node with a client and a server pod (the client's cgroup in the systemd layout, the
/// server's in the cgroupfs one), both in namespace `shop`, and the stand-in holding them.
struct Cluster {
    api: KubeApi,
    node: Node,
    client: Pod,
    server: Pod,
    client_container: Option<Background>,
    _server_container: Background,
    _app: Background,
}

const CLIENT_UID: &str = "4f1d7c52-6a0b-4d8e-9c1f-2b3a4c5d6e01";
const SERVER_UID: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c02";

fn cluster(namespace_enabled: bool) -> anyhow::Result<Cluster> {
    let api = KubeApi::start()?;
    api.require_token(TOKEN);
    api.set_bookmark_interval(Duration::from_millis(500));
    let mut node = Node::new()?;
    let (client, client_container) =
        node.add_kubelet_pod("client", CLIENT_UID, CgroupDriver::Systemd)?;
    let (server, server_container) =
        node.add_kubelet_pod("server", SERVER_UID, CgroupDriver::Cgroupfs)?;
    let app = http_server(&server, APP_PORT)?;
    api.apply(namespace("shop", namespace_enabled))?;
    api.apply(namespace("kube-system", false))?;
    api.apply(pod_object(&client, CLIENT_UID, "frontend", &node.id))?;
    api.apply(pod_object(&server, SERVER_UID, "backend", &node.id))?;
    // A pod of another node: known to the agent for identity and routing, never enrolled here.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "remote", "namespace": "shop", "uid": kube_api::new_uid(), "labels": { "app": "remote" } },
        "spec": { "nodeName": "other-node", "serviceAccountName": "remote", "containers": [] },
        "status": { "phase": "Running", "podIP": "10.250.0.2", "hostIP": "192.0.2.20" },
    }))?;
    // A host-network pod and a Service with a UDP port, as every cluster has: left out, not
    // an error.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "kube-proxy-x", "namespace": "kube-system" },
        "spec": { "nodeName": node.id, "hostNetwork": true, "containers": [] },
        "status": { "phase": "Running", "podIP": "192.0.2.10" },
    }))?;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "kube-dns", "namespace": "kube-system" },
        "spec": { "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": { "k8s-app": "kube-dns" },
                  "ports": [{ "name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53 },
                            { "name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53 }] },
    }))?;
    Ok(Cluster {
        api,
        node,
        client,
        server,
        client_container: Some(client_container),
        _server_container: server_container,
        _app: app,
    })
}

impl Cluster {
    fn start_agent(&self, name: &str, extra: &[&str]) -> anyhow::Result<Agent> {
        Agent::start_kubernetes(
            name,
            &self.api.kubeconfig(TOKEN),
            &self.node.id,
            &self.node.kubelet_cgroup_root(),
            None,
            extra,
        )
    }

    fn set_namespace_label(&self, enabled: bool) -> anyhow::Result<()> {
        self.api.update(kube_api::NAMESPACES, "", "shop", |ns| {
            ns["metadata"]["labels"] = if enabled {
                json!({ LABEL: "enabled" })
            } else {
                json!({})
            };
        })?;
        Ok(())
    }

    /// curl from the client pod to the server app; the answer must be a 200.
    fn request(&self) -> anyhow::Result<()> {
        let (code, body) = self
            .client
            .curl(&format!("http://{}:{APP_PORT}/", self.server.ip))?;
        ensure!(code == 200, "status {code}: {body}");
        Ok(())
    }
}

fn is_outbound(e: &Value) -> bool {
    message(e) == "connection closed"
        && field(e, "direction") == "outbound"
        && field(e, "src.pod") == "shop/client"
}

fn count(agent: &Agent, what: &str, pod: &str) -> usize {
    agent.count_events(|e| message(e) == what && field(e, "pod") == pod)
}

fn wait_count(agent: &mut Agent, what: &str, pod: &str, n: usize) -> anyhow::Result<()> {
    let result = wait_until(&format!("{what} {pod} x{n}"), AGENT_DEADLINE, || {
        (count(agent, what, pod) >= n).then_some(())
    });
    result.with_context(|| format!("agent log:\n{}", agent.log_text()))
}

/// A request whose connection the agent relays (logs from the client pod).
fn request_is_captured(c: &Cluster, agent: &mut Agent) -> anyhow::Result<()> {
    let before = agent.count_events(is_outbound);
    c.request()?;
    let result = wait_until(
        "the agent to log the relayed connection",
        AGENT_DEADLINE,
        || (agent.count_events(is_outbound) > before).then_some(()),
    );
    result.with_context(|| format!("agent log:\n{}", agent.log_text()))
}

fn admin_pods(agent: &Agent) -> anyhow::Result<Vec<Value>> {
    let url = format!("http://{}/pods", agent.admin_addr()?);
    let text = mesh_tests::run("curl", &["-sS", "--max-time", "10", &url])?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("GET /pods: {text}"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn pod_state(agent: &Agent, name: &str) -> anyhow::Result<Option<String>> {
    Ok(admin_pods(agent)?
        .iter()
        .find(|p| p["pod"] == name)
        .map(|p| p["state"].as_str().unwrap_or("").to_string()))
}

#[test]
fn labelling_a_namespace_enrols_its_pods_and_unlabelling_unenrols_them() -> anyhow::Result<()> {
    let c = cluster(false)?;
    let mut agent = c.start_agent("k8s-label", &[])?;
    // Known, not enrolled: the namespace has not opted in.
    ensure!(
        pod_state(&agent, "client")?.as_deref() == Some("not enrolled"),
        "{:?}",
        admin_pods(&agent)?
    );
    c.request()?;
    ensure!(agent.count_events(is_outbound) == 0, "traffic was captured");

    c.set_namespace_label(true)?;
    wait_count(&mut agent, "pod enrolled", "shop/client", 1)?;
    wait_count(&mut agent, "pod enrolled", "shop/server", 1)?;
    request_is_captured(&c, &mut agent)?;
    let event = agent
        .events()
        .into_iter()
        .rfind(is_outbound)
        .context("no connection event")?;
    ensure!(
        field(&event, "src.identity") == "spiffe://cluster.local/ns/shop/sa/frontend",
        "{event}"
    );
    ensure!(pod_state(&agent, "server")?.as_deref() == Some("enrolled"));
    // The other node's pod is in the snapshot (identity, routing), not enrolled here.
    let dump = mesh_tests::run(
        "curl",
        &[
            "-sS",
            &format!("http://{}/config_dump", agent.admin_addr()?),
        ],
    )?;
    ensure!(
        dump.contains("\"other-node\""),
        "remote pod missing: {dump}"
    );
    ensure!(!dump.contains("kube-proxy-x"), "host-network pod listed");

    // A pod opts out by label; its namespace stays enrolled.
    c.api.update(kube_api::PODS, "shop", "client", |p| {
        p["metadata"]["labels"][LABEL] = json!("disabled");
    })?;
    wait_count(&mut agent, "pod unenrolled", "shop/client", 1)?;
    ensure!(pod_state(&agent, "server")?.as_deref() == Some("enrolled"));

    // Unlabelling the namespace unenrols the rest, live.
    c.set_namespace_label(false)?;
    wait_count(&mut agent, "pod unenrolled", "shop/server", 1)?;
    let before = agent.count_events(is_outbound);
    c.request()?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        agent.count_events(is_outbound) == before,
        "traffic captured after unenrolment"
    );

    // What the agent asked: this node's pods by field selector, namespaces by label, watches
    // with bookmarks, authenticated (the stand-in refuses requests without the token).
    let requests = c.api.requests();
    let asked = |s: &str| requests.iter().any(|r| r.contains(s));
    ensure!(
        asked(&format!("fieldSelector=spec.nodeName={}", c.node.id)),
        "{requests:#?}"
    );
    ensure!(asked(&format!(
        "fieldSelector=spec.nodeName!={}",
        c.node.id
    )));
    ensure!(asked("labelSelector=trellis.dev/dataplane=enabled"));
    ensure!(asked("allowWatchBookmarks=true"));
    ensure!(asked("/apis/gateway.networking.k8s.io/v1/httproutes"));
    ensure!(asked("/apis/security.trellis.dev/v1/authorizationpolicies"));
    ensure!(asked("/apis/discovery.k8s.io/v1/endpointslices"));
    Ok(())
}

#[test]
fn a_pod_moved_to_another_node_is_dropped() -> anyhow::Result<()> {
    let c = cluster(true)?;
    let mut agent = c.start_agent("k8s-move", &[])?;
    wait_count(&mut agent, "pod enrolled", "shop/server", 1)?;
    c.api.update(kube_api::PODS, "shop", "server", |p| {
        p["spec"]["nodeName"] = json!("other-node");
    })?;
    wait_count(&mut agent, "pod unenrolled", "shop/server", 1)?;
    wait_until("the server to leave /pods", AGENT_DEADLINE, || {
        pod_state(&agent, "server").ok()?.is_none().then_some(())
    })?;
    ensure!(pod_state(&agent, "client")?.as_deref() == Some("enrolled"));
    Ok(())
}

#[test]
fn an_api_outage_keeps_traffic_flowing_and_changes_made_meanwhile_arrive_after_a_relist()
-> anyhow::Result<()> {
    let c = cluster(true)?;
    let mut agent = c.start_agent("k8s-outage", &[])?;
    wait_count(&mut agent, "pod enrolled", "shop/client", 1)?;
    wait_count(&mut agent, "pod enrolled", "shop/server", 1)?;
    request_is_captured(&c, &mut agent)?;

    c.api.stop();
    agent.wait_for_event("the agent to notice the outage", |e| {
        message(e).starts_with("watch failed")
    })?;
    // The last snapshot keeps serving, through an outage of a few seconds (the watchers
    // retry meanwhile).
    for _ in 0..6 {
        request_is_captured(&c, &mut agent)?;
        ensure!(pod_state(&agent, "client")?.as_deref() == Some("enrolled"));
        std::thread::sleep(Duration::from_millis(500));
    }

    // While the server is away the client opts out, and the server compacts its history
    // past the version the agent last saw: its watches get 410 Gone and must list again.
    c.api.update(kube_api::PODS, "shop", "client", |p| {
        p["metadata"]["labels"][LABEL] = json!("disabled");
    })?;
    c.api.compact();
    let lists_before = c
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
        .count();
    c.api.start_again()?;
    wait_count(&mut agent, "pod unenrolled", "shop/client", 1)?;
    let requests = c.api.requests();
    let lists_after = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
        .count();
    ensure!(
        c.api.expired_watches() > 0,
        "no watch resumed from a compacted version"
    );
    ensure!(
        lists_after > lists_before,
        "no relist after 410: {requests:#?}"
    );
    ensure!(pod_state(&agent, "server")?.as_deref() == Some("enrolled"));
    // And the agent goes on following changes.
    c.set_namespace_label(false)?;
    wait_count(&mut agent, "pod unenrolled", "shop/server", 1)?;
    Ok(())
}

#[test]
fn a_restarted_container_is_found_again() -> anyhow::Result<()> {
    let mut c = cluster(true)?;
    // No named network namespaces: the agent can only go through /proc/PID/ns/net, whose pid
    // dies with the container.
    let empty = tempfile_dir("k8s-no-netns")?;
    let netns_dir = empty.display().to_string();
    let mut agent = c.start_agent("k8s-restart", &["--netns-dir", &netns_dir])?;
    wait_count(&mut agent, "pod enrolled", "shop/client", 1)?;
    let pid = c
        .client_container
        .as_ref()
        .map(Background::id)
        .context("container")?;
    let dump = mesh_tests::run(
        "curl",
        &[
            "-sS",
            &format!("http://{}/config_dump", agent.admin_addr()?),
        ],
    )?;
    ensure!(
        dump.contains(&format!("/proc/{pid}/ns/net")),
        "netns not found through the container's pid: {dump}"
    );
    // The container restarts: its process is gone, a new one runs in the same pod sandbox.
    drop(c.client_container.take());
    c.client_container = Some(c.client.start_container("app2")?);
    wait_count(&mut agent, "pod enrolled", "shop/client", 2)?;
    request_is_captured(&c, &mut agent)?;
    std::fs::remove_dir_all(&empty).ok();
    Ok(())
}

#[test]
fn a_restarted_container_keeps_a_named_netns_enrolled() -> anyhow::Result<()> {
    let mut c = cluster(true)?;
    let mut agent = c.start_agent("k8s-named", &[])?;
    wait_count(&mut agent, "pod enrolled", "shop/client", 1)?;
    let dump = mesh_tests::run(
        "curl",
        &[
            "-sS",
            &format!("http://{}/config_dump", agent.admin_addr()?),
        ],
    )?;
    ensure!(
        dump.contains(&c.client.netns_path.display().to_string()),
        "the runtime's named netns was not preferred: {dump}"
    );
    drop(c.client_container.take());
    c.client_container = Some(c.client.start_container("app2")?);
    request_is_captured(&c, &mut agent)?;
    // Give the agent a few re-resolution rounds: nothing to re-plumb.
    std::thread::sleep(Duration::from_secs(5));
    ensure!(count(&agent, "pod unenrolled", "shop/client") == 0);
    Ok(())
}

fn tempfile_dir(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("trellis-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
fn pods_on_two_nodes_talk_mtls_with_identities_from_the_api() -> anyhow::Result<()> {
    let api = KubeApi::start()?;
    api.require_token(TOKEN);
    let mut n1 = Node::new()?;
    let mut n2 = Node::new()?;
    let _link = n1.link(&n2)?;
    let (client, _c1) = n1.add_kubelet_pod("client", CLIENT_UID, CgroupDriver::Systemd)?;
    let (server, _c2) = n2.add_kubelet_pod("server", SERVER_UID, CgroupDriver::Systemd)?;
    let _app = http_server(&server, APP_PORT)?;
    api.apply(namespace("shop", true))?;
    api.apply(pod_object(&client, CLIENT_UID, "frontend", &n1.id))?;
    api.apply(pod_object(&server, SERVER_UID, "backend", &n2.id))?;
    // One trust root for both agents, as a fleet.
    let fleet_ca = tempfile_dir("k8s-fleet")?;
    let start = |name: &str, node: &Node| {
        Agent::start_kubernetes(
            name,
            &api.kubeconfig(TOKEN),
            &node.id,
            &node.kubelet_cgroup_root(),
            Some(&fleet_ca),
            &[],
        )
    };
    let mut a1 = start("k8s-n1", &n1)?;
    let mut a2 = start("k8s-n2", &n2)?;
    wait_count(&mut a1, "pod enrolled", "shop/client", 1)?;
    wait_count(&mut a2, "pod enrolled", "shop/server", 1)?;
    ensure!(count(&a1, "pod enrolled", "shop/server") == 0);

    let (code, body) = client.curl(&format!("http://{}:{APP_PORT}/", server.ip))?;
    ensure!(code == 200, "status {code}: {body}");
    let out = a1.wait_for_event("outbound HBONE log", is_outbound)?;
    ensure!(
        field(&out, "path") == "hbone" && field(&out, "security") == "mutual_tls",
        "{out}"
    );
    ensure!(
        field(&out, "dst.identity") == "spiffe://cluster.local/ns/shop/sa/backend",
        "{out}"
    );
    let inb = a2.wait_for_event("inbound HBONE log", |e| {
        message(e) == "connection closed" && field(e, "direction") == "inbound"
    })?;
    ensure!(
        field(&inb, "src.identity") == "spiffe://cluster.local/ns/shop/sa/frontend",
        "{inb}"
    );
    std::fs::remove_dir_all(&fleet_ca).ok();
    Ok(())
}

#[test]
fn service_endpoints_are_the_ready_addresses_of_its_endpoint_slices() -> anyhow::Result<()> {
    let c = cluster(true)?;
    let vip = "10.96.77.10";
    c.api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": { "type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "selector": { "app": "server" },
                  "ports": [{ "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "appProtocol": "http" }] },
    }))?;
    let slice = |server_ready: bool| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": "web-x1", "namespace": "shop",
                          "labels": { "kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io" } },
            "addressType": "IPv4",
            "endpoints": [
                { "addresses": [c.server.ip.to_string()], "conditions": { "ready": server_ready },
                  "targetRef": { "kind": "Pod", "namespace": "shop", "name": "server" } },
                // A pod that is starting: not ready, must get no traffic.
                { "addresses": ["10.250.0.99"], "conditions": { "ready": false } },
            ],
            // The named target port "http", resolved by the EndpointSlice controller.
            "ports": [{ "name": "http", "port": APP_PORT, "protocol": "TCP", "appProtocol": "http" }],
        })
    };
    c.api.apply(slice(true))?;
    let mut agent = c.start_agent("k8s-svc", &[])?;
    wait_count(&mut agent, "pod enrolled", "shop/client", 1)?;
    let url = format!("http://{vip}/");
    for _ in 0..5 {
        let (code, body) = c.client.curl(&url)?;
        ensure!(code == 200, "status {code}: {body}\n{}", agent.log_text());
    }
    // The server fails its readiness probe: the Service has no endpoint left.
    c.api.apply(slice(false))?;
    wait_until(
        "the agent to drop the unready endpoint",
        AGENT_DEADLINE,
        || {
            let (code, _) = c.client.curl(&url).ok()?;
            (code == 503).then_some(())
        },
    )
    .with_context(|| agent.log_text())?;
    Ok(())
}

/// Tries one TCP connect and prints how it went (`ok` or the exception's name).
const TRY_CONNECT: &str = r#"
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("ok")
except Exception as e:
    print(type(e).__name__)
"#;

fn try_connect(pod: &Pod, ip: &str, port: u16) -> anyhow::Result<String> {
    let out = pod
        .command("python3")?
        .args(["-c", TRY_CONNECT, ip, &port.to_string()])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn the_start_up_gate_lets_through_every_pod_the_api_says_stays_out() -> anyhow::Result<()> {
    let mut c = cluster(true)?;
    // A pod of a namespace that did not opt in, a host-network pod, and a cgroup kubelet made
    // for a pod the API does not know (yet): only the last must stay gated.
    let legacy_uid = kube_api::new_uid();
    let (legacy, _legacy_container) =
        c.node
            .add_kubelet_pod("legacy", &legacy_uid, CgroupDriver::Systemd)?;
    let mut object = pod_object(&legacy, &legacy_uid, "default", &c.node.id);
    object["metadata"]["namespace"] = json!("legacy");
    c.api.apply(object)?;
    let host_pod = |uid: &str| -> anyhow::Result<Pod> {
        let cgroup = c.node.kubelet_cgroup_root().join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        std::fs::create_dir_all(&cgroup)?;
        Ok(Pod {
            name: format!("host-{}", &uid[..4]),
            ip: c.client.ip,
            netns: String::new(),
            // The test's own (host) network namespace.
            netns_path: "/proc/self/ns/net".into(),
            cgroup,
        })
    };
    let hostnet_uid = kube_api::new_uid();
    let hostnet = host_pod(&hostnet_uid)?;
    c.api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "node-exporter", "namespace": "legacy", "uid": hostnet_uid },
        "spec": { "nodeName": c.node.id, "hostNetwork": true, "containers": [] },
        "status": { "phase": "Running", "podIP": "192.0.2.10" },
    }))?;
    let stray = host_pod(&kube_api::new_uid())?;
    let gate = c.node.kubelet_cgroup_root().join("kubepods.slice");
    let gate_arg = gate.display().to_string();
    let mut agent = c.start_agent("k8s-gate", &["--gate-cgroup", &gate_arg])?;
    agent.wait_for_event("the gate", |e| {
        message(e) == "start-up gate attached: undecided pods cannot connect"
    })?;
    wait_count(&mut agent, "pod enrolled", "shop/server", 1)?;
    // Nothing listens on this port of the host's own (non-loopback: loopback always passes
    // the gate) address: a connect that passes the gate is refused by the kernel, one that
    // does not gets EPERM.
    let host_ip = mesh_tests::run("ip", &["-4", "-o", "addr", "show", "scope", "global"])?
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next().map(str::to_string))
        .context("this machine has no global IPv4 address")?;
    let closed = std::net::TcpListener::bind((host_ip.as_str(), 0))?
        .local_addr()?
        .port();
    ensure!(try_connect(&stray, &host_ip, closed)? == "PermissionError");
    ensure!(try_connect(&hostnet, &host_ip, closed)? == "ConnectionRefusedError");
    // The unmeshed pod reaches the enrolled server (plaintext, as outside the mesh).
    let (code, _) = legacy.curl(&format!("http://{}:{APP_PORT}/", c.server.ip))?;
    ensure!(code == 200, "status {code}");
    // And the meshed client goes through the agent.
    request_is_captured(&c, &mut agent)?;
    c.client_container.take();
    Ok(())
}

//! End-to-end tests of `mesh-agent ca`, the cluster CA, against the API server stand-in: the
//! root key comes from a Secret, node agents authenticate with their service-account tokens
//! (TokenReview), and the CA signs only for service accounts with a pod on the asking node.
//! The client is a real HTTPS client verifying the CA's certificate against the root.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
};

use anyhow::{Context as _, ensure};
use http_body_util::{BodyExt as _, Full};
use mesh_tests::{
    agent::{AGENT_DEADLINE, agent_binary, field, message},
    kube_api::{KubeApi, TokenUser},
    wait_until,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};

const CA_TOKEN: &str = "ca-token-31d9";
const SERVER_NAME: &str = "trellis-ca.trellis-system.svc";

/// A root CA as an operator makes one for the `trellis-ca-root` Secret: (cert PEM, key PEM).
fn root_ca() -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test cluster root");
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn pod(namespace: &str, name: &str, service_account: &str, node: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "nodeName": node, "serviceAccountName": service_account, "containers": [] },
        "status": { "phase": phase, "podIP": "10.9.0.2" },
    })
}

/// The CA process, killed on drop.
struct CaProcess {
    child: Child,
    log: PathBuf,
    addr: std::net::SocketAddr,
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl CaProcess {
    fn start(api: &KubeApi, name: &str) -> anyhow::Result<Self> {
        Self::start_on(api, name, "127.0.0.1:0")
    }

    fn start_on(api: &KubeApi, name: &str, listen: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("trellis-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        fs::write(&kubeconfig, api.kubeconfig(CA_TOKEN))?;
        let log = dir.join("ca.log");
        let out = fs::File::create(&log)?;
        let mut child = Command::new(agent_binary()?)
            .args(["ca", "--log-format", "json", "--listen", listen])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--namespace", "trellis-system", "--audience", "trellis-ca"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting mesh-agent ca")?;
        let found = wait_until("the CA to listen", AGENT_DEADLINE, || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!("the CA exited: {status}")));
            }
            let text = fs::read_to_string(&log).unwrap_or_default();
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| message(e) == "CA listening")
                .map(|e| Ok(field(&e, "addr").to_string()))
        });
        let addr = match found {
            Ok(Ok(a)) => a.parse()?,
            Ok(Err(e)) | Err(e) => {
                let _ = child.kill();
                return Err(e.context(fs::read_to_string(&log).unwrap_or_default()));
            }
        };
        Ok(Self { child, log, addr })
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// POSTs a certificate request over HTTPS (the CA verified against `root_pem` for
/// [`SERVER_NAME`]); returns (status, body, the CSR's key).
fn request(
    addr: std::net::SocketAddr,
    root_pem: &str,
    token: Option<&str>,
    identity: &str,
) -> anyhow::Result<(u16, Value, KeyPair)> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let body = json!({ "identity": identity, "csr": csr }).to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, text) = runtime.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        let root = rustls_pki_types::CertificateDer::from_pem_slice(root_pem.as_bytes())?;
        roots.add(root)?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from(SERVER_NAME)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .context("TLS to the CA (verified against the root)")?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::post("/v1/certificates")
            .header("host", SERVER_NAME)
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Full::new(bytes::Bytes::from(body)))?)
            .await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    })?;
    let value = serde_json::from_str(&text).with_context(|| format!("answer: {text}"))?;
    Ok((status, value, key))
}

use rustls_pki_types::pem::PemObject as _;

#[test]
fn the_ca_signs_only_for_service_accounts_with_a_pod_on_the_asking_node() -> anyhow::Result<()> {
    let api = KubeApi::start()?;
    api.require_token(CA_TOKEN);
    let (root_cert, root_key) = root_ca()?;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": { "name": "trellis-ca-root", "namespace": "trellis-system" },
        "stringData": { "tls.crt": root_cert, "tls.key": root_key },
    }))?;
    // Node n1 runs shop/web; n2 runs shop/db; a finished pod of shop/batch is still on n1.
    api.apply(pod("shop", "web-1", "web", "n1", "Running"))?;
    api.apply(pod("shop", "db-1", "db", "n2", "Running"))?;
    api.apply(pod("shop", "batch-1", "batch", "n1", "Succeeded"))?;
    // The node agent on n1 (its token names its node), an agent token bound only to its pod
    // (the CA looks the pod up), and an application's token.
    let mut agent_n1 =
        TokenUser::service_account("trellis-system", "mesh-agent", "mesh-agent-a", "n1");
    agent_n1.audiences = vec!["trellis-ca".into()];
    api.add_token_review("agent-n1", agent_n1);
    let mut agent_n2 =
        TokenUser::service_account("trellis-system", "mesh-agent", "mesh-agent-b", "n2");
    agent_n2
        .extra
        .remove("authentication.kubernetes.io/node-name");
    agent_n2.audiences = vec!["trellis-ca".into()];
    api.add_token_review("agent-n2", agent_n2);
    api.apply(pod(
        "trellis-system",
        "mesh-agent-b",
        "mesh-agent",
        "n2",
        "Running",
    ))?;
    let mut app = TokenUser::service_account("shop", "web", "web-1", "n1");
    app.audiences = vec!["trellis-ca".into()];
    api.add_token_review("app-web", app);
    let mut wrong_audience =
        TokenUser::service_account("trellis-system", "mesh-agent", "mesh-agent-a", "n1");
    wrong_audience.audiences = vec!["some-other-service".into()];
    api.add_token_review("agent-other-audience", wrong_audience);

    let ca = CaProcess::start(&api, "cluster-ca")?;
    let web = "spiffe://cluster.local/ns/shop/sa/web";

    // Signed: web has a pod on n1.
    let (status, body, key) = request(ca.addr, &root_cert, Some("agent-n1"), web)?;
    ensure!(status == 200, "{status} {body}\n{}", ca.log_text());
    let chain = body["certChain"].as_array().context("certChain")?;
    let leaf_pem = chain.first().and_then(Value::as_str).context("leaf")?;
    let leaf_der = rustls_pki_types::CertificateDer::from_pem_slice(leaf_pem.as_bytes())?;
    let leaf = leaf_facts(&leaf_der)?;
    ensure!(leaf.0 == key.public_key_raw(), "not the CSR's key");
    ensure!(leaf.1 == web, "SAN {}", leaf.1);
    ensure!(
        body["roots"][0].as_str().map(str::trim) == Some(root_cert.trim()),
        "{body}"
    );

    // Refused: db has no pod on n1 (it runs on n2).
    let (status, body, _) = request(
        ca.addr,
        &root_cert,
        Some("agent-n1"),
        "spiffe://cluster.local/ns/shop/sa/db",
    )?;
    ensure!(status == 403, "{status} {body}");
    ensure!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("no pod of service account shop/db runs on node n1")),
        "{body}"
    );
    // Refused: batch's only pod on n1 has finished.
    let (status, _, _) = request(
        ca.addr,
        &root_cert,
        Some("agent-n1"),
        "spiffe://cluster.local/ns/shop/sa/batch",
    )?;
    ensure!(status == 403);
    // The agent on n2, whose token names only its pod: db yes, web no.
    let (status, body, _) = request(
        ca.addr,
        &root_cert,
        Some("agent-n2"),
        "spiffe://cluster.local/ns/shop/sa/db",
    )?;
    ensure!(status == 200, "{status} {body}");
    let (status, _, _) = request(ca.addr, &root_cert, Some("agent-n2"), web)?;
    ensure!(status == 403);
    // Refused: not the agents' service account, even for its own identity.
    let (status, body, _) = request(ca.addr, &root_cert, Some("app-web"), web)?;
    ensure!(status == 403, "{status} {body}");
    // Unauthenticated: unknown token, a token for another audience, no token.
    for token in [Some("forged"), Some("agent-other-audience"), None] {
        let (status, body, _) = request(ca.addr, &root_cert, token, web)?;
        ensure!(status == 401, "{token:?}: {status} {body}");
    }
    // Another trust domain, a malformed identity.
    let (status, _, _) = request(
        ca.addr,
        &root_cert,
        Some("agent-n1"),
        "spiffe://other.domain/ns/shop/sa/web",
    )?;
    ensure!(status == 403);
    let (status, _, _) = request(ca.addr, &root_cert, Some("agent-n1"), "web")?;
    ensure!(status == 400);
    ensure!(api.token_reviews_answered() >= 8);
    ensure!(
        api.requests()
            .iter()
            .any(|r| r.contains("/api/v1/namespaces/shop/pods?")
                && r.contains("fieldSelector=spec.nodeName=n1")),
        "{:#?}",
        api.requests()
    );
    Ok(())
}

/// (public key bytes, first URI SAN) of a certificate.
fn leaf_facts(der: &[u8]) -> anyhow::Result<(Vec<u8>, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)?;
    let key = cert.public_key().subject_public_key.data.to_vec();
    let san = cert.subject_alternative_name()?.context("no SAN")?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .context("no URI SAN")?;
    Ok((key, uri))
}

#[test]
fn the_ca_refuses_to_start_without_its_root_secret() -> anyhow::Result<()> {
    // Plain HTTP this time (kubeconfigs may point at http:// servers too).
    let api = KubeApi::start_plain()?;
    api.require_token(CA_TOKEN);
    let err = match CaProcess::start(&api, "cluster-ca-nosecret") {
        Ok(_) => anyhow::bail!("the CA started without a root"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("secret/trellis-system/trellis-ca-root"),
        "{err}"
    );
    Ok(())
}

#[test]
fn agents_on_two_nodes_get_their_certificates_from_the_cluster_ca() -> anyhow::Result<()> {
    use mesh_tests::{Agent, Background, CgroupDriver, Node, kube_api};
    const API_TOKEN: &str = "agents-api-token";
    let api = KubeApi::start()?;
    api.require_token(CA_TOKEN);
    api.require_token(API_TOKEN);
    let (root_cert, root_key) = root_ca()?;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": { "name": "trellis-ca-root", "namespace": "trellis-system" },
        "stringData": { "tls.crt": root_cert, "tls.key": root_key },
    }))?;
    let mut n1 = Node::new()?;
    let mut n2 = Node::new()?;
    let _link = n1.link(&n2)?;
    let client_uid = kube_api::new_uid();
    let server_uid = kube_api::new_uid();
    let (client, _c1) = n1.add_kubelet_pod("client", &client_uid, CgroupDriver::Systemd)?;
    let (server, _c2) = n2.add_kubelet_pod("server", &server_uid, CgroupDriver::Cgroupfs)?;
    let mut app = server.command(env!("CARGO_BIN_EXE_peer-echo"))?;
    app.args(["http", "8080"]);
    let _app = Background::spawn_ready(app, "listening")?;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": "shop", "labels": { "trellis.dev/dataplane": "enabled" } },
    }))?;
    for (pod, uid, sa, node) in [
        (&client, &client_uid, "frontend", &n1),
        (&server, &server_uid, "backend", &n2),
    ] {
        let mut object = pod_object_running("shop", &pod.name, sa, &node.id, &pod.ip.to_string());
        object["metadata"]["uid"] = json!(uid);
        api.apply(object)?;
    }
    let ca = CaProcess::start(&api, "cluster-ca-agents")?;
    let dir = std::env::temp_dir().join(format!("trellis-{}-ca-agents", std::process::id()));
    fs::create_dir_all(&dir)?;
    let root_file = dir.join("root.pem");
    fs::write(&root_file, &root_cert)?;
    let start = |name: &str, node: &Node| -> anyhow::Result<Agent> {
        // Each agent's projected token: the agents' service account, bound to its node.
        let token = format!("token-{name}");
        let mut user = TokenUser::service_account(
            "trellis-system",
            "mesh-agent",
            &format!("mesh-agent-{name}"),
            &node.id,
        );
        user.audiences = vec!["trellis-ca".into()];
        api.add_token_review(&token, user);
        let token_file = dir.join(format!("{name}.token"));
        fs::write(&token_file, format!("{token}\n"))?;
        let addr = ca.addr.to_string();
        let root = root_file.display().to_string();
        let token_path = token_file.display().to_string();
        Agent::start_kubernetes(
            name,
            &api.kubeconfig(API_TOKEN),
            &node.id,
            &node.kubelet_cgroup_root(),
            None,
            &[
                "--ca-addr",
                &addr,
                "--ca-root-cert",
                &root,
                "--ca-token-file",
                &token_path,
            ],
        )
    };
    // Separate state directories: if the agents trust each other, it is through the CA.
    let mut a1 = start("ca-n1", &n1)?;
    let mut a2 = start("ca-n2", &n2)?;
    for (agent, pod) in [(&mut a1, "shop/client"), (&mut a2, "shop/server")] {
        agent.wait_for_event("enrolled", |e| {
            message(e) == "pod enrolled" && field(e, "pod") == pod
        })?;
    }
    let (code, body) = client.curl(&format!("http://{}:8080/", server.ip))?;
    ensure!(code == 200, "status {code}: {body}");
    let out = a1.wait_for_event("outbound HBONE log", |e| {
        message(e) == "connection closed" && field(e, "direction") == "outbound"
    })?;
    ensure!(
        field(&out, "path") == "hbone" && field(&out, "security") == "mutual_tls",
        "{out}"
    );
    for (identity, node) in [("frontend", &n1.id), ("backend", &n2.id)] {
        let wanted = format!("spiffe://cluster.local/ns/shop/sa/{identity}");
        // The CA's log is written in batches: wait for the line.
        wait_until("the CA to log the signature", AGENT_DEADLINE, || {
            ca.log_text()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|e| {
                    message(&e) == "certificate signed"
                        && field(&e, "identity") == wanted
                        && field(&e, "node") == node.as_str()
                })
                .then_some(())
        })
        .with_context(|| {
            format!(
                "the CA did not sign {identity} for {node}:\n{}",
                ca.log_text()
            )
        })?;
    }
    fs::remove_dir_all(&dir).ok();
    Ok(())
}

fn pod_object_running(namespace: &str, name: &str, sa: &str, node: &str, ip: &str) -> Value {
    let mut p = pod(namespace, name, sa, node, "Running");
    p["status"]["podIP"] = json!(ip);
    p
}

#[test]
fn an_agent_enrols_its_pods_once_the_cluster_ca_is_reachable() -> anyhow::Result<()> {
    use mesh_tests::{Agent, CgroupDriver, Node, kube_api};
    const API_TOKEN: &str = "agent-api-token-2";
    let api = KubeApi::start()?;
    api.require_token(CA_TOKEN);
    api.require_token(API_TOKEN);
    let (root_cert, root_key) = root_ca()?;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": { "name": "trellis-ca-root", "namespace": "trellis-system" },
        "stringData": { "tls.crt": root_cert, "tls.key": root_key },
    }))?;
    let mut node = Node::new()?;
    let uid = kube_api::new_uid();
    let (client, _container) = node.add_kubelet_pod("client", &uid, CgroupDriver::Systemd)?;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": "shop", "labels": { "trellis.dev/dataplane": "enabled" } },
    }))?;
    let mut object = pod_object_running(
        "shop",
        "client",
        "frontend",
        &node.id,
        &client.ip.to_string(),
    );
    object["metadata"]["uid"] = json!(uid);
    api.apply(object)?;
    let dir = std::env::temp_dir().join(format!("trellis-{}-ca-late", std::process::id()));
    fs::create_dir_all(&dir)?;
    let root_file = dir.join("root.pem");
    fs::write(&root_file, &root_cert)?;
    let mut user =
        TokenUser::service_account("trellis-system", "mesh-agent", "mesh-agent-x", &node.id);
    user.audiences = vec!["trellis-ca".into()];
    api.add_token_review("late-token", user);
    let token_file = dir.join("token");
    fs::write(&token_file, "late-token")?;
    // A port for the CA, free now; the CA is not there yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = Agent::start_kubernetes(
        "ca-late",
        &api.kubeconfig(API_TOKEN),
        &node.id,
        &node.kubelet_cgroup_root(),
        None,
        &[
            "--ca-addr",
            &addr,
            "--ca-root-cert",
            &root_file.display().to_string(),
            "--ca-token-file",
            &token_file.display().to_string(),
        ],
    )?;
    agent.wait_for_event("the enrolment to fail without the CA", |e| {
        message(e).starts_with("pod enrolment failed") && field(e, "error").contains("cluster CA")
    })?;
    let ca = CaProcess::start_on(&api, "cluster-ca-late", &addr)?;
    agent.wait_for_event("the pod to be enrolled once the CA is up", |e| {
        message(e) == "pod enrolled" && field(e, "pod") == "shop/client"
    })?;
    // The CA's log is written in batches: wait for the line.
    wait_until("the CA to log the signature", AGENT_DEADLINE, || {
        ca.log_text().contains("certificate signed").then_some(())
    })
    .with_context(|| ca.log_text())?;
    fs::remove_dir_all(&dir).ok();
    Ok(())
}

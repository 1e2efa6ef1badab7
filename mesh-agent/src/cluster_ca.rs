//! `mesh-agent ca`: the cluster's certificate authority. It signs workload certificates for
//! node agents over HTTPS, and only for service accounts that have a pod on the asking
//! agent's node, so a compromised node can obtain the identities of its own pods and no
//! others.
//!
//! ```text
//! POST /v1/certificates                      (HTTPS, port 15012)
//! Authorization: Bearer <the agent's projected service-account token>
//! {"identity": "spiffe://cluster.local/ns/shop/sa/web", "csr": "-----BEGIN CERTIFICATE REQUEST-----..."}
//!
//! 200 {"certChain": ["-----BEGIN CERTIFICATE-----...", ...], "roots": [...]}
//! 401 / 403 / 400 {"error": "..."}: unauthenticated / not allowed / malformed, with the reason
//! ```
//!
//! Per request: a TokenReview authenticates the token (with the configured audiences); the
//! user must be the node agent's service account; the token's node comes from the review's
//! `authentication.kubernetes.io/node-name` extra (bound tokens carry it since Kubernetes
//! 1.30), else from the pod it is bound to (`.../pod-name`, looked up); then the pods of the
//! identity's namespace on that node (field selector `spec.nodeName`) must include one that
//! runs as the identity's service account and has not finished. The certificate is made
//! over the request's public key (the agent keeps its private keys), with the identity as its
//! only SAN, whatever else the request asks for.
//!
//! The signing key and certificate come from a Kubernetes Secret of type `kubernetes.io/tls`
//! (`tls.crt`, `tls.key`, optional `ca.crt` roots; without it `tls.crt`'s last certificate is
//! the root), read through the API at start-up. The HTTPS endpoint presents a certificate the
//! same CA issues for `--server-name` (agents verify it against the mesh roots).
use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    core::v1::{Pod, Secret},
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::{
    identity::{CaError, CertificateAuthority},
    state::Identity,
};

/// Largest request body accepted (a CSR is about 500 bytes).
const MAX_BODY: usize = 64 * 1024;
/// The TokenReview extra naming the node a bound token's pod runs on.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The TokenReview extra naming the pod a bound token belongs to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// Lifetime of the HTTPS endpoint's own certificate (re-issued at each start).
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// `mesh-agent ca` options.
#[derive(clap::Args, Clone, Debug)]
pub struct CaOptions {
    /// Where to serve HTTPS.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// The CA's own namespace (of the root Secret and of the agent's service account).
    #[arg(long, env = "POD_NAMESPACE", default_value = "trellis-system")]
    pub namespace: String,
    /// The Secret (type kubernetes.io/tls) holding the signing key and certificate.
    #[arg(long, default_value = "trellis-ca-root")]
    pub root_secret: String,
    /// The node agents' service account (in --namespace): only it may ask.
    #[arg(long, default_value = "mesh-agent")]
    pub agent_service_account: String,
    /// Audiences the agents' tokens must be valid for (repeatable); none = the API server's.
    #[arg(long = "audience")]
    pub audiences: Vec<String>,
    /// DNS name of the HTTPS endpoint's certificate (the Service's name).
    #[arg(long, default_value = "trellis-ca.trellis-system.svc")]
    pub server_name: String,
    #[arg(long, default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of signed certificates (s, m, h).
    #[arg(long, default_value = "24h")]
    pub certificate_lifetime: String,
    /// A kubeconfig file; default: the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    BadRequest(String),
    Unauthenticated(String),
    Forbidden(String),
    Internal(String),
}

impl Refusal {
    fn response(&self) -> Response<Full<Bytes>> {
        let (status, message) = match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Self::Unauthenticated(m) => (StatusCode::UNAUTHORIZED, m),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            Self::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        json_response(status, &json!({ "error": message }))
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignRequest {
    identity: String,
    csr: String,
}

struct CaState {
    client: Client,
    ca: CertificateAuthority,
    options: CaOptions,
    lifetime: Duration,
}

/// The node an authenticated agent's token belongs to, when the review names it.
pub fn node_of(user: &UserInfo) -> Option<&str> {
    user.extra
        .as_ref()?
        .get(NODE_NAME_EXTRA)?
        .first()
        .map(String::as_str)
        .filter(|n| !n.is_empty())
}

/// Whether `pods` (of one namespace, on the asking node) include a live pod running as
/// `service_account`.
pub fn has_pod_of(pods: &[Pod], service_account: &str) -> bool {
    pods.iter().any(|p| {
        let sa = p
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        sa == service_account && !matches!(phase, Some("Succeeded" | "Failed"))
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

impl CaState {
    async fn sign(&self, req: Request<Incoming>) -> Result<Value, Refusal> {
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Refusal::Unauthenticated("no bearer token".into()))?
            .to_string();
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| Refusal::BadRequest(format!("reading the request: {e}")))?
            .to_bytes();
        let request: SignRequest = serde_json::from_slice(&body)
            .map_err(|e| Refusal::BadRequest(format!("request body: {e}")))?;
        let identity: Identity = request
            .identity
            .parse()
            .map_err(|e| Refusal::BadRequest(format!("identity: {e}")))?;
        if identity.trust_domain != self.options.trust_domain {
            return Err(Refusal::Forbidden(format!(
                "{identity}: this CA signs trust domain {:?} only",
                self.options.trust_domain
            )));
        }
        let user = self.authenticate(&token).await?;
        let expected = format!(
            "system:serviceaccount:{}:{}",
            self.options.namespace, self.options.agent_service_account
        );
        let username = user.username.as_deref().unwrap_or("");
        if username != expected {
            return Err(Refusal::Forbidden(format!(
                "{username:?} is not the node agents' service account ({expected})"
            )));
        }
        let node = self.node_of(&user).await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &identity.namespace);
        let on_node = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| Refusal::Internal(format!("listing pods on {node}: {e}")))?;
        if !has_pod_of(&on_node.items, &identity.service_account) {
            return Err(Refusal::Forbidden(format!(
                "no pod of service account {}/{} runs on node {node}",
                identity.namespace, identity.service_account
            )));
        }
        let chain = self
            .ca
            .sign_csr(&identity, &request.csr, self.lifetime)
            .map_err(|e| match e {
                CaError::Csr { .. } => Refusal::BadRequest(format!("csr: {e}")),
                other => Refusal::Internal(other.to_string()),
            })?;
        info!(identity = %identity, node = %node, "certificate signed");
        Ok(json!({
            "certChain": chain.iter().map(|c| pem("CERTIFICATE", c)).collect::<Vec<_>>(),
            "roots": self.ca.roots().iter().map(|c| pem("CERTIFICATE", c)).collect::<Vec<_>>(),
        }))
    }

    async fn authenticate(&self, token: &str) -> Result<UserInfo, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.options.audiences.is_empty())
                    .then(|| self.options.audiences.clone()),
            },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Internal(format!("TokenReview: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::Unauthenticated(format!(
                "token not authenticated: {}",
                status.error.as_deref().unwrap_or("no reason given")
            )));
        }
        status
            .user
            .ok_or_else(|| Refusal::Unauthenticated("TokenReview named no user".into()))
    }

    /// The asking agent's node: from the review, else from the pod the token is bound to.
    async fn node_of(&self, user: &UserInfo) -> Result<String, Refusal> {
        if let Some(node) = node_of(user) {
            return Ok(node.to_string());
        }
        let extra: BTreeMap<String, Vec<String>> = user.extra.clone().unwrap_or_default();
        let Some(pod) = extra.get(POD_NAME_EXTRA).and_then(|p| p.first()) else {
            return Err(Refusal::Forbidden(
                "the token is not bound to a pod (use a projected service-account token)".into(),
            ));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.options.namespace);
        let pod = pods
            .get(pod)
            .await
            .map_err(|e| Refusal::Forbidden(format!("the token's pod {pod}: {e}")))?;
        pod.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Refusal::Forbidden("the token's pod is not scheduled".into()))
    }
}

/// Reads the root Secret and builds the CA.
async fn load_ca(client: &Client, options: &CaOptions) -> anyhow::Result<CertificateAuthority> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    let origin = format!("secret/{}/{}", options.namespace, options.root_secret);
    let secret = secrets
        .get(&options.root_secret)
        .await
        .with_context(|| format!("reading {origin}"))?;
    let data = secret.data.unwrap_or_default();
    let field = |name: &str| {
        data.get(name)
            .map(|b| b.0.clone())
            .with_context(|| format!("{origin} has no {name}"))
    };
    let chain = field("tls.crt")?;
    let key = field("tls.key")?;
    let roots = match data.get("ca.crt") {
        Some(b) => b.0.clone(),
        None => last_pem_block(&chain).with_context(|| format!("{origin}: tls.crt"))?,
    };
    CertificateAuthority::from_pem(&chain, &key, &roots, &origin, &options.trust_domain)
        .map_err(anyhow::Error::from)
}

/// The last PEM block of `text` (a chain's root), as PEM.
fn last_pem_block(text: &[u8]) -> anyhow::Result<Vec<u8>> {
    let blocks = pem::parse_many(text).context("not valid PEM")?;
    let last = blocks.last().context("no certificate")?;
    Ok(pem(last.tag(), last.contents()).into_bytes())
}

/// Runs the CA until SIGTERM/SIGINT.
pub async fn run(options: CaOptions) -> anyhow::Result<()> {
    let lifetime = crate::config::parse_duration(&options.certificate_lifetime)
        .filter(|d| *d >= Duration::from_secs(60))
        .with_context(|| {
            format!(
                "--certificate-lifetime {:?} is not a duration of at least 60s",
                options.certificate_lifetime
            )
        })?;
    if options.server_name.is_empty() {
        bail!("--server-name must not be empty");
    }
    let client = crate::kubernetes::client(options.kubeconfig.as_deref()).await?;
    let ca = load_ca(&client, &options).await?;
    let (chain, key) = ca
        .issue_server(
            std::slice::from_ref(&options.server_name),
            SERVER_CERT_LIFETIME,
        )
        .context("issuing the CA endpoint's own certificate")?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .context("TLS 1.3")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("the endpoint's certificate")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding {}", options.listen))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(CaState {
        client,
        ca,
        options,
        lifetime,
    });
    info!(addr = %addr, server_name = %state.options.server_name, "CA listening");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        let accepted = tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: exiting"); return Ok(()); }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: exiting"); return Ok(()); }
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(t) => t,
                Err(e) => {
                    warn!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let resp = if req.method() != hyper::Method::POST
                        || req.uri().path() != "/v1/certificates"
                    {
                        Refusal::BadRequest("POST /v1/certificates is the only endpoint".into())
                            .response()
                    } else {
                        match state.sign(req).await {
                            Ok(v) => json_response(StatusCode::OK, &v),
                            Err(refusal) => {
                                warn!(peer = %peer, refusal = ?refusal, "certificate request refused");
                                refusal.response()
                            }
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(sa: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "p", "namespace": "shop" },
            "spec": { "serviceAccountName": sa, "containers": [] },
            "status": { "phase": phase },
        }))
        .expect("pod")
    }

    #[test]
    fn only_live_pods_of_the_service_account_count() {
        let pods = vec![pod("web", "Running"), pod("db", "Succeeded")];
        assert!(has_pod_of(&pods, "web"));
        assert!(!has_pod_of(&pods, "db"), "finished pods do not count");
        assert!(!has_pod_of(&pods, "other"));
        assert!(!has_pod_of(&[], "web"));
    }

    #[test]
    fn the_node_comes_from_the_reviews_extra() {
        let user: UserInfo = serde_json::from_value(json!({
            "username": "system:serviceaccount:trellis-system:mesh-agent",
            "extra": { NODE_NAME_EXTRA: ["n1"] },
        }))
        .expect("user");
        assert_eq!(node_of(&user), Some("n1"));
        assert_eq!(node_of(&UserInfo::default()), None);
    }

    #[test]
    fn the_root_defaults_to_the_chains_last_certificate() {
        let text = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n";
        let root = last_pem_block(text).expect("a block");
        let parsed = pem::parse(&root).expect("pem");
        assert_eq!(parsed.contents(), [1, 2, 3]);
    }
}

//! The cluster CA (`mesh-agent ca`) as an [`Issuer`]: the agent generates each key itself,
//! sends a CSR with its service-account token over HTTPS, and keeps the private key. The CA
//! decides the lifetime; its endpoint is verified against the mesh roots given to the agent.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt as _, Full};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject as _,
};
use serde_json::{Value, json};

use super::{CaError, Issuer, WorkloadCert};
use crate::state::Identity;

/// How long one certificate request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub struct ClusterCaClient {
    /// `host:port` of the CA.
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    roots: Vec<CertificateDer<'static>>,
    /// The agent's service-account token, read at each request (the kubelet rotates it).
    token_file: PathBuf,
}

impl std::fmt::Debug for ClusterCaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCaClient")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

fn remote(detail: impl Into<String>) -> CaError {
    CaError::Remote {
        detail: detail.into(),
    }
}

impl ClusterCaClient {
    /// A client of the CA at `addr` (`host:port`) presenting a certificate for `server_name`
    /// that chains to a root in `root_file` (PEM), which are also the mesh's roots.
    pub fn new(
        addr: &str,
        server_name: &str,
        root_file: &Path,
        token_file: &Path,
    ) -> Result<Self, CaError> {
        let pem = fs::read(root_file).map_err(|source| CaError::Read {
            path: root_file.to_path_buf(),
            source,
        })?;
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| CaError::Pem {
                path: root_file.to_path_buf(),
                detail: e.to_string(),
            })?;
        if roots.is_empty() {
            return Err(CaError::NoCertificate {
                path: root_file.to_path_buf(),
            });
        }
        let mut store = rustls::RootCertStore::empty();
        for root in &roots {
            store
                .add(root.clone())
                .map_err(|e| CaError::BadCertificate {
                    path: root_file.to_path_buf(),
                    index: 0,
                    detail: e.to_string(),
                })?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| remote(format!("TLS 1.3: {e}")))?
        .with_root_certificates(store)
        .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| remote(format!("CA server name {server_name:?}: {e}")))?;
        Ok(Self {
            addr: addr.to_string(),
            server_name,
            tls: Arc::new(tls),
            roots,
            token_file: token_file.to_path_buf(),
        })
    }

    /// POSTs the request and returns the answer's JSON.
    async fn exchange(&self, token: &str, body: String) -> Result<Value, CaError> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| remote(format!("connecting to the CA at {}: {e}", self.addr)))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| remote(format!("TLS with the CA at {}: {e}", self.addr)))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| remote(format!("HTTP with the CA: {e}")))?;
        tokio::spawn(conn);
        let request = http::Request::post("/v1/certificates")
            .header(http::header::HOST, self.server_name.to_str().as_ref())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| remote(format!("building the request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| remote(format!("asking the CA: {e}")))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| remote(format!("reading the CA's answer: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| remote(format!("the CA's answer ({status}) is not JSON: {e}")))?;
        if !status.is_success() {
            return Err(remote(format!(
                "the CA refused ({status}): {}",
                value["error"].as_str().unwrap_or("no reason given")
            )));
        }
        Ok(value)
    }

    /// Runs [`Self::exchange`] to completion from synchronous code: on a thread of its own
    /// with its own small runtime, so that it works whether or not the caller is on a runtime
    /// thread (which is told it blocks).
    fn exchange_blocking(&self, token: &str, body: String) -> Result<Value, CaError> {
        let run = || {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| remote(format!("a runtime for the CA request: {e}")))?;
                    runtime.block_on(async {
                        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(token, body))
                            .await
                            .map_err(|_| {
                                remote(format!("the CA at {} did not answer in time", self.addr))
                            })?
                    })
                })
                .join()
                .map_err(|_| remote("the CA request thread panicked"))?
            })
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        }
    }
}

fn time_of(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

impl Issuer for ClusterCaClient {
    fn issue(&self, id: &Identity, _lifetime: Duration) -> Result<WorkloadCert, CaError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Generate {
                what: format!("generating a key for {id}"),
                source,
            })?;
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|source| CaError::Generate {
                what: format!("a certificate request for {id}"),
                source,
            })?;
        let token = fs::read_to_string(&self.token_file).map_err(|source| CaError::Read {
            path: self.token_file.clone(),
            source,
        })?;
        let body = json!({ "identity": id.to_string(), "csr": csr }).to_string();
        let issued_at = SystemTime::now();
        let answer = self.exchange_blocking(token.trim(), body)?;
        let chain: Vec<CertificateDer<'static>> = answer["certChain"]
            .as_array()
            .ok_or_else(|| remote("the CA's answer has no certChain"))?
            .iter()
            .map(|pem| {
                let text = pem.as_str().unwrap_or("");
                CertificateDer::from_pem_slice(text.as_bytes())
                    .map_err(|e| remote(format!("certChain: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let leaf = chain.first().ok_or_else(|| remote("empty certChain"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| remote(format!("the signed certificate: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(remote("the CA signed another key than ours"));
        }
        let validity = parsed.validity();
        // Roots are known to peers already: keep the leaf and its intermediates.
        let chain = chain
            .iter()
            .filter(|c| !self.roots.contains(c))
            .cloned()
            .collect();
        Ok(WorkloadCert {
            identity: id.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: time_of(validity.not_before),
            not_after: time_of(validity.not_after),
            issued_at,
        })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

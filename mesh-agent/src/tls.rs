//! mTLS between node agents: TLS 1.3 only, ALPN `h2`, SPIFFE X.509 SVIDs on both sides
//! (Istio/ztunnel compatible), ring as the crypto provider.
//!
//! - Server ([`server_config`]): requires a client certificate that chains to the roots; who
//!   the client is gets decided by the caller after the handshake, with [`peer_identity`].
//! - Client ([`client_config`]): verifies the server chains to the roots and that its SPIFFE
//!   ID is the one expected for the destination, or the handshake fails naming both IDs. The
//!   TLS server name is not checked (give any `ServerName`, e.g. the destination IP).
//! - [`TlsConfigs`] caches configs per identity and rebuilds them after rotation.
//!
//! Session resumption is off on both sides, so every handshake verifies certificates.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{
    identity::{CaError, CertManager, IdentityParseError, WorkloadCert},
    state::Identity,
};

/// The only ALPN protocol spoken: HTTP/2 (HBONE is HTTP/2 CONNECT).
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS config could not be built, or a peer certificate names no acceptable identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no trust anchors: the root bundle is empty")]
    NoRoots,
    #[error("root certificate #{index} is not usable as a trust anchor: {source}")]
    BadRoot { index: usize, source: rustls::Error },
    #[error("building the client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("building the TLS {side} config for {identity}: {source}")]
    Config {
        side: &'static str,
        identity: Box<Identity>,
        source: rustls::Error,
    },
    #[error("no certificate for {identity}: {source}")]
    Certificate {
        identity: Box<Identity>,
        source: Box<CaError>,
    },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer certificate is not valid X.509: {0}")]
    BadPeerCertificate(String),
    #[error("the peer certificate has no URI SAN (SPIFFE ID)")]
    NoSpiffeId,
    #[error("the peer certificate has {} URI SANs ({}), an SVID has exactly one", .0.len(), .0.join(", "))]
    MultipleUriSans(Vec<String>),
    #[error("the peer certificate's URI SAN is not a workload SPIFFE ID: {0}")]
    InvalidSpiffeId(#[from] IdentityParseError),
    #[error("peer identity mismatch: expected {expected}, presented {presented}")]
    IdentityMismatch {
        expected: Box<Identity>,
        presented: Box<Identity>,
    },
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let mut store = RootCertStore::empty();
    for (index, root) in roots.iter().enumerate() {
        store
            .add(root.clone())
            .map_err(|source| TlsError::BadRoot { index, source })?;
    }
    Ok(Arc::new(store))
}

/// TLS 1.3 only, ALPN "h2". Requires a client certificate chaining to `roots` (with the
/// clientAuth usage); the caller extracts and checks the peer identity after the handshake
/// ([`peer_identity`] of `ServerConnection::peer_certificates()`).
pub fn server_config(
    cert: &WorkloadCert,
    roots: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let config_err = |source| TlsError::Config {
        side: "server",
        identity: Box::new(cert.identity.clone()),
        source,
    };
    let verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(roots)?, provider()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(config_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// TLS 1.3 only, ALPN "h2". Presents `cert`; verifies the server chains to `roots` (with the
/// serverAuth usage, ignoring the server name) and that its leaf's SPIFFE ID is `expected`.
/// A wrong identity or a foreign CA fails the handshake; for a wrong identity the error
/// reads "peer identity mismatch: expected ..., presented ...".
pub fn client_config(
    cert: &WorkloadCert,
    roots: &[CertificateDer<'static>],
    expected: &Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = SpiffeServerVerifier::new(root_store(roots)?, expected.clone());
    client_config_with(cert, Arc::new(verifier), &[&rustls::version::TLS13])
}

fn client_config_with(
    cert: &WorkloadCert,
    verifier: Arc<dyn ServerCertVerifier>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<ClientConfig>, TlsError> {
    let config_err = |source| TlsError::Config {
        side: "client",
        identity: Box::new(cert.identity.clone()),
        source,
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(config_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(config_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE identity in a peer's leaf certificate (`chain[0]`): it must have exactly one
/// URI SAN, and that must be `spiffe://<td>/ns/<ns>/sa/<sa>`. Does not verify the chain;
/// rustls has done that during the handshake.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Result<Identity, TlsError> {
    let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
    leaf_identity(leaf)
}

fn leaf_identity(leaf: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    let sans = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::BadPeerCertificate(format!("subjectAltName: {e}")))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris[..] {
        [] => Err(TlsError::NoSpiffeId),
        [uri] => Ok(uri.parse()?),
        _ => Err(TlsError::MultipleUriSans(
            uris.iter().map(|u| u.to_string()).collect(),
        )),
    }
}

/// Wraps a [`TlsError`] as a rustls certificate error whose message is the error's own text
/// (rustls prints `CertificateError::Other` with `{:?}`).
struct PeerRejected(TlsError);

impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for PeerRejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn rejected(error: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(PeerRejected(
        error,
    )))))
}

/// If `error` (from a failed handshake or I/O on a TLS stream) is a peer identity mismatch
/// detected by [`client_config`]'s verifier, the expected and presented identities.
#[cfg(test)]
pub fn identity_mismatch<'e>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<(&'e Identity, &'e Identity)> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
            e.downcast_ref::<rustls::Error>()
            && let Some(PeerRejected(TlsError::IdentityMismatch {
                expected,
                presented,
            })) = other.0.downcast_ref::<PeerRejected>()
        {
            return Some((expected, presented));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            current = Some(inner);
            continue;
        }
        current = e.source();
    }
    None
}

/// Server certificate verifier for mesh peers: webpki chain verification for serverAuth
/// against the mesh roots (the DNS/IP server name is ignored), then the leaf's SPIFFE ID must
/// equal the expected identity.
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    fn new(roots: Arc<RootCertStore>, expected: Identity) -> Self {
        Self {
            roots,
            expected,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected.to_string())
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = leaf_identity(end_entity).map_err(rejected)?;
        if presented != self.expected {
            return Err(rejected(TlsError::IdentityMismatch {
                expected: Box::new(self.expected.clone()),
                presented: Box::new(presented),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

type ServerEntry = (Arc<WorkloadCert>, Arc<ServerConfig>);
type ClientEntry = (Arc<WorkloadCert>, Arc<ClientConfig>);

/// Caches built configs per identity so a handshake does not rebuild them; a config is
/// rebuilt when the [`CertManager`] holds a different certificate than the one it was built
/// with (rotation). Entries for rotated or dropped certificates are pruned on rebuilds.
pub struct TlsConfigs {
    certs: Arc<CertManager>,
    servers: Mutex<HashMap<Identity, ServerEntry>>,
    clients: Mutex<HashMap<(Identity, Identity), ClientEntry>>,
}

impl fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("servers", &lock(&self.servers).len())
            .field("clients", &lock(&self.clients).len())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only whole entries are inserted or removed under these locks.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TlsConfigs {
    pub fn new(certs: Arc<CertManager>) -> Self {
        Self {
            certs,
            servers: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn cert(&self, local: &Identity) -> Result<Arc<WorkloadCert>, TlsError> {
        self.certs
            .ensure(local)
            .map_err(|source| TlsError::Certificate {
                identity: Box::new(local.clone()),
                source: Box::new(source),
            })
    }

    /// True if `cert` is still the one the manager holds for its identity.
    fn is_current(&self, cert: &Arc<WorkloadCert>) -> bool {
        self.certs
            .get(&cert.identity)
            .is_some_and(|held| Arc::ptr_eq(&held, cert))
    }

    /// Server config presenting `local`'s certificate (issued now if not held yet).
    pub fn server(&self, local: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
        let cert = self.cert(local)?;
        if let Some((built_with, config)) = lock(&self.servers).get(local)
            && Arc::ptr_eq(built_with, &cert)
        {
            return Ok(config.clone());
        }
        let config = server_config(&cert, &self.certs.roots())?;
        let mut servers = lock(&self.servers);
        servers.retain(|_, (built_with, _)| self.is_current(built_with));
        servers.insert(local.clone(), (cert, config.clone()));
        Ok(config)
    }

    /// Client config presenting `local`'s certificate and accepting only a server that proves
    /// `expected_peer`.
    pub fn client(
        &self,
        local: &Identity,
        expected_peer: &Identity,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let cert = self.cert(local)?;
        let key = (local.clone(), expected_peer.clone());
        if let Some((built_with, config)) = lock(&self.clients).get(&key)
            && Arc::ptr_eq(built_with, &cert)
        {
            return Ok(config.clone());
        }
        let config = client_config(&cert, &self.certs.roots(), expected_peer)?;
        let mut clients = lock(&self.clients);
        clients.retain(|_, (built_with, _)| self.is_current(built_with));
        clients.insert(key, (cert, config.clone()));
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::{
        CertificateAuthority,
        ca::tests::{id, local_ca},
    };

    const LIFETIME: Duration = Duration::from_secs(600);

    /// What each side saw: the peer identity, or the error text.
    struct Outcome {
        client: Result<Identity, String>,
        server: Result<Identity, String>,
    }

    /// Runs a real handshake over an in-memory duplex pipe; the server then sends "ok" and
    /// the client reads it (so a client certificate rejected after the client finished its
    /// side of the TLS 1.3 handshake shows up on the client too).
    async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let mut tls = TlsAcceptor::from(server)
                .accept(server_io)
                .await
                .map_err(|e| e.to_string())?;
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let peer = peer_identity(conn.peer_certificates().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer)
        };
        let client_side = async move {
            let name = ServerName::try_from("10.0.0.1").map_err(|e| e.to_string())?;
            let mut tls = TlsConnector::from(client)
                .connect(name.to_owned(), client_io)
                .await
                .map_err(|e| e.to_string())?;
            let peer = peer_identity(tls.get_ref().1.peer_certificates().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"ok");
            Ok::<_, String>(peer)
        };
        let (server, client) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(server_side, client_side)
        })
        .await
        .expect("handshake finished");
        Outcome { client, server }
    }

    #[tokio::test]
    async fn two_identities_handshake_and_see_each_other() {
        let (_dir, ca) = local_ca();
        let (a, b) = (id("shop", "frontend"), id("shop", "backend"));
        let cert_a = ca.issue(&a, LIFETIME).expect("issue");
        let cert_b = ca.issue(&b, LIFETIME).expect("issue");
        let client = client_config(&cert_a, ca.roots(), &b).expect("client config");
        let server = server_config(&cert_b, ca.roots()).expect("server config");
        let outcome = handshake(client, server).await;
        assert_eq!(outcome.client, Ok(b));
        assert_eq!(outcome.server, Ok(a));
    }

    #[tokio::test]
    async fn handshake_over_tcp_with_an_intermediate_ca_chain() {
        // Plug-in CA with an intermediate, over real loopback TCP.
        let dir = tempfile::tempdir().expect("tempdir");
        let (chain, key, roots) = plugin_ca(dir.path());
        let ca = CertificateAuthority::from_files(&chain, &key, &roots).expect("CA");
        let (a, b) = (id("shop", "frontend"), id("shop", "backend"));
        let client =
            client_config(&ca.issue(&a, LIFETIME).expect("issue"), ca.roots(), &b).expect("client");
        let server =
            server_config(&ca.issue(&b, LIFETIME).expect("issue"), ca.roots()).expect("server");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let tls = TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .expect("server handshake");
            peer_identity(tls.get_ref().1.peer_certificates().expect("client certs"))
                .expect("identity")
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let tls = TlsConnector::from(client)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .expect("client handshake");
        assert_eq!(
            peer_identity(tls.get_ref().1.peer_certificates().expect("certs")).expect("id"),
            b
        );
        assert_eq!(server_task.await.expect("server task"), a);
    }

    #[tokio::test]
    async fn client_refuses_a_server_with_another_identity() {
        let (_dir, ca) = local_ca();
        let (a, b, c) = (
            id("shop", "frontend"),
            id("shop", "backend"),
            id("shop", "evil"),
        );
        let client =
            client_config(&ca.issue(&a, LIFETIME).expect("issue"), ca.roots(), &b).expect("client");
        let server =
            server_config(&ca.issue(&c, LIFETIME).expect("issue"), ca.roots()).expect("server");
        let outcome = handshake(client, server).await;
        let err = outcome.client.expect_err("client must refuse");
        assert!(err.contains("peer identity mismatch"), "{err}");
        assert!(err.contains(&format!("expected {b}")), "{err}");
        assert!(err.contains(&format!("presented {c}")), "{err}");
        assert!(outcome.server.is_err());
    }

    #[tokio::test]
    async fn identity_mismatch_is_recoverable_from_the_io_error() {
        let (_dir, ca) = local_ca();
        let (a, b, c) = (
            id("shop", "frontend"),
            id("shop", "backend"),
            id("shop", "evil"),
        );
        let client =
            client_config(&ca.issue(&a, LIFETIME).expect("issue"), ca.roots(), &b).expect("client");
        let server =
            server_config(&ca.issue(&c, LIFETIME).expect("issue"), ca.roots()).expect("server");
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_task =
            tokio::spawn(async move { TlsAcceptor::from(server).accept(server_io).await.is_err() });
        let name = ServerName::try_from("mesh.invalid")
            .expect("name")
            .to_owned();
        let err = TlsConnector::from(client)
            .connect(name, client_io)
            .await
            .expect_err("mismatch");
        let (expected, presented) = identity_mismatch(&err).expect("a mismatch");
        assert_eq!((expected, presented), (&b, &c));
        assert!(server_task.await.expect("server task"));
    }

    #[tokio::test]
    async fn client_refuses_a_server_from_a_foreign_ca() {
        let (_d1, ca) = local_ca();
        let (_d2, foreign) = local_ca();
        let (a, b) = (id("shop", "frontend"), id("shop", "backend"));
        let client =
            client_config(&ca.issue(&a, LIFETIME).expect("issue"), ca.roots(), &b).expect("client");
        // Right identity, wrong CA.
        let server = server_config(&foreign.issue(&b, LIFETIME).expect("issue"), ca.roots())
            .expect("server");
        let outcome = handshake(client, server).await;
        let err = outcome.client.expect_err("client must refuse");
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn server_refuses_a_client_from_a_foreign_ca() {
        let (_d1, ca) = local_ca();
        let (_d2, foreign) = local_ca();
        let (a, b) = (id("shop", "frontend"), id("shop", "backend"));
        let client = client_config(&foreign.issue(&a, LIFETIME).expect("issue"), ca.roots(), &b)
            .expect("client");
        let server =
            server_config(&ca.issue(&b, LIFETIME).expect("issue"), ca.roots()).expect("server");
        let outcome = handshake(client, server).await;
        let err = outcome.server.expect_err("server must refuse");
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(outcome.client.is_err(), "the client learns it was refused");
    }

    #[tokio::test]
    async fn server_refuses_a_client_without_certificate() {
        let (_dir, ca) = local_ca();
        let b = id("shop", "backend");
        let server =
            server_config(&ca.issue(&b, LIFETIME).expect("issue"), ca.roots()).expect("server");
        let verifier = SpiffeServerVerifier::new(root_store(ca.roots()).expect("roots"), b.clone());
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        let outcome = handshake(Arc::new(client), server).await;
        let err = outcome.server.expect_err("server must refuse");
        assert!(
            err.contains("NoCertificatesPresented") || err.contains("certificate"),
            "{err}"
        );
        assert!(outcome.client.is_err(), "the client learns it was refused");
    }

    #[tokio::test]
    async fn tls12_is_refused() {
        let (_dir, ca) = local_ca();
        let (a, b) = (id("shop", "frontend"), id("shop", "backend"));
        let cert_a = ca.issue(&a, LIFETIME).expect("issue");
        let server =
            server_config(&ca.issue(&b, LIFETIME).expect("issue"), ca.roots()).expect("server");
        let verifier = SpiffeServerVerifier::new(root_store(ca.roots()).expect("roots"), b.clone());
        let client = client_config_with(&cert_a, Arc::new(verifier), &[&rustls::version::TLS12])
            .expect("TLS 1.2 client");
        let outcome = handshake(client, server).await;
        let err = outcome.server.expect_err("server must refuse TLS 1.2");
        assert!(
            err.contains("Tls12NotOfferedOrEnabled") || err.contains("version"),
            "{err}"
        );
        assert!(outcome.client.is_err());
    }

    #[test]
    fn peer_identity_requires_exactly_one_spiffe_uri() {
        let (_dir, ca) = local_ca();
        let a = id("shop", "frontend");
        let cert = ca.issue(&a, LIFETIME).expect("issue");
        assert_eq!(peer_identity(&cert.chain).expect("spiffe"), a);
        assert!(matches!(
            peer_identity(&[]),
            Err(TlsError::NoPeerCertificate)
        ));
        assert!(matches!(
            peer_identity(&[CertificateDer::from(vec![1u8, 2, 3])]),
            Err(TlsError::BadPeerCertificate(_))
        ));

        let leaf = |sans: Vec<rcgen::SanType>| {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans;
            params.self_signed(&key).expect("cert").der().clone()
        };
        let uri = |s: &str| rcgen::SanType::URI(s.try_into().expect("ia5"));
        let dns = rcgen::SanType::DnsName("backend.shop.svc".try_into().expect("ia5"));

        let err = peer_identity(&[leaf(vec![dns.clone()])]).expect_err("DNS only");
        assert!(matches!(err, TlsError::NoSpiffeId), "{err}");
        let err = peer_identity(&[leaf(vec![uri("https://backend.shop")])]).expect_err("https");
        assert!(matches!(err, TlsError::InvalidSpiffeId(_)), "{err}");
        let err =
            peer_identity(&[leaf(vec![uri("spiffe://cluster.local/backend")])]).expect_err("path");
        assert!(matches!(err, TlsError::InvalidSpiffeId(_)), "{err}");
        let err = peer_identity(&[leaf(vec![
            uri("spiffe://cluster.local/ns/a/sa/b"),
            uri("spiffe://cluster.local/ns/c/sa/d"),
        ])])
        .expect_err("two");
        assert!(
            matches!(err, TlsError::MultipleUriSans(ref v) if v.len() == 2),
            "{err}"
        );
        // A DNS SAN next to the SPIFFE ID is fine.
        let ok =
            peer_identity(&[leaf(vec![dns, uri("spiffe://cluster.local/ns/a/sa/b")])]).expect("ok");
        assert_eq!(ok.to_string(), "spiffe://cluster.local/ns/a/sa/b");
    }

    #[test]
    fn configs_are_cached_until_the_certificate_rotates() {
        let (_dir, ca) = local_ca();
        let manager = CertManager::new(Arc::new(ca), LIFETIME, 0.5);
        let configs = TlsConfigs::new(manager.clone());
        let (a, b) = (id("shop", "frontend"), id("shop", "backend"));
        let s1 = configs.server(&a).expect("server");
        let c1 = configs.client(&a, &b).expect("client");
        assert!(Arc::ptr_eq(&s1, &configs.server(&a).expect("server")));
        assert!(Arc::ptr_eq(&c1, &configs.client(&a, &b).expect("client")));
        assert!(!Arc::ptr_eq(
            &c1,
            &configs.client(&a, &a).expect("client to self")
        ));
        manager.reissue(&a).expect("rotate");
        let s2 = configs.server(&a).expect("server");
        let c2 = configs.client(&a, &b).expect("client");
        assert!(!Arc::ptr_eq(&s1, &s2));
        assert!(!Arc::ptr_eq(&c1, &c2));
        // The stale (a -> a) client entry was pruned with the rebuild.
        assert_eq!(lock(&configs.clients).len(), 1);
    }

    /// Root -> intermediate plug-in CA files in `dir`: (cert chain, key, root bundle).
    fn plugin_ca(
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_params = || {
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            params
        };
        let root_key = KeyPair::generate().expect("key");
        let root_params = ca_params();
        let root = root_params.self_signed(&root_key).expect("root");
        let inter_key = KeyPair::generate().expect("key");
        let inter = ca_params()
            .signed_by(&inter_key, &Issuer::new(root_params, root_key))
            .expect("intermediate");
        let paths = (
            dir.join("chain.pem"),
            dir.join("key.pem"),
            dir.join("root.pem"),
        );
        std::fs::write(&paths.0, inter.pem()).expect("write");
        std::fs::write(&paths.1, inter_key.serialize_pem()).expect("write");
        std::fs::write(&paths.2, root.pem()).expect("write");
        paths
    }
}

//! The certificate authority that signs workload SVIDs.
//!
//! Two kinds, one type:
//! - a **local CA** ([`CertificateAuthority::load_or_create`]): a self-signed ECDSA P-256 root
//!   kept in the agent's state directory, created on first run and reused afterwards, so a
//!   restart keeps the trust root. Each node has its own: fine for one node, not for a fleet.
//! - an **operator-provided signing CA** ([`CertificateAuthority::from_files`]), like Istio's
//!   plug-in CA certs (`ca-cert.pem`/`cert-chain.pem`, `ca-key.pem`, `root-cert.pem`): every
//!   node that is given the same files shares one trust root, and can join an existing mesh.
//!
//! Either way the CA checks itself when it is built: it issues a probe certificate and verifies
//! it against its own roots, so a key that does not match its certificate or a chain that does
//! not lead to the root bundle is reported at start-up, with the files named.

use std::{
    fmt, fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, string::Ia5String,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime, pem::PemObject,
};

use super::manager::WorkloadCert;
use crate::state::Identity;

/// File name of the local CA's private key (PKCS#8 PEM, mode 0600) in the state directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the local CA's self-signed root certificate (PEM) in the state directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// How far back an issued certificate's `notBefore` is set, for peers whose clock is behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Lifetime of a freshly created local root.
const LOCAL_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Trust domain of the self-check certificate when the CA is not tied to one.
const PROBE_TRUST_DOMAIN: &str = "trellis.invalid";

/// Why the CA could not be loaded, created or could not issue.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: not valid PEM: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("{path}: no CERTIFICATE in the file")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate #{index} is not valid X.509: {detail}")]
    BadCertificate {
        path: PathBuf,
        index: usize,
        detail: String,
    },
    #[error(
        "{path}: no private key in the file (PKCS#8 \"PRIVATE KEY\", SEC1 \"EC PRIVATE KEY\" or PKCS#1 \"RSA PRIVATE KEY\")"
    )]
    NoKey { path: PathBuf },
    #[error("{path}: unusable private key: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("{key} is not the private key of the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: the signing certificate is not a CA (basicConstraints CA:TRUE missing)")]
    NotCa { path: PathBuf },
    #[error("{path}: the signing certificate expired at {not_after} (unix time)")]
    Expired { path: PathBuf, not_after: i64 },
    #[error(
        "{present} exists but {missing} does not; restore it, or remove {present} to create a new CA (peers will then need the new root)"
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error(
        "certificates signed with {chain} do not verify against the roots in {roots}: {detail}"
    )]
    ChainUntrusted {
        chain: PathBuf,
        roots: PathBuf,
        detail: String,
    },
    #[error("cannot issue for {identity}: this CA signs only trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error("{what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("unusable certificate signing request: {detail}")]
    Csr { detail: String },
    #[error("cluster CA: {detail}")]
    Remote { detail: String },
}

/// Signs X.509 SVIDs. Cheap to share behind an `Arc`; issuing takes `&self`.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then its intermediates; any certificate that is also a root is
    /// left out (peers have the roots already).
    signing_chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    /// When set, only identities in this trust domain are signed.
    trust_domain: Option<String>,
    /// Issued certificates do not outlive the signing certificate.
    signer_not_after: SystemTime,
    /// Whether the signing certificate has a subject key identifier (then issued
    /// certificates carry a matching authority key identifier).
    signer_has_ski: bool,
    description: String,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("source", &self.description)
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .field("intermediates", &self.signing_chain.len())
            .finish_non_exhaustive()
    }
}

/// The files a CA was read from, to name them in errors.
struct Sources<'a> {
    chain: &'a Path,
    key: &'a Path,
    roots: &'a Path,
}

impl CertificateAuthority {
    /// Local CA whose root key and cert live in `state_dir` (`ca-key.pem` mode 0600,
    /// `ca-cert.pem`); created on first run, reused after (so restarts keep the same trust
    /// root). It signs only identities of `trust_domain`.
    pub fn load_or_create(state_dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let key_path = state_dir.join(CA_KEY_FILE);
        let cert_path = state_dir.join(CA_CERT_FILE);
        let exists = |path: &Path| {
            path.try_exists().map_err(|source| CaError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        match (exists(&key_path)?, exists(&cert_path)?) {
            (true, true) => {}
            (false, false) => create_local_root(state_dir, &key_path, &cert_path, trust_domain)?,
            (true, false) => {
                return Err(CaError::Incomplete {
                    present: key_path,
                    missing: cert_path,
                });
            }
            (false, true) => {
                return Err(CaError::Incomplete {
                    present: cert_path,
                    missing: key_path,
                });
            }
        }
        warn_if_key_readable_by_others(&key_path);
        let certs = read_certs(&cert_path)?;
        let key = read_key(&key_path)?;
        // The root is the first certificate of the file; it is its own trust anchor.
        let roots = certs[..1].to_vec();
        Self::assemble(
            certs,
            key,
            roots,
            Some(trust_domain.to_string()),
            Sources {
                chain: &cert_path,
                key: &key_path,
                roots: &cert_path,
            },
            format!("local CA in {}", state_dir.display()),
        )
    }

    /// Operator-provided signing CA, like Istio's plug-in CA certs: `cert_chain` (PEM: signing
    /// cert, then its intermediates), `key` (PEM PKCS#8, SEC1/EC or PKCS#1/RSA), `root_bundle`
    /// (PEM: one or more roots). Lets a fleet share one trust root / join an existing one.
    /// It signs identities of any trust domain.
    pub fn from_files(cert_chain: &Path, key: &Path, root_bundle: &Path) -> Result<Self, CaError> {
        let chain = read_certs(cert_chain)?;
        let key_pair = read_key(key)?;
        let roots = read_certs(root_bundle)?;
        Self::assemble(
            chain,
            key_pair,
            roots,
            None,
            Sources {
                chain: cert_chain,
                key,
                roots: root_bundle,
            },
            format!("signing CA {}", cert_chain.display()),
        )
    }

    /// Like [`Self::from_files`], from PEM in memory (a Kubernetes Secret's `tls.crt`,
    /// `tls.key` and `ca.crt`); `origin` names where it came from in errors (the files are
    /// named `<origin>/tls.crt` and so on). It signs identities of `trust_domain` only.
    pub fn from_pem(
        cert_chain: &[u8],
        key: &[u8],
        root_bundle: &[u8],
        origin: &str,
        trust_domain: &str,
    ) -> Result<Self, CaError> {
        let chain_path = PathBuf::from(format!("{origin}/tls.crt"));
        let key_path = PathBuf::from(format!("{origin}/tls.key"));
        let roots_path = PathBuf::from(format!("{origin}/ca.crt"));
        let chain = parse_certs(cert_chain, &chain_path)?;
        let key_pair = parse_key(key, &key_path)?;
        let roots = parse_certs(root_bundle, &roots_path)?;
        Self::assemble(
            chain,
            key_pair,
            roots,
            Some(trust_domain.to_string()),
            Sources {
                chain: &chain_path,
                key: &key_path,
                roots: &roots_path,
            },
            format!("signing CA {origin}"),
        )
    }

    /// Checks the parts fit together and builds the CA.
    fn assemble(
        chain: Vec<CertificateDer<'static>>,
        key: KeyPair,
        roots: Vec<CertificateDer<'static>>,
        trust_domain: Option<String>,
        files: Sources<'_>,
        description: String,
    ) -> Result<Self, CaError> {
        let signer = &chain[0];
        let (_, x509) =
            x509_parser::parse_x509_certificate(signer).map_err(|e| CaError::BadCertificate {
                path: files.chain.to_path_buf(),
                index: 0,
                detail: e.to_string(),
            })?;
        if !x509.is_ca() {
            return Err(CaError::NotCa {
                path: files.chain.to_path_buf(),
            });
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                cert: files.chain.to_path_buf(),
                key: files.key.to_path_buf(),
            });
        }
        let not_after = x509.validity().not_after.timestamp();
        let signer_not_after = unix_to_system(not_after);
        if signer_not_after <= SystemTime::now() {
            return Err(CaError::Expired {
                path: files.chain.to_path_buf(),
                not_after,
            });
        }
        let signer_has_ski = x509.iter_extensions().any(|ext| {
            matches!(
                ext.parsed_extension(),
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(_)
            )
        });
        let issuer = Issuer::from_ca_cert_der(signer, key).map_err(|source| CaError::Generate {
            what: format!("using {} as an issuer", files.chain.display()),
            source,
        })?;
        let signing_chain = chain.into_iter().filter(|c| !roots.contains(c)).collect();
        let ca = Self {
            issuer,
            signing_chain,
            roots,
            trust_domain,
            signer_not_after,
            signer_has_ski,
            description,
        };
        ca.self_check(&files)?;
        Ok(ca)
    }

    /// Issues a probe certificate and verifies it against the roots, for both TLS roles.
    fn self_check(&self, files: &Sources<'_>) -> Result<(), CaError> {
        let probe = Identity {
            trust_domain: self
                .trust_domain
                .clone()
                .unwrap_or_else(|| PROBE_TRUST_DOMAIN.to_string()),
            namespace: "trellis-system".to_string(),
            service_account: "ca-self-check".to_string(),
        };
        let cert = self.issue(&probe, Duration::from_secs(300))?;
        for usage in [SvidUsage::Client, SvidUsage::Server] {
            verify_svid_chain(&cert.chain, &self.roots, usage, UnixTime::now()).map_err(
                |detail| CaError::ChainUntrusted {
                    chain: files.chain.to_path_buf(),
                    roots: files.roots.to_path_buf(),
                    detail,
                },
            )?;
        }
        Ok(())
    }

    /// Issues an X.509 SVID for `identity`: a fresh ECDSA P-256 key, the identity's SPIFFE ID
    /// as the only (critical) SAN and an empty subject (as Istio does), `notBefore` backdated
    /// by [`CLOCK_SKEW`], `notAfter` = now + `lifetime` (capped at the signing certificate's
    /// expiry, whole seconds), key usage digitalSignature + keyEncipherment, extended key
    /// usage serverAuth + clientAuth.
    pub fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert, CaError> {
        let generate = |what: &str| {
            let what = format!("{what} for {identity}");
            move |source| CaError::Generate { what, source }
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("generating a key"))?;
        let (params, times) = self.svid_params(identity, lifetime)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("signing the certificate"))?;
        let (issued_at, not_before, not_after) = times;
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: self.chain_with(cert.der().clone()),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            issued_at,
        })
    }

    /// Signs a certificate signing request (PEM) for `identity`: the certificate is the one
    /// [`Self::issue`] makes, over the request's public key (whose signature is verified);
    /// everything else the request asks for (subject, SANs, extensions) is ignored. Returns
    /// the chain, leaf first.
    pub fn sign_csr(
        &self,
        identity: &Identity,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CaError::Csr {
                detail: e.to_string(),
            }
        })?;
        let (params, _) = self.svid_params(identity, lifetime)?;
        let request = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request
            .signed_by(&self.issuer)
            .map_err(|source| CaError::Generate {
                what: format!("signing the request for {identity}"),
                source,
            })?;
        Ok(self.chain_with(cert.der().clone()))
    }

    /// A serving certificate for `dns_names` (serverAuth only), with a fresh key: for a
    /// service of the mesh's own, such as the cluster CA's HTTPS endpoint.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let generate = |what: &str| {
            let what = format!("{what} for {dns_names:?}");
            move |source| CaError::Generate { what, source }
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("generating a key"))?;
        let mut params =
            CertificateParams::new(dns_names.to_vec()).map_err(generate("encoding the names"))?;
        let now = SystemTime::now();
        params.not_before =
            floor_to_second(now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH)).into();
        params.not_after = floor_to_second(
            now.checked_add(lifetime)
                .unwrap_or(self.signer_not_after)
                .min(self.signer_not_after),
        )
        .into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = self.signer_has_ski;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("signing the certificate"))?;
        Ok((
            self.chain_with(cert.der().clone()),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    fn chain_with(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        let mut chain = Vec::with_capacity(1 + self.signing_chain.len());
        chain.push(leaf);
        chain.extend(self.signing_chain.iter().cloned());
        chain
    }

    /// The parameters of an SVID for `identity`, and (issued at, notBefore, notAfter).
    #[allow(clippy::type_complexity)]
    fn svid_params(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<(CertificateParams, (SystemTime, SystemTime, SystemTime)), CaError> {
        if let Some(td) = &self.trust_domain
            && *td != identity.trust_domain
        {
            return Err(CaError::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: td.clone(),
            });
        }
        let generate = |what: &str| {
            let what = format!("{what} for {identity}");
            move |source| CaError::Generate { what, source }
        };
        let issued_at = SystemTime::now();
        let not_before = floor_to_second(issued_at.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH));
        let not_after = floor_to_second(
            issued_at
                .checked_add(lifetime)
                .unwrap_or(self.signer_not_after)
                .min(self.signer_not_after),
        );

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = Ia5String::try_from(identity.to_string())
            .map_err(generate("encoding the SPIFFE ID"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = self.signer_has_ski;
        Ok((params, (issued_at, not_before, not_after)))
    }

    /// Trust anchors peers are verified against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
}

/// The TLS role an SVID chain is checked for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SvidUsage {
    Client,
    Server,
}

/// Verifies `chain` (leaf first, then intermediates) up to one of `roots` with webpki, for the
/// extended key usage of `usage`. Names are not checked. Returns webpki's reason on failure.
pub(crate) fn verify_svid_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    usage: SvidUsage,
    now: UnixTime,
) -> Result<(), String> {
    let anchors = roots
        .iter()
        .map(|root| webpki::anchor_from_trusted_cert(root).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unusable root certificate: {e}"))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "empty certificate chain".to_string())?;
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("bad leaf: {e}"))?;
    let eku = match usage {
        SvidUsage::Client => webpki::KeyUsage::client_auth(),
        SvidUsage::Server => webpki::KeyUsage::server_auth(),
    };
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    leaf.verify_for_usage(algs, &anchors, intermediates, now, eku, None, None)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn create_local_root(
    state_dir: &Path,
    key_path: &Path,
    cert_path: &Path,
    trust_domain: &str,
) -> Result<(), CaError> {
    fs::create_dir_all(state_dir).map_err(|source| CaError::Write {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let generate = |what: &str| {
        let what = format!("{what} for the local CA in {}", state_dir.display());
        move |source| CaError::Generate { what, source }
    };
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("generating the key"))?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    // A per-root suffix (from its key) tells roots of different nodes apart in a bundle.
    let key_id: String = params
        .key_identifier(&key)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, trust_domain);
    name.push(
        DnType::CommonName,
        format!("Trellis local root CA {key_id}"),
    );
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = floor_to_second(now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH)).into();
    params.not_after = floor_to_second(now + LOCAL_ROOT_LIFETIME).into();
    let cert = params
        .self_signed(&key)
        .map_err(generate("self-signing the root"))?;
    // The key first: a crash in between leaves a key without a certificate, which
    // load_or_create reports rather than silently replacing the trust root.
    write_file_atomically(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file_atomically(cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %state_dir.display(), trust_domain, "created a local root CA");
    Ok(())
}

/// Writes `path` through a temporary file in the same directory, created with `mode`, then
/// renames it into place.
fn write_file_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}

fn warn_if_key_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "CA private key is accessible to group or others; it should be mode 0600"
        );
    }
}

fn read_pem_file(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every CERTIFICATE block of a PEM file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    parse_certs(&read_pem_file(path)?, path)
}

/// Every CERTIFICATE block of PEM `bytes` (read from `path`), in order; at least one.
fn parse_certs(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Pem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    for (index, cert) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(cert).map_err(|e| CaError::BadCertificate {
            path: path.to_path_buf(),
            index,
            detail: e.to_string(),
        })?;
    }
    Ok(certs)
}

/// The first private key of a PEM file, as a signing key pair.
fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    parse_key(&read_pem_file(path)?, path)
}

/// The first private key of PEM `bytes` (read from `path`), as a signing key pair.
fn parse_key(bytes: &[u8], path: &Path) -> Result<KeyPair, CaError> {
    let key = PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CaError::NoKey {
            path: path.to_path_buf(),
        },
        other => CaError::Pem {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    })?;
    let bad = |detail: String| CaError::BadKey {
        path: path.to_path_buf(),
        detail,
    };
    // ring loads PKCS#8 only: wrap SEC1 and PKCS#1 keys in a PKCS#8 envelope.
    let candidates: Vec<Vec<u8>> = match &key {
        PrivateKeyDer::Pkcs8(k) => vec![k.secret_pkcs8_der().to_vec()],
        PrivateKeyDer::Sec1(k) => [OID_P256, OID_P384]
            .iter()
            .map(|curve| pkcs8::wrap(&pkcs8::ec_algorithm(curve), k.secret_sec1_der()))
            .collect(),
        PrivateKeyDer::Pkcs1(k) => vec![pkcs8::wrap(pkcs8::RSA_ALGORITHM, k.secret_pkcs1_der())],
        _ => return Err(bad("unsupported key format".to_string())),
    };
    let mut last_error = None;
    for der in candidates {
        match KeyPair::try_from(&PrivatePkcs8KeyDer::from(der)) {
            Ok(pair) => return Ok(pair),
            Err(e) => last_error = Some(e),
        }
    }
    Err(bad(match last_error {
        Some(e) => format!("{e} (supported: ECDSA P-256/P-384, Ed25519, RSA)"),
        None => "no key".to_string(),
    }))
}

/// DER of the named-curve OIDs (tag and length included).
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Just enough DER to build a PKCS#8 `PrivateKeyInfo` around a SEC1 or PKCS#1 key.
mod pkcs8 {
    /// `AlgorithmIdentifier { rsaEncryption, NULL }`.
    pub const RSA_ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    /// `id-ecPublicKey`.
    const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

    /// `AlgorithmIdentifier { id-ecPublicKey, curve }`.
    pub fn ec_algorithm(curve_oid: &[u8]) -> Vec<u8> {
        tlv(0x30, &[OID_EC_PUBLIC_KEY, curve_oid].concat())
    }

    /// `PrivateKeyInfo { version 0, algorithm, OCTET STRING key }`.
    pub fn wrap(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
        let version = [0x02, 0x01, 0x00];
        tlv(0x30, &[&version[..], algorithm, &tlv(0x04, key)].concat())
    }

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(content);
        out
    }
}

fn floor_to_second(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Keeps `Arc<CertificateAuthority>` usable across tasks.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Arc<CertificateAuthority>>();
};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn id(ns: &str, sa: &str) -> Identity {
        Identity {
            trust_domain: "cluster.local".to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        }
    }

    /// A local CA in a fresh temporary directory (kept alive by the returned guard).
    pub(crate) fn local_ca() -> (tempfile::TempDir, CertificateAuthority) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca =
            CertificateAuthority::load_or_create(dir.path(), "cluster.local").expect("local CA");
        (dir, ca)
    }

    #[test]
    fn signs_a_csr_for_the_identity_and_the_requests_key_only() {
        let (dir, ca) = local_ca();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = asked
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let chain = ca
            .sign_csr(&id("shop", "web"), &csr, Duration::from_secs(600))
            .expect("signed");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("x509");
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert!(!leaf.is_ca(), "the request's CA:TRUE was ignored");
        let sans = leaf.subject_alternative_name().expect("ext").expect("san");
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["URI(spiffe://cluster.local/ns/shop/sa/web)"]);
        verify_svid_chain(&chain, ca.roots(), SvidUsage::Client, UnixTime::now())
            .expect("verifies");
        let err = ca
            .sign_csr(&id("shop", "web"), "not a csr", Duration::from_secs(600))
            .unwrap_err();
        assert!(matches!(err, CaError::Csr { .. }), "{err}");
        // The same PEM through from_pem is the same CA.
        let cert = fs::read(dir.path().join(CA_CERT_FILE)).expect("cert");
        let key = fs::read(dir.path().join(CA_KEY_FILE)).expect("key");
        let again = CertificateAuthority::from_pem(&cert, &key, &cert, "secret/x", "cluster.local")
            .expect("from pem");
        assert_eq!(again.roots(), ca.roots());
        let err = CertificateAuthority::from_pem(&cert, b"", &cert, "secret/x", "cluster.local")
            .unwrap_err();
        assert!(err.to_string().contains("secret/x/tls.key"), "{err}");
    }

    fn ca_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, cn);
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    /// Writes root -> intermediate plug-in CA files into `dir`; returns (chain, key, roots).
    fn plugin_ca_files(
        dir: &Path,
        sec1_key: bool,
    ) -> (PathBuf, PathBuf, PathBuf, CertificateDer<'static>) {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("root key");
        let root_params = ca_params("test root");
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root_params, root_key);
        let other_root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let other_root = ca_params("unrelated root")
            .self_signed(&other_root_key)
            .expect("root");

        let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("intermediate key");
        let mut inter_params = ca_params("test intermediate");
        inter_params.use_authority_key_identifier_extension = true;
        let inter = inter_params
            .signed_by(&inter_key, &root_issuer)
            .expect("intermediate");

        let chain = dir.join("cert-chain.pem");
        let key = dir.join("ca-key.pem");
        let roots = dir.join("root-cert.pem");
        // Like Istio's cert-chain.pem: the signing cert, then up to the root.
        fs::write(&chain, format!("{}{}", inter.pem(), root.pem())).expect("write");
        let key_pem = if sec1_key {
            let sec1 = test_der::pkcs8_inner_key(inter_key.serialized_der());
            format!(
                "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
                test_der::base64(&sec1)
            )
        } else {
            inter_key.serialize_pem()
        };
        fs::write(&key, key_pem).expect("write");
        fs::write(&roots, format!("{}{}", other_root.pem(), root.pem())).expect("write");
        (chain, key, roots, root.der().clone())
    }

    #[test]
    fn local_ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first =
            CertificateAuthority::load_or_create(dir.path(), "cluster.local").expect("create");
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second =
            CertificateAuthority::load_or_create(dir.path(), "cluster.local").expect("load");
        assert_eq!(first.roots(), second.roots());
        assert_eq!(first.roots().len(), 1);
        // A certificate from the first instance verifies against the second's roots.
        let cert = first
            .issue(&id("shop", "frontend"), Duration::from_secs(60))
            .expect("issue");
        verify_svid_chain(
            &cert.chain,
            second.roots(),
            SvidUsage::Server,
            UnixTime::now(),
        )
        .expect("verifies");
    }

    #[test]
    fn local_ca_half_present_is_an_error_naming_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        CertificateAuthority::load_or_create(dir.path(), "cluster.local").expect("create");
        fs::remove_file(dir.path().join(CA_CERT_FILE)).expect("remove");
        let err = CertificateAuthority::load_or_create(dir.path(), "cluster.local")
            .expect_err("incomplete");
        assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
        assert!(err.to_string().contains(CA_CERT_FILE), "{err}");
    }

    #[test]
    fn issued_svid_has_the_istio_shape() {
        let (_dir, ca) = local_ca();
        let identity = id("shop", "frontend");
        let before = SystemTime::now();
        let cert = ca
            .issue(&identity, Duration::from_secs(3600))
            .expect("issue");
        assert_eq!(cert.identity, identity);
        assert_eq!(cert.chain.len(), 1, "the local root is not sent along");
        assert!(cert.not_before <= before - Duration::from_secs(59));
        assert!(cert.not_after <= before + Duration::from_secs(3601));
        assert!(cert.not_after >= before + Duration::from_secs(3599));
        let (_, x509) = x509_parser::parse_x509_certificate(&cert.chain[0]).expect("parse");
        assert!(!x509.is_ca());
        let sans = x509
            .subject_alternative_name()
            .expect("san ok")
            .expect("san present");
        assert!(sans.critical, "empty subject makes the SAN critical");
        let uris: Vec<_> = sans
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(uris, vec![format!("URI({identity})")]);
        let eku = x509
            .extended_key_usage()
            .expect("eku ok")
            .expect("eku present")
            .value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = x509.key_usage().expect("ku ok").expect("ku present").value;
        assert!(ku.digital_signature());
        assert_eq!(
            x509.validity().not_after.timestamp(),
            cert.not_after
                .duration_since(UNIX_EPOCH)
                .expect("epoch")
                .as_secs() as i64
        );
        // The key in the struct belongs to the certificate.
        let key = KeyPair::try_from(&cert.key).expect("pkcs8 key");
        assert_eq!(
            key.public_key_raw(),
            x509.public_key().subject_public_key.data.as_ref()
        );
    }

    #[test]
    fn local_ca_refuses_other_trust_domains() {
        let (_dir, ca) = local_ca();
        let mut foreign = id("shop", "frontend");
        foreign.trust_domain = "evil.example".to_string();
        let err = ca
            .issue(&foreign, Duration::from_secs(60))
            .expect_err("foreign");
        assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
    }

    #[test]
    fn plugin_ca_with_intermediate_issues_certs_that_verify_against_the_root_bundle() {
        for sec1 in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (chain, key, roots, root) = plugin_ca_files(dir.path(), sec1);
            let ca = CertificateAuthority::from_files(&chain, &key, &roots).expect("plug-in CA");
            assert_eq!(ca.roots().len(), 2);
            let cert = ca
                .issue(&id("shop", "backend"), Duration::from_secs(600))
                .expect("issue");
            assert_eq!(cert.chain.len(), 2, "leaf + intermediate, root left out");
            assert!(!cert.chain.contains(&root));
            for usage in [SvidUsage::Client, SvidUsage::Server] {
                verify_svid_chain(&cert.chain, ca.roots(), usage, UnixTime::now())
                    .expect("verifies");
                verify_svid_chain(
                    &cert.chain,
                    std::slice::from_ref(&root),
                    usage,
                    UnixTime::now(),
                )
                .expect("verifies against the root alone");
            }
            // Without the intermediate the leaf does not chain.
            let err = verify_svid_chain(
                &cert.chain[..1],
                ca.roots(),
                SvidUsage::Client,
                UnixTime::now(),
            )
            .expect_err("no intermediate");
            assert!(err.contains("UnknownIssuer"), "{err}");
        }
    }

    #[test]
    fn plugin_ca_errors_name_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (chain, key, roots, _) = plugin_ca_files(dir.path(), false);
        let other = tempfile::tempdir().expect("tempdir");
        let (_, other_key, other_roots, _) = plugin_ca_files(other.path(), false);

        let err =
            CertificateAuthority::from_files(&chain, &other_key, &roots).expect_err("wrong key");
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
        assert!(
            err.to_string().contains(&*other_key.to_string_lossy()),
            "{err}"
        );

        let err =
            CertificateAuthority::from_files(&chain, &key, &other_roots).expect_err("wrong roots");
        assert!(matches!(err, CaError::ChainUntrusted { .. }), "{err}");
        assert!(
            err.to_string().contains(&*other_roots.to_string_lossy()),
            "{err}"
        );

        let missing = dir.path().join("nope.pem");
        let err = CertificateAuthority::from_files(&missing, &key, &roots).expect_err("missing");
        assert!(
            matches!(err, CaError::Read { .. }) && err.to_string().contains("nope.pem"),
            "{err}"
        );

        let err = CertificateAuthority::from_files(&chain, &roots, &roots).expect_err("no key");
        assert!(matches!(err, CaError::NoKey { .. }), "{err}");

        let err = CertificateAuthority::from_files(&key, &key, &roots).expect_err("no cert");
        assert!(matches!(err, CaError::NoCertificate { .. }), "{err}");

        // A leaf is not a signing CA.
        let ca = CertificateAuthority::from_files(&chain, &key, &roots).expect("CA");
        let leaf = ca
            .issue(&id("a", "b"), Duration::from_secs(60))
            .expect("issue");
        let leaf_cert = dir.path().join("leaf.pem");
        let leaf_key = dir.path().join("leaf-key.pem");
        fs::write(&leaf_cert, test_der::pem("CERTIFICATE", &leaf.chain[0])).expect("write");
        fs::write(
            &leaf_key,
            test_der::pem("PRIVATE KEY", leaf.key.secret_der()),
        )
        .expect("write");
        let err =
            CertificateAuthority::from_files(&leaf_cert, &leaf_key, &roots).expect_err("leaf");
        assert!(matches!(err, CaError::NotCa { .. }), "{err}");
    }

    /// Test-only DER/PEM helpers.
    pub(crate) mod test_der {
        /// The OCTET STRING payload of a PKCS#8 PrivateKeyInfo (the SEC1 key for EC).
        pub fn pkcs8_inner_key(pkcs8: &[u8]) -> Vec<u8> {
            let (_, body, _) = read_tlv(pkcs8);
            let mut rest = body;
            loop {
                let (tag, content, next) = read_tlv(rest);
                if tag == 0x04 {
                    return content.to_vec();
                }
                rest = next;
            }
        }

        fn read_tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
            let tag = input[0];
            let (len, header) = if input[1] < 0x80 {
                (input[1] as usize, 2)
            } else {
                let n = (input[1] & 0x7f) as usize;
                let len = input[2..2 + n]
                    .iter()
                    .fold(0usize, |acc, b| acc << 8 | *b as usize);
                (len, 2 + n)
            };
            (tag, &input[header..header + len], &input[header + len..])
        }

        pub fn pem(label: &str, der: &[u8]) -> String {
            format!(
                "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                base64(der)
            )
        }

        pub fn base64(data: &[u8]) -> String {
            const ALPHABET: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = String::new();
            for chunk in data.chunks(3) {
                let b = [
                    chunk[0],
                    *chunk.get(1).unwrap_or(&0),
                    *chunk.get(2).unwrap_or(&0),
                ];
                let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
                for i in 0..4 {
                    if i <= chunk.len() {
                        out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
                    } else {
                        out.push('=');
                    }
                }
            }
            out.as_bytes()
                .chunks(64)
                .map(|line| String::from_utf8_lossy(line).into_owned())
                .collect::<Vec<_>>()
                .join("\n")
        }
    }
}

//! A deliberately misbehaving HBONE client for bad-input tests.
//!
//! `hbone-probe garbage TARGET`: opens TCP to TARGET (ip:15008), sends bytes that are not
//! TLS, prints `closed` when the server closes the connection (or `open` after 10 s).
//!
//! `hbone-probe connect TARGET AUTHORITY --ca-dir DIR --identity SPIFFE_ID [--header-bytes N]`:
//! signs a workload certificate for SPIFFE_ID with the local CA in DIR (`ca-key.pem`,
//! `ca-cert.pem`, as the agent writes them), opens mTLS (TLS 1.3, ALPN h2) to TARGET, sends
//! `CONNECT AUTHORITY` (with one extra header of N bytes if asked), and prints
//! `status=NNN` or `error=...`. It does not verify the server: it is a probe.
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn usage() -> ! {
    eprintln!(
        "usage: hbone-probe garbage TARGET | connect TARGET AUTHORITY --ca-dir DIR --identity ID [--header-bytes N]"
    );
    std::process::exit(2);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("garbage") => garbage(args.get(1).unwrap_or_else(|| usage())).await,
        Some("connect") => connect(&args[1..]).await,
        _ => usage(),
    };
    match result {
        Ok(line) => println!("{line}"),
        Err(e) => println!("error={e}"),
    }
}

async fn garbage(target: &str) -> Result<String, String> {
    let mut tcp = TcpStream::connect(target)
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: not-tls\r\n\r\n\x00\x01\x02garbage")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    Ok(if read.is_ok() {
        "closed".into()
    } else {
        "open".into()
    })
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

async fn connect(args: &[String]) -> Result<String, String> {
    let (Some(target), Some(authority)) = (args.first(), args.get(1)) else {
        usage()
    };
    let ca_dir = std::path::PathBuf::from(flag(args, "--ca-dir").unwrap_or_else(|| usage()));
    let identity = flag(args, "--identity").unwrap_or_else(|| usage());
    let header_bytes: usize = flag(args, "--header-bytes")
        .map(|n| n.parse().unwrap_or(0))
        .unwrap_or(0);

    let (chain, key) = issue(&ca_dir, identity)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
    .with_client_auth_cert(chain, key)
    .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];

    let tcp = TcpStream::connect(target.as_str())
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            ServerName::try_from("probe").map_err(|e| e.to_string())?,
            tcp,
        )
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
        .await
        .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.as_str());
    if header_bytes > 0 {
        request = request.header("x-padding", "a".repeat(header_bytes));
    }
    let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| "timed out waiting for a response".to_string())?
        .map_err(|e| format!("request: {e}"))?;
    Ok(format!("status={}", response.status().as_u16()))
}

/// Signs a workload certificate for `identity` with the CA in `ca_dir`.
fn issue(
    ca_dir: &std::path::Path,
    identity: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let read =
        |name: &str| std::fs::read_to_string(ca_dir.join(name)).map_err(|e| format!("{name}: {e}"));
    let ca_key = rcgen::KeyPair::from_pem(&read("ca-key.pem")?).map_err(|e| e.to_string())?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read("ca-cert.pem")?, ca_key)
        .map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?,
    )];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    Ok((
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    ))
}

#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

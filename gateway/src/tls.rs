//! TLS with rustls, TLS 1.2 and 1.3 only: the proxy listener's server configuration (ALPN
//! `h2` then `http/1.1`) with certificates reloaded from disk without a restart, the admin
//! API's client-certificate-verifying (mTLS) server configuration, and the client
//! configurations for upstream TLS per cell.
//!
//! A certificate change is picked up by [`CertReloader::reload`] (the server calls it from
//! its file watch): the new pair is parsed and checked (certificate and key must match)
//! off the request path and swapped in whole; new handshakes get it, established
//! connections keep theirs. A bad new pair is refused with a log line and the previous one
//! keeps serving. This module never reads a file during a handshake and never logs key
//! material.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use cellgate_config::UpstreamTlsCfg;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Why a TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {message}")]
    Read {
        /// File.
        path: String,
        /// Why.
        message: String,
    },
    /// The certificate or key is not usable.
    #[error("{0}")]
    Invalid(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read(path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn parse_certs(pem: &[u8], path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid(format!("{path}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!("{path}: no certificate in PEM")));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| TlsError::Invalid(format!("{path}: {e}")))?
        .ok_or_else(|| TlsError::Invalid(format!("{path}: no private key in PEM")))
}

/// A certificate chain and its key, parsed and checked to belong together.
fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &str,
    key_path: &str,
) -> Result<CertifiedKey, TlsError> {
    let certs = parse_certs(cert_pem, cert_path)?;
    let key = parse_key(key_pem, key_path)?;
    CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| TlsError::Invalid(format!("{cert_path} / {key_path}: {e}")))
}

fn roots(path: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(&read(path)?, path)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Invalid(format!("{path}: {e}")))?;
    }
    Ok(roots)
}

/// A server configuration from PEM certificate-chain and key files (no reload).
pub fn server_config(cert_path: &str, key_path: &str) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(reloading_server_config(cert_path, key_path)?.0)
}

/// A server configuration whose certificate comes from a [`CertReloader`]: reload the
/// reloader and new handshakes use the new certificate.
pub fn reloading_server_config(
    cert_path: &str,
    key_path: &str,
) -> Result<(Arc<ServerConfig>, Arc<CertReloader>), TlsError> {
    let reloader = Arc::new(CertReloader::load(cert_path, key_path)?);
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&reloader) as Arc<dyn ResolvesServerCert>);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), reloader))
}

/// The admin API's server configuration: TLS 1.2/1.3 with the certificate in `cert_path`
/// and `key_path`, and client certificates chaining to a CA in `client_ca_path` (mTLS):
/// required at the handshake, or, with `optional`, verified when presented (the admin
/// router then refuses `/admin/*` to a connection without one). ALPN `h2` and `http/1.1`.
///
/// The server certificate comes from the returned [`CertReloader`] (watched like the proxy
/// listener's); the client CA is read once.
pub fn admin_server_config(
    cert_path: &str,
    key_path: &str,
    client_ca_path: &str,
    optional: bool,
) -> Result<(Arc<ServerConfig>, Arc<CertReloader>), TlsError> {
    let reloader = Arc::new(CertReloader::load(cert_path, key_path)?);
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca_path)?), provider());
    if optional {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier
        .build()
        .map_err(|e| TlsError::Invalid(format!("{client_ca_path}: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::clone(&reloader) as Arc<dyn ResolvesServerCert>);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), reloader))
}

/// `cellgate ctl`'s client configuration for an admin API served over TLS: server
/// certificates must chain to a CA in `ca_path`; the certificate and key of `client`, when
/// given, are presented for mTLS. ALPN `http/1.1`.
pub fn admin_client_config(
    ca_path: &str,
    client: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_root_certificates(roots(ca_path)?);
    let mut cfg = match client {
        Some((cert_path, key_path)) => {
            let certs = parse_certs(&read(cert_path)?, cert_path)?;
            let key = parse_key(&read(key_path)?, key_path)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError::Invalid(format!("{cert_path} / {key_path}: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A listener's current certificate (the proxy's TLS listener, the admin API's), swapped
/// whole on reload.
pub struct CertReloader {
    cert_path: String,
    key_path: String,
    current: ArcSwap<CertifiedKey>,
    /// Digest of the files last seen (only the file watch touches it).
    seen: Mutex<u64>,
}

impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish()
    }
}

/// What one [`CertReloader::reload`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum CertReload {
    /// The files did not change.
    Unchanged,
    /// A new certificate serves new connections.
    Applied,
    /// The new files were refused; the previous certificate keeps serving.
    Rejected(String),
}

fn digest(a: &[u8], b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.hash(&mut h);
    b.hash(&mut h);
    h.finish()
}

impl CertReloader {
    /// Load the pair now; an error if it is not usable.
    pub fn load(cert_path: &str, key_path: &str) -> Result<Self, TlsError> {
        let (c, k) = (read(cert_path)?, read(key_path)?);
        let ck = certified_key(&c, &k, cert_path, key_path)?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: ArcSwap::from_pointee(ck),
            seen: Mutex::new(digest(&c, &k)),
        })
    }

    /// Re-read the files; when they changed and are a valid pair, serve them to new
    /// connections. Blocking file I/O: call it off the request path.
    pub fn reload(&self) -> CertReload {
        let (c, k) = match (read(&self.cert_path), read(&self.key_path)) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => return CertReload::Rejected(e.to_string()),
        };
        let d = digest(&c, &k);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == d {
            return CertReload::Unchanged;
        }
        match certified_key(&c, &k, &self.cert_path, &self.key_path) {
            Ok(ck) => {
                *seen = d;
                self.current.store(Arc::new(ck));
                CertReload::Applied
            }
            // `seen` stays: the same bad pair is reported again on the next look, and a
            // fixed pair is picked up as soon as it lands.
            Err(e) => CertReload::Rejected(e.to_string()),
        }
    }

    /// The certificate files.
    pub fn paths(&self) -> (&str, &str) {
        (&self.cert_path, &self.key_path)
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Client configurations to one cell's instances: one per ALPN (`http/1.1`, `h2`), and the
/// name to verify (when not taken from each instance's address).
#[derive(Clone)]
pub struct UpstreamTls {
    /// Offers ALPN `http/1.1`.
    pub h1: tokio_rustls::TlsConnector,
    /// Offers ALPN `h2`.
    pub h2: tokio_rustls::TlsConnector,
    /// Fixed SNI / verified name, if configured.
    pub server_name: Option<ServerName<'static>>,
    /// Otherwise: the host name of each instance configured by name, by its address.
    pub names: std::collections::HashMap<std::net::SocketAddr, ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl UpstreamTls {
    /// Build from a cell's `tls` section.
    pub fn from_config(cfg: &UpstreamTlsCfg) -> Result<Self, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let base = if cfg.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth()
        } else {
            let path = cfg.ca_file.as_deref().ok_or_else(|| {
                TlsError::Invalid("ca_file is required unless insecure_skip_verify".into())
            })?;
            builder
                .with_root_certificates(roots(path)?)
                .with_no_client_auth()
        };
        let with_alpn = |p: &[u8]| {
            let mut c = base.clone();
            c.alpn_protocols = vec![p.to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(c))
        };
        let server_name = match &cfg.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| TlsError::Invalid(format!("server_name {n:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(Self {
            h1: with_alpn(b"http/1.1"),
            h2: with_alpn(b"h2"),
            server_name,
            names: std::collections::HashMap::new(),
        })
    }

    /// The name to send and verify for an instance at `addr`: `server_name`, else the host
    /// name its `addr` was configured with, else its IP address.
    pub fn name_for(&self, addr: std::net::SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .or_else(|| self.names.get(&addr).cloned())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }
}

/// Upstream TLS of every cell that has it, by cell id. Built with the routing table (start
/// and reload) and read once per request to a TLS cell.
#[derive(Debug, Default)]
pub struct UpstreamTlsMap(std::collections::HashMap<String, UpstreamTls>);

impl UpstreamTlsMap {
    /// Build for every cell of `cfg` with a `tls` section.
    pub fn from_config(cfg: &cellgate_config::Config) -> Result<Self, TlsError> {
        let mut m = std::collections::HashMap::new();
        for c in &cfg.cells {
            if let Some(t) = &c.tls {
                if t.insecure_skip_verify {
                    tracing::warn!(cell = %c.id, "upstream TLS certificates are not verified (insecure_skip_verify)");
                }
                let mut u = UpstreamTls::from_config(t)
                    .map_err(|e| TlsError::Invalid(format!("cell {}: {e}", c.id)))?;
                // Instances configured by host name are verified against that name.
                for inst in &c.instances {
                    let Some((host, _)) = inst.addr.rsplit_once(':') else {
                        continue;
                    };
                    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
                        continue;
                    }
                    let (Ok(addr), Ok(name)) = (
                        cellgate_config::instance_addr(&inst.addr),
                        ServerName::try_from(host.to_owned()),
                    ) else {
                        continue;
                    };
                    u.names.insert(addr, name);
                }
                m.insert(c.id.clone(), u);
            }
        }
        Ok(Self(m))
    }

    /// TLS settings of cell `id`, if it has them.
    pub fn get(&self, id: &str) -> Option<&UpstreamTls> {
        if self.0.is_empty() {
            None
        } else {
            self.0.get(id)
        }
    }
}

/// Accepts any server certificate (`insecure_skip_verify`), still checking signatures.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

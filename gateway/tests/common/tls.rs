//! Certificates for the TLS tests, made with rcgen: self-signed leaves, a CA and leaves it
//! signs; and a rustls acceptor serving one of them with the given ALPN protocols.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;

/// A certificate and its key, as PEM, with the certificate's DER.
pub struct Pem {
    pub cert: String,
    pub key: String,
    pub der: CertificateDer<'static>,
}

/// A self-signed certificate for `name`.
pub fn self_signed(name: &str) -> Pem {
    let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    Pem {
        cert: c.cert.pem(),
        key: c.signing_key.serialize_pem(),
        der: c.cert.der().clone(),
    }
}

/// A certificate authority: what signs leaves, and its certificate as PEM.
pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A new CA named `name`.
pub fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_owned());
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A certificate for `name` signed by `ca`.
pub fn leaf(ca: &Ca, name: &str) -> Pem {
    let p = CertificateParams::new(vec![name.to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
        der: cert.der().clone(),
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server presenting `cert`, offering the ALPN protocols `alpn`.
pub fn acceptor(cert: &Pem, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let key = rustls_pemfile::private_key(&mut cert.key.as_bytes())
        .unwrap()
        .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], key)
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

//! Throwaway TLS material for tests: a private CA, a server certificate for
//! `localhost`/`127.0.0.1`, and client identities for mutual TLS.
//!
//! A real CA (rather than a bare self-signed leaf) is generated because that
//! is what clients are configured with in production: they trust a CA file,
//! and the chain-building path of the client is what a test should exercise.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::TestkitError;

/// A private CA plus a server certificate it signed, valid for `localhost`
/// and `127.0.0.1`.
///
/// Cheap to clone. `Debug` shows no key material.
#[derive(Clone)]
pub struct TestCertificate {
    inner: Arc<Inner>,
}

struct Inner {
    ca_params: CertificateParams,
    ca_key: KeyPair,
    ca_pem: String,
    server_cert_der: CertificateDer<'static>,
    server_cert_pem: String,
    server_key_der: Vec<u8>,
}

impl fmt::Debug for TestCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCertificate")
            .field("server_names", &["localhost", "127.0.0.1"])
            .finish_non_exhaustive()
    }
}

fn tls_err(what: &str) -> impl FnOnce(rcgen::Error) -> TestkitError + '_ {
    move |e| TestkitError::Tls(format!("{what}: {e}"))
}

impl TestCertificate {
    /// Generates a fresh CA and a server leaf for `localhost` and
    /// `127.0.0.1` signed by it. Takes a few milliseconds (ECDSA P-256).
    pub fn generate() -> Result<Self, TestkitError> {
        let ca_key = KeyPair::generate().map_err(tls_err("generating the CA key"))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())
            .map_err(tls_err("building CA parameters"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "connector-testkit CA");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(tls_err("self-signing the CA"))?;

        let server_key = KeyPair::generate().map_err(tls_err("generating the server key"))?;
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .map_err(tls_err("building server parameters"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "localhost");
        server_params.distinguished_name = dn;
        server_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .map_err(tls_err("signing the server certificate"))?;

        Ok(Self {
            inner: Arc::new(Inner {
                ca_pem: ca_cert.pem(),
                server_cert_pem: server_cert.pem(),
                server_cert_der: server_cert.der().clone(),
                server_key_der: server_key.serialize_der(),
                ca_params,
                ca_key,
            }),
        })
    }

    /// The CA certificate (PEM) a client must trust to reach the servers.
    pub fn ca_pem(&self) -> String {
        self.inner.ca_pem.clone()
    }

    /// The server's leaf certificate (PEM), for tests that pin it.
    pub fn server_cert_pem(&self) -> String {
        self.inner.server_cert_pem.clone()
    }

    /// Writes the CA certificate to `dir/testkit-ca.pem` and returns the
    /// path, for clients configured with a CA *file* (as the SDK's
    /// `TlsOptions::ca_cert` is).
    pub fn write_ca_pem(&self, dir: &Path) -> Result<PathBuf, TestkitError> {
        let path = dir.join("testkit-ca.pem");
        std::fs::write(&path, self.inner.ca_pem.as_bytes())?;
        Ok(path)
    }

    /// A client certificate and key (both PEM) for `name`, signed by the same
    /// CA, for mutual-TLS tests. `name` becomes the common name and a DNS
    /// subject alternative name, so it must be a valid DNS-ish label.
    pub fn generate_client_identity(&self, name: &str) -> Result<(String, String), TestkitError> {
        let key = KeyPair::generate().map_err(tls_err("generating a client key"))?;
        let mut params = CertificateParams::new(vec![name.to_string()])
            .map_err(tls_err("building client parameters"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = Issuer::from_params(&self.inner.ca_params, &self.inner.ca_key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(tls_err("signing the client certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A rustls server configuration presenting the leaf, with `alpn` as the
    /// offered application protocols (`h2` for gRPC, `http/1.1` for
    /// WebSocket). The ring provider is named explicitly so the config does
    /// not depend on a process-wide default provider being installed.
    ///
    /// With `require_client_cert`, the handshake fails unless the client
    /// presents a certificate signed by this CA (mutual TLS).
    pub(crate) fn server_config(
        &self,
        alpn: &[&[u8]],
        require_client_cert: bool,
    ) -> Result<Arc<rustls::ServerConfig>, TestkitError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.inner.server_key_der.clone()));
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TestkitError::Tls(format!("protocol versions: {e}")))?;
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            let ca =
                rustls::pki_types::CertificateDer::from_pem_slice(self.inner.ca_pem.as_bytes())
                    .map_err(|e| TestkitError::Tls(format!("CA certificate: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| TestkitError::Tls(format!("CA certificate: {e}")))?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TestkitError::Tls(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(vec![self.inner.server_cert_der.clone()], key)
            .map_err(|e| TestkitError::Tls(format!("server certificate: {e}")))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

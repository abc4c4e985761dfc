//! The rustls client configuration for `wss://`, built once per mux.

use std::path::Path;
use std::sync::Arc;

use connector_core::{trust_anchors, ConnectorError, TlsOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::error::WsError;

/// What a mux needs to start TLS on every socket.
#[derive(Clone)]
pub(crate) struct TlsSetup {
    pub(crate) connector: TlsConnector,
    pub(crate) server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Builds the TLS setup for `host`: the trust anchors of
/// [`connector_core::trust_anchors`] (the rule the gRPC transport follows
/// too: system roots and/or the CA file, never bundled roots) and the client
/// identity for mutual TLS when one is configured.
///
/// Reads files: call it off the async workers.
pub(crate) fn setup(host: &str, options: &TlsOptions) -> Result<TlsSetup, WsError> {
    let server_name = ServerName::try_from(host.to_string()).map_err(|e| {
        WsError::Config(format!("host {host:?} is not a valid TLS server name: {e}"))
    })?;

    let roots = RootCertStore::from_iter(trust_anchors(options).map_err(|e| match e {
        ConnectorError::InvalidConfig(message) => WsError::Config(message),
        other => WsError::Config(other.to_string()),
    })?);

    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| WsError::Config(format!("TLS provider: {e}")))?
            .with_root_certificates(roots);
    let mut config = match (&options.client_cert, &options.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "client_cert")?;
            let key_der = read_key(key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                WsError::Config(format!(
                    "client certificate {} and key {} do not form a usable identity: {e}",
                    cert.display(),
                    key.display()
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(WsError::Config(
                "client_cert and client_key go together".into(),
            ))
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsSetup {
        connector: TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, WsError> {
    std::fs::read(path)
        .map_err(|e| WsError::Config(format!("{what} {}: cannot read: {e}", path.display())))
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, WsError> {
    let pem = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WsError::Config(format!("{what} {}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(WsError::Config(format!(
            "{what} {}: no CERTIFICATE block found",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, WsError> {
    let pem = read_file(path, "client_key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        WsError::Config(format!(
            "client_key {}: no usable private key: {e}",
            path.display()
        ))
    })
}

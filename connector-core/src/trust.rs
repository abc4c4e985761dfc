//! Which CA certificates a TLS connection trusts: one rule, written once,
//! for both transports (gRPC hands the anchors to tonic, WebSocket to
//! rustls directly).
//!
//! The rule:
//!
//! | `ca_cert` | `trust_only_ca` | system store | trusted |
//! |---|---|---|---|
//! | none | — | has roots | the system roots |
//! | none | — | empty | nothing: a configuration error that says how to fix it |
//! | file | off | has roots | the system roots and the file's CAs |
//! | file | off | empty | the file's CAs (with a warning) |
//! | file | on | not read | the file's CAs only |
//!
//! No bundled roots, on either transport. A compiled-in snapshot (webpki
//! roots) goes stale with every release and would quietly trust a CA the
//! operator removed from the machine's store; on a machine without a store
//! (a bare container) it would hide a misconfiguration instead of naming it.
//! The machine's store (`/etc/ssl/certs`, or `SSL_CERT_FILE` /
//! `SSL_CERT_DIR`, as `rustls-native-certs` reads them) is the operator's
//! to manage, and a private control plane is trusted with `ca_cert`, alone
//! with `trust_only_ca`.
//!
//! Certificates are parsed with `rustls-webpki`, the parser rustls itself
//! uses, without a crypto provider: this module needs no TLS stack, so
//! `connector-core` stays free of one.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::config::TlsOptions;
use crate::error::ConnectorError;

/// The trust anchors for a `grpcs://` or `wss://` connection under
/// `options`. Reads the CA file and (unless `trust_only_ca`) the system
/// store: call it once per mux, off the async workers if that matters, never
/// per connection.
///
/// | `ca_cert` | `trust_only_ca` | system store | trusted |
/// |---|---|---|---|
/// | none | — | has roots | the system roots |
/// | none | — | empty | nothing: a configuration error that says how to fix it |
/// | file | off | has roots | the system roots and the file's CAs |
/// | file | off | empty | the file's CAs (with a warning) |
/// | file | on | not read | the file's CAs only |
///
/// No bundled roots: a compiled-in list goes stale and would trust a CA the
/// operator removed from the machine's store.
///
/// Errors are [`ConnectorError::InvalidConfig`] naming the file or the
/// missing store.
pub fn trust_anchors(options: &TlsOptions) -> Result<Vec<TrustAnchor<'static>>, ConnectorError> {
    let extra = match &options.ca_cert {
        Some(path) => Some(read_ca_file(path)?),
        None => None,
    };
    if options.trust_only_ca && extra.is_none() {
        return Err(ConnectorError::InvalidConfig(
            "trust_only_ca is set but no ca_cert is: name the CA file to trust".into(),
        ));
    }
    let system = (!options.trust_only_ca).then(load_system_roots);
    select(system, extra)
}

/// The rule itself, on certificates already read (unit-tested without
/// touching the machine's store).
fn select(
    system: Option<Vec<CertificateDer<'static>>>,
    extra: Option<Vec<TrustAnchor<'static>>>,
) -> Result<Vec<TrustAnchor<'static>>, ConnectorError> {
    let mut anchors = Vec::new();
    if let Some(system) = system {
        let offered = system.len();
        anchors.extend(system.iter().filter_map(|cert| {
            webpki::anchor_from_trusted_cert(cert)
                .ok()
                .map(|a| a.to_owned())
        }));
        tracing::debug!(
            added = anchors.len(),
            ignored = offered - anchors.len(),
            "system CA certificates loaded"
        );
        if anchors.is_empty() {
            if extra.is_none() {
                return Err(ConnectorError::InvalidConfig(
                    "no system CA certificates were found (install the ca-certificates package, \
                     or point SSL_CERT_FILE or SSL_CERT_DIR at a CA bundle) and no ca_cert is \
                     set: set ca_cert to the CA that signed the server's certificate"
                        .into(),
                ));
            }
            tracing::warn!("no system CA certificates were found; trusting only ca_cert");
        }
    }
    anchors.extend(extra.into_iter().flatten());
    Ok(anchors)
}

/// The system store. Errors for single files are logged, not fatal: a
/// store with one unreadable file still has the others.
fn load_system_roots() -> Vec<CertificateDer<'static>> {
    let result = rustls_native_certs::load_native_certs();
    for err in &result.errors {
        tracing::debug!(error = %err, "could not load some system CA certificates");
    }
    result.certs
}

/// Reads a PEM file of CA certificates: at least one, each usable as a
/// trust anchor (a bad one is an error, never skipped).
fn read_ca_file(path: &Path) -> Result<Vec<TrustAnchor<'static>>, ConnectorError> {
    let bad =
        |why: String| ConnectorError::InvalidConfig(format!("ca_cert {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read the file: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no CERTIFICATE block found; expected a PEM file of CA certificates".into(),
        ));
    }
    certs
        .iter()
        .enumerate()
        .map(|(i, cert)| {
            webpki::anchor_from_trusted_cert(cert)
                .map(|a| a.to_owned())
                .map_err(|e| {
                    bad(format!(
                        "certificate #{} is not a usable CA certificate: {e}",
                        i + 1
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_file(name: &str, pem: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("connector-core-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write");
        path
    }

    fn testkit_ca() -> Vec<TrustAnchor<'static>> {
        let cert = connector_testkit::TestCertificate::generate().expect("cert");
        read_ca_file(&ca_file("ok.pem", &cert.ca_pem())).expect("a good CA file")
    }

    fn system_like() -> Vec<CertificateDer<'static>> {
        let pem = connector_testkit::TestCertificate::generate()
            .expect("cert")
            .ca_pem();
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("pem")
    }

    #[test]
    fn system_roots_and_the_extra_ca_are_both_trusted() {
        let got = select(Some(system_like()), Some(testkit_ca())).expect("ok");
        assert_eq!(got.len(), 2);
        let got = select(Some(system_like()), None).expect("ok");
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn no_system_roots_and_no_ca_is_a_clear_config_error() {
        let err = select(Some(Vec::new()), None).expect_err("nothing to trust");
        assert!(err.is_config(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("no system CA certificates") && text.contains("ca_cert"),
            "{text}"
        );
        // Unparsable system certificates count as none.
        let junk = vec![CertificateDer::from(vec![1u8, 2, 3])];
        assert!(select(Some(junk), None).is_err());
    }

    #[test]
    fn no_system_roots_with_a_ca_trusts_the_ca_alone() {
        let ca = testkit_ca();
        let got = select(Some(Vec::new()), Some(ca.clone())).expect("ok");
        assert_eq!(got, ca);
    }

    #[test]
    fn trust_only_ca_never_reads_the_system_store() {
        let ca = testkit_ca();
        assert_eq!(select(None, Some(ca.clone())).expect("ok"), ca);

        let mut options = TlsOptions {
            trust_only_ca: true,
            ..TlsOptions::default()
        };
        let err = trust_anchors(&options).expect_err("no CA named");
        assert!(err.to_string().contains("trust_only_ca"), "{err}");
        let cert = connector_testkit::TestCertificate::generate().expect("cert");
        options.ca_cert = Some(ca_file("only.pem", &cert.ca_pem()));
        assert_eq!(trust_anchors(&options).expect("ok").len(), 1);
    }

    #[test]
    fn bad_ca_files_name_the_file_and_the_fault() {
        let missing = std::path::Path::new("/definitely/not/here/ca.pem");
        let err = read_ca_file(missing).expect_err("missing");
        assert!(
            err.to_string().contains("/definitely/not/here/ca.pem"),
            "{err}"
        );
        let err = read_ca_file(&ca_file("junk.pem", "not a certificate\n")).expect_err("junk");
        assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");
        let err = read_ca_file(&ca_file(
            "bad-der.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ))
        .expect_err("bad DER");
        assert!(err.to_string().contains("certificate #1"), "{err}");
    }
}

//! How one channel (one HTTP/2 connection) is configured and dialled.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use connector_core::{
    sanitize_text, trust_anchors, ConnectorError, MultiTransportOptions, Proxy, TlsOptions,
    TransportKind, MAX_PEER_TEXT_CHARS,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::connector::{Dialer, Route, TlsSetup};
use crate::error::{dial_error, Cause, GrpcError};
use crate::settings::{PeerSettings, PrefaceFault};

/// HTTP/2 keepalive ping period.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A keepalive ping unanswered this long fails the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// hyper's default stream window (2 MiB), set explicitly so the connection
/// window below can be computed from it.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// hyper's default connection window (5 MiB), the floor.
const MIN_CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The largest window HTTP/2 allows.
const MAX_WINDOW: u32 = (1 << 31) - 1;

/// The connection window for `streams` streams of [`STREAM_WINDOW`] each:
/// every stream can use its whole window at once, so one stream whose
/// reader is slow never stalls the others on the connection-level window.
pub(crate) fn connection_window(streams: usize) -> u32 {
    let wanted = (streams as u64).saturating_mul(u64::from(STREAM_WINDOW));
    let wanted = u32::try_from(wanted.min(u64::from(MAX_WINDOW))).unwrap_or(MAX_WINDOW);
    wanted.max(MIN_CONNECTION_WINDOW)
}

/// Everything needed to dial channels to one server, validated once.
#[derive(Debug, Clone)]
pub(crate) struct ChannelFactory {
    /// Always `http://`: TLS is the connector's (see [`crate::connector`]);
    /// with TLS its origin is `https://`, so requests say `:scheme https`.
    endpoint: Endpoint,
    target: String,
    connect_timeout: Duration,
    route: Arc<Route>,
}

/// A dialled channel and what its server said about its stream limit.
#[derive(Debug)]
pub(crate) struct Dialled {
    pub(crate) channel: Channel,
    pub(crate) settings: Arc<PeerSettings>,
}

impl ChannelFactory {
    /// Validates the options (scheme, TLS files, proxy) and builds the
    /// endpoint. Makes no connection.
    ///
    /// The proxy is resolved here, once: the environment is read when the
    /// mux is made, not on every dial, so every channel of a mux goes the
    /// same way.
    pub(crate) fn new(options: &MultiTransportOptions) -> Result<Self, GrpcError> {
        let ep = &options.endpoint;
        if ep.kind != TransportKind::Grpc {
            return Err(GrpcError::config(format!(
                "url {ep} is not a gRPC URL; the gRPC transport takes grpc:// or grpcs://"
            )));
        }
        let target = ep.to_string();
        let uri = format!("http://{}", ep.authority());
        let connect_timeout = options.connect_timeout;
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| GrpcError::config(format!("url {target}: {e}")))?
            .user_agent(concat!("connector-grpc/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| GrpcError::config(format!("user agent: {e}")))?
            .connect_timeout(connect_timeout)
            // Keepalive pings only while streams are open. A gRPC server with
            // the default ping policy (grpc-core/grpc-go: at most one ping
            // per 5 minutes while no data flows, none without streams)
            // answers pings that do not follow data with a strike and, after
            // two, a GOAWAY `too_many_pings`. With `while_idle(false)` an
            // idle connection sends no pings at all; while streams are open
            // every stream carries heartbeats and acks (30 s by default)
            // both ways, so the server always sent data since our last ping
            // and never counts a strike. The pings still catch a dead peer
            // that TCP would not notice for minutes.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(false)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(connection_window(options.max_streams_per_channel));
        let (endpoint, tls) = if ep.tls {
            let origin = format!("https://{}", ep.authority())
                .parse()
                .map_err(|e| GrpcError::config(format!("url {target}: {e}")))?;
            (
                endpoint.origin(origin),
                Some(tls_setup(&ep.host, &options.tls)?),
            )
        } else {
            if options.tls != TlsOptions::default() {
                tracing::warn!(
                    server = %target,
                    "TLS files are configured but the URL is grpc:// (plaintext); they are not used"
                );
            }
            (endpoint, None)
        };
        let proxy = options.resolve_proxy().map_err(|e| match e {
            ConnectorError::InvalidConfig(message) => GrpcError::config(message),
            other => GrpcError::config(other.to_string()),
        })?;
        let proxy = proxy.map(|p: Proxy| {
            tracing::debug!(server = %target, proxy = %p.authority(), "connecting through an HTTP proxy");
            Arc::new(p)
        });
        Ok(Self {
            endpoint,
            target,
            connect_timeout,
            route: Arc::new(Route {
                authority: Arc::from(ep.authority()),
                proxy,
                tls,
            }),
        })
    }

    /// The server, as `grpc[s]://host:port`, for logs and errors.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// The dial and response-headers deadline.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// True when connections go through an HTTP CONNECT proxy.
    #[cfg(test)]
    fn proxied(&self) -> bool {
        self.route.proxy.is_some()
    }

    /// Dials one HTTP/2 connection (TCP, the proxy's tunnel if any, TLS,
    /// HTTP/2 preface) and waits for the server's first SETTINGS frame, all
    /// bounded by the connect timeout. A server sends SETTINGS first, so
    /// the wait is one round trip; a server that sends none in time still
    /// gives a channel, whose limit is then learned by the stall fallback.
    pub(crate) async fn dial(&self) -> Result<Dialled, GrpcError> {
        let settings = PeerSettings::new();
        let dialer = Dialer::new(Arc::clone(&self.route), Arc::clone(&settings));
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let channel =
            match tokio::time::timeout_at(deadline, self.endpoint.connect_with_connector(dialer))
                .await
            {
                Ok(Ok(channel)) => channel,
                Ok(Err(e)) => return Err(dial_error(&self.target, self.connect_timeout, e)),
                Err(_) => {
                    return Err(GrpcError::timeout(
                        format!("connecting to {}", self.target),
                        self.connect_timeout,
                    ))
                }
            };
        match tokio::time::timeout_at(deadline, settings.wait_seen()).await {
            Ok(Ok(())) => {}
            Ok(Err(fault)) => return Err(preface_error(&self.target, fault)),
            Err(_) => tracing::debug!(
                server = %self.target,
                "no SETTINGS from the server within the connect timeout"
            ),
        }
        Ok(Dialled { channel, settings })
    }
}

/// The error of a dial whose server preface is not HTTP/2. A first frame
/// that is not SETTINGS carries h2's reason, so it sorts as the HTTP/2
/// refusal it is ([`GrpcError::http2_refusal`]); a connection that ended
/// first is a closed one, with the read error if there was one (a TLS
/// alert refusing our client certificate arrives this way).
fn preface_error(target: &str, fault: PrefaceFault) -> GrpcError {
    match fault {
        PrefaceFault::NotSettings { head, reason } => {
            let seen = String::from_utf8_lossy(&head).escape_debug().to_string();
            GrpcError::Protocol {
                message: format!(
                    "{target} does not speak HTTP/2: its first frame is not SETTINGS \
                     ({reason:?}); it began with \"{}\"",
                    sanitize_text(&seen, MAX_PEER_TEXT_CHARS)
                ),
                source: Some(Arc::new(h2::Error::from(reason))),
            }
        }
        PrefaceFault::Closed(None) => GrpcError::Closed {
            message: format!("{target} ended the connection before its HTTP/2 SETTINGS"),
            source: None,
        },
        PrefaceFault::Closed(Some(failure)) => GrpcError::Closed {
            message: format!(
                "reading from {target} before its HTTP/2 SETTINGS: {}",
                failure.message
            ),
            source: failure.tls.map(|e| Arc::new(e) as Cause),
        },
    }
}

/// Reads a PEM file named by option `what`, with the path in any error.
fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>, GrpcError> {
    std::fs::read(path).map_err(|e| {
        GrpcError::config(format!(
            "{what} {}: cannot read the file: {e}",
            path.display()
        ))
    })
}

/// Reads and checks a client identity (certificate chain + private key).
fn read_identity(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), GrpcError> {
    let cert = read_pem("client_cert", cert_path)?;
    let key = read_pem("client_key", key_path)?;
    let certs = rustls_pemfile::certs(&mut cert.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            GrpcError::config(format!(
                "client_cert {}: not valid PEM: {e}",
                cert_path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(GrpcError::config(format!(
            "client_cert {}: no CERTIFICATE block found",
            cert_path.display()
        )));
    }
    match rustls_pemfile::private_key(&mut key.as_slice()) {
        Ok(Some(key)) => Ok((certs, key)),
        Ok(None) => Err(GrpcError::config(format!(
            "client_key {}: no PRIVATE KEY block found",
            key_path.display()
        ))),
        Err(e) => Err(GrpcError::config(format!(
            "client_key {}: not valid PEM: {e}",
            key_path.display()
        ))),
    }
}

/// The TLS settings: SNI from the URL's host, the trust anchors of
/// [`connector_core::trust_anchors`] (the rule the WebSocket transport
/// follows too: system roots and/or the CA file, never bundled roots),
/// ALPN `h2` and the client identity if configured.
fn tls_setup(host: &str, tls: &TlsOptions) -> Result<TlsSetup, GrpcError> {
    let server_name = ServerName::try_from(host.to_string()).map_err(|e| {
        GrpcError::config(format!("host {host:?} is not a valid TLS server name: {e}"))
    })?;
    let anchors = trust_anchors(tls).map_err(|e| match e {
        ConnectorError::InvalidConfig(message) => GrpcError::config(message),
        other => GrpcError::config(other.to_string()),
    })?;
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| GrpcError::config(format!("TLS provider: {e}")))?
            .with_root_certificates(RootCertStore::from_iter(anchors));
    let mut config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let (chain, key_der) = read_identity(cert, key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                GrpcError::config(format!(
                    "client certificate {} and key {} do not form a usable identity: {e}",
                    cert.display(),
                    key.display()
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(GrpcError::config(
                "client_cert and client_key go together; set both or neither",
            ))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsSetup {
        connector: TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_window_covers_every_stream_and_stays_legal() {
        assert_eq!(connection_window(1), MIN_CONNECTION_WINDOW);
        assert_eq!(connection_window(80), 80 * STREAM_WINDOW);
        assert_eq!(connection_window(100_000), MAX_WINDOW);
    }

    fn options(url: &str) -> connector_core::MultiTransportOptionsBuilder {
        MultiTransportOptions::builder(url)
    }

    #[test]
    fn websocket_url_is_a_config_error() {
        let o = options("ws://127.0.0.1:1").build().expect("valid options");
        let err = ChannelFactory::new(&o).expect_err("ws is not grpc");
        assert!(matches!(err, GrpcError::Config { .. }), "{err}");
    }

    #[test]
    fn missing_ca_file_is_a_config_error_naming_the_path() {
        let o = options("grpcs://localhost:1")
            .ca_cert("/nonexistent/ca.pem")
            .build()
            .expect("valid options");
        let err = ChannelFactory::new(&o).expect_err("missing file");
        assert!(matches!(err, GrpcError::Config { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn garbage_ca_file_is_a_config_error() {
        let dir = std::env::temp_dir().join(format!("connector-grpc-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("garbage.pem");
        std::fs::write(&path, b"this is not a certificate\n").expect("write");
        let o = options("grpcs://localhost:1")
            .ca_cert(&path)
            .build()
            .expect("valid options");
        let err = ChannelFactory::new(&o).expect_err("garbage");
        assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");

        // A CERTIFICATE block whose contents are not a certificate.
        std::fs::write(
            &path,
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = ChannelFactory::new(&o).expect_err("bad DER");
        assert!(matches!(err, GrpcError::Config { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_proxy_url_is_a_config_error_and_disabled_means_direct() {
        let mut o = options("grpc://127.0.0.1:50051").build().expect("valid");
        o.proxy = connector_core::ProxySetting::Url("socks5://p:1".into());
        let err = ChannelFactory::new(&o).expect_err("bad proxy");
        assert!(matches!(err, GrpcError::Config { .. }), "{err}");
        assert!(err.to_string().contains("proxy url"), "{err}");

        o.proxy = connector_core::ProxySetting::Disabled;
        assert!(!ChannelFactory::new(&o).expect("direct").proxied());
        o.proxy = connector_core::ProxySetting::Url("http://u:p@127.0.0.1:3128".into());
        let f = ChannelFactory::new(&o).expect("proxied");
        assert!(f.proxied());
        assert!(!format!("{f:?}").contains("dTpw"), "no credential in Debug");
    }

    #[test]
    fn plaintext_endpoint_builds_without_tls_files() {
        let o = options("grpc://127.0.0.1:50051").build().expect("valid");
        let f = ChannelFactory::new(&o).expect("plaintext builds");
        assert_eq!(f.target(), "grpc://127.0.0.1:50051");
    }
}

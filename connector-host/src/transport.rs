//! Which transport a host uses: picked by the URL scheme, among the
//! transports this build has (the `grpc` and `ws` cargo features).
//!
//! [`select_transport`] is the one place the choice is made, so a transport
//! that wraps others (a gRPC → WebSocket fallback for `--fallback-url`)
//! plugs in here as another [`HostTransport`] variant.

use std::sync::Arc;

use async_trait::async_trait;
use connector_core::{MultiTransportOptions, StreamMux, Transport, TransportError, TransportKind};
#[cfg(feature = "grpc")]
use connector_grpc::GrpcTransport;
#[cfg(feature = "ws")]
use connector_ws::WsTransport;

/// The transport of a host: gRPC for `grpc://`/`grpcs://`, WebSocket for
/// `ws://`/`wss://`, or any other [`Transport`] (see [`HostTransport::other`]).
#[derive(Clone)]
#[non_exhaustive]
pub enum HostTransport {
    /// gRPC: many registrations per HTTP/2 connection.
    #[cfg(feature = "grpc")]
    Grpc(GrpcTransport),
    /// WebSocket: one socket per registration.
    #[cfg(feature = "ws")]
    WebSocket(WsTransport),
    /// Any other transport, such as one that falls back from gRPC to
    /// WebSocket when HTTP/2 cannot get through.
    Other(Arc<dyn Transport>),
}

impl std::fmt::Debug for HostTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            #[cfg(feature = "grpc")]
            Self::Grpc(_) => "HostTransport::Grpc",
            #[cfg(feature = "ws")]
            Self::WebSocket(_) => "HostTransport::WebSocket",
            Self::Other(_) => "HostTransport::Other",
        })
    }
}

impl HostTransport {
    /// Wraps any transport.
    pub fn other(transport: impl Transport) -> Self {
        Self::Other(Arc::new(transport))
    }
}

/// The cargo feature a URL's transport needs, and whether this build has it.
fn feature_for(kind: TransportKind) -> (&'static str, bool) {
    match kind {
        TransportKind::WebSocket => ("ws", cfg!(feature = "ws")),
        _ => ("grpc", cfg!(feature = "grpc")),
    }
}

/// Picks the transport for `options.endpoint.kind`; a scheme whose transport
/// this build lacks is a configuration error that says how to build it.
///
/// `fallback_url` is `--fallback-url` (config `fallback_url`), already
/// validated: with it, registrations run on gRPC and fall back to that
/// WebSocket URL when HTTP/2 cannot get through ([`crate::fallback`]).
pub(crate) fn select_transport(
    options: &MultiTransportOptions,
    fallback_url: Option<&str>,
) -> Result<HostTransport, String> {
    let (feature, built) = feature_for(options.endpoint.kind);
    if !built {
        return Err(format!(
            "{}: this connector-host was built without the `{feature}` feature; \
             build it with `cargo build --release -p connector-host --features {feature}`",
            options.endpoint
        ));
    }
    if let Some(url) = fallback_url {
        #[cfg(all(feature = "grpc", feature = "ws"))]
        {
            if options.endpoint.kind == TransportKind::WebSocket {
                return Err(format!(
                    "--fallback-url {url}: --url is already a WebSocket URL; the fallback is \
                     for a grpc:// or grpcs:// --url"
                ));
            }
            tracing::info!(fallback_url = %connector_core::redact_url(url), "gRPC first, WebSocket fallback");
            return Ok(HostTransport::Other(Arc::new(
                crate::fallback::FallbackTransport::new(url),
            )));
        }
        #[cfg(not(all(feature = "grpc", feature = "ws")))]
        return Err(format!(
            "--fallback-url {}: needs both the `grpc` and `ws` features of connector-host",
            connector_core::redact_url(url)
        ));
    }
    Ok(transport_for(options))
}

/// Picks the transport for `options.endpoint.kind` among those built in.
///
/// # Panics
///
/// Never: a build has at least one of the two transports, and a scheme
/// whose transport is missing gets the other one, which reports the URL as
/// a configuration error when the runner starts (`select_transport`
/// reports it earlier, with the feature to enable).
pub fn transport_for(options: &MultiTransportOptions) -> HostTransport {
    match options.endpoint.kind {
        #[cfg(feature = "ws")]
        TransportKind::WebSocket => HostTransport::WebSocket(WsTransport::new()),
        #[cfg(feature = "grpc")]
        _ => HostTransport::Grpc(GrpcTransport::new()),
        #[cfg(not(feature = "grpc"))]
        _ => HostTransport::WebSocket(WsTransport::new()),
    }
}

#[async_trait]
impl Transport for HostTransport {
    async fn mux(
        &self,
        options: &MultiTransportOptions,
    ) -> Result<Arc<dyn StreamMux>, TransportError> {
        match self {
            #[cfg(feature = "grpc")]
            Self::Grpc(t) => t.mux(options).await,
            #[cfg(feature = "ws")]
            Self::WebSocket(t) => t.mux(options).await,
            Self::Other(t) => t.mux(options).await,
        }
    }
}

#[cfg(all(test, feature = "grpc", feature = "ws"))]
mod tests {
    use super::*;

    #[test]
    fn transport_follows_the_scheme() {
        let pick = |url: &str| {
            transport_for(
                &MultiTransportOptions::builder(url)
                    .build()
                    .expect("valid url"),
            )
        };
        assert!(matches!(pick("grpc://h:1"), HostTransport::Grpc(_)));
        assert!(matches!(pick("grpcs://h:1"), HostTransport::Grpc(_)));
        assert!(matches!(pick("ws://h:1"), HostTransport::WebSocket(_)));
        assert!(matches!(pick("wss://h:1"), HostTransport::WebSocket(_)));
    }
}

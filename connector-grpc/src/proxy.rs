//! The tonic connector that dials through an HTTP CONNECT proxy (the
//! tunnel itself is `connector_core::Proxy::open_tunnel`).
//!
//! The tunnel is opened before TLS and HTTP/2, so the proxy sees only the
//! server's `host:port` and an opaque byte stream; tonic then runs TLS
//! (its `ClientTlsConfig`, server name from the URL, ALPN `h2`) over the
//! tunnel exactly as over a direct socket, because it applies TLS to
//! whatever a custom connector returns when the URI scheme is `https`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use connector_core::Proxy;
use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::GrpcError;

/// A tonic connector (`tower::Service<Uri>`) that opens every connection
/// through the proxy, to the server named when it was made (the `Uri`
/// tonic passes is that same server).
#[derive(Debug, Clone)]
pub(crate) struct ProxyConnector {
    proxy: Arc<Proxy>,
    /// `host:port` of the server, the CONNECT target.
    authority: Arc<str>,
}

impl ProxyConnector {
    pub(crate) fn new(proxy: Arc<Proxy>, authority: &str) -> Self {
        Self {
            proxy,
            authority: Arc::from(authority),
        }
    }
}

impl tower::Service<Uri> for ProxyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = GrpcError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, GrpcError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GrpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            match this.proxy.open_tunnel(&this.authority).await {
                Ok(tcp) => {
                    tracing::debug!(proxy = %this.proxy.authority(), "tunnel open");
                    Ok(TokioIo::new(tcp))
                }
                Err(e) => Err(GrpcError::Proxy {
                    proxy: this.proxy.authority(),
                    status: e.status(),
                    message: e.to_string(),
                }),
            }
        })
    }
}

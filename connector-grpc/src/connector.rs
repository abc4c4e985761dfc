//! The connector handed to tonic: TCP (or an HTTP CONNECT tunnel), then
//! TLS, then the [`SniffedIo`] that reads the server's stream limit.
//!
//! tonic would run TLS itself, above whatever a custom connector returns;
//! the frames would then reach our code encrypted. So TLS is ours (rustls
//! with the anchors of [`connector_core::trust_anchors`], ALPN `h2`, the
//! server name from the URL, the optional client identity) and tonic's
//! endpoint is a plain `http://` one whose *origin* is `https://`: the
//! requests still carry `:scheme https` and the URL's authority.
//!
//! Through a proxy the tunnel is opened before TLS and HTTP/2, so the proxy
//! sees only the server's `host:port` and an opaque byte stream.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use connector_core::Proxy;
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::error::GrpcError;
use crate::settings::{PeerSettings, SniffedIo};

/// What TLS needs on every connection of a mux.
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

/// How every connection of a mux is made (shared by its channels).
#[derive(Debug)]
pub(crate) struct Route {
    /// `host:port` of the server: the TCP target, or the CONNECT target.
    pub(crate) authority: Arc<str>,
    pub(crate) proxy: Option<Arc<Proxy>>,
    pub(crate) tls: Option<TlsSetup>,
}

/// A tonic connector (`tower::Service<Uri>`) for one channel: every
/// connection it makes (tonic reconnects a channel through the same
/// connector) reports the server's settings into `settings`. The `Uri`
/// tonic passes is the endpoint's, i.e. the same server as `route`.
#[derive(Debug, Clone)]
pub(crate) struct Dialer {
    route: Arc<Route>,
    settings: Arc<PeerSettings>,
}

impl Dialer {
    pub(crate) fn new(route: Arc<Route>, settings: Arc<PeerSettings>) -> Self {
        Self { route, settings }
    }

    async fn dial(
        self,
    ) -> Result<TokioIo<SniffedIo<Io>>, Box<dyn std::error::Error + Send + Sync>> {
        let route = &*self.route;
        let tcp = match &route.proxy {
            Some(proxy) => match proxy.open_tunnel(&route.authority).await {
                Ok(tcp) => {
                    tracing::debug!(proxy = %proxy.authority(), "tunnel open");
                    tcp
                }
                Err(e) => {
                    return Err(Box::new(GrpcError::Proxy {
                        proxy: proxy.authority(),
                        status: e.status(),
                        message: e.to_string(),
                    }))
                }
            },
            None => TcpStream::connect(&*route.authority).await?,
        };
        // Small writes (an answer, an ack) must not wait for Nagle.
        tcp.set_nodelay(true)?;
        let io = match &route.tls {
            // Handshake errors are `io::Error`s around a `rustls::Error`,
            // which `dial_error` sorts as TLS failures. ALPN is not
            // required: gRPC is HTTP/2 only, so a server that does not
            // answer ALPN still gets HTTP/2.
            Some(tls) => Io::Tls(Box::new(
                tls.connector.connect(tls.server_name.clone(), tcp).await?,
            )),
            None => Io::Plain(tcp),
        };
        Ok(TokioIo::new(SniffedIo::new(io, Arc::clone(&self.settings))))
    }
}

impl tower::Service<Uri> for Dialer {
    type Response = TokioIo<SniffedIo<Io>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        Box::pin(self.clone().dial())
    }
}

/// A connection's byte stream: plain TCP or TLS over it.
#[derive(Debug)]
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

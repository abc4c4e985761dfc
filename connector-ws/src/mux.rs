//! [`WsTransport`] and [`WsMux`]: one WebSocket per registration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use connector_core::{
    ConnectionStats, ConnectorError, Endpoint, MessageStream, MultiTransportOptions, MuxStats,
    Proxy, RegistrationKey, StreamInfo, StreamMux, Transport, TransportError, TransportKind,
};
use connector_proto::{StreamMessage, WS_SUBPROTOCOL};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{self, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Resolved, WsConfig};
use crate::error::WsError;
use crate::socket::{self, Inbound, Registry, Shared, WriterSettings, Ws};
use crate::tls::{self, TlsSetup};

/// The WebSocket [`Transport`]: builds a [`WsMux`] for `ws://` and `wss://`
/// URLs.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use connector_core::{MultiTransportOptions, Transport};
/// use connector_ws::{WsConfig, WsTransport};
///
/// let options = MultiTransportOptions::builder("wss://control.example.com").build()?;
/// let transport = WsTransport::with_config(WsConfig::default().max_concurrent_handshakes(32));
/// let mux = transport.mux(&options).await?;
/// # let _ = mux; Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct WsTransport {
    config: WsConfig,
}

impl WsTransport {
    /// A transport with [`WsConfig::default`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport with `config`.
    pub fn with_config(config: WsConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> &WsConfig {
        &self.config
    }
}

#[async_trait]
impl Transport for WsTransport {
    /// Builds a [`WsMux`]; fails with a `Config` error for a non-WebSocket
    /// URL, inconsistent [`WsConfig`] values or unusable TLS files.
    async fn mux(
        &self,
        options: &MultiTransportOptions,
    ) -> Result<Arc<dyn StreamMux>, TransportError> {
        let options = options.clone();
        let config = self.config.clone();
        // Loading the system's CA certificates reads files.
        let mux = tokio::task::spawn_blocking(move || WsMux::new(&options, config))
            .await
            .map_err(|e| WsError::Config(format!("building the WebSocket mux failed: {e}")))??;
        Ok(Arc::new(mux))
    }
}

/// A [`StreamMux`] that gives every registration its own WebSocket.
///
/// Handshakes are paced ([`WsConfig::max_concurrent_handshakes`]); each
/// socket has one writer task, which ends with its socket. Cheap to share:
/// clones are handles to the same sockets.
#[derive(Debug, Clone)]
pub struct WsMux {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoint: Endpoint,
    /// `ws[s]://authority/path`, for the upgrade request and logs.
    url: String,
    tls: Option<TlsSetup>,
    /// The HTTP CONNECT proxy every socket tunnels through, if any.
    proxy: Option<Proxy>,
    settings: Resolved,
    connect_timeout: std::time::Duration,
    handshakes: Semaphore,
    next_id: AtomicU64,
    registry: Arc<Registry>,
    dials_succeeded: AtomicU64,
    dials_failed: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl WsMux {
    /// Builds a mux for `options.endpoint` with `config`.
    ///
    /// For `wss://` this loads the system's CA certificates and the files of
    /// `options.tls` (blocking file reads). The proxy (`options.proxy`) is
    /// resolved here, once, so every socket of the mux goes the same way.
    /// Fails with [`WsError::Config`] for a non-WebSocket URL, invalid
    /// `config` values, unusable TLS files or a bad proxy URL.
    pub fn new(options: &MultiTransportOptions, config: WsConfig) -> Result<Self, WsError> {
        let endpoint = options.endpoint.clone();
        if endpoint.kind != TransportKind::WebSocket {
            return Err(WsError::Config(format!(
                "url {endpoint} is not a WebSocket URL; use ws:// or wss:// with this transport"
            )));
        }
        let settings = config.resolve(options.max_message_size)?;
        let tls = if endpoint.tls {
            Some(tls::setup(&endpoint.host, &options.tls)?)
        } else {
            if options.tls != Default::default() {
                tracing::warn!(url = %endpoint, "TLS files are configured but the URL is ws://; they are not used");
            }
            None
        };
        let scheme = if endpoint.tls { "wss" } else { "ws" };
        // The whole URL, query included: it goes into the request and
        // nowhere else (logs and errors print `endpoint`, which redacts it).
        let url = format!("{scheme}://{}{}", endpoint.authority(), endpoint.path);
        // Fail now, not on every dial, if the URL cannot make a request.
        upgrade_request(&url).map_err(|e| match e {
            WsError::Config(why) => WsError::Config(format!("url {endpoint}: {why}")),
            other => other,
        })?;
        let proxy = options.resolve_proxy().map_err(|e| match e {
            ConnectorError::InvalidConfig(message) => WsError::Config(message),
            other => WsError::Config(other.to_string()),
        })?;
        if let Some(p) = &proxy {
            tracing::debug!(url = %endpoint, proxy = %p.authority(), "connecting through an HTTP proxy");
        }
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                url,
                tls,
                proxy,
                handshakes: Semaphore::new(settings.max_concurrent_handshakes),
                settings,
                connect_timeout: options.connect_timeout,
                next_id: AtomicU64::new(1),
                registry: Arc::default(),
                dials_succeeded: AtomicU64::new(0),
                dials_failed: AtomicU64::new(0),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        })
    }

    /// Opens a socket for `key`: dial, TLS, upgrade offering `connector.v1`,
    /// then `register` as the first frame. See [`StreamMux::open`].
    pub async fn open_socket(
        &self,
        key: &RegistrationKey,
        register: StreamMessage,
    ) -> Result<MessageStream, WsError> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("ws_socket", registration = %key, socket_id = id);
        let result = async {
            let permit = tokio::select! {
                permit = inner.handshakes.acquire() => permit
                    .map_err(|_| WsError::closed("the mux is closed"))?,
                () = inner.shutdown.cancelled() => return Err(WsError::closed("the mux is closed")),
            };
            let started = Instant::now();
            let ws = tokio::select! {
                dialled = time::timeout(inner.connect_timeout, inner.dial(&register)) => dialled
                    .map_err(|_| WsError::Timeout {
                        addr: inner.endpoint.authority(),
                        after: inner.connect_timeout,
                    })??,
                () = inner.shutdown.cancelled() => return Err(WsError::closed("the mux is closed")),
            };
            drop(permit);
            tracing::debug!(
                url = %inner.endpoint,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "socket open, register sent"
            );
            Ok(inner.start(id, ws, tracing::Span::current()))
        }
        .instrument(span.clone())
        .await;
        match &result {
            Ok(_) => {
                inner.dials_succeeded.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                inner.dials_failed.fetch_add(1, Ordering::Relaxed);
                span.in_scope(|| tracing::debug!(url = %inner.endpoint, error = %e, "dial failed"));
            }
        }
        result
    }
}

impl Inner {
    /// TCP (through the proxy's tunnel if any), TLS, the upgrade and the
    /// first frame.
    async fn dial(&self, register: &StreamMessage) -> Result<Ws, WsError> {
        let addr = self.endpoint.authority();
        let tcp = match &self.proxy {
            Some(proxy) => proxy.open_tunnel(&addr).await.map_err(|e| WsError::Proxy {
                proxy: proxy.authority(),
                status: e.status(),
                message: e.to_string(),
            })?,
            None => {
                let tcp = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
                    .await
                    .map_err(|source| WsError::Connect {
                        addr: addr.clone(),
                        source,
                    })?;
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                tcp
            }
        };
        let io = match &self.tls {
            None => Either::Left(tcp),
            Some(tls) => Either::Right(Box::new(
                tls.connector
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|source| WsError::Tls {
                        addr: addr.clone(),
                        source,
                    })?,
            )),
        };
        let request = upgrade_request(&self.url)?;
        let (mut ws, response) =
            tokio_tungstenite::client_async_with_config(request, io, Some(self.settings.websocket))
                .await
                .map_err(|e| handshake_error(&addr, e))?;
        let selected = response.headers().get(SEC_WEBSOCKET_PROTOCOL);
        if selected.map(HeaderValue::as_bytes) != Some(WS_SUBPROTOCOL.as_bytes()) {
            return Err(WsError::protocol(format!(
                "the server did not select subprotocol {WS_SUBPROTOCOL} (it answered {selected:?})"
            )));
        }
        let frame = register.encode_to_vec();
        if frame.len() > self.settings.max_message_size {
            return Err(WsError::protocol(format!(
                "register is {} bytes, more than max_message_size ({})",
                frame.len(),
                self.settings.max_message_size
            )));
        }
        ws.send(Message::Binary(frame.into()))
            .await
            .map_err(|e| WsError::closed_with("sending register failed", e))?;
        Ok(ws)
    }

    /// Splits an open socket into its writer task and inbound stream.
    fn start(&self, id: u64, ws: Ws, span: tracing::Span) -> MessageStream {
        let (sink, stream) = ws.split();
        let shared = Arc::new(Shared::new(
            self.shutdown.child_token(),
            self.registry.insert(id),
        ));
        let (tx, rx) = mpsc::channel(self.settings.outbound_capacity);
        let settings = WriterSettings {
            max_message_size: self.settings.max_message_size,
            ping_interval: self.settings.ping_interval,
            close_timeout: self.settings.close_timeout,
        };
        self.tasks.spawn(
            socket::run_writer(sink, rx, Arc::clone(&shared), settings).instrument(span.clone()),
        );
        let inbound = Inbound::new(stream, shared, span);
        MessageStream::new(tx, Box::pin(inbound), StreamInfo::new(id))
    }
}

fn upgrade_request(url: &str) -> Result<tungstenite::handshake::client::Request, WsError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| WsError::Config(format!("cannot make an upgrade request: {e}")))?;
    request.headers_mut().insert(
        SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(WS_SUBPROTOCOL),
    );
    Ok(request)
}

fn handshake_error(addr: &str, err: tungstenite::Error) -> WsError {
    match err {
        tungstenite::Error::Http(response) => WsError::Refused {
            addr: addr.to_string(),
            status: response.status().as_u16(),
        },
        tungstenite::Error::Io(e) => {
            WsError::closed_with("the connection closed during the WebSocket upgrade", e)
        }
        other => WsError::protocol_with("the WebSocket upgrade failed", other),
    }
}

#[async_trait]
impl StreamMux for WsMux {
    async fn open(
        &self,
        key: &RegistrationKey,
        register: StreamMessage,
    ) -> Result<MessageStream, TransportError> {
        Ok(self.open_socket(key, register).await?)
    }

    /// One connection per open socket, each carrying one stream.
    fn stats(&self) -> MuxStats {
        let mut stats = MuxStats::default();
        stats.connections = self
            .inner
            .registry
            .ids()
            .into_iter()
            .map(|id| ConnectionStats::new(id, 1, 1))
            .collect();
        stats.dials_succeeded = self.inner.dials_succeeded.load(Ordering::Relaxed);
        stats.dials_failed = self.inner.dials_failed.load(Ordering::Relaxed);
        stats
    }

    /// Sends every socket a close frame and waits (at most the close
    /// timeout, plus a margin) for every writer task to end. Later `open`
    /// calls fail with a `Closed` error.
    async fn close(&self) {
        let inner = &self.inner;
        inner.shutdown.cancel();
        inner.tasks.close();
        let bound = inner.settings.close_timeout + std::time::Duration::from_secs(1);
        if time::timeout(bound, inner.tasks.wait()).await.is_err() {
            tracing::warn!(
                url = %inner.endpoint,
                tasks = inner.tasks.len(),
                "socket writers still running after close"
            );
        }
    }
}

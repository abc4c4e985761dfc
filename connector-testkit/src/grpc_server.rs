//! A real gRPC (tonic, HTTP/2) front-end for the engine on a loopback
//! socket, with connection accounting and abrupt connection kills.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use connector_proto::connector_service_server::{ConnectorService, ConnectorServiceServer};
use connector_proto::StreamMessage;
use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::conn::{
    accept_loop, bind_retry, ConnRegistry, ConnectionInfo, ServerConnInfo, ServerIo,
};
use crate::engine::{ConnectionMeta, TestServer};
use crate::error::TestkitError;
use crate::tls::TestCertificate;

/// How long `stop` waits for tonic to wind down after every connection was
/// killed, before aborting its task.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of a [`GrpcTestServer`].
#[derive(Default, Clone, Debug)]
#[non_exhaustive]
pub struct GrpcServerOptions {
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` the server advertises
    /// (`None`: hyper's default), to test a client's stream-per-channel cap.
    pub max_concurrent_streams: Option<u32>,
    /// Serve TLS with this certificate (`grpcs://localhost:PORT`).
    pub tls: Option<TestCertificate>,
    /// With `tls`: refuse clients that present no certificate signed by
    /// the test CA (mutual TLS; see `TestCertificate::generate_client_identity`).
    pub require_client_cert: bool,
    /// Where to listen (`None`: `127.0.0.1:0`, what a test wants). Set by
    /// the `testkit-server` binary from `--grpc ADDR`.
    pub bind: Option<SocketAddr>,
}

impl GrpcServerOptions {
    /// Sets [`GrpcServerOptions::max_concurrent_streams`].
    pub fn max_concurrent_streams(mut self, n: u32) -> Self {
        self.max_concurrent_streams = Some(n);
        self
    }

    /// Sets [`GrpcServerOptions::tls`].
    pub fn tls(mut self, cert: TestCertificate) -> Self {
        self.tls = Some(cert);
        self
    }

    /// Sets [`GrpcServerOptions::require_client_cert`].
    pub fn require_client_cert(mut self, on: bool) -> Self {
        self.require_client_cert = on;
        self
    }

    /// Sets [`GrpcServerOptions::bind`].
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }
}

/// The engine served over gRPC on `127.0.0.1:<ephemeral port>`.
///
/// Cheap to clone. Dropping the last clone stops accepting and kills every
/// connection.
#[derive(Clone)]
pub struct GrpcTestServer {
    inner: Arc<Inner>,
}

struct Inner {
    engine: TestServer,
    opts: GrpcServerOptions,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    registry: Arc<ConnRegistry>,
    running: Mutex<Option<Running>>,
    /// Serialises stop/restart so two of them never interleave.
    lifecycle: tokio::sync::Mutex<()>,
}

struct Running {
    shutdown: CancellationToken,
    accept: JoinHandle<()>,
    serve: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let running = self
            .running
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(r) = running {
            r.shutdown.cancel();
        }
        self.registry.kill_all();
    }
}

impl fmt::Debug for GrpcTestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcTestServer")
            .field("url", &self.url())
            .field("connections", &self.connection_count())
            .finish_non_exhaustive()
    }
}

impl GrpcTestServer {
    /// Binds `127.0.0.1:0` (or the options' `bind` address) and serves
    /// `engine` until stopped.
    pub async fn start(
        engine: TestServer,
        opts: GrpcServerOptions,
    ) -> Result<GrpcTestServer, TestkitError> {
        let tls = match &opts.tls {
            Some(cert) => Some(TlsAcceptor::from(
                cert.server_config(&[b"h2"], opts.require_client_cert)?,
            )),
            None => None,
        };
        let bind = opts
            .bind
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let server = GrpcTestServer {
            inner: Arc::new(Inner {
                engine,
                opts,
                addr,
                tls,
                registry: ConnRegistry::new(),
                running: Mutex::new(None),
                lifecycle: tokio::sync::Mutex::new(()),
            }),
        };
        server.run(listener);
        Ok(server)
    }

    fn run(&self, listener: TcpListener) {
        let inner = &self.inner;
        let shutdown = CancellationToken::new();
        let (tx, rx) = mpsc::unbounded_channel::<Result<ServerIo, std::io::Error>>();
        let on_conn: Arc<dyn Fn(ServerIo) + Send + Sync> = Arc::new(move |io| {
            // Fails only when tonic is gone (stopping); the socket then
            // drops and closes.
            let _ = tx.send(Ok(io));
        });
        let accept = tokio::spawn(accept_loop(
            listener,
            inner.engine.clone(),
            Arc::clone(&inner.registry),
            inner.tls.clone(),
            shutdown.clone(),
            on_conn,
        ));
        let svc = ConnectSvc {
            engine: inner.engine.clone(),
            registry: Arc::clone(&inner.registry),
        };
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(inner.opts.max_concurrent_streams)
            .add_service(ConnectorServiceServer::new(svc));
        let signal = shutdown.clone().cancelled_owned();
        let serve = tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(UnboundedReceiverStream::new(rx), signal)
                .await
            {
                tracing::warn!("testkit gRPC server ended with an error: {e}");
            }
        });
        *inner
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Running {
            shutdown,
            accept,
            serve,
        });
    }

    /// The bound address (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `grpc://127.0.0.1:PORT`, or `grpcs://localhost:PORT` with TLS (the
    /// name the test certificate is issued for).
    pub fn url(&self) -> String {
        match self.inner.tls {
            Some(_) => format!("grpcs://localhost:{}", self.inner.addr.port()),
            None => format!("grpc://{}", self.inner.addr),
        }
    }

    /// The engine behind the server.
    pub fn engine(&self) -> &TestServer {
        &self.inner.engine
    }

    /// Live TCP connections with their open `Connect` streams.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.inner.registry.list()
    }

    /// Number of live TCP connections.
    pub fn connection_count(&self) -> usize {
        self.inner.registry.count()
    }

    /// TCP connections accepted since start (across restarts).
    pub fn total_connections_accepted(&self) -> u64 {
        self.inner.registry.accepted()
    }

    /// Waits until exactly `n` TCP connections are live (connections close
    /// asynchronously after a kill or a client drop).
    pub async fn wait_for_connection_count(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<(), TestkitError> {
        self.inner
            .registry
            .wait_until(
                timeout,
                || format!("{n} live gRPC connections"),
                |c| c.len() == n,
            )
            .await
    }

    /// Abruptly breaks connection `connection_id`: its socket is reset, so
    /// the client sees the connection die and every stream on it fail.
    /// False if no such live connection.
    pub fn kill_connection(&self, connection_id: u64) -> bool {
        self.inner.registry.kill(connection_id)
    }

    /// Breaks every live connection; returns how many.
    pub fn kill_all_connections(&self) -> usize {
        self.inner.registry.kill_all()
    }

    /// Stops accepting (the port is released) and kills every connection.
    /// Returns once tonic has wound down.
    pub async fn stop(&self) {
        let _lifecycle = self.inner.lifecycle.lock().await;
        self.stop_locked().await;
    }

    async fn stop_locked(&self) {
        let running = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(r) = running else {
            return;
        };
        r.shutdown.cancel();
        // The accept task owns the listener: once it returns the port is free.
        let _ = r.accept.await;
        self.inner.registry.kill_all();
        let mut serve = r.serve;
        if tokio::time::timeout(STOP_TIMEOUT, &mut serve)
            .await
            .is_err()
        {
            tracing::warn!("testkit gRPC server did not stop in {STOP_TIMEOUT:?}; aborting it");
            serve.abort();
        }
    }

    /// Stops, then serves again on the same port (a control-plane restart).
    /// The engine and its state (session tokens, counters) survive.
    pub async fn restart(&self) -> Result<(), TestkitError> {
        let _lifecycle = self.inner.lifecycle.lock().await;
        self.stop_locked().await;
        let listener = bind_retry(self.inner.addr).await?;
        self.run(listener);
        Ok(())
    }
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<StreamMessage, Status>> + Send + 'static>>;

/// The `Connect` handler: bridges one gRPC call into `serve_stream`.
struct ConnectSvc {
    engine: TestServer,
    registry: Arc<ConnRegistry>,
}

#[async_trait]
impl ConnectorService for ConnectSvc {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<StreamMessage>>,
    ) -> Result<Response<ConnectStream>, Status> {
        let info = request.extensions().get::<ServerConnInfo>().cloned();
        let Some(info) = info else {
            // Cannot happen with our own incoming stream; refuse loudly
            // rather than serve a stream we cannot account for.
            return Err(Status::internal("testkit: connection info missing"));
        };
        let inbound = request
            .into_inner()
            .map(|r| r.map_err(|status| format!("grpc: {status}")));
        let (tx, rx) = mpsc::channel(256);
        let engine = self.engine.clone();
        let guard = self.registry.stream_opened(info.connection_id);
        let meta = ConnectionMeta::new(info.connection_id, info.peer, "grpc");
        tokio::spawn(async move {
            engine.serve_stream(meta, inbound, tx).await;
            drop(guard);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

//! A real gRPC (tonic, HTTP/2) front-end for the engine on a loopback
//! socket, with connection accounting and abrupt connection kills.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use connector_proto::connector_service_server::{ConnectorService, ConnectorServiceServer};
use connector_proto::StreamMessage;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::conn::{ConnRegistry, ServerConnInfo, ServerIo};
use crate::engine::{ConnectionMeta, TestServer};
use crate::error::TestkitError;
use crate::socket_server::{
    listen_option_setters, socket_front_end, Listen, Serve, Serving, SocketServer,
};
use crate::tls::TestCertificate;

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

listen_option_setters!(GrpcServerOptions);

impl GrpcServerOptions {
    /// Sets [`GrpcServerOptions::max_concurrent_streams`].
    pub fn max_concurrent_streams(mut self, n: u32) -> Self {
        self.max_concurrent_streams = Some(n);
        self
    }
}

/// The engine served over gRPC on `127.0.0.1:<ephemeral port>`.
///
/// Cheap to clone. Dropping the last clone stops accepting and kills every
/// connection.
#[derive(Clone)]
pub struct GrpcTestServer {
    core: Arc<SocketServer>,
}

socket_front_end! {
    GrpcTestServer;
    /// `grpc://127.0.0.1:PORT`, or `grpcs://localhost:PORT` with TLS (the
    /// name the test certificate is issued for).
    url;
    /// Live TCP connections with their open `Connect` streams.
    connections;
    /// Abruptly breaks connection `connection_id`: its socket is reset, so
    /// the client sees the connection die and every stream on it fail.
    /// False if no such live connection.
    kill_connection;
    /// Stops accepting (the port is released) and kills every connection.
    /// Returns once tonic has wound down.
    stop;
}

impl GrpcTestServer {
    /// Binds `127.0.0.1:0` (or the options' `bind` address) and serves
    /// `engine` until stopped.
    pub async fn start(
        engine: TestServer,
        opts: GrpcServerOptions,
    ) -> Result<GrpcTestServer, TestkitError> {
        let listen = Listen {
            bind: opts.bind,
            tls: opts.tls.as_ref(),
            alpn: &[b"h2"],
            require_client_cert: opts.require_client_cert,
            schemes: ("grpc", "grpcs"),
            protocol: "gRPC",
        };
        let max_concurrent_streams = opts.max_concurrent_streams;
        let serve: Serve = Box::new(move |engine, registry, shutdown| {
            serve_tonic(engine, registry, shutdown, max_concurrent_streams)
        });
        let core = SocketServer::start(engine, listen, serve).await?;
        Ok(GrpcTestServer { core })
    }
}

/// One run of tonic, fed the accepted connections through a channel.
fn serve_tonic(
    engine: &TestServer,
    registry: &Arc<ConnRegistry>,
    shutdown: CancellationToken,
    max_concurrent_streams: Option<u32>,
) -> Serving {
    let (tx, rx) = mpsc::unbounded_channel::<Result<ServerIo, std::io::Error>>();
    let svc = ConnectSvc {
        engine: engine.clone(),
        registry: Arc::clone(registry),
    };
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(max_concurrent_streams)
        .add_service(ConnectorServiceServer::new(svc));
    let signal = shutdown.cancelled_owned();
    let task = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(UnboundedReceiverStream::new(rx), signal)
            .await
        {
            tracing::warn!("testkit gRPC server ended with an error: {e}");
        }
    });
    Serving {
        on_conn: Arc::new(move |io| {
            // Fails only when tonic is gone (stopping); the socket then
            // drops and closes.
            let _ = tx.send(Ok(io));
        }),
        task: Some(task),
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

//! The bench gRPC server: plain tonic over plaintext HTTP/2, serving
//! [`crate::server_core`] to the SDK and to the raw baseline alike.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use connector_proto::connector_service_server::{ConnectorService, ConnectorServiceServer};
use connector_proto::StreamMessage;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::server_core::{ConnGuard, ServerShared};
use crate::wire::{commands, emit, next_command, unknown_command, Result};

/// A listener on `127.0.0.1:0` with a deep accept queue: thousands of
/// clients may dial at once, and a full queue turns into 1 s SYN retries
/// that would be measured as slowness of the client.
pub(crate) fn listen() -> Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(socket.listen(4096)?)
}

/// An accepted socket that counts itself as a live connection.
struct Counted {
    io: TcpStream,
    _guard: ConnGuard,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

struct Svc {
    shared: Arc<ServerShared>,
}

#[async_trait]
impl ConnectorService for Svc {
    type ConnectStream = ReceiverStream<std::result::Result<StreamMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<StreamMessage>>,
    ) -> std::result::Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let mut session = self.shared.session();
        // Room for the whole window plus acks: pushing never waits on the
        // client except when it really stops reading.
        let (tx, rx) = mpsc::channel(64 + 2 * self.shared_window());
        tokio::spawn(async move {
            let mut out = Vec::new();
            while let Ok(Some(m)) = inbound.message().await {
                session.on_message(m, &mut out);
                for m in out.drain(..) {
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Svc {
    fn shared_window(&self) -> usize {
        self.shared.window()
    }
}

/// Serves until stdin closes. Commands: `count`, `measure SECS`.
/// `max_streams` is the server's `SETTINGS_MAX_CONCURRENT_STREAMS` (1024
/// normally; the `server-limit` scenario sets it below the client's cap).
pub(crate) async fn run(window: usize, payload: usize, max_streams: u32) -> Result<()> {
    let shared = ServerShared::new(window, payload);
    let listener = listen()?;
    let port = listener.local_addr()?.port();
    let accept_shared = Arc::clone(&shared);
    let incoming = futures_util::stream::unfold(listener, move |l| {
        let shared = Arc::clone(&accept_shared);
        async move {
            let item = l.accept().await.map(|(io, _)| {
                let _ = io.set_nodelay(true);
                Counted {
                    io,
                    _guard: shared.connection(),
                }
            });
            Some((item, l))
        }
    });
    let svc = ConnectorServiceServer::new(Svc {
        shared: Arc::clone(&shared),
    });
    // Generous HTTP/2 windows and (unless told otherwise) stream limit: the
    // server must never be the bottleneck, for either client.
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(2 * 1024 * 1024))
        .initial_connection_window_size(Some(64 * 1024 * 1024))
        .max_concurrent_streams(Some(max_streams))
        .add_service(svc)
        .serve_with_incoming(incoming);
    tokio::spawn(async move {
        if let Err(e) = server.await {
            crate::wire::fail(&format!("bench gRPC server failed: {e}"));
        }
    });
    emit(
        "ready",
        json!({ "port": port, "url": format!("grpc://127.0.0.1:{port}") }),
    );
    command_loop(&shared).await
}

/// The commands both bench servers understand.
pub(crate) async fn command_loop(shared: &ServerShared) -> Result<()> {
    let mut cmds = commands();
    loop {
        let cmd = next_command(&mut cmds).await;
        let mut words = cmd.split_whitespace();
        match words.next() {
            Some("count") => emit("count", shared.count()),
            Some("measure") => {
                let secs: f64 = words.next().and_then(|s| s.parse().ok()).unwrap_or(1.0);
                emit("throughput", shared.measure(secs).await);
            }
            Some("exit") => std::process::exit(0),
            _ => unknown_command(&cmd),
        }
    }
}

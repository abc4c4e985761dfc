//! A real WebSocket front-end for the engine (tokio-tungstenite) on a
//! loopback socket: one socket per registration, one binary frame per
//! protobuf `StreamMessage`, as the wire contract's WebSocket binding says.
//!
//! Frame-level faults (text frames, garbage, oversized frames) cannot be
//! expressed as `StreamMessage`s, so this front-end keeps a side channel per
//! socket and injects them below the engine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use connector_proto::{StreamMessage, WS_PATH, WS_SUBPROTOCOL};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{ConnRegistry, ServerIo};
use crate::engine::{ConnectionMeta, TestServer};
use crate::error::TestkitError;
use crate::socket_server::{
    listen_option_setters, socket_front_end, Listen, Serve, Serving, SocketServer,
};
use crate::tls::TestCertificate;

/// Deadline for a client's HTTP upgrade request, and for its close reply
/// once the server has sent a close frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of a [`WsTestServer`].
#[derive(Default, Clone, Debug)]
#[non_exhaustive]
pub struct WsServerOptions {
    /// Serve TLS with this certificate (`wss://localhost:PORT`).
    pub tls: Option<TestCertificate>,
    /// With `tls`: refuse clients that present no certificate signed by
    /// the test CA (mutual TLS; see `TestCertificate::generate_client_identity`).
    pub require_client_cert: bool,
    /// Largest message (and frame) accepted from a client; `None` keeps
    /// tungstenite's defaults (64 MiB message, 16 MiB frame).
    pub max_message_size: Option<usize>,
    /// Where to listen (`None`: `127.0.0.1:0`, what a test wants). Set by
    /// the `testkit-server` binary from `--ws ADDR`.
    pub bind: Option<SocketAddr>,
}

listen_option_setters!(WsServerOptions);

impl WsServerOptions {
    /// Sets [`WsServerOptions::max_message_size`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = Some(bytes);
        self
    }
}

/// A frame injected below the engine.
enum RawFrame {
    Text,
    Garbage,
    Oversized(usize),
}

type Sides = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<RawFrame>>>>;

fn lock_sides(sides: &Sides) -> MutexGuard<'_, HashMap<u64, mpsc::UnboundedSender<RawFrame>>> {
    sides
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The engine served over WebSocket on `127.0.0.1:<ephemeral port>`, path
/// `/v1/connect`, subprotocol `connector.v1`.
///
/// Cheap to clone. Dropping the last clone stops accepting and kills every
/// connection.
#[derive(Clone)]
pub struct WsTestServer {
    core: Arc<SocketServer>,
    sides: Sides,
}

socket_front_end! {
    WsTestServer;
    /// `ws://127.0.0.1:PORT` or, with TLS, `wss://localhost:PORT`; the
    /// `/v1/connect` path is implied (clients add it).
    url;
    /// Live TCP connections (each carries at most one stream).
    connections;
    /// Abruptly breaks connection `connection_id` (socket reset, no close
    /// frame). False if no such live connection.
    kill_connection;
    /// Stops accepting (the port is released) and kills every connection.
    stop;
}

impl WsTestServer {
    /// Binds `127.0.0.1:0` (or the options' `bind` address) and serves
    /// `engine` until stopped.
    pub async fn start(
        engine: TestServer,
        opts: WsServerOptions,
    ) -> Result<WsTestServer, TestkitError> {
        let listen = Listen {
            bind: opts.bind,
            tls: opts.tls.as_ref(),
            alpn: &[b"http/1.1"],
            require_client_cert: opts.require_client_cert,
            schemes: ("ws", "wss"),
            protocol: "WebSocket",
        };
        let mut config = WebSocketConfig::default();
        if let Some(max) = opts.max_message_size {
            config = config.max_message_size(Some(max)).max_frame_size(Some(max));
        }
        let sides: Sides = Arc::new(Mutex::new(HashMap::new()));
        let run_sides = Arc::clone(&sides);
        let serve: Serve = Box::new(move |engine, registry, _shutdown| {
            let engine = engine.clone();
            let registry = Arc::clone(registry);
            let sides = Arc::clone(&run_sides);
            Serving {
                on_conn: Arc::new(move |io| {
                    tokio::spawn(serve_socket(
                        io,
                        engine.clone(),
                        Arc::clone(&registry),
                        Arc::clone(&sides),
                        config,
                    ));
                }),
                task: None,
            }
        });
        let core = SocketServer::start(engine, listen, serve).await?;
        Ok(WsTestServer { core, sides })
    }

    /// Sends a text frame on the socket of `key`'s newest live stream (a
    /// protocol error the client must survive: contract says close 1003).
    pub fn send_text_frame(&self, key: &str) -> bool {
        self.send_side(key, RawFrame::Text)
    }

    /// Sends a binary frame that does not decode as a `StreamMessage`.
    pub fn send_garbage_frame(&self, key: &str) -> bool {
        self.send_side(key, RawFrame::Garbage)
    }

    /// Sends a binary frame of exactly `bytes` zero bytes, to trip the
    /// client's message size limit (it does not decode either).
    pub fn send_oversized_frame(&self, key: &str, bytes: usize) -> bool {
        self.send_side(key, RawFrame::Oversized(bytes))
    }

    fn send_side(&self, key: &str, frame: RawFrame) -> bool {
        let Some(conn) = self.core.engine().connection_of(key) else {
            return false;
        };
        lock_sides(&self.sides)
            .get(&conn)
            .is_some_and(|tx| tx.send(frame).is_ok())
    }
}

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    r
}

/// The upgrade check: path `/v1/connect` (404 otherwise) and subprotocol
/// `connector.v1` offered (400 otherwise), which is then selected.
#[allow(clippy::result_large_err)] // the signature is tungstenite's `Callback`
fn check_upgrade(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != WS_PATH {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "unknown path; the connector.v1 endpoint is /v1/connect",
        ));
    }
    let offered = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == WS_SUBPROTOCOL);
    if !offered {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "offer the connector.v1 subprotocol (Sec-WebSocket-Protocol)",
        ));
    }
    resp.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(WS_SUBPROTOCOL),
    );
    Ok(resp)
}

fn close_frame(code: CloseCode, reason: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

/// One socket's life: upgrade, then pump frames between the socket and the
/// engine's stream until either side ends.
async fn serve_socket(
    io: ServerIo,
    engine: TestServer,
    registry: Arc<ConnRegistry>,
    sides: Sides,
    config: WebSocketConfig,
) {
    let info = io.info().clone();
    let id = info.connection_id;
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(io, check_upgrade, Some(config));
    let mut ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(
                connection_id = id,
                "testkit ws: upgrade refused or failed: {e}"
            );
            return;
        }
        Err(_) => {
            tracing::debug!(connection_id = id, "testkit ws: upgrade timed out");
            return;
        }
    };

    let (side_tx, mut side_rx) = mpsc::unbounded_channel();
    lock_sides(&sides).insert(id, side_tx);
    let (in_tx, in_rx) = mpsc::channel::<Result<StreamMessage, String>>(64);
    let (out_tx, mut out_rx) = mpsc::channel::<StreamMessage>(256);
    let guard = registry.stream_opened(id);
    let meta = ConnectionMeta::new(id, info.peer, "ws");
    let stream_engine = engine.clone();
    tokio::spawn(async move {
        stream_engine
            .serve_stream(meta, ReceiverStream::new(in_rx), out_tx)
            .await;
        drop(guard);
    });

    // `None` once the client's half has ended (close frame or error).
    let mut in_tx = Some(in_tx);
    // Set once the server sent its close frame: bounds the wait for the reply.
    let mut closing: Option<Instant> = None;
    loop {
        let close_by = closing.unwrap_or_else(Instant::now);
        tokio::select! {
            frame = ws.next() => {
                let fail = match frame {
                    None => break,
                    Some(Err(e)) => {
                        if let Some(tx) = in_tx.take() {
                            let _ = tx.send(Err(format!("websocket: {e}"))).await;
                        }
                        break;
                    }
                    Some(Ok(Message::Binary(bytes))) => match StreamMessage::decode(bytes) {
                        Ok(m) => {
                            if let Some(tx) = &in_tx {
                                // The engine always reads its inbound, so
                                // this waits at most for a short queue.
                                let _ = tx.send(Ok(m)).await;
                            }
                            None
                        }
                        Err(e) => Some((
                            CloseCode::Invalid,
                            "binary frame is not a StreamMessage",
                            format!("connection {id}: undecodable binary frame: {e}"),
                        )),
                    },
                    Some(Ok(Message::Text(_))) => Some((
                        CloseCode::Unsupported,
                        "text frames are not allowed",
                        format!("connection {id}: text frame from the client"),
                    )),
                    Some(Ok(Message::Close(_))) => {
                        // The client ends its half; tungstenite answers the
                        // close and the socket ends with the next read.
                        in_tx.take();
                        None
                    }
                    Some(Ok(_)) => None, // ping/pong: tungstenite answers pings itself
                };
                if let Some((code, reason, what)) = fail {
                    engine.record_protocol_error(what.clone());
                    if let Some(tx) = in_tx.take() {
                        let _ = tx.send(Err(what)).await;
                    }
                    if closing.is_none() {
                        let _ = ws.close(close_frame(code, reason)).await;
                        closing = Some(Instant::now() + CLOSE_REPLY_TIMEOUT);
                    }
                }
            }
            out = out_rx.recv(), if closing.is_none() => match out {
                Some(m) => {
                    if ws.send(Message::Binary(m.encode_to_vec().into())).await.is_err() {
                        break;
                    }
                }
                None => {
                    // The engine ended the stream: a clean close.
                    let _ = ws.close(close_frame(CloseCode::Normal, "stream closed by the server")).await;
                    closing = Some(Instant::now() + CLOSE_REPLY_TIMEOUT);
                }
            },
            raw = side_rx.recv(), if closing.is_none() => {
                let frame = match raw {
                    Some(RawFrame::Text) => Message::Text(
                        "connector.v1 carries binary frames only".into(),
                    ),
                    // A varint that never ends: no protobuf decoder accepts it.
                    Some(RawFrame::Garbage) => Message::Binary(vec![0xff; 11].into()),
                    Some(RawFrame::Oversized(n)) => Message::Binary(vec![0u8; n].into()),
                    None => continue,
                };
                if ws.send(frame).await.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(close_by), if closing.is_some() => break,
        }
    }
    lock_sides(&sides).remove(&id);
    // Dropping `in_tx` (if still held) ends the engine's stream; dropping
    // `ws` closes the socket and unregisters the connection.
}

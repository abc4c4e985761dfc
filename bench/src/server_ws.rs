//! The bench WebSocket server: tokio-tungstenite on `ws://127.0.0.1:PORT/v1/connect`,
//! serving [`crate::server_core`] one socket per registration.

use std::sync::Arc;

use connector_proto::{StreamMessage, WS_SUBPROTOCOL};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::server_core::ServerShared;
use crate::wire::{emit, Result};

/// The server's own sockets are small too (4 KiB read buffer, no write
/// buffering): it is not what is measured, but thousands of 128 KiB
/// buffers would crowd the machine the client runs on. The same settings
/// as the raw client's.
fn config() -> WebSocketConfig {
    crate::client_raw::ws_config()
}

/// Serves until stdin closes. Commands: `count`, `measure SECS`.
pub(crate) async fn run(window: usize, payload: usize) -> Result<()> {
    let shared = ServerShared::new(window, payload);
    let listener = crate::server_grpc::listen()?;
    let port = listener.local_addr()?.port();
    let accept_shared = Arc::clone(&shared);
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve_socket(io, Arc::clone(&accept_shared)));
        }
    });
    emit(
        "ready",
        json!({ "port": port, "url": format!("ws://127.0.0.1:{port}/v1/connect") }),
    );
    crate::server_grpc::command_loop(&shared).await
}

/// Selects `connector.v1` when the client offers it (the SDK insists).
#[allow(clippy::result_large_err)] // tungstenite's callback signature
fn select_subprotocol(
    req: &Request,
    mut resp: Response,
) -> std::result::Result<Response, ErrorResponse> {
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == WS_SUBPROTOCOL);
    if offered {
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(WS_SUBPROTOCOL),
        );
    }
    Ok(resp)
}

async fn serve_socket(io: TcpStream, shared: Arc<ServerShared>) {
    let _ = io.set_nodelay(true);
    let _guard = shared.connection();
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(io, select_subprotocol, Some(config()))
            .await
    else {
        return;
    };
    let mut session = shared.session();
    let mut out = Vec::new();
    while let Some(Ok(frame)) = ws.next().await {
        match frame {
            Message::Binary(data) => {
                let Ok(m) = StreamMessage::decode(data) else {
                    break;
                };
                session.on_message(m, &mut out);
                for m in out.drain(..) {
                    if ws
                        .feed(Message::Binary(m.encode_to_vec().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if ws.flush().await.is_err() {
                    return;
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
}

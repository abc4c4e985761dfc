//! The raw baselines: what a hand-written client costs with nothing but
//! tonic or tokio-tungstenite, no SDK. They register, count approvals and
//! echo each `execute_request`'s payload back without decoding it; no
//! heartbeats, no state machine, no metrics. That makes them the ceiling
//! the SDK is compared with.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_proto::connector_service_client::ConnectorServiceClient;
use connector_proto::{Kind, RegistrationStatus, StreamMessage, WS_SUBPROTOCOL};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::json;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::{Channel, Endpoint};

use crate::wire::{
    echo, emit, emit_active, next_command, ready_then_go, register, unknown_command, Result,
};
use crate::ClientArgs;

/// The SDK's HTTP/2 stream window (connector-grpc `channel.rs`), mirrored
/// so both clients run with the same flow control.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// The SDK's connection window for `streams` streams per channel.
fn connection_window(streams: usize) -> u32 {
    let wanted = (streams as u64).saturating_mul(u64::from(STREAM_WINDOW));
    (wanted.min((1u64 << 31) - 1) as u32).max(5 * 1024 * 1024)
}

/// The same buffers as connector-ws's `WsConfig` defaults: 4 KiB reads, no
/// write buffering, a write cap of one largest message plus 16 KiB.
pub(crate) fn ws_config() -> WebSocketConfig {
    const MAX_MESSAGE: usize = 4 * 1024 * 1024;
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_MESSAGE + 16 * 1024)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// connector-ws's default pacing of handshakes, mirrored for the same
/// reason: thousands of simultaneous dials overflow the accept queue.
const WS_HANDSHAKES: usize = 64;

/// Counts approvals and wakes the waiter at the last one.
#[derive(Debug, Default)]
struct Progress {
    active: AtomicUsize,
    echoed: AtomicU64,
    done: Notify,
}

impl Progress {
    fn approved(&self, n: usize) {
        if self.active.fetch_add(1, Relaxed) + 1 == n {
            self.done.notify_one();
        }
    }

    /// Handles one server message; returns the answer, if any.
    fn on_message(&self, m: StreamMessage, n: usize, approved: &mut bool) -> Option<StreamMessage> {
        match m.kind {
            Some(Kind::RegisterResponse(r)) if r.status == RegistrationStatus::Approved as i32 => {
                if !*approved {
                    *approved = true;
                    self.approved(n);
                }
                None
            }
            Some(Kind::ExecuteRequest(req)) => {
                self.echoed.fetch_add(1, Relaxed);
                Some(echo(*req))
            }
            _ => None,
        }
    }
}

/// Runs the raw tonic client: `ceil(N/K)` channels, K streams on each.
pub(crate) async fn run_grpc(args: &ClientArgs) -> Result<()> {
    let (mut cmds, started, started_unix) = ready_then_go().await;

    let uri = args.url.replacen("grpc://", "http://", 1);
    let k = args.streams_per_channel.max(1);
    let endpoint = Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window(k));
    let channels = args.n.div_ceil(k);
    let channels: Vec<Channel> =
        futures_util::future::try_join_all((0..channels).map(|_| endpoint.connect())).await?;
    let progress = Arc::new(Progress::default());
    for i in 0..args.n {
        let channel = channels[i / k].clone();
        let progress = Arc::clone(&progress);
        let n = args.n;
        tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<StreamMessage>(64);
            // `register` is queued before the call starts, as the contract asks.
            if tx.send(register(i)).await.is_err() {
                return;
            }
            let mut client = ConnectorServiceClient::new(channel);
            let Ok(response) = client.connect(ReceiverStream::new(rx)).await else {
                return;
            };
            let mut inbound = response.into_inner();
            let mut approved = false;
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(answer) = progress.on_message(m, n, &mut approved) {
                    if tx.send(answer).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    wait_and_serve(
        args,
        &progress,
        started,
        started_unix,
        channels.len(),
        &mut cmds,
    )
    .await
}

/// Runs the raw tokio-tungstenite client: one socket per registration.
pub(crate) async fn run_ws(args: &ClientArgs) -> Result<()> {
    let (mut cmds, started, started_unix) = ready_then_go().await;

    let progress = Arc::new(Progress::default());
    let handshakes = Arc::new(Semaphore::new(WS_HANDSHAKES));
    let url: Arc<str> = Arc::from(args.url.as_str());
    for i in 0..args.n {
        let progress = Arc::clone(&progress);
        let handshakes = Arc::clone(&handshakes);
        let url = Arc::clone(&url);
        let n = args.n;
        tokio::spawn(async move {
            let Ok(permit) = handshakes.acquire().await else {
                return;
            };
            let Ok(mut ws) = dial_ws(&url).await else {
                return;
            };
            drop(permit);
            if ws
                .send(Message::Binary(register(i).encode_to_vec().into()))
                .await
                .is_err()
            {
                return;
            }
            let mut approved = false;
            while let Some(Ok(frame)) = ws.next().await {
                let Message::Binary(data) = frame else {
                    continue;
                };
                let Ok(m) = StreamMessage::decode(data) else {
                    return;
                };
                if let Some(answer) = progress.on_message(m, n, &mut approved) {
                    let frame = Message::Binary(answer.encode_to_vec().into());
                    if ws.send(frame).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    wait_and_serve(args, &progress, started, started_unix, args.n, &mut cmds).await
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn dial_ws(url: &str) -> Result<Ws> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(WS_SUBPROTOCOL),
    );
    let authority = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .ok_or("url has no authority")?;
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config())).await?;
    Ok(ws)
}

async fn wait_and_serve(
    args: &ClientArgs,
    progress: &Progress,
    started: Instant,
    started_unix: u64,
    connections: usize,
    cmds: &mut mpsc::UnboundedReceiver<String>,
) -> Result<()> {
    let deadline = started + Duration::from_secs_f64(args.timeout_secs);
    while progress.active.load(Relaxed) < args.n {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "only {} of {} raw registrations active after {} s",
                progress.active.load(Relaxed),
                args.n,
                args.timeout_secs
            )
            .into());
        }
        // The notification is the fast path; the timeout bounds the wait.
        let _ = tokio::time::timeout(
            (deadline - now).min(Duration::from_millis(50)),
            progress.done.notified(),
        )
        .await;
    }
    emit_active(
        args.n,
        started.elapsed().as_secs_f64(),
        started_unix,
        connections,
    );
    loop {
        let cmd = next_command(cmds).await;
        match cmd.as_str() {
            "stats" => emit(
                "stats",
                json!({
                    "active": progress.active.load(Relaxed),
                    "requests_received": progress.echoed.load(Relaxed),
                    "requests_failed": 0,
                    "connections": connections,
                }),
            ),
            "exit" => std::process::exit(0),
            other => unknown_command(other),
        }
    }
}

//! `connector-bench hotpath`: the SDK's per-response path in one process,
//! with no network, for instruction counts that load cannot disturb.
//!
//! N echo registrations run in a `MultiConnectorRunner` over an in-process
//! [`StreamMux`] whose "server" (one task per stream) approves the
//! `register`, keeps `window` 64 B JSON `execute_request`s outstanding,
//! replaces each answer with a new request and acks heartbeats. Everything
//! the SDK does per response runs (decode-free dispatch, JSON check,
//! concurrency bound, in-flight table, answered log, outbox), everything
//! gRPC does not. Request payloads share one buffer, as tonic's decoded
//! `bytes` fields share its receive buffer (cloning one is a reference
//! count, not an allocation). On a single-threaded runtime, so a run is
//! deterministic enough to compare instruction counts:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=a.out \
//!     target/release/connector-bench hotpath --n 80 --responses 100000
//! valgrind --tool=callgrind --callgrind-out-file=b.out \
//!     target/release/connector-bench hotpath --n 80 --responses 300000
//! # instructions per response = (Ir(b) - Ir(a)) / 200000
//! callgrind_annotate b.out | head -60     # where they go
//! ```

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use connector_core::{
    MessageStream, MultiConnectorRunner, MultiTransportOptions, RegistrationKey, StreamInfo,
    StreamMux, Transport, TransportError,
};
use connector_proto::{ExecuteRequest, Kind, PayloadEncoding, StreamMessage};
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;

use crate::client_sdk::echo_registrations;
use crate::wire::{approved, heartbeat_ack, json_payload, msg, Result};

/// An `execute_request` with id `id` whose payload shares `payload`.
fn execute(id: u64, payload: &Bytes) -> StreamMessage {
    msg(Kind::ExecuteRequest(Box::new(ExecuteRequest {
        request_id: id.to_string(),
        payload: payload.clone(),
        encoding: PayloadEncoding::Json as i32,
        ..Default::default()
    })))
}

/// Arguments of `hotpath`.
#[derive(Debug, clap::Args)]
pub(crate) struct HotpathArgs {
    /// Registrations.
    #[arg(long, default_value_t = 80)]
    n: usize,
    /// Responses to wait for in all.
    #[arg(long, default_value_t = 200_000)]
    responses: i64,
    /// Requests kept outstanding per stream (the bench server's 32).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Size of each request's JSON payload.
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

struct Shared {
    window: usize,
    /// Already shared (see the module docs).
    payload: Bytes,
    /// Responses still to come; the run ends at 0.
    remaining: AtomicI64,
    done: Notify,
}

#[derive(Clone)]
struct LoopTransport(Arc<Shared>);

#[async_trait]
impl Transport for LoopTransport {
    async fn mux(
        &self,
        _options: &MultiTransportOptions,
    ) -> std::result::Result<Arc<dyn StreamMux>, TransportError> {
        Ok(Arc::new(self.clone()))
    }
}

#[async_trait]
impl StreamMux for LoopTransport {
    async fn open(
        &self,
        _key: &RegistrationKey,
        register: StreamMessage,
    ) -> std::result::Result<MessageStream, TransportError> {
        let (out_tx, out_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(256);
        tokio::spawn(serve(Arc::clone(&self.0), register, out_rx, in_tx));
        let inbound = ReceiverStream::new(in_rx).map(Ok).boxed();
        Ok(MessageStream::new(out_tx, inbound, StreamInfo::new(1)))
    }
}

/// The server side of one stream.
async fn serve(
    shared: Arc<Shared>,
    register: StreamMessage,
    mut from_client: mpsc::Receiver<StreamMessage>,
    to_client: mpsc::Sender<StreamMessage>,
) {
    let Some(Kind::Register(r)) = register.kind else {
        return;
    };
    if to_client.send(approved(&r)).await.is_err() {
        return;
    }
    let mut next_id = 0u64;
    for _ in 0..shared.window {
        next_id += 1;
        if to_client
            .send(execute(next_id, &shared.payload))
            .await
            .is_err()
        {
            return;
        }
    }
    while let Some(m) = from_client.recv().await {
        let reply = match m.kind {
            Some(Kind::ExecuteResponse(_)) => {
                let left = shared.remaining.fetch_sub(1, Ordering::Relaxed) - 1;
                if left == 0 {
                    shared.done.notify_one();
                }
                if left <= 0 {
                    continue;
                }
                next_id += 1;
                execute(next_id, &shared.payload)
            }
            Some(Kind::Heartbeat(h)) => heartbeat_ack(&h),
            _ => continue,
        };
        if to_client.send(reply).await.is_err() {
            return;
        }
    }
}

/// Runs the hot-path harness and prints one line of figures.
pub(crate) fn run(args: &HotpathArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shared = Arc::new(Shared {
            window: args.window,
            payload: {
                let payload = Bytes::from(json_payload(args.payload.max(8)));
                // The first clone makes the buffer shared; later ones count.
                let _ = payload.clone();
                payload
            },
            remaining: AtomicI64::new(args.responses),
            done: Notify::new(),
        });
        let registrations = echo_registrations(args.n)?;
        let options = MultiTransportOptions::builder("grpc://127.0.0.1:1").build()?;
        let runner =
            MultiConnectorRunner::new(registrations, options, LoopTransport(Arc::clone(&shared)));
        let started = Instant::now();
        let run = tokio::spawn({
            let runner = runner.clone();
            async move { runner.run().await }
        });
        let bound = Duration::from_secs(600);
        tokio::time::timeout(bound, shared.done.notified())
            .await
            .map_err(|_| format!("{} responses not done within {bound:?}", args.responses))?;
        let secs = started.elapsed().as_secs_f64();
        runner.shutdown_handle().shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
        println!(
            "hotpath: n={} window={} payload={} B: {} responses in {secs:.3} s ({:.0}/s)",
            args.n,
            args.window,
            args.payload,
            args.responses,
            args.responses as f64 / secs
        );
        Ok(())
    })
}

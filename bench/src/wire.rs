//! What the bench's processes say to each other, and the protocol messages
//! the bench server and the raw clients build.
//!
//! A child process (server or client) writes one JSON object per line on
//! stdout (`{"event":"ready",...}`) and reads one command per line on
//! stdin (`go`, `count`, `measure 5`, ...). End of stdin means the
//! orchestrator is gone: the child exits at once, so no child outlives a
//! crashed or interrupted run.

use std::io::BufRead;
use std::time::Instant;

use connector_proto::{
    ExecuteRequest, ExecuteResponse, Heartbeat, HeartbeatAck, Kind, PayloadEncoding,
    RegisterRequest, RegisterResponse, RegistrationStatus, StreamMessage,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::sys::unix_us;

/// Boxed error: this is a measuring tool, errors are reported, not matched.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Result with [`BoxError`].
pub(crate) type Result<T> = std::result::Result<T, BoxError>;

/// Writes one event line to stdout (line-buffered, so it is flushed).
pub(crate) fn emit(event: &str, mut fields: Value) {
    if let Value::Object(map) = &mut fields {
        map.insert("event".into(), Value::from(event));
    }
    println!("{fields}");
}

/// Reports a fatal error to the orchestrator and exits the child.
pub(crate) fn fail(err: &dyn std::fmt::Display) -> ! {
    emit("error", json!({ "message": err.to_string() }));
    std::process::exit(1);
}

/// Commands from the orchestrator, read on a plain thread (stdin is
/// blocking). The channel closes when stdin ends.
pub(crate) fn commands() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next command, or exit when the orchestrator closed stdin.
pub(crate) async fn next_command(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
    match rx.recv().await {
        Some(cmd) => cmd,
        None => std::process::exit(0),
    }
}

/// Answers a command the child does not know with an `error` event.
pub(crate) fn unknown_command(cmd: &str) {
    emit(
        "error",
        json!({ "message": format!("unknown command {cmd:?}") }),
    );
}

/// How every client starts: says `ready` (with its pid) and waits for
/// `go`. Returns the commands that follow and when `go` came, as an
/// instant and in Unix microseconds.
pub(crate) async fn ready_then_go() -> (mpsc::UnboundedReceiver<String>, Instant, u64) {
    let mut cmds = commands();
    emit("ready", json!({ "pid": std::process::id() }));
    while next_command(&mut cmds).await != "go" {}
    (cmds, Instant::now(), unix_us())
}

/// A client's `active` event: all `n` registrations became active `secs`
/// after `go` (at `started_unix`), over `connections` connections.
pub(crate) fn emit_active(n: usize, secs: f64, started_unix: u64, connections: usize) {
    emit(
        "active",
        json!({
            "n": n,
            "secs": secs,
            "start_unix_us": started_unix,
            "active_unix_us": unix_us(),
            "connections": connections,
        }),
    );
}

/// Wraps a message kind.
pub(crate) fn msg(kind: Kind) -> StreamMessage {
    StreamMessage { kind: Some(kind) }
}

/// The `register` of simulated registration `i` (`bench.echo.i<i>`).
pub(crate) fn register(i: usize) -> StreamMessage {
    msg(Kind::Register(Box::new(RegisterRequest {
        tenant_id: "bench".into(),
        connector_type: "echo".into(),
        instance_id: format!("i{i}"),
        version: "0.0.0".into(),
        max_concurrent_requests: 100,
        ..Default::default()
    })))
}

/// The instance id of simulated registration `i`.
pub(crate) fn instance_id(i: usize) -> String {
    format!("i{i}")
}

/// `register_response` with `APPROVED`.
pub(crate) fn approved(r: &RegisterRequest) -> StreamMessage {
    msg(Kind::RegisterResponse(Box::new(RegisterResponse {
        status: RegistrationStatus::Approved as i32,
        session_token: "bench-session".into(),
        address: format!("{}.{}.{}", r.tenant_id, r.connector_type, r.instance_id),
        ..Default::default()
    })))
}

/// The ack of a heartbeat.
pub(crate) fn heartbeat_ack(h: &Heartbeat) -> StreamMessage {
    msg(Kind::HeartbeatAck(Box::new(HeartbeatAck {
        sequence: h.sequence,
        sent_at_unix_ms: h.sent_at_unix_ms,
        should_reconnect: false,
    })))
}

/// An `execute_request` with id `id`.
pub(crate) fn execute(id: u64, payload: &[u8]) -> StreamMessage {
    msg(Kind::ExecuteRequest(Box::new(ExecuteRequest {
        request_id: id.to_string(),
        payload: payload.to_vec().into(),
        encoding: PayloadEncoding::Json as i32,
        ..Default::default()
    })))
}

/// The raw baseline's answer: the request's id and payload moved into a
/// successful response, the payload never decoded.
pub(crate) fn echo(req: ExecuteRequest) -> StreamMessage {
    msg(Kind::ExecuteResponse(Box::new(ExecuteResponse {
        request_id: req.request_id,
        success: true,
        payload: req.payload,
        encoding: req.encoding,
        ..Default::default()
    })))
}

/// A JSON document of exactly `size` bytes (at least 8): `{"d":"xxx…"}`.
pub(crate) fn json_payload(size: usize) -> Vec<u8> {
    let fill = size.saturating_sub(8);
    let mut v = Vec::with_capacity(fill + 8);
    v.extend_from_slice(b"{\"d\":\"");
    v.extend(std::iter::repeat_n(b'x', fill));
    v.extend_from_slice(b"\"}");
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_json_of_the_exact_size() {
        for size in [64, 4096] {
            let p = json_payload(size);
            assert_eq!(p.len(), size);
            let v: Value = serde_json::from_slice(&p).expect("valid JSON");
            assert!(v.get("d").is_some());
        }
    }
}

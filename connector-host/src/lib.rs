//! Shared pieces of the `connector-host` program and the examples.
//!
//! - [`EchoConnector`]: the echo connector of the `connector-host` contract
//!   (`echo`, `sleep`, `fail`);
//! - [`HostTransport`] / [`transport_for`]: the gRPC or WebSocket transport,
//!   picked by the URL scheme of the options;
//! - [`SummaryRow`] / [`render_summary`]: the table `connector-host` prints
//!   when it stops;
//! - [`ops`]: the `/metrics` and `/ready` endpoint of `--metrics-addr`.
#![deny(missing_docs)]

pub mod ops;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use connector_core::proto::{Capability, PayloadEncoding};
use connector_core::{
    BaseConnector, ExecuteContext, ExecuteError, ExecuteOutput, MultiTransportOptions, StreamMux,
    Transport, TransportError, TransportKind,
};
use connector_grpc::GrpcTransport;
use connector_ws::WsTransport;

/// The echo connector: `echo` (also for an empty capability id) returns the
/// JSON payload unchanged, `sleep` takes `{"ms": N}`, waits N ms and returns
/// `{"slept_ms": N}`, `fail` always fails with a `HANDLER` error.
///
/// Its three capabilities are declared, so the SDK answers any other
/// capability id with `UNKNOWN_CAPABILITY` without calling it, and a payload
/// sent with JSON encoding that is not JSON with `BAD_PAYLOAD`. Payloads sent
/// as RAW or with no encoding are checked here, with the same answer.
#[derive(Debug, Clone)]
pub struct EchoConnector {
    connector_type: String,
}

impl Default for EchoConnector {
    fn default() -> Self {
        Self::new()
    }
}

impl EchoConnector {
    /// An echo connector of type `echo`.
    pub fn new() -> Self {
        Self::with_type("echo")
    }

    /// An echo connector registered under another connector type.
    pub fn with_type(connector_type: impl Into<String>) -> Self {
        Self {
            connector_type: connector_type.into(),
        }
    }
}

const SLEEP_INPUT_SCHEMA: &str = r#"{"type":"object","required":["ms"],
  "properties":{"ms":{"type":"integer","minimum":0}}}"#;
const SLEEP_OUTPUT_SCHEMA: &str = r#"{"type":"object","required":["slept_ms"],
  "properties":{"slept_ms":{"type":"integer","minimum":0}}}"#;

fn capability(id: &str, description: &str, input: &str, output: &str) -> Capability {
    Capability {
        id: id.into(),
        description: description.into(),
        input_schema_json: input.into(),
        output_schema_json: output.into(),
    }
}

#[async_trait]
impl BaseConnector for EchoConnector {
    fn connector_type(&self) -> &str {
        &self.connector_type
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![
            capability(
                "echo",
                "Returns the JSON payload unchanged (also used for an empty capability id).",
                "{}",
                "{}",
            ),
            capability(
                "sleep",
                "Waits `ms` milliseconds, then returns {\"slept_ms\": ms}.",
                SLEEP_INPUT_SCHEMA,
                SLEEP_OUTPUT_SCHEMA,
            ),
            capability(
                "fail",
                "Always fails with a HANDLER error; for testing error paths.",
                "{}",
                "{}",
            ),
        ]
    }

    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        // The SDK checks JSON payloads already; RAW and unspecified ones
        // reach us unchecked, and the contract wants BAD_PAYLOAD for them too.
        if ctx.encoding != PayloadEncoding::Json {
            serde_json::from_slice::<serde_json::Value>(&ctx.payload).map_err(|e| {
                ExecuteError::bad_payload(format!("payload is not valid JSON: {e}"))
            })?;
        }
        match ctx.capability_id.as_str() {
            "" | "echo" => Ok(ExecuteOutput::json_bytes(ctx.payload)),
            "sleep" => {
                let value: serde_json::Value = ctx.json()?;
                let ms = value
                    .get("ms")
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| {
                        ExecuteError::bad_payload(
                            "`sleep` takes {\"ms\": N} with N a non-negative integer",
                        )
                    })?;
                // Cancellation and deadlines drop this future; nothing to do.
                tokio::time::sleep(Duration::from_millis(ms)).await;
                ExecuteOutput::json(&serde_json::json!({ "slept_ms": ms }))
            }
            "fail" => Err(ExecuteError::handler(
                "the `fail` capability always fails (as asked)",
            )),
            other => Err(ExecuteError::unknown_capability(other)),
        }
    }
}

/// The transport a set of options calls for: gRPC for `grpc://`/`grpcs://`,
/// WebSocket for `ws://`/`wss://`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum HostTransport {
    /// gRPC: many registrations per HTTP/2 connection.
    Grpc(GrpcTransport),
    /// WebSocket: one socket per registration.
    WebSocket(WsTransport),
}

/// Picks the transport for `options.endpoint.kind`.
pub fn transport_for(options: &MultiTransportOptions) -> HostTransport {
    match options.endpoint.kind {
        TransportKind::WebSocket => HostTransport::WebSocket(WsTransport::new()),
        // gRPC, and any kind added later: the gRPC transport reports a URL
        // it cannot serve as a configuration error when the runner starts.
        _ => HostTransport::Grpc(GrpcTransport::new()),
    }
}

#[async_trait]
impl Transport for HostTransport {
    async fn mux(
        &self,
        options: &MultiTransportOptions,
    ) -> Result<Arc<dyn StreamMux>, TransportError> {
        match self {
            Self::Grpc(t) => t.mux(options).await,
            Self::WebSocket(t) => t.mux(options).await,
        }
    }
}

/// One registration's line in the summary table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryRow {
    /// `tenant.type.instance`.
    pub address: String,
    /// The state shown (for example `active`).
    pub state: String,
    /// Requests answered with success.
    pub ok: u64,
    /// Requests answered with an error (any kind).
    pub failed: u64,
    /// Approvals after a lost stream.
    pub reconnects: u64,
    /// Round trip of the last acknowledged heartbeat, if any.
    pub heartbeat_rtt: Option<Duration>,
}

fn fmt_rtt(rtt: Option<Duration>) -> String {
    match rtt {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(10) => {
            format!("{:.2} ms", d.as_secs_f64() * 1000.0)
        }
        Some(d) => format!("{} ms", d.as_millis()),
    }
}

/// Renders the summary table: a header, one row per registration, then a
/// totals row (`total (N)`, the count per state, the summed counters and
/// the worst heartbeat RTT) and `TCP connections used: N`. Every line ends
/// with a newline.
pub fn render_summary(rows: &[SummaryRow], tcp_connections: usize) -> String {
    let mut by_state: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in rows {
        *by_state.entry(r.state.as_str()).or_default() += 1;
    }
    let states = by_state
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ");
    let total = SummaryRow {
        address: format!("total ({})", rows.len()),
        state: states,
        ok: rows.iter().map(|r| r.ok).sum(),
        failed: rows.iter().map(|r| r.failed).sum(),
        reconnects: rows.iter().map(|r| r.reconnects).sum(),
        heartbeat_rtt: rows.iter().filter_map(|r| r.heartbeat_rtt).max(),
    };
    let header = [
        "address",
        "state",
        "ok",
        "failed",
        "reconnects",
        "heartbeat rtt",
    ];
    let cells = |r: &SummaryRow| {
        [
            r.address.clone(),
            r.state.clone(),
            r.ok.to_string(),
            r.failed.to_string(),
            r.reconnects.to_string(),
            fmt_rtt(r.heartbeat_rtt),
        ]
    };
    let body: Vec<[String; 6]> = rows.iter().chain([&total]).map(cells).collect();
    let mut widths = header.map(str::len);
    for line in &body {
        for (w, c) in widths.iter_mut().zip(line) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String; 6]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            // Text left-aligned, numbers right-aligned.
            let _ = match i {
                0 | 1 => write!(s, "{c:<w$}  "),
                _ => write!(s, "{c:>w$}  "),
            };
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    line(&widths.map(|w| "-".repeat(w)));
    for (i, cells) in body.iter().enumerate() {
        if i == rows.len() {
            line(&widths.map(|w| "-".repeat(w)));
        }
        line(cells);
    }
    let _ = writeln!(out, "TCP connections used: {tcp_connections}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_has_one_row_per_registration_and_totals() {
        let row = |i: u64, rtt| SummaryRow {
            address: format!("demo.echo.echo-{i}"),
            state: "active".into(),
            ok: 10 * i,
            failed: i,
            reconnects: 0,
            heartbeat_rtt: rtt,
        };
        let rows = [
            row(0, None),
            row(1, Some(Duration::from_micros(450))),
            row(2, Some(Duration::from_millis(12))),
        ];
        let table = render_summary(&rows, 1);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + 3 + 2 + 1, "{table}");
        assert!(lines[0].starts_with("address"), "{table}");
        assert!(lines[3].contains("0.45 ms"), "{table}");
        assert!(lines[4].contains("12 ms"), "{table}");
        assert!(lines[6].starts_with("total (3)"), "{table}");
        assert!(lines[6].contains("3 active"), "{table}");
        assert!(lines[6].contains("30"), "{table}");
        assert_eq!(lines[7], "TCP connections used: 1");
    }

    #[test]
    fn transport_follows_the_scheme() {
        let pick = |url: &str| {
            transport_for(
                &MultiTransportOptions::builder(url)
                    .build()
                    .expect("valid url"),
            )
        };
        assert!(matches!(pick("grpc://h:1"), HostTransport::Grpc(_)));
        assert!(matches!(pick("grpcs://h:1"), HostTransport::Grpc(_)));
        assert!(matches!(pick("ws://h:1"), HostTransport::WebSocket(_)));
        assert!(matches!(pick("wss://h:1"), HostTransport::WebSocket(_)));
    }
}

//! Three different connector types in one `MultiConnectorRunner`.
//!
//! ```sh
//! cargo run -p examples --example multi_types -- grpc://127.0.0.1:50051
//! cargo run -p examples --example multi_types -- ws://127.0.0.1:8080
//! ```
//!
//! One process, one transport: over gRPC all three registrations share one
//! HTTP/2 connection; each still registers, heartbeats, reconnects and is
//! approved on its own, so one rejected connector does not stop the others.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use connector_core::proto::Capability;
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorRegistration, ExecuteContext, ExecuteError,
    ExecuteOutput, MultiConnectorRunner, MultiTransportOptions,
};
use connector_host::{render_summary, transport_for, EchoConnector, SummaryRow};

/// `now` → `{"unix_ms": …}`.
struct Clock;

#[async_trait]
impl BaseConnector for Clock {
    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            id: "now".into(),
            description: "The host's wall-clock time".into(),
            ..Default::default()
        }]
    }

    async fn execute(&self, _ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| ExecuteError::handler(e.to_string()))?
            .as_millis() as u64;
        ExecuteOutput::json(&serde_json::json!({ "unix_ms": ms }))
    }
}

/// `sum` of `{"values": [numbers]}` → `{"sum": …}`.
struct Calc;

#[async_trait]
impl BaseConnector for Calc {
    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            id: "sum".into(),
            description: "Adds {\"values\": [number]}".into(),
            ..Default::default()
        }]
    }

    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        let input: serde_json::Value = ctx.json()?;
        let values = input["values"]
            .as_array()
            .ok_or_else(|| ExecuteError::bad_payload("expected {\"values\": [number]}"))?;
        let mut sum = 0.0;
        for v in values {
            // A wrong input is the caller's mistake (BAD_PAYLOAD), not ours.
            sum += v
                .as_f64()
                .ok_or_else(|| ExecuteError::bad_payload(format!("{v} is not a number")))?;
        }
        ExecuteOutput::json(&serde_json::json!({ "sum": sum }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "grpc://127.0.0.1:50051".into());

    // Each registration has its own identity (tenant, connector type,
    // instance); the connector value only says what it can do.
    let registrations = vec![
        ConnectorRegistration::new(
            ConnectorConfig::builder("acme", "echo", "echo-1").build()?,
            EchoConnector::new(),
        ),
        ConnectorRegistration::new(
            ConnectorConfig::builder("acme", "clock", "clock-1").build()?,
            Clock,
        ),
        ConnectorRegistration::new(
            // A slow or expensive connector can run fewer requests at once
            // than the runner-wide default.
            ConnectorConfig::builder("acme", "calc", "calc-1")
                .max_concurrent_requests(4)
                .build()?,
            Calc,
        ),
    ];

    let options = MultiTransportOptions::builder(url).build()?;
    // gRPC or WebSocket, by the URL's scheme.
    let runner = MultiConnectorRunner::new(registrations, options.clone(), transport_for(&options));

    let stop = runner.shutdown_handle();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.shutdown();
    });
    runner.run().await?;

    // Per-registration counters survive the runner's stop.
    let rows: Vec<SummaryRow> = runner
        .metrics_snapshot()
        .into_iter()
        .map(|(key, m)| SummaryRow {
            address: key.to_string(),
            state: m.state.name().to_string(),
            ok: m.requests_succeeded,
            failed: m.requests_failed,
            reconnects: m.successful_reconnects,
            heartbeat_rtt: m.last_heartbeat_rtt,
        })
        .collect();
    print!(
        "{}",
        render_summary(&rows, runner.summary().transport.open_connections())
    );
    Ok(())
}

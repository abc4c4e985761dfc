//! One connector, hosted by `ConnectorRunner` over gRPC or WebSocket.
//!
//! ```sh
//! cargo run -p examples --example single_connector -- grpc://127.0.0.1:50051
//! cargo run -p examples --example single_connector -- ws://127.0.0.1:8080
//! CONNECTOR_URL=grpcs://cp.example.com:443 cargo run -p examples --example single_connector
//! ```
//!
//! Only the URL's scheme picks the transport: the connector, the config and
//! the runner are the same. A WebSocket registration gets its own socket to
//! `ws[s]://host:port/v1/connect` (the path is added when the URL has none).
//!
//! Ctrl-C stops it gracefully: requests in flight are answered first.

use async_trait::async_trait;
use connector_core::proto::Capability;
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorRegistration, ConnectorRunner, ExecuteContext,
    ExecuteError, ExecuteOutput, MultiTransportOptions, TransportKind,
};
use connector_grpc::GrpcTransport;
use connector_ws::WsTransport;

/// Upper-cases text: `{"text": "hi"}` → `{"text": "HI"}`.
struct Shout;

#[async_trait]
impl BaseConnector for Shout {
    // Declaring capabilities lets the SDK answer any other capability id
    // with UNKNOWN_CAPABILITY, and tells the control plane what we can do.
    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            id: "shout".into(),
            description: "Upper-cases {\"text\": string}".into(),
            ..Default::default()
        }]
    }

    // Called concurrently (up to max_concurrent_requests), hence `&self`.
    // The SDK has already checked that a JSON payload parses.
    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        let input: serde_json::Value = ctx.json()?;
        let text = input["text"]
            .as_str()
            .ok_or_else(|| ExecuteError::bad_payload("expected {\"text\": string}"))?;
        ExecuteOutput::json(&serde_json::json!({ "text": text.to_uppercase() }))
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
        .or_else(|| std::env::var("CONNECTOR_URL").ok())
        .unwrap_or_else(|| "grpc://127.0.0.1:50051".into());

    // Identifiers and the URL are validated here, before any connection:
    // a typo fails now with a message naming the field.
    let config = ConnectorConfig::builder("acme", "shout", "shout-1")
        .auth_token(std::env::var("CONNECTOR_AUTH_TOKEN").unwrap_or_default())
        .build()?;
    let options = MultiTransportOptions::builder(url).build()?;

    let registration = ConnectorRegistration::new(config, Shout);
    // WebSocket keeps the protocol's heartbeats on top of its own ping/pong:
    // pings prove the socket is alive, heartbeats prove the server is.
    let runner = match options.endpoint.kind {
        TransportKind::WebSocket => ConnectorRunner::new(registration, options, WsTransport::new()),
        _ => ConnectorRunner::new(registration, options, GrpcTransport::new()),
    };

    // The shutdown handle is cheap to clone and works from any task.
    let stop = runner.shutdown_handle();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.shutdown();
    });

    // Runs until shutdown. Network failures never end it: the registration
    // backs off and reconnects. Only a configuration error does.
    runner.run().await?;
    if let Some(m) = runner.metrics() {
        println!(
            "answered {} requests ({} failed)",
            m.requests_succeeded + m.requests_failed,
            m.requests_failed
        );
    }
    Ok(())
}

//! The single-connector program over WebSocket instead of gRPC.
//!
//! ```sh
//! cargo run -p examples --example websocket -- ws://127.0.0.1:8080
//! ```
//!
//! Only the URL and the transport change: the connector, the config and the
//! runner are the same. Each registration gets its own socket to
//! `ws[s]://host:port/v1/connect` (the path is added when the URL has none).

use async_trait::async_trait;
use connector_core::proto::Capability;
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorRegistration, ConnectorRunner, ExecuteContext,
    ExecuteError, ExecuteOutput, MultiTransportOptions,
};
use connector_ws::WsTransport;

/// Upper-cases text: `{"text": "hi"}` → `{"text": "HI"}`.
struct Shout;

#[async_trait]
impl BaseConnector for Shout {
    fn connector_type(&self) -> &str {
        "shout"
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            id: "shout".into(),
            description: "Upper-cases {\"text\": string}".into(),
            ..Default::default()
        }]
    }

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
        .unwrap_or_else(|| "ws://127.0.0.1:8080".into());

    let config = ConnectorConfig::builder("acme", "shout", "shout-ws-1")
        .auth_token(std::env::var("CONNECTOR_AUTH_TOKEN").unwrap_or_default())
        .build()?;
    // WebSocket keeps the protocol's heartbeats on top of its own ping/pong:
    // pings prove the socket is alive, heartbeats prove the server is.
    let options = MultiTransportOptions::builder(url).build()?;

    // `WsTransport` instead of `GrpcTransport`; a `grpc://` URL here would be
    // reported by `run` as a configuration error.
    let runner = ConnectorRunner::new(
        ConnectorRegistration::new(config, Shout),
        options,
        WsTransport::new(),
    );

    let stop = runner.shutdown_handle();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.shutdown();
    });

    runner.run().await?;
    println!("stopped; final state: {}", runner.state());
    Ok(())
}

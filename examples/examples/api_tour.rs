use async_trait::async_trait;
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorError, ConnectorRegistration, ExecuteContext,
    ExecuteError, ExecuteOutput, MultiConnectorRunner, MultiTransportOptions,
};
use connector_grpc::GrpcTransport;

struct Echo;

#[async_trait]
impl BaseConnector for Echo {
    // Runs concurrently, up to max_concurrent_requests per registration.
    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        Ok(ExecuteOutput::json_bytes(ctx.payload))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Validated here, before any connection: a bad identifier or URL fails now.
    let regs = (0..3)
        .map(|i| {
            let config = ConnectorConfig::builder("acme", "echo", format!("echo-{i}"))
                .auth_token("…")
                .build()?;
            Ok(ConnectorRegistration::new(config, Echo))
        })
        .collect::<Result<Vec<_>, ConnectorError>>()?;
    let options = MultiTransportOptions::builder("grpc://127.0.0.1:50051")
        .max_streams_per_channel(80)
        .build()?;
    let runner = MultiConnectorRunner::new(regs, options, GrpcTransport::new());

    let stop = runner.shutdown_handle(); // graceful shutdown from anywhere
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.shutdown();
    });
    let key = runner.registrations()[0].clone();
    if let Some(live) = runner.registration(&key) {
        let _state = live.watch_state(); // tokio::sync::watch of RegistrationState
        let _events = live.events(); // connected, approved, disconnected{cause}, …
    }
    runner.run().await?; // until shutdown or all stopped
    Ok(())
}

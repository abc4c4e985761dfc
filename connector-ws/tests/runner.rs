//! The whole SDK over WebSocket: `MultiConnectorRunner` + `WsTransport`
//! against the testkit's WebSocket server on loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use connector_core::proto::{ExecuteRequest, PayloadEncoding};
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorError, ConnectorRegistration, ExecuteContext,
    ExecuteError, ExecuteOutput, MultiConnectorRunner, MultiTransportOptions, RegistrationState,
};
use connector_testkit::{TestServer, WsServerOptions, WsTestServer};
use connector_ws::WsTransport;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(15);

/// Echoes the payload. With `gate`, each execute first waits for a permit
/// (so a test holds requests in flight), and `started` counts entries.
struct Echo {
    gate: Option<Arc<Semaphore>>,
    started: watch::Sender<usize>,
}

impl Echo {
    fn new(gate: Option<Arc<Semaphore>>) -> Arc<Self> {
        Arc::new(Self {
            gate,
            started: watch::Sender::new(0),
        })
    }
}

#[async_trait]
impl BaseConnector for Echo {
    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        self.started.send_modify(|n| *n += 1);
        if let Some(gate) = &self.gate {
            let permit = gate
                .acquire()
                .await
                .map_err(|_| ExecuteError::handler("gate closed"))?;
            permit.forget();
        }
        Ok(ExecuteOutput::json_bytes(ctx.payload))
    }
}

fn options(url: &str) -> MultiTransportOptions {
    MultiTransportOptions::builder(url)
        .connect_timeout(Duration::from_secs(5))
        .reconnect_delay(Duration::from_millis(20))
        .jitter(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(200))
        .drain_timeout(Duration::from_secs(5))
        .jitter_seed(Some(7))
        .build()
        .unwrap()
}

fn runner(n: usize, options: MultiTransportOptions, echo: &Arc<Echo>) -> MultiConnectorRunner {
    let regs = (0..n)
        .map(|i| {
            ConnectorRegistration::from_arc(
                ConnectorConfig::builder("acme", "echo", format!("i{i}"))
                    .auth_token("secret-token")
                    .build()
                    .unwrap(),
                echo.clone(),
            )
        })
        .collect();
    MultiConnectorRunner::new(regs, options, WsTransport::new())
}

fn start(runner: &MultiConnectorRunner) -> JoinHandle<Result<(), ConnectorError>> {
    let r = runner.clone();
    tokio::spawn(async move { r.run().await })
}

async fn stop(runner: &MultiConnectorRunner, run: JoinHandle<Result<(), ConnectorError>>) {
    runner.shutdown_handle().shutdown();
    timeout(WAIT, run)
        .await
        .expect("run() returns after shutdown")
        .expect("no panic")
        .expect("clean stop");
    // No socket and no writer task outlives run().
    assert_eq!(runner.summary().transport.open_connections(), 0);
}

fn echo_request(id: &str) -> ExecuteRequest {
    ExecuteRequest {
        request_id: id.into(),
        payload: format!("{{\"id\":\"{id}\"}}").into_bytes().into(),
        encoding: PayloadEncoding::Json as i32,
        ..Default::default()
    }
}

async fn ws_server(opts: WsServerOptions) -> (TestServer, WsTestServer) {
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), opts).await.unwrap();
    (engine, server)
}

async fn wait_all_active(runner: &MultiConnectorRunner) {
    for key in runner.registrations() {
        runner
            .registration(&key)
            .unwrap()
            .wait_for(WAIT, |s| *s == RegistrationState::Active)
            .await
            .unwrap_or_else(|| panic!("{key} not active"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_registrations_twenty_sockets_all_active_and_echo() {
    let (engine, server) = ws_server(WsServerOptions::default()).await;
    let echo = Echo::new(None);
    let runner = runner(20, options(&server.url()), &echo);
    let run = start(&runner);

    engine.wait_for_active(20, WAIT).await.unwrap();
    wait_all_active(&runner).await;
    server.wait_for_connection_count(20, WAIT).await.unwrap();
    assert_eq!(runner.summary().transport.open_connections(), 20);

    for key in runner.registrations() {
        let id = format!("req-{key}");
        let resp = timeout(WAIT, engine.execute(&key, echo_request(&id)))
            .await
            .expect("answered in time")
            .unwrap();
        assert!(resp.success, "{resp:?}");
        assert_eq!(resp.payload, echo_request(&id).payload);
    }

    stop(&runner, run).await;
    server.wait_for_connection_count(0, WAIT).await.unwrap();
    assert!(
        engine.stats().protocol_errors.is_empty(),
        "{:?}",
        engine.stats()
    );
}

#[tokio::test]
async fn text_and_garbage_frames_make_the_registration_reconnect() {
    let (engine, server) = ws_server(WsServerOptions::default()).await;
    let echo = Echo::new(None);
    let runner = runner(2, options(&server.url()), &echo);
    let run = start(&runner);
    engine.wait_for_active(2, WAIT).await.unwrap();

    assert!(server.send_text_frame("acme.echo.i0"));
    assert!(server.send_garbage_frame("acme.echo.i1"));
    engine
        .wait_until(WAIT, |e| {
            e.stats().registers >= 4 && e.active_keys().len() == 2
        })
        .await
        .unwrap();
    wait_all_active(&runner).await;
    for key in runner.registrations() {
        let m = runner.registration(&key).unwrap().metrics();
        assert!(m.total_disconnects >= 1, "{key}: {m:?}");
        assert!(m.successful_reconnects >= 1, "{key}: {m:?}");
        assert_eq!(
            m.protocol_errors, 1,
            "{key}: the bad frame is counted: {m:?}"
        );
    }
    stop(&runner, run).await;
    server.wait_for_connection_count(0, WAIT).await.unwrap();
}

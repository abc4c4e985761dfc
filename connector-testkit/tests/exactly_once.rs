//! Random stream closes, connection kills and server restarts while
//! executes flow, over both transports: every request the server sent gets
//! exactly one answer (0 lost, 0 duplicated), and no handler runs twice.

mod sdk;

use std::time::Duration;

use connector_core::proto::{ExecuteRequest, PayloadEncoding};
use connector_core::{
    ConnectorConfig, ConnectorRegistration, JitterRng, MultiConnectorRunner, MultiTransportOptions,
};
use connector_testkit::connectors::{Counting, Sleep};
use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, TestServer, WsServerOptions, WsTestServer,
};
use sdk::AnyServer;

const WAIT: Duration = Duration::from_secs(30);
const N: usize = 12;

async fn run_chaos(engine: TestServer, server: AnyServer) {
    let worker = Counting::new(Sleep::new(Duration::ZERO));
    let regs = (0..N)
        .map(|i| {
            ConnectorRegistration::new(
                ConnectorConfig::builder("acme", "echo", format!("w{i}"))
                    .build()
                    .expect("valid"),
                worker.clone(),
            )
        })
        .collect();
    let options = MultiTransportOptions::builder(server.url())
        .max_streams_per_channel(4)
        .connect_timeout(Duration::from_secs(2))
        .reconnect_delay(Duration::from_millis(20))
        .jitter(Duration::from_millis(30))
        .max_backoff(Duration::from_millis(300))
        .heartbeat_interval(Duration::from_millis(200))
        .heartbeat_timeout(Duration::from_secs(2))
        .jitter_seed(Some(11))
        .build()
        .expect("valid");
    let runner = MultiConnectorRunner::new(regs, options, server.transport());
    let r = runner.clone();
    let run = tokio::spawn(async move { r.run().await });
    engine.wait_for_active(N, WAIT).await.expect("all active");

    let mut rng = JitterRng::new(2024);
    let mut pending = Vec::new();
    let mut sent = 0u64;
    for round in 0..30u64 {
        for i in 0..15u64 {
            let keys = engine.active_keys();
            if keys.is_empty() {
                break;
            }
            let key = &keys[(rng.next_u64() as usize) % keys.len()];
            let ms = rng.next_u64() % 40;
            let req = ExecuteRequest {
                request_id: format!("r{round}-{i}"),
                payload: format!("{{\"ms\":{ms}}}").into_bytes().into(),
                encoding: PayloadEncoding::Json as i32,
                capability_id: "sleep".into(),
                ..Default::default()
            };
            if let Ok(p) = engine.send_execute(key, req) {
                pending.push(p);
                sent += 1;
            }
        }
        match rng.next_u64() % 5 {
            0 => {
                if let Some(k) = engine.active_keys().first() {
                    engine.close_stream(k);
                }
            }
            1 => server.kill_one(),
            2 if round % 10 == 5 => server.restart().await,
            _ => {}
        }
        // Let the fleet come back before the next burst.
        engine.wait_for_active(N, WAIT).await.expect("all back");
    }
    engine
        .wait_until(WAIT, |s| s.stats().outstanding == 0)
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", engine.stats()));
    let stats = engine.stats();
    assert_eq!(stats.duplicate_responses, 0, "{stats:?}");
    assert_eq!(stats.unknown_responses, 0, "{stats:?}");
    assert_eq!(stats.duplicate_active, 0, "{stats:?}");
    assert_eq!(stats.executes_sent, sent);
    for p in pending {
        let r = p.wait(Duration::from_secs(1)).await.expect("answered");
        assert!(r.success, "{r:?}");
    }
    // A replay answers from the kept response: no handler ran twice.
    assert!(
        worker.runs_over_once().is_empty(),
        "{:?}",
        worker.runs_over_once()
    );
    runner.shutdown_handle().shutdown();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("run returns")
        .expect("join")
        .expect("clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_every_request_answered_exactly_once_under_random_faults() {
    let engine = TestServer::new();
    let server = GrpcTestServer::start(engine.clone(), GrpcServerOptions::default())
        .await
        .expect("server");
    run_chaos(engine, AnyServer::Grpc(server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_every_request_answered_exactly_once_under_random_faults() {
    let engine = TestServer::new();
    let server = WsTestServer::start(engine.clone(), WsServerOptions::default())
        .await
        .expect("server");
    run_chaos(engine, AnyServer::Ws(server)).await;
}

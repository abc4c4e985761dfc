//! A full run over both transports, with every log line of the SDK captured
//! at `trace`: neither the auth token nor a session token may appear in a
//! log line, an error, a `Debug` output or an event.

mod sdk;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connector_core::proto::RejectReason;
use connector_core::{
    ConnectorConfig, ConnectorRegistration, MultiConnectorRunner, MultiTransportOptions,
    RegistrationKey,
};
use connector_testkit::connectors::Echo;
use connector_testkit::harness::{json_execute, Running, WAIT};
use connector_testkit::{
    ApprovalPolicy, GrpcServerOptions, GrpcTestServer, TestServer, WsServerOptions, WsTestServer,
};
use sdk::AnyServer;

const AUTH: &str = "AUTH-SECRET-7f3a9c";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Three registrations over `server` (one rejected), a reconnect with the
/// session token after every connection is killed, an execute; returns the
/// `Debug` output of the runner and of the events of one registration.
async fn exercise(engine: &TestServer, server: AnyServer) -> String {
    let regs = (0..3)
        .map(|i| {
            ConnectorRegistration::new(
                ConnectorConfig::builder("t", "echo", format!("e{i}"))
                    .auth_token(AUTH)
                    .build()
                    .expect("valid"),
                Echo,
            )
        })
        .collect();
    engine.set_policy_for(
        &"t.echo.e2".parse().expect("a key"),
        ApprovalPolicy::Reject(RejectReason::InvalidCredentials),
    );
    let options = MultiTransportOptions::builder(server.url())
        .reconnect_delay(Duration::from_millis(10))
        .jitter(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(100))
        .build()
        .expect("valid");
    let runner = MultiConnectorRunner::new(regs, options, server.transport());
    let mut events = runner
        .registration(&RegistrationKey::new("t", "echo", "e0").expect("valid"))
        .expect("hosted")
        .events();
    let running = Running::start(runner.clone());
    engine.wait_for_active(2, WAIT).await.expect("active");
    // Reconnect with the session token.
    server.kill_all();
    engine
        .wait_until(WAIT, |s| s.stats().registers >= 5)
        .await
        .expect("re-registered");
    engine.wait_for_active(2, WAIT).await.expect("back");
    let resp = engine
        .execute(
            &"t.echo.e0".parse().expect("a key"),
            json_execute("x", "", "{}"),
        )
        .await
        .expect("answered");
    assert!(resp.success);
    let mut dump = format!(
        "{:?}\n{:?}\n{:?}\n",
        runner,
        runner.summary(),
        runner.metrics_snapshot()
    );
    while let Ok(e) = events.try_recv() {
        dump.push_str(&format!("{e:?}\n"));
    }
    running.stop().await.expect("clean");
    dump
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_logs_errors_or_debug_output() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,h2=debug,hyper=debug,hyper_util=debug,tower=debug,tungstenite=debug,tokio_tungstenite=debug,rustls=debug",
        ))
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("first subscriber");

    let mut dump = String::new();
    for grpc in [true, false] {
        let engine = TestServer::new();
        let server = if grpc {
            AnyServer::Grpc(
                GrpcTestServer::start(engine.clone(), GrpcServerOptions::default())
                    .await
                    .expect("grpc server"),
            )
        } else {
            AnyServer::Ws(
                WsTestServer::start(engine.clone(), WsServerOptions::default())
                    .await
                    .expect("ws server"),
            )
        };
        dump.push_str(&exercise(&engine, server).await);
    }

    let logs = String::from_utf8_lossy(&captured.0.lock().expect("lock")).to_string();
    assert!(
        logs.lines().count() > 50,
        "the run was logged: {} lines",
        logs.lines().count()
    );
    assert!(logs.contains("rejected"), "the rejection was logged");
    for secret in [AUTH, "testkit-session-"] {
        for (what, text) in [("log", &logs), ("debug output", &dump)] {
            if let Some(line) = text.lines().find(|l| l.contains(secret)) {
                panic!("{secret} found in {what}: {line}");
            }
        }
    }
}

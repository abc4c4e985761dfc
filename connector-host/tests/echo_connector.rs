//! The echo connector of `connector-host` against its contract, over the
//! testkit's in-memory transport on paused tokio time (no sockets, no real
//! waiting: the `sleep` capability's 250 ms pass instantly).

use std::time::Duration;

use connector_core::proto::{ExecuteErrorKind, ExecuteRequest, ExecuteResponse, PayloadEncoding};
use connector_core::{
    ConnectorConfig, ConnectorRegistration, MultiConnectorRunner, MultiTransportOptions,
};
use connector_host::EchoConnector;
use connector_testkit::harness::{json_execute, Running, WAIT};
use connector_testkit::{MemoryTransport, TestServer};

const KEY: &str = "demo.echo.e0";

fn key() -> connector_core::RegistrationKey {
    KEY.parse().expect("a key")
}

async fn with_echo<F, Fut>(test: F)
where
    F: FnOnce(TestServer) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let server = TestServer::new();
    let options = MultiTransportOptions::builder("grpc://127.0.0.1:1")
        .build()
        .expect("valid options");
    let config = ConnectorConfig::builder("demo", "echo", "e0")
        .build()
        .expect("valid config");
    let running = Running::start(MultiConnectorRunner::new(
        vec![ConnectorRegistration::new(config, EchoConnector::new())],
        options,
        MemoryTransport::new(server.memory_mux()),
    ));
    server.wait_for_active(1, WAIT).await.expect("active");
    test(server.clone()).await;
    running.stop().await.expect("clean stop");
}

async fn call(
    server: &TestServer,
    capability: &str,
    payload: &[u8],
    encoding: PayloadEncoding,
) -> ExecuteResponse {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let request = ExecuteRequest {
        payload: payload.to_vec().into(),
        encoding: encoding as i32,
        ..json_execute(&format!("r{id}"), capability, "")
    };
    server
        .send_execute(&key(), request)
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered")
}

fn json(r: &ExecuteResponse) -> serde_json::Value {
    assert!(
        r.success,
        "expected success, got {:?}: {}",
        r.error_kind(),
        r.error
    );
    serde_json::from_slice(&r.payload).expect("JSON payload")
}

#[tokio::test(start_paused = true)]
async fn declares_its_three_capabilities() {
    with_echo(|server| async move {
        let regs = server.registrations();
        let ids: Vec<&str> = regs[0]
            .register
            .capabilities
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(ids, ["echo", "sleep", "fail"]);
        assert!(regs[0]
            .register
            .capabilities
            .iter()
            .all(|c| !c.description.is_empty()));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn echo_returns_the_same_json_also_for_an_empty_id() {
    with_echo(|server| async move {
        let payload = br#"{"a": [1, 2, {"b": null}], "c": "d"}"#;
        let want: serde_json::Value = serde_json::from_slice(payload).expect("json");
        for id in ["echo", ""] {
            let r = call(&server, id, payload, PayloadEncoding::Json).await;
            assert_eq!(json(&r), want);
            assert_eq!(r.encoding(), PayloadEncoding::Json);
        }
        // RAW and unspecified encodings are fine when the bytes are JSON.
        for enc in [PayloadEncoding::Raw, PayloadEncoding::Unspecified] {
            assert_eq!(json(&call(&server, "echo", payload, enc).await), want);
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn sleep_waits_then_reports_the_time() {
    with_echo(|server| async move {
        let started = tokio::time::Instant::now();
        let r = call(&server, "sleep", br#"{"ms": 250}"#, PayloadEncoding::Json).await;
        assert_eq!(json(&r), serde_json::json!({"slept_ms": 250}));
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        for bad in [&br#"{}"#[..], br#"{"ms": -1}"#, br#"{"ms": "x"}"#, b"[]"] {
            let r = call(&server, "sleep", bad, PayloadEncoding::Json).await;
            assert_eq!(r.error_kind(), ExecuteErrorKind::BadPayload, "{bad:?}");
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn fail_bad_json_and_unknown_capability_get_their_kinds() {
    with_echo(|server| async move {
        let r = call(&server, "fail", b"{}", PayloadEncoding::Json).await;
        assert!(!r.success);
        assert_eq!(r.error_kind(), ExecuteErrorKind::Handler);
        for enc in [
            PayloadEncoding::Json,
            PayloadEncoding::Raw,
            PayloadEncoding::Unspecified,
        ] {
            let r = call(&server, "echo", b"{not json", enc).await;
            assert_eq!(r.error_kind(), ExecuteErrorKind::BadPayload, "{enc:?}");
        }
        let r = call(&server, "teleport", b"{}", PayloadEncoding::Json).await;
        assert_eq!(r.error_kind(), ExecuteErrorKind::UnknownCapability);
    })
    .await;
}

//! `examples/custom_host.rs` run in-process against a testkit server: the
//! library's entry point with the same flags as `connector-host`, hosting
//! the example's `kv` type over gRPC and WebSocket.

use std::time::Duration;

use connector_core::proto::{ExecuteRequest, PayloadEncoding};
use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, TestServer, WsServerOptions, WsTestServer,
};

#[allow(
    dead_code,
    unreachable_pub,
    reason = "the example's `main` is not called here"
)]
#[path = "../examples/custom_host.rs"]
mod custom_host;

const WAIT: Duration = Duration::from_secs(30);

fn request(id: &str, capability: &str, payload: serde_json::Value) -> ExecuteRequest {
    ExecuteRequest {
        request_id: id.into(),
        payload: payload.to_string().into_bytes().into(),
        encoding: PayloadEncoding::Json as i32,
        capability_id: capability.into(),
        timeout_ms: 10_000,
        ..Default::default()
    }
}

async fn call(
    engine: &TestServer,
    key: &str,
    id: &str,
    cap: &str,
    payload: serde_json::Value,
) -> serde_json::Value {
    let r = engine
        .send_execute(&key.parse().expect("a key"), request(id, cap, payload))
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered");
    assert!(r.success, "{key} {cap}: {}", r.error);
    serde_json::from_slice(&r.payload).expect("JSON result")
}

/// Runs the example's host against `url` and checks `put`/`get`.
async fn kv_story(engine: &TestServer, url: String) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let args = [
        "custom_host",
        "--url",
        &url,
        "--connector-type",
        "kv",
        "--tenant",
        "acme",
        "--instance-prefix",
        "kv-",
        "--count",
        "2",
        "--log",
        "warn",
    ]
    .map(String::from);
    let host = tokio::spawn(connector_host::run_until(
        custom_host::types(),
        args,
        async move {
            let _ = stop_rx.await;
        },
    ));
    engine
        .wait_for_active(2, WAIT)
        .await
        .expect("both kv registrations active");
    let put = call(
        engine,
        "acme.kv.kv-0",
        "p",
        "put",
        serde_json::json!({"key": "k", "value": [1, "two"]}),
    )
    .await;
    assert_eq!(put, serde_json::json!({}));
    let got = call(
        engine,
        "acme.kv.kv-0",
        "g",
        "get",
        serde_json::json!({"key": "k"}),
    )
    .await;
    assert_eq!(got, serde_json::json!({"value": [1, "two"]}));
    // Each registration has its own store.
    let other = call(
        engine,
        "acme.kv.kv-1",
        "g1",
        "get",
        serde_json::json!({"key": "k"}),
    )
    .await;
    assert_eq!(other, serde_json::json!({"value": null}));
    let unknown = engine
        .send_execute(
            &"acme.kv.kv-0".parse().expect("a key"),
            request("u", "delete", serde_json::json!({"key": "k"})),
        )
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered");
    assert!(!unknown.success);
    stop_tx.send(()).expect("host still running");
    let code = tokio::time::timeout(WAIT, host)
        .await
        .expect("stopped in time")
        .expect("join");
    assert_eq!(
        format!("{code:?}"),
        format!("{:?}", std::process::ExitCode::SUCCESS)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_host_serves_put_and_get_over_grpc_and_websocket() {
    let grpc = GrpcTestServer::start(TestServer::new(), GrpcServerOptions::default())
        .await
        .expect("gRPC server");
    kv_story(grpc.engine(), grpc.url()).await;
    grpc.stop().await;
    let ws = WsTestServer::start(TestServer::new(), WsServerOptions::default())
        .await
        .expect("WebSocket server");
    kv_story(ws.engine(), ws.url()).await;
    ws.stop().await;
}

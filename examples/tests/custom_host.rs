//! `examples/custom_host.rs` run in-process against a testkit server: the
//! library's entry point with the same flags as `connector-host`, hosting
//! the example's `kv` type over gRPC and WebSocket.

use connector_testkit::harness::{json_execute, RunningHost, WAIT};
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

/// Sends `cap` with `payload` to `key` and waits for the answer.
async fn send(
    engine: &TestServer,
    key: &str,
    id: &str,
    cap: &str,
    payload: serde_json::Value,
) -> connector_core::proto::ExecuteResponse {
    engine
        .send_execute(
            &key.parse().expect("a key"),
            json_execute(id, cap, &payload.to_string()),
        )
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered")
}

/// Runs the example's host against `url` and checks `put`/`get`.
async fn kv_story(engine: &TestServer, url: String) {
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
    let host =
        RunningHost::start(|stop| connector_host::run_until(custom_host::types(), args, stop));
    engine
        .wait_for_active(2, WAIT)
        .await
        .expect("both kv registrations active");
    // The key, request id, capability, payload, and the JSON result.
    for (key, id, cap, payload, result) in [
        (
            "acme.kv.kv-0",
            "p",
            "put",
            serde_json::json!({"key": "k", "value": [1, "two"]}),
            serde_json::json!({}),
        ),
        (
            "acme.kv.kv-0",
            "g",
            "get",
            serde_json::json!({"key": "k"}),
            serde_json::json!({"value": [1, "two"]}),
        ),
        // Each registration has its own store.
        (
            "acme.kv.kv-1",
            "g1",
            "get",
            serde_json::json!({"key": "k"}),
            serde_json::json!({"value": null}),
        ),
    ] {
        let r = send(engine, key, id, cap, payload).await;
        assert!(r.success, "{key} {cap}: {}", r.error);
        let got: serde_json::Value = serde_json::from_slice(&r.payload).expect("JSON result");
        assert_eq!(got, result, "{key} {cap}");
    }
    let unknown = send(
        engine,
        "acme.kv.kv-0",
        "u",
        "delete",
        serde_json::json!({"key": "k"}),
    )
    .await;
    assert!(!unknown.success);
    assert_eq!(
        unknown.error_kind(),
        connector_core::proto::ExecuteErrorKind::UnknownCapability,
        "{}",
        unknown.error
    );
    host.stop_successfully().await;
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

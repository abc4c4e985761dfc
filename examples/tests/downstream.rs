//! How a user of the SDK tests their own connector: a real testkit server on
//! loopback gRPC, the user's connector in a `MultiConnectorRunner`, executes
//! sent by the server and their responses checked.
//!
//! Copy this file into your crate's `tests/` with `connector-testkit` as a
//! dev-dependency. Every wait is on an event with a bounded timeout, and the
//! server binds `127.0.0.1:0`, so such tests run in parallel safely.

use std::collections::HashMap;

use async_trait::async_trait;
use connector_core::proto::{Capability, ExecuteErrorKind, ExecuteResponse};
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorRegistration, ExecuteContext, ExecuteError,
    ExecuteOutput, MultiConnectorRunner, MultiTransportOptions, RegistrationKey, RegistrationState,
};
use connector_grpc::GrpcTransport;
// `WAIT` bounds every wait: generous, because CI machines are slow, and
// only reached when something is broken. `Running` is a runner running on
// a task that stops cleanly; `json_execute` builds a JSON execute request.
use connector_testkit::harness::{json_execute, Running, WAIT};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestServer};

/// The user's connector: stock levels by SKU.
struct Inventory {
    stock: HashMap<&'static str, u64>,
}

impl Inventory {
    fn new() -> Self {
        Self {
            stock: HashMap::from([("A-1", 3), ("B-2", 0)]),
        }
    }
}

#[async_trait]
impl BaseConnector for Inventory {
    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability {
            id: "stock".into(),
            description: "Units in stock for {\"sku\": string}".into(),
            ..Default::default()
        }]
    }

    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        let input: serde_json::Value = ctx.json()?;
        let sku = input["sku"]
            .as_str()
            .ok_or_else(|| ExecuteError::bad_payload("expected {\"sku\": string}"))?;
        let count = self
            .stock
            .get(sku)
            .ok_or_else(|| ExecuteError::handler(format!("unknown sku {sku:?}")))?;
        ExecuteOutput::json(&serde_json::json!({ "sku": sku, "count": count }))
    }
}

/// Sends a JSON execute to `key` as the control plane would, and waits for
/// the answer.
async fn execute(
    engine: &TestServer,
    key: &RegistrationKey,
    id: &str,
    capability: &str,
    payload: &str,
) -> ExecuteResponse {
    engine
        .send_execute(key, json_execute(id, capability, payload))
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered")
}

fn json(response: &ExecuteResponse) -> serde_json::Value {
    serde_json::from_slice(&response.payload).expect("the response payload is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn my_connector_answers_over_real_grpc() {
    // 1. A real gRPC server in this process, on a free port.
    let server = GrpcTestServer::start(TestServer::new(), GrpcServerOptions::default())
        .await
        .expect("the test server starts");
    let engine = server.engine().clone();

    // 2. The connector, hosted exactly as in production.
    let config = ConnectorConfig::builder("acme", "inventory", "inv-1")
        .build()
        .expect("valid identifiers");
    let key = config.key().clone(); // the server sees it as `acme.inventory.inv-1`
    let options = MultiTransportOptions::builder(server.url())
        .build()
        .expect("valid options");
    let runner = MultiConnectorRunner::new(
        vec![ConnectorRegistration::new(config, Inventory::new())],
        options,
        GrpcTransport::new(),
    );
    let running = Running::start(runner);

    // 3. Wait for the registration to be approved (the testkit approves by
    //    default; `set_policy` tests pending or rejected flows).
    engine
        .wait_for_active(1, WAIT)
        .await
        .expect("registration active");
    let registered = engine.registrations();
    assert_eq!(registered[0].register.capabilities[0].id, "stock");

    // 4. Executes, as the control plane would send them.
    let ok = execute(&engine, &key, "r1", "stock", r#"{"sku": "A-1"}"#).await;
    assert!(ok.success, "{}", ok.error);
    assert_eq!(json(&ok), serde_json::json!({"sku": "A-1", "count": 3}));

    // Failures: the request id, capability and payload, the kind of error
    // and what its message names.
    for (id, capability, payload, kind, names) in [
        (
            "r2",
            "stock",
            r#"{"sku": "Z-9"}"#,
            ExecuteErrorKind::Handler,
            "Z-9",
        ),
        (
            "r3",
            "stock",
            r#"{"id": 1}"#,
            ExecuteErrorKind::BadPayload,
            "",
        ),
        // The SDK answers these two without calling the connector.
        ("r4", "stock", "{sku", ExecuteErrorKind::BadPayload, ""),
        (
            "r5",
            "restock",
            "{}",
            ExecuteErrorKind::UnknownCapability,
            "",
        ),
    ] {
        let failed = execute(&engine, &key, id, capability, payload).await;
        assert!(!failed.success, "{id}");
        assert_eq!(failed.error_kind(), kind, "{id}: {}", failed.error);
        assert!(failed.error.contains(names), "{id}: {}", failed.error);
    }

    // 5. The host's own view agrees.
    let handle = running.runner().registration(&key).expect("hosted");
    assert_eq!(handle.state(), RegistrationState::Active);
    let metrics = handle.metrics();
    assert_eq!(metrics.requests_succeeded, 1);
    assert_eq!(metrics.requests_failed, 4);
    assert_eq!(engine.stats().outstanding, 0, "every request was answered");
    assert!(
        engine.stats().protocol_errors.is_empty(),
        "{:?}",
        engine.stats()
    );

    // 6. Graceful shutdown: `run` returns Ok.
    running.stop().await.expect("a clean stop");
    server.stop().await;
}

//! A server that sends legal messages with hostile values, over real
//! loopback sockets and both transports (issue 11, row "answer exceeding
//! 4 MiB"): every request still gets exactly one answer, one that fits the
//! message limit.

mod sdk;

use async_trait::async_trait;
use connector_core::proto::{Capability, ExecuteErrorKind};
use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorRegistration, ExecuteContext, ExecuteError,
    ExecuteOutput, MultiConnectorRunner, MultiTransportOptions, RegistrationKey,
};
use connector_testkit::harness::{capabilities, json_execute, Running, WAIT};
use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, TestServer, WsServerOptions, WsTestServer,
};
use sdk::AnyServer;

const LIMIT: usize = 4 * 1024 * 1024;

/// `echo` echoes; `huge` answers 5 MiB; `loud` fails with 5 MiB of text.
struct Hostile;

#[async_trait]
impl BaseConnector for Hostile {
    fn capabilities(&self) -> Vec<Capability> {
        capabilities(&["echo", "huge", "loud"])
    }
    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        match ctx.capability_id.as_str() {
            "huge" => Ok(ExecuteOutput::raw(vec![b'x'; 5 << 20])),
            "loud" => Err(ExecuteError::handler("\u{7}".repeat(5 << 20))),
            _ => Ok(ExecuteOutput::json_bytes(ctx.payload)),
        }
    }
}

/// The story on one transport, against a server of its own.
async fn answers_that_would_exceed_the_limit(transport: &str) {
    let engine = TestServer::new();
    let server = match transport {
        "grpc" => AnyServer::Grpc(
            GrpcTestServer::start(engine.clone(), GrpcServerOptions::default())
                .await
                .expect("server"),
        ),
        "ws" => AnyServer::Ws(
            WsTestServer::start(engine.clone(), WsServerOptions::default())
                .await
                .expect("server"),
        ),
        other => unreachable!("no {other} transport"),
    };
    let key = RegistrationKey::new("acme", "echo", "w0").expect("a key");
    let reg = ConnectorRegistration::new(
        ConnectorConfig::builder(key.tenant_id(), key.connector_type(), key.instance_id())
            .build()
            .expect("valid"),
        Hostile,
    );
    let options = MultiTransportOptions::builder(server.url())
        .max_message_size(LIMIT)
        .jitter_seed(Some(5))
        .build()
        .expect("valid");
    let running = Running::start(MultiConnectorRunner::new(
        vec![reg],
        options,
        server.transport(),
    ));
    engine.wait_for_active(1, WAIT).await.expect("active");
    let answer = |id: &str, capability: &str| {
        let sent = engine.send_execute(&key, json_execute(id, capability, "{}"));
        async move { sent.expect("sent").wait(WAIT).await.expect("answered") }
    };

    // A 1 MB capability id of control characters: Debug-escaped it made a
    // ~6 MB error text that no transport would carry.
    let a = answer("cap", &"\u{1}".repeat(1 << 20)).await;
    assert_eq!(a.error_kind, ExecuteErrorKind::UnknownCapability as i32);
    assert!(a.error.len() < 4096, "{} bytes", a.error.len());
    assert!(!a.error.contains('\u{1}'));

    // Results over the limit: replaced by a HANDLER error answer that fits.
    for cap in ["huge", "loud"] {
        let a = answer(cap, cap).await;
        assert!(!a.success, "{cap}");
        assert!(a.payload.is_empty(), "{cap}");
        assert_eq!(a.error_kind, ExecuteErrorKind::Handler as i32, "{cap}");
        assert!(
            a.error.starts_with("answer of "),
            "{cap}: {}",
            &a.error[..40]
        );
        assert!(a.error.len() <= 4096, "{cap}: {} bytes", a.error.len());
    }
    // The registration carried on.
    assert!(answer("after", "echo").await.success);

    let m = running
        .runner()
        .registration(&key)
        .expect("hosted")
        .metrics();
    assert_eq!(m.answers_oversized, 2);
    assert_eq!(m.total_disconnects, 0, "no stream was lost to it");
    assert_eq!(engine.stats().duplicate_responses, 0);
    running.stop().await.expect("ok");
}

#[tokio::test]
async fn grpc_answer_that_would_exceed_4_mib_is_replaced_by_one_that_fits() {
    answers_that_would_exceed_the_limit("grpc").await;
}

#[tokio::test]
async fn ws_answer_that_would_exceed_4_mib_is_replaced_by_one_that_fits() {
    answers_that_would_exceed_the_limit("ws").await;
}

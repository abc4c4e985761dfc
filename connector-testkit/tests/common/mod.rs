//! Helpers shared by the integration tests: the test plays the client.
#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use connector_testkit::proto::{
    ExecuteRequest, ExecuteResponse, Heartbeat, Kind, PayloadEncoding, RegisterRequest,
    RegisterResponse, StreamMessage,
};

/// Bound for every wait in the tests: generous, only hit when broken.
pub(crate) const T: Duration = Duration::from_secs(10);

pub(crate) fn register(tenant: &str, ty: &str, instance: &str) -> StreamMessage {
    register_with_token(tenant, ty, instance, "")
}

pub(crate) fn register_with_token(
    tenant: &str,
    ty: &str,
    instance: &str,
    session_token: &str,
) -> StreamMessage {
    StreamMessage {
        kind: Some(Kind::Register(Box::new(RegisterRequest {
            tenant_id: tenant.to_string(),
            connector_type: ty.to_string(),
            instance_id: instance.to_string(),
            version: "0.0.1-test".to_string(),
            auth_token: "auth".to_string(),
            session_token: session_token.to_string(),
            display_name: format!("{tenant}.{ty}.{instance}"),
            max_concurrent_requests: 4,
            ..Default::default()
        }))),
    }
}

pub(crate) fn heartbeat(sequence: u64, sent_at_unix_ms: i64) -> StreamMessage {
    StreamMessage {
        kind: Some(Kind::Heartbeat(Box::new(Heartbeat {
            sequence,
            sent_at_unix_ms,
        }))),
    }
}

pub(crate) fn exec_req(request_id: &str) -> ExecuteRequest {
    ExecuteRequest {
        request_id: request_id.to_string(),
        payload: br#"{"x":1}"#.to_vec().into(),
        encoding: PayloadEncoding::Json as i32,
        capability_id: "echo".to_string(),
        ..Default::default()
    }
}

pub(crate) fn exec_resp(request_id: &str) -> StreamMessage {
    StreamMessage {
        kind: Some(Kind::ExecuteResponse(Box::new(ExecuteResponse {
            request_id: request_id.to_string(),
            success: true,
            payload: br#"{"ok":true}"#.to_vec().into(),
            encoding: PayloadEncoding::Json as i32,
            ..Default::default()
        }))),
    }
}

pub(crate) fn expect_register_response(m: StreamMessage) -> RegisterResponse {
    match m.kind {
        Some(Kind::RegisterResponse(r)) => *r,
        other => panic!("expected register_response, got {other:?}"),
    }
}

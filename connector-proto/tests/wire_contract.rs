//! The compiled `.proto` against the wire contract (`shared/wire-contract.md`):
//! every message's fields (number, name, type), every enum's values, and the
//! service. Reads the descriptor set protox produced for this build, so what
//! is checked is exactly what the generated code came from.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::collections::BTreeMap;

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};

const PKG: &str = ".connector.v1.";

/// One message's fields: (number, name, type).
type Fields = &'static [(i32, &'static str, &'static str)];

/// The contract's tables, typed in: message → (number, name, type).
#[rustfmt::skip]
const MESSAGES: &[(&str, Fields)] = &[
    ("StreamMessage", &[(1, "register", "RegisterRequest"), (2, "register_response", "RegisterResponse"),
        (3, "approval_update", "ApprovalUpdate"), (4, "heartbeat", "Heartbeat"), (5, "heartbeat_ack", "HeartbeatAck"),
        (6, "execute_request", "ExecuteRequest"), (7, "execute_response", "ExecuteResponse"),
        (8, "cancel", "CancelRequest"), (9, "drain", "Drain"), (10, "metrics_report", "MetricsReport")]),
    ("RegisterRequest", &[(1, "tenant_id", "string"), (2, "connector_type", "string"), (3, "instance_id", "string"),
        (4, "version", "string"), (5, "auth_token", "string"), (6, "session_token", "string"),
        (7, "display_name", "string"), (8, "tags", "repeated string"), (9, "metadata", "map<string,string>"),
        (10, "behavior", "ConnectorBehavior"), (11, "max_concurrent_requests", "uint32"),
        (12, "capabilities", "repeated Capability")]),
    ("Capability", &[(1, "id", "string"), (2, "description", "string"), (3, "input_schema_json", "string"),
        (4, "output_schema_json", "string")]),
    ("RegisterResponse", &[(1, "status", "RegistrationStatus"), (2, "session_token", "string"), (3, "address", "string"),
        (4, "message", "string"), (5, "reject_reason", "RejectReason"), (6, "heartbeat_interval_ms", "uint32")]),
    ("ApprovalUpdate", &[(1, "status", "RegistrationStatus"), (2, "session_token", "string"), (3, "message", "string"),
        (4, "reject_reason", "RejectReason")]),
    ("Heartbeat", &[(1, "sequence", "uint64"), (2, "sent_at_unix_ms", "int64")]),
    ("HeartbeatAck", &[(1, "sequence", "uint64"), (2, "sent_at_unix_ms", "int64"), (3, "should_reconnect", "bool")]),
    ("ExecuteRequest", &[(1, "request_id", "string"), (2, "payload", "bytes"), (3, "encoding", "PayloadEncoding"),
        (4, "context", "map<string,string>"), (5, "capability_id", "string"), (6, "timeout_ms", "uint32")]),
    ("ExecuteResponse", &[(1, "request_id", "string"), (2, "success", "bool"), (3, "payload", "bytes"),
        (4, "encoding", "PayloadEncoding"), (5, "error", "string"), (6, "duration_ms", "uint64"),
        (7, "error_kind", "ExecuteErrorKind")]),
    ("CancelRequest", &[(1, "request_id", "string")]),
    ("Drain", &[(1, "reason", "string"), (2, "reconnect_after_ms", "uint32")]),
    ("MetricsReport", &[(1, "requests_received", "uint64"), (2, "requests_succeeded", "uint64"),
        (3, "requests_failed", "uint64"), (4, "in_flight", "uint32"), (5, "total_disconnects", "uint64"),
        (6, "successful_reconnects", "uint64"), (7, "last_heartbeat_rtt_ms", "uint32")]),
];

/// Enum → values 1.. in order (value 0 is always `<PREFIX>_UNSPECIFIED`).
#[rustfmt::skip]
const ENUMS: &[(&str, &str, &[&str])] = &[
    ("RegistrationStatus", "REGISTRATION_STATUS", &["PENDING", "APPROVED", "REJECTED"]),
    ("RejectReason", "REJECT_REASON", &["DENIED", "INVALID_CREDENTIALS", "SESSION_EXPIRED", "DUPLICATE", "INVALID_REQUEST"]),
    ("PayloadEncoding", "PAYLOAD_ENCODING", &["JSON", "RAW"]),
    ("ConnectorBehavior", "CONNECTOR_BEHAVIOR", &["TOOL", "REQUEST_RESPONSE", "SOURCE", "SINK"]),
    ("ExecuteErrorKind", "EXECUTE_ERROR_KIND", &["HANDLER", "TIMEOUT", "CANCELLED", "BAD_PAYLOAD", "OVERLOADED", "UNKNOWN_CAPABILITY"]),
];

/// A field's type as the contract writes it (`repeated string`, `map<string,string>`).
fn type_of(f: &FieldDescriptorProto, msg: &DescriptorProto) -> String {
    let scalar = |t: Type, name: &str| match t {
        Type::Message | Type::Enum => name.strip_prefix(PKG).unwrap_or(name).to_string(),
        t => t.as_str_name().trim_start_matches("TYPE_").to_lowercase(),
    };
    let base = scalar(f.r#type(), f.type_name());
    let entry = msg.nested_type.iter().find(|n| {
        n.options.as_ref().is_some_and(|o| o.map_entry())
            && base == format!("{}.{}", msg.name(), n.name())
    });
    match (entry, f.label()) {
        (Some(e), _) => {
            let kv: Vec<String> = e
                .field
                .iter()
                .map(|f| scalar(f.r#type(), f.type_name()))
                .collect();
            format!("map<{}>", kv.join(","))
        }
        (None, Label::Repeated) => format!("repeated {base}"),
        (None, _) => base,
    }
}

#[test]
fn the_compiled_proto_matches_the_wire_contract() {
    let set = FileDescriptorSet::decode(connector_proto::FILE_DESCRIPTOR_SET).unwrap();
    let file = set
        .file
        .iter()
        .find(|f| f.package() == "connector.v1")
        .unwrap();
    assert_eq!(file.syntax(), "proto3");

    let got: BTreeMap<&str, &DescriptorProto> =
        file.message_type.iter().map(|m| (m.name(), m)).collect();
    let want: Vec<&str> = MESSAGES.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        {
            let mut w = want.clone();
            w.sort();
            w
        },
        "messages"
    );
    for (name, fields) in MESSAGES {
        let m = got[name];
        let actual: Vec<(i32, &str, String)> = m
            .field
            .iter()
            .map(|f| (f.number(), f.name(), type_of(f, m)))
            .collect();
        let expected: Vec<(i32, &str, String)> = fields
            .iter()
            .map(|(n, f, t)| (*n, *f, t.to_string()))
            .collect();
        assert_eq!(actual, expected, "fields of {name}");
        // Only the envelope has a oneof, and every one of its fields is in it.
        let in_oneof = m.field.iter().filter(|f| f.oneof_index.is_some()).count();
        if *name == "StreamMessage" {
            assert_eq!(
                m.oneof_decl.iter().map(|o| o.name()).collect::<Vec<_>>(),
                ["kind"]
            );
            assert_eq!(
                in_oneof,
                fields.len(),
                "every envelope field is in `oneof kind`"
            );
        } else {
            assert_eq!(
                in_oneof, 0,
                "{name} has no oneof (and no proto3 `optional`)"
            );
        }
    }

    let enums: BTreeMap<&str, Vec<(&str, i32)>> = file
        .enum_type
        .iter()
        .map(|e| {
            (
                e.name(),
                e.value.iter().map(|v| (v.name(), v.number())).collect(),
            )
        })
        .collect();
    assert_eq!(enums.len(), ENUMS.len(), "enums: {:?}", enums.keys());
    for (name, prefix, values) in ENUMS {
        let mut expected = vec![(format!("{prefix}_UNSPECIFIED"), 0)];
        expected.extend(
            values
                .iter()
                .zip(1..)
                .map(|(v, n)| (format!("{prefix}_{v}"), n)),
        );
        let actual: Vec<(String, i32)> = enums[name]
            .iter()
            .map(|(v, n)| (v.to_string(), *n))
            .collect();
        assert_eq!(actual, expected, "values of {name}");
    }

    let [service] = file.service.as_slice() else {
        panic!("one service: {:?}", file.service)
    };
    assert_eq!(service.name(), "ConnectorService");
    let [rpc] = service.method.as_slice() else {
        panic!("one rpc: {:?}", service.method)
    };
    assert_eq!(
        (rpc.name(), rpc.input_type(), rpc.output_type()),
        (
            "Connect",
            ".connector.v1.StreamMessage",
            ".connector.v1.StreamMessage"
        )
    );
    assert!(
        rpc.client_streaming() && rpc.server_streaming(),
        "Connect streams both ways"
    );
    assert_eq!(
        connector_proto::CONNECT_PATH,
        format!("/connector.v1.{}/{}", service.name(), rpc.name())
    );
}

//! `connector-host --otlp-endpoint` (feature `opentelemetry`) end to end:
//! a real OTLP/gRPC collector on 127.0.0.1 receives the `execute` span of
//! a request that carried a W3C `traceparent`, as a child of the server's
//! span in the server's trace; a request without one is a root of its own.
//!
//! Every wait is bounded and on an event; ports are 0.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use connector_core::proto::ExecuteRequest;
use connector_testkit::harness::json_execute;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

mod support;
use support::{execute_ok, grpc_server, Host, LOG, WAIT};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    got: Arc<tokio::sync::Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        self.got.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_collector() -> (SocketAddr, Collector) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let collector = Collector::default();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (addr, collector)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            Some(other) => Some(format!("{other:?}")),
            None => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_spans_are_exported_as_children_of_the_servers_trace() {
    let (collector_addr, collector) = start_collector().await;
    let server = grpc_server().await;
    let url = server.url();
    let endpoint = format!("http://{collector_addr}");
    let host = Host::spawn(
        &[
            "--url",
            &url,
            "--count",
            "1",
            "--otlp-endpoint",
            &endpoint,
            "--log",
            LOG,
        ],
        &[],
    );
    server
        .engine()
        .wait_for_active(1, WAIT)
        .await
        .expect("active");
    let key = "demo.echo.echo-0";
    let reg_key = &key.parse().expect("a key");
    let traced = ExecuteRequest {
        context: [(
            "traceparent".to_string(),
            format!("00-{TRACE_ID}-{PARENT_ID}-01"),
        )]
        .into_iter()
        .collect(),
        timeout_ms: 0,
        ..json_execute("traced-1", "echo", r#"{"x":1}"#)
    };
    let plain = ExecuteRequest {
        timeout_ms: 0,
        ..json_execute("plain-1", "echo", "{}")
    };
    for request in [traced, plain] {
        execute_ok(server.engine(), reg_key, request).await;
    }
    // A graceful stop flushes the batch.
    let (code, _, stderr) = host.stop().await;
    assert_eq!(code, 0, "{stderr}");
    let spans = tokio::time::timeout(WAIT, async {
        loop {
            let notified = collector.got.notified();
            {
                let spans = collector.spans.lock().expect("lock");
                if spans.iter().filter(|s| s.name == "execute").count() >= 2 {
                    return spans.clone();
                }
            }
            notified.await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no two execute spans exported; got {:?}; stderr:\n{stderr}",
            collector.spans.lock().expect("lock")
        )
    });
    let executes = spans.iter().filter(|s| s.name == "execute").count();
    assert_eq!(executes, 2, "one execute span per request: {spans:?}");
    let by_id = |id: &str| {
        spans
            .iter()
            .find(|s| s.name == "execute" && attribute(s, "request_id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no execute span for {id}: {spans:?}"))
    };
    let traced = by_id("traced-1");
    assert_eq!(hex(&traced.trace_id), TRACE_ID);
    assert_eq!(hex(&traced.parent_span_id), PARENT_ID);
    assert_eq!(attribute(traced, "outcome").as_deref(), Some("ok"));
    assert_eq!(attribute(traced, "registration").as_deref(), Some(key));
    let plain = by_id("plain-1");
    assert_ne!(hex(&plain.trace_id), TRACE_ID);
    assert!(plain.parent_span_id.is_empty(), "a root: {plain:?}");
    // The registration span is not exported (it would hold every execute
    // of the registration's life in one trace).
    assert!(spans.iter().all(|s| s.name != "registration"));
}

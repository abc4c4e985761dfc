//! Traced executes (issue 15 §4): every handler runs in an `execute` span
//! with its registration, request id and capability, closed with its
//! outcome and duration, even when it panics, is cancelled or times out;
//! a handler that moves to its own task keeps the registration span as
//! parent; a valid W3C `traceparent` puts the server's trace id on the span
//! and on `ExecuteContext`. Captured with a test subscriber layer, over the
//! testkit's in-memory mux on paused tokio time (a current-thread runtime,
//! so the scoped subscriber sees every task).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use connector_core::proto::{ExecuteErrorKind, ExecuteRequest, PayloadEncoding};
use connector_core::{BaseConnector, ExecuteContext, ExecuteError, ExecuteOutput, RegistrationKey};
use connector_testkit::harness::Running;
use connector_testkit::TestServer;
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::Layer;

const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "t.traced.i0";

fn key() -> RegistrationKey {
    support::key_of("traced", "i0")
}
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// ---------------------------------------------------------------------
// The capture layer
// ---------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct SpanRec {
    name: String,
    fields: HashMap<String, String>,
    parent: Option<String>,
    closed: bool,
}

impl SpanRec {
    /// The recorded value of `name`.
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// Spans by id, and the span an event named `in handler` was inside.
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<HashMap<u64, SpanRec>>>,
    /// Closed spans, in order (an id may be reused after a close).
    closed: Arc<Mutex<Vec<SpanRec>>>,
    handler_events: Arc<Mutex<Vec<Option<String>>>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

impl<S> Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut rec = SpanRec {
            name: attrs.metadata().name().into(),
            ..Default::default()
        };
        attrs.record(&mut Fields(&mut rec.fields));
        rec.parent = ctx
            .span(id)
            .and_then(|s| s.parent())
            .map(|p| p.name().to_string());
        self.spans.lock().expect("lock").insert(id.into_u64(), rec);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        if let Some(rec) = self.spans.lock().expect("lock").get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut rec.fields));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        if fields.get("message").map(String::as_str) == Some("in handler") {
            let current = ctx.lookup_current().map(|s| {
                let ext = s.name();
                let id = s.id().into_u64();
                let rid = self
                    .spans
                    .lock()
                    .expect("lock")
                    .get(&id)
                    .and_then(|r| r.fields.get("request_id").cloned())
                    .unwrap_or_default();
                format!("{ext}:{rid}")
            });
            self.handler_events.lock().expect("lock").push(current);
        }
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        if let Some(mut rec) = self.spans.lock().expect("lock").remove(&id.into_u64()) {
            rec.closed = true;
            self.closed.lock().expect("lock").push(rec);
        }
    }
}

impl Capture {
    /// The closed `execute` span of `request_id`.
    fn closed_execute(&self, request_id: &str) -> Option<SpanRec> {
        self.closed
            .lock()
            .expect("lock")
            .iter()
            .find(|r| r.name == "execute" && r.field("request_id") == Some(request_id))
            .cloned()
    }

    async fn wait_closed(&self, request_id: &str) -> SpanRec {
        // Spans close as the driver drops the handler; yield on paused time
        // (no real waiting) until it has, bounded.
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(r) = self.closed_execute(request_id) {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no closed execute span for {request_id}; open: {:?}",
                self.spans.lock().expect("lock")
            )
        })
    }
}

// ---------------------------------------------------------------------
// The connector
// ---------------------------------------------------------------------

#[derive(Default)]
struct Traced {
    seen_trace_ids: Mutex<Vec<Option<String>>>,
}

#[async_trait]
impl BaseConnector for Traced {
    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        self.seen_trace_ids
            .lock()
            .expect("lock")
            .push(ctx.trace_context().map(|t| t.trace_id_hex()));
        match ctx.capability_id.as_str() {
            "sleep" => {
                // Not ready at the first poll: the handler moves to a task.
                tokio::time::sleep(Duration::from_millis(50)).await;
                tracing::info!("in handler");
                Ok(ExecuteOutput::json_bytes(ctx.payload))
            }
            "forever" => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(ExecuteOutput::json_bytes(ctx.payload))
            }
            "panic" => panic!("handler panicked on purpose"),
            "panic_later" => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                panic!("handler panicked on purpose, on its own task")
            }
            "fail" => Err(ExecuteError::handler("failed on purpose")),
            _ => {
                tracing::info!("in handler");
                Ok(ExecuteOutput::json_bytes(ctx.payload))
            }
        }
    }
}

struct Setup {
    server: TestServer,
    running: Running,
    connector: Arc<Traced>,
    capture: Capture,
    _guard: tracing::subscriber::DefaultGuard,
}

async fn setup() -> Setup {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let guard = tracing::subscriber::set_default(subscriber);
    let connector = Arc::new(Traced::default());
    let (server, _mux, running) = support::start(
        vec![support::registration("traced", "i0", connector.clone())],
        support::options(),
    );
    server.wait_for_active(1, WAIT).await.expect("active");
    Setup {
        server,
        running,
        connector,
        capture,
        _guard: guard,
    }
}

impl Setup {
    /// Stops the runner (still captured) and checks it ended cleanly.
    async fn stop(self) {
        self.running.stop().await.expect("clean stop");
    }
}

fn request(
    id: &str,
    capability: &str,
    context: &[(&str, &str)],
    timeout_ms: u32,
) -> ExecuteRequest {
    ExecuteRequest {
        request_id: id.into(),
        payload: b"{}".to_vec().into(),
        encoding: PayloadEncoding::Json as i32,
        capability_id: capability.into(),
        context: context
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout_ms,
    }
}

async fn run(s: &Setup, req: ExecuteRequest) -> connector_core::proto::ExecuteResponse {
    s.server
        .send_execute(&key(), req)
        .expect("sent")
        .wait(WAIT)
        .await
        .expect("answered")
}

// ---------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------

/// Sends request `id` to `capability` with a valid `traceparent` (and
/// `extra` context) as the only request of a fresh setup, and checks its
/// closed `execute` span: the server's trace id, the registration,
/// capability and outcome `ok`, a duration, the registration span as parent,
/// the trace id on the handler's context, and the handler's own log line
/// inside the span.
async fn traced_ok(id: &str, capability: &str, extra: &[(&str, &str)]) {
    let s = setup().await;
    let context: Vec<_> = [("traceparent", TRACEPARENT)]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let r = run(&s, request(id, capability, &context, 0)).await;
    assert!(r.success, "{r:?}");
    let span = s.capture.wait_closed(id).await;
    assert_eq!(span.field("trace_id"), Some(TRACE_ID), "{span:?}");
    assert_eq!(span.field("registration"), Some(KEY), "{span:?}");
    assert_eq!(span.field("capability"), Some(capability), "{span:?}");
    assert_eq!(span.field("outcome"), Some("ok"), "{span:?}");
    assert!(span.fields.contains_key("duration_ms"), "{span:?}");
    assert_eq!(span.parent.as_deref(), Some("registration"), "{span:?}");
    assert_eq!(
        s.connector.seen_trace_ids.lock().expect("lock").as_slice(),
        [Some(TRACE_ID.to_string())]
    );
    assert_eq!(
        s.capture.handler_events.lock().expect("lock").as_slice(),
        [Some(format!("execute:{id}"))]
    );
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_traceparent_puts_the_servers_trace_id_on_the_span_and_the_context() {
    traced_ok("r1", "echo", &[("tracestate", "congo=t61rcWkgMzE")]).await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_traceparent_is_ignored_never_an_error() {
    let s = setup().await;
    for (i, bad) in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "garbage\nINFO forged log line",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("bad{i}");
        let r = run(&s, request(&id, "echo", &[("traceparent", bad)], 0)).await;
        assert!(r.success, "{bad:?}: {r:?}");
        let span = s.capture.wait_closed(&id).await;
        assert!(!span.fields.contains_key("trace_id"), "{bad:?}: {span:?}");
        assert_eq!(span.field("outcome"), Some("ok"));
    }
    assert!(s
        .connector
        .seen_trace_ids
        .lock()
        .expect("lock")
        .iter()
        .all(Option::is_none));
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_spawned_handler_keeps_the_registration_span_as_parent() {
    // After its await, on its own task, the handler still logs inside it.
    traced_ok("slow", "sleep", &[]).await;
}

#[tokio::test(start_paused = true)]
async fn panicking_failing_cancelled_and_timed_out_handlers_close_their_spans_with_the_outcome() {
    let s = setup().await;
    // (request, capability, timeout ms, answered kind, span outcome, span error_kind)
    for (id, capability, timeout_ms, kind, outcome, span_kind) in [
        (
            "p1",
            "panic",
            0,
            ExecuteErrorKind::Handler,
            "panicked",
            None,
        ),
        (
            "p2",
            "panic_later",
            0,
            ExecuteErrorKind::Handler,
            "panicked",
            None,
        ),
        (
            "f1",
            "fail",
            0,
            ExecuteErrorKind::Handler,
            "error",
            Some("EXECUTE_ERROR_KIND_HANDLER"),
        ),
        (
            "t1",
            "forever",
            100,
            ExecuteErrorKind::Timeout,
            "timed_out",
            None,
        ),
    ] {
        let r = run(&s, request(id, capability, &[], timeout_ms)).await;
        assert!(!r.success, "{id}: {r:?}");
        assert_eq!(r.error_kind, kind as i32, "{id}: {r:?}");
        let span = s.capture.wait_closed(id).await;
        assert_eq!(span.field("outcome"), Some(outcome), "{id}: {span:?}");
        if let Some(span_kind) = span_kind {
            assert_eq!(span.field("error_kind"), Some(span_kind), "{id}: {span:?}");
        }
        if timeout_ms > 0 {
            let ms: f64 = span.fields["duration_ms"].parse().expect("a number");
            assert!((100.0..200.0).contains(&ms), "{id}: {ms}");
        }
    }

    let pending = s
        .server
        .send_execute(&key(), request("c1", "forever", &[], 0))
        .expect("sent");
    // Let it start (and move to its task) before the cancel.
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.server.cancel(&key(), "c1").expect("c1 is outstanding");
    let r = pending.wait(WAIT).await.expect("answered");
    assert_eq!(r.error_kind, ExecuteErrorKind::Cancelled as i32);
    let span = s.capture.wait_closed("c1").await;
    assert_eq!(span.field("outcome"), Some("cancelled"));
    s.stop().await;
}

#[tokio::test]
async fn a_handler_is_unit_tested_with_a_context_built_by_hand() {
    let key = RegistrationKey::new("t", "traced", "i0").expect("key");
    let ctx = ExecuteContext::new(key, "unit-1", r#"{"a":1}"#)
        .with_capability("echo")
        .with_context_entry("traceparent", TRACEPARENT)
        .with_deadline(tokio::time::Instant::now() + Duration::from_secs(1));
    assert_eq!(
        ctx.trace_context().map(|t| t.trace_id_hex()).as_deref(),
        Some(TRACE_ID)
    );
    let out = Traced::default().execute(ctx).await.expect("ok");
    assert_eq!(&out.payload[..], br#"{"a":1}"#);
    let raw = ExecuteContext::new(
        RegistrationKey::new("t", "x", "y").expect("key"),
        "u2",
        vec![1u8, 2],
    )
    .with_encoding(PayloadEncoding::Raw);
    assert!(raw.json::<serde_json::Value>().is_err());
    assert!(raw.trace_context().is_none());
}

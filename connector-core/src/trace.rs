//! The server's W3C trace context (`traceparent` / `tracestate` in
//! `ExecuteRequest.context`), parsed strictly, and the `execute` span every
//! handler runs in.
//!
//! A header from the server is input: a malformed one is ignored (the
//! request runs untraced by the server's trace), never an error, and its
//! text never reaches a log.

use std::fmt;

use tokio::time::Instant;

/// The context key of the W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The context key of the W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` kept (W3C: at most 32 members; vendors must
/// propagate at least 512 characters; a longer one is dropped whole here
/// rather than cut in the middle of a member).
const MAX_TRACESTATE_LEN: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A valid W3C trace context from the server (version `00`).
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
    tracestate: Option<String>,
}

impl TraceContext {
    /// Parses `traceparent` (and `tracestate`, kept only when it is well
    /// formed) strictly per W3C Trace Context level 1: version `00`, a
    /// 32-hex-digit trace id that is not all zero, a 16-hex-digit parent id
    /// that is not all zero, 2 hex digits of flags, lowercase, `-`
    /// separated, nothing else. `None` for anything else.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let b = traceparent.as_bytes();
        if b.len() != 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        if &b[0..2] != b"00" {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex(&b[3..35], &mut trace_id)?;
        hex(&b[36..52], &mut parent_id)?;
        hex(&b[53..55], &mut flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags: flags[0],
            tracestate: tracestate
                .filter(|s| valid_tracestate(s))
                .map(str::to_owned),
        })
    }

    /// From an execute request's context map, if it carries a valid one.
    pub fn from_context(context: &std::collections::HashMap<String, String>) -> Option<Self> {
        let parent = context.get(TRACEPARENT)?;
        Self::parse(parent, context.get(TRACESTATE).map(String::as_str))
    }

    /// The 16-byte trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The 8-byte id of the server's span (the parent of ours).
    pub fn parent_id(&self) -> [u8; 8] {
        self.parent_id
    }

    /// The trace flags byte.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the server sampled the trace (flag `01`).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The well-formed `tracestate` that came with it, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The `traceparent` header value (to pass the server's context on to
    /// a downstream call).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.parent_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent())
            .field("tracestate", &self.tracestate)
            .finish()
    }
}

fn hex(digits: &[u8], out: &mut [u8]) -> Option<()> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(())
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// W3C `tracestate`: up to 32 comma-separated `key=value` members (optional
/// whitespace around them), keys `[a-z0-9][a-z0-9_\-*/]*` with at most one
/// `@` (multi-tenant keys), values of printable ASCII without `,` and `=`,
/// not ending in a space.
fn valid_tracestate(s: &str) -> bool {
    if s.len() > MAX_TRACESTATE_LEN {
        return false;
    }
    let mut members = 0;
    for member in s.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            // Empty members are allowed and ignored.
            continue;
        }
        members += 1;
        if members > MAX_TRACESTATE_MEMBERS {
            return false;
        }
        let Some((key, value)) = member.split_once('=') else {
            return false;
        };
        let key_ok = !key.is_empty()
            && key.len() <= 256
            && key
                .bytes()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && key.bytes().filter(|&c| c == b'@').count() <= 1
            && key.bytes().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, b'_' | b'-' | b'*' | b'/' | b'@')
            });
        let value_ok = !value.is_empty()
            && value.len() <= 256
            && !value.ends_with(' ')
            && value
                .bytes()
                .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=');
        if !key_ok || !value_ok {
            return false;
        }
    }
    true
}

/// The span a handler runs in: `execute`, at `info`, with the fields
/// `registration`, `request_id`, `capability` (the last two sanitized, as
/// any text from the server), `trace_id` (the server's, when it sent a
/// valid `traceparent`), and, once it ends, `outcome` (`ok`, `error`,
/// `panicked`, `cancelled`, `timed_out`), `error_kind` and `duration_ms`.
///
/// Its parent is the current span (the driver runs inside the
/// registration's); with the `opentelemetry` feature, a valid
/// `traceparent` makes it a child of the server's span in OpenTelemetry.
/// When no subscriber wants it, nothing is formatted or allocated.
pub(crate) fn execute_span(
    key: &crate::RegistrationKey,
    ctx: &crate::ExecuteContext,
) -> tracing::Span {
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "execute",
        registration = %key,
        request_id = %Peer(&ctx.request_id),
        capability = %Peer(&ctx.capability_id),
        trace_id = Empty,
        outcome = Empty,
        error_kind = Empty,
        duration_ms = Empty,
    );
    if let Some(tc) = ctx.trace_context() {
        if !span.is_disabled() {
            span.record("trace_id", tracing::field::display(Hex(&tc.trace_id)));
            #[cfg(feature = "opentelemetry")]
            otel::set_parent(&span, tc);
        }
    }
    span
}

/// Text from the server, sanitized only if a subscriber formats it.
struct Peer<'a>(&'a str);

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::text::sanitize_text(
            self.0,
            crate::text::MAX_PEER_TEXT_CHARS,
        ))
    }
}

/// Bytes as lowercase hex, formatted only when printed.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    /// Makes `span` a child of the server's span in OpenTelemetry.
    pub(super) fn set_parent(span: &tracing::Span, tc: &super::TraceContext) {
        let state = tc
            .tracestate()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let remote = SpanContext::new(
            TraceId::from_bytes(tc.trace_id()),
            SpanId::from_bytes(tc.parent_id()),
            TraceFlags::new(tc.flags()),
            true,
            state,
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

/// How a handler's run ended, as recorded on its `execute` span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Error(connector_proto::ExecuteErrorKind),
    Panicked,
    Cancelled,
    TimedOut,
}

impl Outcome {
    pub(crate) fn of(result: &Result<crate::ExecuteOutput, crate::ExecuteError>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(e) => Self::Error(e.kind),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error(_) => "error",
            Self::Panicked => "panicked",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

/// Records the outcome and duration on an `execute` span exactly once: when
/// the handler ends, or, if its future is dropped first (cancel, deadline,
/// shutdown), when it is dropped. Costs nothing when the span is disabled.
pub(crate) struct SpanEnd {
    span: tracing::Span,
    started: Option<Instant>,
    deadline: Option<Instant>,
}

impl SpanEnd {
    pub(crate) fn new(span: &tracing::Span, deadline: Option<Instant>) -> Self {
        if span.is_disabled() {
            return Self {
                span: tracing::Span::none(),
                started: None,
                deadline: None,
            };
        }
        Self {
            span: span.clone(),
            started: Some(Instant::now()),
            deadline,
        }
    }

    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        let Some(started) = self.started.take() else {
            return;
        };
        let span = &self.span;
        span.record("outcome", outcome.name());
        if let Outcome::Error(kind) = outcome {
            span.record("error_kind", kind.as_str_name());
        }
        span.record("duration_ms", started.elapsed().as_secs_f64() * 1000.0);
    }
}

impl Drop for SpanEnd {
    fn drop(&mut self) {
        if self.started.is_some() {
            // Dropped before it ended: the driver aborted it. At or past
            // its deadline that was the timeout; otherwise a cancel, a
            // drain deadline or a shutdown.
            let outcome = match self.deadline {
                Some(d) if Instant::now() >= d => Outcome::TimedOut,
                _ => Outcome::Cancelled,
            };
            self.record(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_parsed() {
        let t = TraceContext::parse(GOOD, Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"))
            .expect("valid");
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id()[..2], [0x00, 0xf0]);
        assert!(t.sampled());
        assert_eq!(t.traceparent(), GOOD);
        assert_eq!(
            t.tracestate(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
    }

    #[test]
    fn anything_not_strictly_w3c_is_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1x",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn a_bad_tracestate_is_dropped_and_the_traceparent_kept() {
        let long = format!("a={}", "x".repeat(600));
        let many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        for bad in ["novalue", "Upper=1", "a=b=c", "a=\u{1b}[2J", &long, &many] {
            let t = TraceContext::parse(GOOD, Some(bad)).expect("traceparent kept");
            assert_eq!(t.tracestate(), None, "{bad:?}");
        }
        let t = TraceContext::parse(GOOD, Some(" tenant@vendor=v1 , ,b=2")).expect("ok");
        assert!(t.tracestate().is_some());
    }
}

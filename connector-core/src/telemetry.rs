//! Metrics through the `metrics` facade, so a host picks the exporter
//! (Prometheus, OpenTelemetry, StatsD) and a library user pays nothing when
//! none is installed. Install the recorder before `run()`: the per-execute
//! metrics are registered once, when a registration starts.
//!
//! Names follow the shape of gRPC's A66/A94 client metrics: a
//! `connector.client.` prefix, units in the name's last part, and the
//! registration's address as the `registration` label.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `connector.client.connection.attempts` | counter | `registration`, `outcome` = `succeeded` / `failed` |
//! | `connector.client.disconnections` | counter | `registration`, `cause` ([`DisconnectCause::label`]) |
//! | `connector.client.executes` | counter | `registration`, `outcome` = `success` or the error kind |
//! | `connector.client.execute.duration` | histogram, seconds | `registration` |
//! | `connector.client.heartbeat.rtt` | histogram, seconds | `registration` |
//! | `connector.client.protocol_errors` | counter | `registration` |
//! | `connector.client.active` | gauge, 1 while Active | `registration` |

use std::time::Duration;

use connector_proto::ExecuteErrorKind;
use metrics::SharedString;

use crate::state::DisconnectCause;

/// Metric names, public so exporters and dashboards can refer to them.
pub mod names {
    /// Stream open attempts by outcome.
    pub const CONNECTION_ATTEMPTS: &str = "connector.client.connection.attempts";
    /// Streams lost, by cause.
    pub const DISCONNECTIONS: &str = "connector.client.disconnections";
    /// Executes answered, by outcome.
    pub const EXECUTES: &str = "connector.client.executes";
    /// Time from `execute_request` received to response made, in seconds.
    pub const EXECUTE_DURATION: &str = "connector.client.execute.duration";
    /// Heartbeat round trip, in seconds.
    pub const HEARTBEAT_RTT: &str = "connector.client.heartbeat.rtt";
    /// Malformed or unexpected server messages.
    pub const PROTOCOL_ERRORS: &str = "connector.client.protocol_errors";
    /// 1 while the registration is Active, else 0.
    pub const ACTIVE: &str = "connector.client.active";
}

/// The labels of one registration, built once, and the handles of the
/// metrics recorded for every execute, registered once: building a metric
/// key per execute (a label vector and a name lookup) was a measurable share
/// of the SDK's per-response cost.
#[derive(Debug, Clone)]
pub(crate) struct Telemetry {
    /// Shared, so each label clone is a reference count, not a copy.
    registration: SharedString,
    executes_ok: metrics::Counter,
    execute_duration: metrics::Histogram,
    heartbeat_rtt: metrics::Histogram,
}

impl Telemetry {
    pub(crate) fn new(registration: String) -> Self {
        let registration = SharedString::from_shared(std::sync::Arc::<str>::from(registration));
        Self {
            executes_ok: metrics::counter!(names::EXECUTES,
                "registration" => registration.clone(),
                "outcome" => "success"),
            execute_duration: metrics::histogram!(names::EXECUTE_DURATION,
                "registration" => registration.clone()),
            heartbeat_rtt: metrics::histogram!(names::HEARTBEAT_RTT,
                "registration" => registration.clone()),
            registration,
        }
    }

    pub(crate) fn connection_attempt(&self, succeeded: bool) {
        metrics::counter!(names::CONNECTION_ATTEMPTS,
            "registration" => self.registration.clone(),
            "outcome" => if succeeded { "succeeded" } else { "failed" })
        .increment(1);
    }

    pub(crate) fn disconnected(&self, cause: &DisconnectCause) {
        metrics::counter!(names::DISCONNECTIONS,
            "registration" => self.registration.clone(),
            "cause" => cause.label())
        .increment(1);
    }

    pub(crate) fn executed(&self, success: bool, kind: i32, duration: Duration) {
        self.execute_duration.record(duration.as_secs_f64());
        if success {
            self.executes_ok.increment(1);
            return;
        }
        let outcome = {
            match ExecuteErrorKind::try_from(kind).unwrap_or(ExecuteErrorKind::Unspecified) {
                ExecuteErrorKind::Handler => "handler",
                ExecuteErrorKind::Timeout => "timeout",
                ExecuteErrorKind::Cancelled => "cancelled",
                ExecuteErrorKind::BadPayload => "bad_payload",
                ExecuteErrorKind::Overloaded => "overloaded",
                ExecuteErrorKind::UnknownCapability => "unknown_capability",
                ExecuteErrorKind::Unspecified => "unspecified",
            }
        };
        metrics::counter!(names::EXECUTES,
            "registration" => self.registration.clone(),
            "outcome" => outcome)
        .increment(1);
    }

    pub(crate) fn heartbeat_rtt(&self, rtt: Duration) {
        self.heartbeat_rtt.record(rtt.as_secs_f64());
    }

    pub(crate) fn protocol_error(&self) {
        metrics::counter!(names::PROTOCOL_ERRORS,
            "registration" => self.registration.clone())
        .increment(1);
    }

    pub(crate) fn active(&self, active: bool) {
        metrics::gauge!(names::ACTIVE,
            "registration" => self.registration.clone())
        .set(if active { 1.0 } else { 0.0 });
    }
}

//! The echo connector of the `connector-host` contract (`echo`, `sleep`,
//! `fail`).

use std::time::Duration;

use async_trait::async_trait;
use connector_core::proto::{Capability, PayloadEncoding};
use connector_core::{BaseConnector, ExecuteContext, ExecuteError, ExecuteOutput};

/// The echo connector: `echo` (also for an empty capability id) returns the
/// JSON payload unchanged, `sleep` takes `{"ms": N}`, waits N ms and returns
/// `{"slept_ms": N}`, `fail` always fails with a `HANDLER` error.
///
/// Its three capabilities are declared, so the SDK answers any other
/// capability id with `UNKNOWN_CAPABILITY` without calling it, and a payload
/// sent with JSON encoding that is not JSON with `BAD_PAYLOAD`. Payloads sent
/// as RAW or with no encoding are checked here, with the same answer.
///
/// It serves any connector type: the type is the registration's
/// (`ConnectorConfig`), not the connector's.
#[derive(Debug, Clone, Default)]
pub struct EchoConnector;

impl EchoConnector {
    /// The echo connector.
    pub fn new() -> Self {
        Self
    }
}

const SLEEP_INPUT_SCHEMA: &str = r#"{"type":"object","required":["ms"],
  "properties":{"ms":{"type":"integer","minimum":0}}}"#;
const SLEEP_OUTPUT_SCHEMA: &str = r#"{"type":"object","required":["slept_ms"],
  "properties":{"slept_ms":{"type":"integer","minimum":0}}}"#;

fn capability(id: &str, description: &str, input: &str, output: &str) -> Capability {
    Capability {
        id: id.into(),
        description: description.into(),
        input_schema_json: input.into(),
        output_schema_json: output.into(),
    }
}

#[async_trait]
impl BaseConnector for EchoConnector {
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![
            capability(
                "echo",
                "Returns the JSON payload unchanged (also used for an empty capability id).",
                "{}",
                "{}",
            ),
            capability(
                "sleep",
                "Waits `ms` milliseconds, then returns {\"slept_ms\": ms}.",
                SLEEP_INPUT_SCHEMA,
                SLEEP_OUTPUT_SCHEMA,
            ),
            capability(
                "fail",
                "Always fails with a HANDLER error; for testing error paths.",
                "{}",
                "{}",
            ),
        ]
    }

    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        // The SDK checks JSON payloads already; RAW and unspecified ones
        // reach us unchecked, and the contract wants BAD_PAYLOAD for them too.
        if ctx.encoding != PayloadEncoding::Json {
            serde_json::from_slice::<serde_json::Value>(&ctx.payload).map_err(|e| {
                ExecuteError::bad_payload(format!("payload is not valid JSON: {e}"))
            })?;
        }
        match ctx.capability_id.as_str() {
            "" | "echo" => Ok(ExecuteOutput::json_bytes(ctx.payload)),
            "sleep" => {
                let value: serde_json::Value = ctx.json()?;
                let ms = value
                    .get("ms")
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| {
                        ExecuteError::bad_payload(
                            "`sleep` takes {\"ms\": N} with N a non-negative integer",
                        )
                    })?;
                // Cancellation and deadlines drop this future; nothing to do.
                tokio::time::sleep(Duration::from_millis(ms)).await;
                ExecuteOutput::json(&serde_json::json!({ "slept_ms": ms }))
            }
            "fail" => Err(ExecuteError::handler(
                "the `fail` capability always fails (as asked)",
            )),
            other => Err(ExecuteError::unknown_capability(other)),
        }
    }
}

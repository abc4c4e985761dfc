//! A host for your own type `kv`, an in-memory key-value store (`put`
//! `{"key": K, "value": V}` → `{}`, `get` `{"key": K}` → `{"value": V}`), with
//! every flag, `--config`, reload and ops endpoint of `connector-host`:
//! `custom_host --url grpc://HOST:PORT --connector-type kv --instance-prefix kv-`.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use connector_core::proto::Capability;
use connector_core::{BaseConnector, ExecuteContext, ExecuteError, ExecuteOutput};
use connector_host::ConnectorTypes;
use serde_json::{json, Value};

/// One store per registration.
#[derive(Debug, Default)]
pub struct Kv(Mutex<HashMap<String, Value>>);

#[async_trait]
impl BaseConnector for Kv {
    fn capabilities(&self) -> Vec<Capability> {
        let cap = |id: &str| Capability {
            id: id.into(),
            ..Default::default()
        };
        vec![cap("put"), cap("get")]
    }

    async fn execute(&self, ctx: ExecuteContext) -> Result<ExecuteOutput, ExecuteError> {
        let body: Value = ctx.json()?;
        let Some(key) = body["key"].as_str() else {
            return Err(ExecuteError::bad_payload("needs a string \"key\""));
        };
        let mut store = self
            .0
            .lock()
            .map_err(|_| ExecuteError::handler("poisoned"))?;
        match ctx.capability_id.as_str() {
            "put" => {
                store.insert(key.to_string(), body["value"].clone());
                ExecuteOutput::json(&json!({}))
            }
            "get" => ExecuteOutput::json(&json!({ "value": store.get(key) })),
            other => Err(ExecuteError::unknown_capability(other)),
        }
    }
}

/// The types this host knows: `kv`, a fresh store per registration.
pub fn types() -> ConnectorTypes {
    ConnectorTypes::new().with("kv", |_key| Kv::default())
}

fn main() -> std::process::ExitCode {
    connector_host::main(types())
}

//! What the WebSocket tests and the `ws_rss` example build the same way.
#![allow(dead_code)] // each user takes a different subset

use connector_core::proto::{Kind, RegisterRequest, StreamMessage};
use connector_core::RegistrationKey;

/// The auth token of [`register`].
pub(crate) const TOKEN: &str = "secret-token";

/// A `register` for `key`, version 1.0.0, token [`TOKEN`], four requests at
/// a time.
pub(crate) fn register(key: &RegistrationKey) -> StreamMessage {
    StreamMessage {
        kind: Some(Kind::Register(Box::new(RegisterRequest {
            tenant_id: key.tenant_id().into(),
            connector_type: key.connector_type().into(),
            instance_id: key.instance_id().into(),
            version: "1.0.0".into(),
            auth_token: TOKEN.into(),
            max_concurrent_requests: 4,
            ..Default::default()
        }))),
    }
}

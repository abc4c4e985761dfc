//! What the WebSocket tests and the `ws_rss` example build the same way.
#![allow(dead_code)] // each user takes a different subset

use connector_core::proto::StreamMessage;
use connector_core::RegistrationKey;
use connector_testkit::harness::{register_message, TEST_TOKEN};

/// The auth token of [`register`].
pub(crate) const TOKEN: &str = TEST_TOKEN;

/// A `register` for `key`, version 1.0.0, token [`TOKEN`], four requests at
/// a time.
pub(crate) fn register(key: &RegistrationKey) -> StreamMessage {
    register_message(key, 4)
}

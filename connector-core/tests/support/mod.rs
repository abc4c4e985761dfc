//! What the runner-level tests of this crate repeat, written once: options
//! for the in-memory mux, `t.<type>.<instance>` registrations and keys, and
//! a runner started over a fresh [`TestServer`]. The background runner and
//! its clean stop are the testkit's [`Running`].

// Each test file uses its own part of this module.
#![allow(dead_code, reason = "shared by several test crates, each using a part")]

use std::sync::Arc;

use connector_core::{
    BaseConnector, ConnectorConfig, ConnectorError, ConnectorRegistration, MultiConnectorRunner,
    MultiTransportOptions, MultiTransportOptionsBuilder, RegistrationKey,
};
use connector_testkit::harness::{Running, WAIT};
use connector_testkit::{MemoryMux, MemoryTransport, TestServer};
use tokio::task::JoinHandle;

/// Options for the in-memory mux (the URL is never dialled), with the
/// defaults and jitter seed 1.
pub(crate) fn options() -> MultiTransportOptions {
    tuned(|b| b)
}

/// [`options`] changed by `f`.
pub(crate) fn tuned(
    f: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
) -> MultiTransportOptions {
    f(MultiTransportOptions::builder("grpc://127.0.0.1:1").jitter_seed(Some(1)))
        .build()
        .expect("valid options")
}

/// The key `t.<connector_type>.<instance>`.
pub(crate) fn key_of(connector_type: &str, instance: &str) -> RegistrationKey {
    RegistrationKey::new("t", connector_type, instance).expect("a valid key")
}

/// A registration of `connector` under `t.<connector_type>.<instance>`.
pub(crate) fn registration(
    connector_type: &str,
    instance: &str,
    connector: Arc<dyn BaseConnector>,
) -> ConnectorRegistration {
    ConnectorRegistration::from_arc(
        ConnectorConfig::builder("t", connector_type, instance)
            .build()
            .expect("a valid config"),
        connector,
    )
}

/// `n` registrations `t.echo.e0..e{n}` sharing `connector`.
pub(crate) fn echoes(n: usize, connector: Arc<dyn BaseConnector>) -> Vec<ConnectorRegistration> {
    (0..n)
        .map(|i| registration("echo", &format!("e{i}"), Arc::clone(&connector)))
        .collect()
}

/// A server, its mux, and a runner of `registrations` over it (not run).
pub(crate) fn runner(
    registrations: Vec<ConnectorRegistration>,
    options: MultiTransportOptions,
) -> (TestServer, MemoryMux, MultiConnectorRunner) {
    let server = TestServer::new();
    let mux = server.memory_mux();
    let runner =
        MultiConnectorRunner::new(registrations, options, MemoryTransport::new(mux.clone()));
    (server, mux, runner)
}

/// As [`runner`], running in the background (not yet waited for).
pub(crate) fn start(
    registrations: Vec<ConnectorRegistration>,
    options: MultiTransportOptions,
) -> (TestServer, MemoryMux, Running) {
    let (server, mux, runner) = runner(registrations, options);
    (server, mux, Running::start(runner))
}

/// What a `run()`-like task that [`Running`] does not cover (a
/// `ConnectorRunner`, `run_until_shutdown`) returned, within [`WAIT`].
pub(crate) async fn joined(
    task: JoinHandle<Result<(), ConnectorError>>,
) -> Result<(), ConnectorError> {
    tokio::time::timeout(WAIT, task)
        .await
        .expect("run() returned in time")
        .expect("the runner's task did not panic")
}

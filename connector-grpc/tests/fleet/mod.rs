//! What the whole-SDK gRPC tests (`runner.rs`, `reliability.rs`) share: a
//! testkit gRPC server, a runner of `n` registrations over
//! `GrpcTransport` started against it with every registration active on
//! both sides, and a stop that checks no connection outlives `run()`.

use std::sync::Arc;

use connector_core::{
    BaseConnector, MultiConnectorRunner, MultiTransportOptionsBuilder, RegistrationState,
};
use connector_grpc::GrpcTransport;
use connector_testkit::harness::{fast_options, registrations, Running, WAIT};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestServer};

/// A testkit gRPC server with `options`, and a running runner of `n`
/// registrations of `connector` (options `tune`d from the test options),
/// every one active on the server and on the client.
pub(crate) struct Fleet {
    pub(crate) engine: TestServer,
    pub(crate) server: GrpcTestServer,
    pub(crate) running: Running,
}

impl Fleet {
    pub(crate) async fn start(
        n: usize,
        options: GrpcServerOptions,
        connector: Arc<dyn BaseConnector>,
        tune: impl FnOnce(MultiTransportOptionsBuilder) -> MultiTransportOptionsBuilder,
    ) -> Self {
        let engine = TestServer::new();
        let server = GrpcTestServer::start(engine.clone(), options)
            .await
            .expect("server starts");
        let options = tune(fast_options(&server.url()))
            .build()
            .expect("valid options");
        let running = Running::start(MultiConnectorRunner::new(
            registrations(n, connector),
            options,
            GrpcTransport::new(),
        ));
        engine
            .wait_for_active(n, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{n} active on the server: {e}"));
        let fleet = Self {
            engine,
            server,
            running,
        };
        fleet.wait_all_active().await;
        fleet
    }

    pub(crate) fn runner(&self) -> &MultiConnectorRunner {
        self.running.runner()
    }

    /// Every registration active on the client. (The server may see a
    /// registration active before the client has its approval.)
    pub(crate) async fn wait_all_active(&self) {
        let runner = self.runner();
        for key in runner.registrations() {
            runner
                .registration(&key)
                .expect("hosted")
                .wait_for(WAIT, |s| *s == RegistrationState::Active)
                .await
                .unwrap_or_else(|| panic!("{key} not active on the client"));
        }
    }

    /// Stops cleanly; no connection outlives `run()`, on either side.
    pub(crate) async fn stop(self) {
        let runner = self.runner().clone();
        self.running.stop().await.expect("clean stop");
        assert_eq!(runner.summary().transport.open_connections(), 0);
        self.server
            .wait_for_connection_count(0, WAIT)
            .await
            .expect("every server connection closed");
    }
}

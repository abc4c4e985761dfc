//! Mutual TLS end to end over both transports: a server that requires a
//! client certificate admits a client with one signed by its CA and refuses
//! (with a TLS error, retried with backoff) a client without.

mod sdk;

use std::path::PathBuf;
use std::time::Duration;

use connector_core::{
    ConnectorConfig, ConnectorRegistration, MultiConnectorRunner, MultiTransportOptions,
    RegistrationEvent, RegistrationKey, Transport,
};
use connector_grpc::GrpcTransport;
use connector_testkit::connectors::Echo;
use connector_testkit::{
    GrpcServerOptions, GrpcTestServer, TestCertificate, TestServer, WsServerOptions, WsTestServer,
};
use connector_ws::WsTransport;
use sdk::AnyTransport;

const WAIT: Duration = Duration::from_secs(20);

struct Files {
    dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn files(cert: &TestCertificate, tag: &str) -> Files {
    let dir = std::env::temp_dir().join(format!("connector-mtls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ca = cert.write_ca_pem(&dir).expect("ca");
    let (c, k) = cert
        .generate_client_identity("client.test")
        .expect("identity");
    let (cp, kp) = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&cp, c).expect("write");
    std::fs::write(&kp, k).expect("write");
    Files {
        dir,
        ca,
        cert: cp,
        key: kp,
    }
}

fn runner(
    url: &str,
    f: &Files,
    with_identity: bool,
    transport: impl Transport,
) -> MultiConnectorRunner {
    let mut b = MultiTransportOptions::builder(url)
        .ca_cert(&f.ca)
        .connect_timeout(Duration::from_secs(3))
        .reconnect_delay(Duration::from_millis(20))
        .jitter(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(200));
    if with_identity {
        b = b.client_identity(&f.cert, &f.key);
    }
    let reg = ConnectorRegistration::new(
        ConnectorConfig::builder("t", "echo", "m")
            .build()
            .expect("valid"),
        Echo,
    );
    MultiConnectorRunner::new(vec![reg], b.build().expect("valid"), transport)
}

async fn check(engine: TestServer, url: String, f: Files, transport: fn() -> AnyTransport) {
    // Without a client certificate: refused at the TLS layer, retried.
    let refused = runner(&url, &f, false, transport());
    let mut events = refused
        .registration(&RegistrationKey::new("t", "echo", "m").expect("valid"))
        .expect("hosted")
        .events();
    let r = refused.clone();
    let run = tokio::spawn(async move { r.run().await });
    let mut failures = 0;
    tokio::time::timeout(WAIT, async {
        while failures < 2 {
            if let Ok(RegistrationEvent::Disconnected { .. }) = events.recv().await {
                failures += 1;
            }
        }
    })
    .await
    .expect("open failures reported");
    assert!(
        engine.active_keys().is_empty(),
        "no stream without a client certificate"
    );
    refused.shutdown_handle().shutdown();
    run.await.expect("join").expect("clean");

    // With one: admitted.
    let admitted = runner(&url, &f, true, transport());
    let r = admitted.clone();
    let run = tokio::spawn(async move { r.run().await });
    engine
        .wait_for_active(1, WAIT)
        .await
        .expect("admitted with a client certificate");
    admitted.shutdown_handle().shutdown();
    run.await.expect("join").expect("clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_mutual_tls() {
    let cert = TestCertificate::generate().expect("cert");
    let engine = TestServer::new();
    let server = GrpcTestServer::start(
        engine.clone(),
        GrpcServerOptions::default()
            .tls(cert.clone())
            .require_client_cert(true),
    )
    .await
    .expect("server");
    check(engine, server.url(), files(&cert, "grpc"), || {
        AnyTransport::Grpc(GrpcTransport::new())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_mutual_tls() {
    let cert = TestCertificate::generate().expect("cert");
    let engine = TestServer::new();
    let server = WsTestServer::start(
        engine.clone(),
        WsServerOptions::default()
            .tls(cert.clone())
            .require_client_cert(true),
    )
    .await
    .expect("server");
    check(engine, server.url(), files(&cert, "ws"), || {
        AnyTransport::Ws(WsTransport::new())
    })
    .await;
}

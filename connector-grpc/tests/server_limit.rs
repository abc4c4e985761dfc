//! A server whose `SETTINGS_MAX_CONCURRENT_STREAMS` is below the cap: the
//! mux reads the limit from the server's SETTINGS and opens the next
//! connection at once, without waiting for the stall timeout (the connect
//! timeout, set to 30 s here so that any stall would blow the bound).

use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_core::{MultiTransportOptions, RegistrationKey, StreamMux, Transport};
use connector_grpc::{GrpcMux, GrpcTransport};
use connector_proto::{Kind, RegisterRequest, RegistrationStatus, StreamMessage};
use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestCertificate, TestServer};
use futures_util::StreamExt;
use tokio::time::timeout;

/// The stall timeout of these tests: far above the bound below.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// All 12 opens must be done well within one stall timeout.
const BOUND: Duration = Duration::from_secs(5);

fn register(i: usize) -> StreamMessage {
    StreamMessage {
        kind: Some(Kind::Register(Box::new(RegisterRequest {
            tenant_id: "tenant".into(),
            connector_type: "echo".into(),
            instance_id: format!("i{i}"),
            version: "1.0.0".into(),
            auth_token: "secret-token".into(),
            max_concurrent_requests: 1,
            ..Default::default()
        }))),
    }
}

/// Opens registrations `0..n` from `n` tasks and checks each is approved.
async fn open_many(mux: Arc<dyn StreamMux>, n: usize) -> Vec<connector_core::MessageStream> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mux = Arc::clone(&mux);
            tokio::spawn(async move {
                let key = RegistrationKey::new("tenant", "echo", format!("i{i}")).expect("key");
                let mut stream = mux
                    .open(&key, register(i))
                    .await
                    .unwrap_or_else(|e| panic!("open {i}: {e}"));
                match stream.inbound.next().await {
                    Some(Ok(StreamMessage {
                        kind: Some(Kind::RegisterResponse(r)),
                    })) => assert_eq!(r.status, RegistrationStatus::Approved as i32),
                    other => panic!("{i}: expected a register_response, got {other:?}"),
                }
                stream
            })
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.expect("open task"));
    }
    streams
}

async fn check_limit_read(server: &GrpcTestServer, mux: Arc<dyn StreamMux>) {
    let started = Instant::now();
    let streams = timeout(BOUND, open_many(Arc::clone(&mux), 12))
        .await
        .unwrap_or_else(|_| panic!("12 opens within {BOUND:?} (stall timeout {STALL_TIMEOUT:?})"));
    let took = started.elapsed();
    assert_eq!(streams.len(), 12);
    let stats = mux.stats();
    let mut per_channel: Vec<usize> = stats.connections.iter().map(|c| c.streams).collect();
    per_channel.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(per_channel, vec![5, 5, 2], "{stats:?}");
    assert!(
        stats.connections.iter().all(|c| c.capacity == 5),
        "every channel has the server's limit: {stats:?}"
    );
    assert_eq!(stats.dials_succeeded, 3, "{stats:?}");
    let mut on_server: Vec<usize> = server
        .connections()
        .iter()
        .map(|c| c.open_streams)
        .collect();
    on_server.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(on_server, vec![5, 5, 2], "the server agrees");
    eprintln!("12 opens over a limit of 5 took {took:?}");
    drop(streams);
}

fn options(url: &str) -> connector_core::MultiTransportOptionsBuilder {
    MultiTransportOptions::builder(url)
        .connect_timeout(STALL_TIMEOUT)
        .max_streams_per_channel(80)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limit_is_read_from_settings_not_learned_from_a_stall() {
    let engine = TestServer::new();
    let server = GrpcTestServer::start(
        engine.clone(),
        GrpcServerOptions::default().max_concurrent_streams(5),
    )
    .await
    .expect("server");
    let o = options(&server.url()).build().expect("options");
    // Without the eager first dial: 12 opens race for the first channel.
    let mux: Arc<dyn StreamMux> = Arc::new(GrpcMux::new(&o).expect("mux"));
    check_limit_read(&server, mux).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limit_is_read_through_tls_after_an_eager_dial() {
    let dir = std::env::temp_dir().join(format!("connector-grpc-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cert = TestCertificate::generate().expect("cert");
    let ca = cert.write_ca_pem(&dir).expect("ca file");
    let engine = TestServer::new();
    let server = GrpcTestServer::start(
        engine.clone(),
        GrpcServerOptions::default()
            .max_concurrent_streams(5)
            .tls(cert),
    )
    .await
    .expect("server");
    let url = server.url();
    assert!(url.starts_with("grpcs://"), "{url}");
    let o = options(&url).ca_cert(&ca).build().expect("options");
    let mux = GrpcTransport::new().mux(&o).await.expect("mux");
    check_limit_read(&server, mux).await;
    let _ = std::fs::remove_dir_all(&dir);
}

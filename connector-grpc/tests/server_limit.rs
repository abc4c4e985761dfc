//! A server whose `SETTINGS_MAX_CONCURRENT_STREAMS` is below the cap: the
//! mux reads the limit from the server's SETTINGS and opens the next
//! connection at once, without waiting for the stall timeout (the connect
//! timeout, set to 30 s here so that any stall would blow the bound).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_core::{StreamMux, Transport};
use connector_grpc::{GrpcMux, GrpcTransport};
use connector_testkit::harness::TempDir;
use connector_testkit::{GrpcServerOptions, TestCertificate};
use support::{open_many, options, server_streams_per_connection, start, streams_per_channel};
use tokio::time::timeout;

/// The stall timeout of these tests: far above the bound below.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// All 12 opens must be done well within one stall timeout.
const BOUND: Duration = Duration::from_secs(5);

/// A server allowing 5 streams per connection (over TLS when `tls`), a mux
/// on it with the cap at 80 (eagerly dialled through `GrpcTransport::mux`
/// when `eager`), then 12 concurrent opens: within [`BOUND`], over 3
/// channels of the server's limit, each dialled once, and the server agrees.
async fn the_limit_is_read(tls: bool, eager: bool) {
    let dir = TempDir::new("limit");
    let mut server_opts = GrpcServerOptions::default().max_concurrent_streams(5);
    let mut ca = None;
    if tls {
        let cert = TestCertificate::generate().expect("cert");
        ca = Some(cert.write_ca_pem(dir.dir()).expect("ca file"));
        server_opts = server_opts.tls(cert);
    }
    let (_engine, server) = start(server_opts).await;
    let url = server.url();
    assert_eq!(url.starts_with("grpcs://"), tls, "{url}");
    let mut o = options(&url)
        .connect_timeout(STALL_TIMEOUT)
        .max_streams_per_channel(80);
    if let Some(ca) = &ca {
        o = o.ca_cert(ca);
    }
    let o = o.build().expect("options");
    let mux: Arc<dyn StreamMux> = if eager {
        GrpcTransport::new().mux(&o).await.expect("mux")
    } else {
        // Without the eager first dial: 12 opens race for the first channel.
        Arc::new(GrpcMux::new(&o).expect("mux"))
    };

    let started = Instant::now();
    let streams = timeout(BOUND, open_many(&mux, 0..12))
        .await
        .unwrap_or_else(|_| panic!("12 opens within {BOUND:?} (stall timeout {STALL_TIMEOUT:?})"));
    let took = started.elapsed();
    assert_eq!(streams.len(), 12);
    let stats = mux.stats();
    assert_eq!(streams_per_channel(&*mux), vec![5, 5, 2], "{stats:?}");
    assert!(
        stats.connections.iter().all(|c| c.capacity == 5),
        "every channel has the server's limit: {stats:?}"
    );
    assert_eq!(stats.dials_succeeded, 3, "{stats:?}");
    assert_eq!(
        server_streams_per_connection(&server),
        vec![5, 5, 2],
        "the server agrees"
    );
    eprintln!("12 opens over a limit of 5 took {took:?}");
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limit_is_read_from_settings_not_learned_from_a_stall() {
    the_limit_is_read(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limit_is_read_through_tls_after_an_eager_dial() {
    the_limit_is_read(true, true).await;
}

//! `GrpcMux` dial rounds over real loopback sockets: when every channel is
//! full, the open holding the dial lock dials as many channels at once as
//! the opens queued behind it will fill. Every wait is bounded; ports are
//! always 0.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use connector_core::{MessageStream, StreamMux};
use connector_grpc::GrpcMux;
use connector_proto::{Kind, RegistrationStatus, StreamMessage};
use connector_testkit::harness::{key, WAIT};
use connector_testkit::GrpcServerOptions;
use support::{next, options, register, start, streams_per_channel};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::timeout;

/// A TCP gate in front of a server, on its own thread and runtime (so it
/// never depends on the test's runtime being polled). It forwards nothing
/// until it decides to:
///
/// * the first connection is held until [`Gate::release_first`];
/// * after that, connections are held until two are held at once, then
///   both are forwarded.
///
/// So a connection after the first gets through only if another one is
/// dialled while it waits.
struct Gate {
    addr: SocketAddr,
    first_arrived: Option<oneshot::Receiver<()>>,
    release: Option<oneshot::Sender<()>>,
    /// The most connections held (accepted, not yet forwarded) at once.
    max_held: Arc<AtomicUsize>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

impl Gate {
    fn start(server: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the gate");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("gate addr");
        let (arrived_tx, first_arrived) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        let max_held = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (max, count) = (Arc::clone(&max_held), Arc::clone(&accepted));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("gate runtime");
            rt.block_on(gate(listener, server, arrived_tx, release_rx, max, count));
        });
        Self {
            addr,
            first_arrived: Some(first_arrived),
            release: Some(release),
            max_held,
            accepted,
        }
    }

    fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// Waits (bounded) until the first connection is held.
    async fn first_arrived(&mut self) {
        let arrived = self.first_arrived.take().expect("waited once");
        timeout(WAIT, arrived)
            .await
            .expect("the first connection reaches the gate in time")
            .expect("gate running");
    }

    /// Lets the first connection through.
    fn release_first(&mut self) {
        let release = self.release.take().expect("released once");
        release.send(()).expect("gate running");
    }

    fn max_held(&self) -> usize {
        self.max_held.load(Ordering::SeqCst)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn gate(
    listener: std::net::TcpListener,
    server: SocketAddr,
    arrived: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
    max_held: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
) {
    let listener = TcpListener::from_std(listener).expect("gate listener");
    let accept = || async {
        let (conn, _) = listener.accept().await.expect("gate accept");
        accepted.fetch_add(1, Ordering::SeqCst);
        conn
    };
    let first = accept().await;
    max_held.fetch_max(1, Ordering::SeqCst);
    let _ = arrived.send(());
    if release.await.is_err() {
        return; // the test is gone
    }
    tokio::spawn(forward(first, server));
    loop {
        let mut held = Vec::with_capacity(2);
        while held.len() < 2 {
            held.push(accept().await);
            max_held.fetch_max(held.len(), Ordering::SeqCst);
        }
        for conn in held {
            tokio::spawn(forward(conn, server));
        }
    }
}

async fn forward(mut client: TcpStream, server: SocketAddr) {
    let Ok(mut upstream) = TcpStream::connect(server).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Checks that `stream` got its `register_response`, approved.
async fn approved(i: usize, stream: &mut MessageStream) {
    match next(stream).await {
        Some(Ok(StreamMessage {
            kind: Some(Kind::RegisterResponse(r)),
        })) => assert_eq!(r.status, RegistrationStatus::Approved as i32, "{i}: {r:?}"),
        other => panic!("{i}: expected a register_response, got {other:?}"),
    }
}

/// The second dial round dials two channels at once.
///
/// 240 opens at a cap of 80 per channel, spawned on a current-thread
/// runtime before it runs any of them, reach the dial lock before the
/// first dial's IO can complete (every task woken by that IO runs after
/// all of them): the first open dials one channel (nothing is queued yet
/// when it takes the lock) and 239 wait. That channel takes 80 of them;
/// the 81st open then holds the lock with 159 queued behind it, so its
/// round is `ceil(160 / 80) = 2` channels, dialled at once.
///
/// The gate makes this deterministic rather than a matter of timing: it
/// holds the first connection until the test releases it (so the opens
/// are all queued first), and then lets connections through only in
/// pairs. Two concurrent dials arrive as a pair and go through at once.
/// A mux dialling one channel at a time leaves its lone connection held,
/// and that dial waits for the server's SETTINGS for the whole connect
/// timeout, an hour here: its opens never finish within [`WAIT`].
#[tokio::test(flavor = "current_thread")]
async fn a_full_pool_dials_a_round_of_channels_at_once() {
    let (_engine, server) = start(GrpcServerOptions::default()).await;
    let mut gate = Gate::start(server.addr());
    let o = options(&gate.url())
        .max_streams_per_channel(80)
        .connect_timeout(Duration::from_secs(3600))
        .build()
        .expect("options");
    let mux = Arc::new(GrpcMux::new(&o).expect("mux"));

    // All spawned before this task yields: none has run yet.
    let opens: Vec<_> = (0..240)
        .map(|i| {
            let mux = Arc::clone(&mux);
            tokio::spawn(async move { mux.open(&key(i), register(i)).await })
        })
        .collect();

    gate.first_arrived().await;
    assert_eq!(gate.accepted(), 1, "one dial in the first round");
    gate.release_first();

    let mut streams = Vec::new();
    let mut failed = Vec::new();
    for (i, open) in opens.into_iter().enumerate() {
        match timeout(WAIT, open).await {
            Ok(Ok(Ok(stream))) => streams.push((i, stream)),
            Ok(Ok(Err(e))) => failed.push(format!("{i}: {e}")),
            Ok(Err(e)) => panic!("open task {i} panicked: {e}"),
            Err(_) => panic!(
                "open {i} did not finish within {WAIT:?}: a dial was left alone at the gate \
                 (the gate held at most {} at once; {:?})",
                gate.max_held(),
                mux.stats()
            ),
        }
    }
    let stats = mux.stats();
    assert!(
        failed.is_empty(),
        "{} of 240 opens failed (gate held at most {} at once, accepted {}; {stats:?}); first: {}",
        failed.len(),
        gate.max_held(),
        gate.accepted(),
        failed[0]
    );
    for (i, stream) in &mut streams {
        approved(*i, stream).await;
    }

    assert_eq!(
        (stats.dials_succeeded, stats.dials_failed),
        (3, 0),
        "{stats:?}"
    );
    assert_eq!(
        gate.max_held(),
        2,
        "the second round's two dials were held together"
    );
    assert_eq!(gate.accepted(), 3);
    assert_eq!(streams_per_channel(&*mux), [80, 80, 80]);
    server
        .wait_for_connection_count(3, WAIT)
        .await
        .expect("three server connections");
    assert_eq!(server.total_connections_accepted(), 3);
    drop(streams);
    mux.close().await;
}

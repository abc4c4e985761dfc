//! Measures the resident memory an idle WebSocket costs the client.
//!
//! `cargo run --release -p connector-ws --example ws_rss -- [SOCKETS] [READ_BUFFER]`
//!
//! Starts the testkit's WebSocket server in a child process (so its memory
//! is not counted), opens SOCKETS (default 1000) sockets through a `WsMux`,
//! reads each one's `register_response`, and prints the growth of this
//! process's `VmRSS` per socket. READ_BUFFER (default: `WsConfig`'s 4 KiB)
//! lets you compare with tungstenite's 128 KiB default. Linux only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a measuring tool: panics are its error report

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use connector_core::proto::Kind;
use connector_core::{MultiTransportOptions, RegistrationKey, StreamMux};
use connector_testkit::{TestServer, WsServerOptions, WsTestServer};
use connector_ws::{WsConfig, WsMux};
use futures_util::StreamExt;
use support::register;

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

async fn serve() {
    let server = WsTestServer::start(TestServer::new(), WsServerOptions::default())
        .await
        .unwrap();
    println!("{}", server.url());
    // Serve until the parent closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await
    .unwrap();
}

async fn open_batch(mux: &WsMux, from: usize, to: usize) -> Vec<connector_core::MessageStream> {
    let mut streams = Vec::with_capacity(to - from);
    for chunk in (from..to).collect::<Vec<_>>().chunks(100) {
        let opens = chunk.iter().map(|i| async move {
            let key = RegistrationKey::new("rss", "echo", format!("i{i}")).unwrap();
            let mut s = mux.open_socket(&key, register(&key)).await.unwrap();
            let first = s.inbound.next().await.unwrap().unwrap();
            assert!(matches!(first.kind, Some(Kind::RegisterResponse(_))));
            s
        });
        streams.extend(futures_util::future::join_all(opens).await);
    }
    streams
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if args.get(1).map(String::as_str) == Some("server") {
        rt.block_on(serve());
        return;
    }
    let sockets: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let mut config = WsConfig::default().ping_interval(None);
    if let Some(rb) = args.get(2).and_then(|a| a.parse().ok()) {
        config = config.read_buffer_size(rb);
    }

    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let url = url.trim().to_string();

    rt.block_on(async {
        let options = MultiTransportOptions::builder(&url).build().unwrap();
        let mux = WsMux::new(&options, config.clone()).unwrap();
        // Warm up the runtime, the allocator and the lazy statics.
        drop(open_batch(&mux, 0, 50).await);
        while mux.stats().open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = vm_rss_kib();
        let streams = open_batch(&mux, 100, 100 + sockets).await;
        let after = vm_rss_kib();
        println!(
            "{sockets} idle sockets, read_buffer_size {} B: VmRSS {before} KiB -> {after} KiB, \
             {:.1} KiB per socket",
            config.read_buffer_size,
            (after - before) as f64 / sockets as f64
        );
        drop(streams);
    });
    drop(child.stdin.take());
    let _ = child.wait();
}

//! `connection_id` in `GET /registrations` names the connection a
//! registration's stream is on: registrations that share an HTTP/2
//! connection share the id, and those on different connections (a gRPC
//! stream cap of 1, or WebSocket's socket per registration) do not. The
//! number of distinct ids is checked against the connections the server
//! actually accepted, so ids that merely differ are not enough.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use connector_core::proto::RegistrationStatus;
use connector_testkit::TestServer;

mod support;
use support::*;

/// Hosts `count` registrations on `url` (plus `extra` flags), waits until
/// all are active on both sides, and returns `/registrations`' ids with
/// the running host.
async fn ids(
    engine: &TestServer,
    url: &str,
    count: u32,
    extra: &[&str],
) -> (Vec<Option<u64>>, Host, SocketAddr) {
    let mut host = Host::with_metrics(url, &count.to_string(), extra);
    let addr = host.metrics_addr().await;
    engine
        .wait_for_active(count as usize, WAIT)
        .await
        .expect("all active");
    // Answered executes mean the host has read its approvals too.
    one_execute_each(engine, &engine.active_keys()).await;
    let list = registrations(addr).await;
    (list, host, addr)
}

async fn registrations(addr: SocketAddr) -> Vec<Option<u64>> {
    let response = get_status(addr, "/registrations", 200).await;
    let list: serde_json::Value = serde_json::from_str(&response.body).expect("JSON");
    let list = list.as_array().expect("an array");
    list.iter()
        .map(|r| {
            assert_eq!(r["state"], "active", "{r}");
            r["connection_id"].as_u64()
        })
        .collect()
}

fn distinct(ids: &[Option<u64>]) -> BTreeSet<u64> {
    assert!(
        ids.iter().all(Option::is_some),
        "every active one has an id: {ids:?}"
    );
    ids.iter().flatten().copied().collect()
}

/// [`ids`], then: exactly `want` distinct ids, and exactly `want`
/// connections open on the server (`connection_count`).
async fn assert_ids(
    engine: &TestServer,
    url: &str,
    count: u32,
    extra: &[&str],
    want: usize,
    connection_count: impl Fn() -> usize,
) -> (Host, SocketAddr) {
    let (ids, host, addr) = ids(engine, url, count, extra).await;
    assert_eq!(distinct(&ids).len(), want, "{want} connection(s): {ids:?}");
    assert_eq!(connection_count(), want);
    (host, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_registrations_share_an_id_when_they_share_a_connection() {
    let server = grpc_server().await;
    let count = || server.connection_count();
    // One HTTP/2 connection.
    let (host, _) = assert_ids(server.engine(), &server.url(), 2, &[], 1, count).await;
    host.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_registrations_on_two_connections_have_two_ids() {
    let server = grpc_server().await;
    let count = || server.connection_count();
    // Two HTTP/2 connections.
    let extra = ["--max-streams-per-channel", "1"];
    let (host, addr) = assert_ids(server.engine(), &server.url(), 2, &extra, 2, count).await;

    // After the server kills both connections, each registration comes
    // back, still one per connection. (A gRPC channel reconnects in place
    // and keeps its id: the id names the channel, which has one HTTP/2
    // connection at a time.)
    let engine = server.engine().clone();
    let newest_old = engine
        .registrations()
        .iter()
        .map(|r| r.stream_id)
        .max()
        .expect("two streams");
    assert_eq!(server.kill_all_connections(), 2);
    let waited = engine
        .wait_until(WAIT, |e| {
            let regs = e.registrations();
            regs.len() == 2
                && regs
                    .iter()
                    .all(|r| r.stream_id > newest_old && r.status == RegistrationStatus::Approved)
        })
        .await;
    waited.expect("both approved again on new streams");
    one_execute_each(&engine, &engine.active_keys()).await;
    let after = distinct(&registrations(addr).await);
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(server.connection_count(), 2);
    host.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_registrations_have_a_socket_each() {
    let server = ws_server().await;
    let count = || server.connection_count();
    // One socket each.
    let (host, _) = assert_ids(server.engine(), &server.url(), 3, &[], 3, count).await;
    host.stop_ok().await;
}

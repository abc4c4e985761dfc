//! Property test over the state machine's inputs: whatever a server (or the
//! network) throws at it, in any order, it never panics, never runs more
//! handlers than its bound, and never answers a request twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use connector_core::proto::{
    stream_message::Kind, ApprovalUpdate, CancelRequest, Drain, ExecuteRequest, HeartbeatAck,
    PayloadEncoding, RegisterResponse, StreamMessage,
};
use connector_core::{
    Action, ConnectorConfig, ConnectorRegistration, ExecuteError, ExecuteOutput,
    MultiTransportOptions, Registration, RegistrationState,
};
use connector_testkit::connectors::Echo;
use proptest::prelude::*;
use tokio::time::Instant;

#[derive(Debug, Clone)]
enum Input {
    Opened,
    OpenFailed,
    Status(i32, i32),
    Update(i32, i32),
    Execute { json_ok: bool, timeout_ms: u32 },
    DuplicateOfRecent(usize),
    Cancel(usize),
    Done(usize, bool),
    Closed(bool),
    Drain(u32),
    Ack(bool),
    NoKind,
    WrongDirection,
    Advance(u64),
    Shutdown,
    Unsent,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        1 => Just(Input::Opened),
        1 => Just(Input::OpenFailed),
        1 => (0..5i32, 0..7i32).prop_map(|(s, r)| Input::Status(s, r)),
        1 => (0..5i32, 0..7i32).prop_map(|(s, r)| Input::Update(s, r)),
        4 => (any::<bool>(), prop_oneof![Just(0u32), 1..5_000u32])
            .prop_map(|(json_ok, timeout_ms)| Input::Execute { json_ok, timeout_ms }),
        1 => (0..16usize).prop_map(Input::DuplicateOfRecent),
        1 => (0..16usize).prop_map(Input::Cancel),
        3 => (0..16usize, any::<bool>()).prop_map(|(i, ok)| Input::Done(i, ok)),
        1 => any::<bool>().prop_map(Input::Closed),
        1 => (0..3_000u32).prop_map(Input::Drain),
        1 => any::<bool>().prop_map(Input::Ack),
        1 => Just(Input::NoKind),
        1 => Just(Input::WrongDirection),
        3 => (0..70_000u64).prop_map(Input::Advance),
        1 => Just(Input::Shutdown),
        1 => Just(Input::Unsent),
    ]
}

const MAX_CONCURRENT: usize = 3;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn never_panics_bounds_slots_and_answers_once(inputs in proptest::collection::vec(input(), 1..120)) {
        let options = MultiTransportOptions::builder("grpc://127.0.0.1:1")
            .jitter_seed(Some(3))
            .max_concurrent_requests(MAX_CONCURRENT as u32)
            .max_queued_requests(4)
            .drain_timeout(Duration::from_secs(5))
            .metrics_report_interval(Some(Duration::from_secs(20)))
            .build()
            .expect("valid options");
        let reg = ConnectorRegistration::new(
            ConnectorConfig::builder("t", "nop", "p").build().expect("valid"),
            Echo,
        );
        let mut now = Instant::now();
        let mut sm = Registration::new(&reg, &options, now, 0);
        sm.handle_start(now);
        let mut next_id = 0u64;
        let mut sent_ids: Vec<String> = Vec::new();
        let mut running: HashSet<String> = HashSet::new();
        let mut answered: HashMap<String, u32> = HashMap::new();
        let mut asked: HashMap<String, u32> = HashMap::new();
        let mut last_unsent: Option<StreamMessage> = None;

        for inp in inputs {
            let msg = |kind| StreamMessage { kind: Some(kind) };
            match inp {
                Input::Opened => sm.handle_stream_opened(now),
                Input::OpenFailed => sm.handle_open_failed(now, "refused"),
                Input::Status(s, r) => sm.handle_message(now, msg(Kind::RegisterResponse(Box::new(RegisterResponse {
                    status: s, reject_reason: r, ..Default::default()
                })))),
                Input::Update(s, r) => sm.handle_message(now, msg(Kind::ApprovalUpdate(Box::new(ApprovalUpdate {
                    status: s, reject_reason: r, ..Default::default()
                })))),
                Input::Execute { json_ok, timeout_ms } => {
                    next_id += 1;
                    let id = format!("r{next_id}");
                    sent_ids.push(id.clone());
                    *asked.entry(id.clone()).or_default() += 1;
                    sm.handle_message(now, msg(Kind::ExecuteRequest(Box::new(ExecuteRequest {
                        request_id: id,
                        payload: if json_ok { &b"{}"[..] } else { &b"{"[..] }.to_vec().into(),
                        encoding: PayloadEncoding::Json as i32,
                        timeout_ms,
                        ..Default::default()
                    }))));
                }
                Input::DuplicateOfRecent(i) => {
                    if let Some(id) = sent_ids.iter().rev().nth(i) {
                        // The server asks again (a retry after a reconnect,
                        // or a buggy duplicate).
                        {
                            *asked.entry(id.clone()).or_default() += 1;
                            sm.handle_message(now, msg(Kind::ExecuteRequest(Box::new(ExecuteRequest {
                                request_id: id.clone(),
                                payload: b"{}".to_vec().into(),
                                encoding: PayloadEncoding::Json as i32,
                                ..Default::default()
                            }))));
                        }
                    }
                }
                Input::Cancel(i) => {
                    let id = sent_ids.iter().rev().nth(i).cloned().unwrap_or_else(|| "unknown".into());
                    sm.handle_message(now, msg(Kind::Cancel(Box::new(CancelRequest { request_id: id }))));
                }
                Input::Done(i, ok) => {
                    if let Some(id) = running.iter().nth(i % running.len().max(1)).cloned() {
                        running.remove(&id);
                        let result = if ok { Ok(ExecuteOutput::raw(Vec::new())) } else { Err(ExecuteError::handler("x")) };
                        sm.handle_execute_done(now, &id, result);
                    }
                }
                Input::Closed(clean) => sm.handle_stream_closed(now, if clean { None } else { Some("reset") }),
                Input::Drain(ms) => sm.handle_message(now, msg(Kind::Drain(Box::new(Drain { reason: String::new(), reconnect_after_ms: ms })))),
                Input::Ack(r) => sm.handle_message(now, msg(Kind::HeartbeatAck(Box::new(HeartbeatAck { sequence: 1, sent_at_unix_ms: 0, should_reconnect: r })))),
                Input::NoKind => sm.handle_message(now, StreamMessage { kind: None }),
                Input::WrongDirection => sm.handle_message(now, msg(Kind::Heartbeat(Box::default()))),
                Input::Advance(ms) => {
                    let target = now + Duration::from_millis(ms);
                    while let Some(at) = sm.poll_timeout() {
                        if at > target { break; }
                        now = at;
                        sm.handle_timeout(now);
                        drain_outputs(&mut sm, &mut running, &mut answered, &mut last_unsent);
                    }
                    now = target;
                }
                Input::Shutdown => sm.handle_shutdown(now),
                Input::Unsent => {
                    if let Some(m) = last_unsent.take() {
                        // The driver failed to send it: it must be kept, not
                        // answered a second time.
                        if let Some(Kind::ExecuteResponse(r)) = &m.kind {
                            if let Some(c) = answered.get_mut(&r.request_id) { *c -= 1; }
                        }
                        sm.handle_unsent(now, m);
                    }
                }
            }
            drain_outputs(&mut sm, &mut running, &mut answered, &mut last_unsent);
            prop_assert!(sm.running() <= MAX_CONCURRENT, "running {} > bound", sm.running());
            prop_assert!(running.len() <= MAX_CONCURRENT);
            for (id, n) in &answered {
                prop_assert!(*n <= asked.get(id).copied().unwrap_or(0), "{id} answered {n} times, asked fewer");
            }
        }

        // However it ended, a shutdown finishes it within the drain timeout.
        sm.handle_shutdown(now);
        drain_outputs(&mut sm, &mut running, &mut answered, &mut last_unsent);
        let end = now + Duration::from_secs(6);
        while let Some(at) = sm.poll_timeout() {
            if at > end { break; }
            now = at;
            sm.handle_timeout(now);
            drain_outputs(&mut sm, &mut running, &mut answered, &mut last_unsent);
        }
        prop_assert!(matches!(sm.state(), RegistrationState::Stopped(_)), "{:?}", sm.state());
        prop_assert_eq!(sm.in_flight(), 0);
        for (id, n) in &answered {
            prop_assert!(*n <= asked.get(id).copied().unwrap_or(0), "{id} answered {n} times, asked fewer");
        }
    }
}

fn drain_outputs(
    sm: &mut Registration,
    running: &mut HashSet<String>,
    answered: &mut HashMap<String, u32>,
    last_unsent: &mut Option<StreamMessage>,
) {
    while let Some(a) = sm.poll_action() {
        match a {
            Action::Execute(r) => {
                assert!(
                    running.insert(r.request_id.clone()),
                    "started twice: {}",
                    r.request_id
                );
            }
            Action::Abort(id) => {
                running.remove(&id);
            }
            _ => {}
        }
    }
    while let Some(m) = sm.poll_transmit() {
        if let Some(Kind::ExecuteResponse(r)) = &m.kind {
            *answered.entry(r.request_id.clone()).or_default() += 1;
            *last_unsent = Some(m.clone());
        }
    }
    while sm.poll_event().is_some() {}
}

//! `testkit-server`: the testkit's control-plane server as a program, so a
//! host (`connector-host --url`, the examples, your own) has something to
//! register with on a laptop.
//!
//! ```text
//! testkit-server [--grpc ADDR] [--ws ADDR] [--approve all|pending|deny]
//!                [--workload N] [--capability ID] [--payload JSON]
//! ```
//!
//! It is the library's [`TestServer`] engine behind its [`GrpcTestServer`]
//! and [`WsTestServer`] front-ends (both on one engine), nothing copied.
//! The first line on stdout names what it listens on, one URL per
//! front-end (`listening on grpc://127.0.0.1:41234 ws://127.0.0.1:41235`),
//! so port 0 can be used and read back by a script. Then a line per
//! registration change (`approved KEY`, `closed KEY: …`) and, once a second,
//! a status line:
//!
//! ```text
//! t=3s active=2 pending=0 connections=1 answers/s=20 failed/s=0 sent/s=20 outstanding=0
//! ```
//!
//! `--workload N` sends N executes a second to every active registration
//! (`echo` with `{"seq":N}`, each answer checked to be the payload back;
//! `--capability`/`--payload` send something else, then only `success` is
//! checked). With `--approve pending`, registrations wait until approved on
//! stdin: `approve KEY`, `approve all`, `reject KEY`, `reject all`, `list`.
//!
//! Exit: 0 after SIGINT/SIGTERM (servers stopped, a `stopped:` total line),
//! 2 for a bad flag (one line on stderr), 1 when a front-end cannot listen.
//! The binary follows the crate's `grpc`/`ws` features: a flag for a
//! front-end that was not built in is a flag error.

// Built with neither front-end, every flag is refused and little is used.
#![cfg_attr(
    not(any(feature = "grpc", feature = "ws")),
    allow(unused_mut, unused_variables, dead_code)
)]

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use connector_core::RegistrationKey;
use connector_testkit::proto::{
    ExecuteRequest, ExecuteResponse, PayloadEncoding, RegistrationStatus, RejectReason,
};
use connector_testkit::{ApprovalPolicy, ServerEvent, TestServer, TestkitError};
#[cfg(feature = "grpc")]
use connector_testkit::{GrpcServerOptions, GrpcTestServer};
#[cfg(feature = "ws")]
use connector_testkit::{WsServerOptions, WsTestServer};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

const USAGE: &str = "\
usage: testkit-server [--grpc ADDR] [--ws ADDR] [--approve all|pending|deny]
                      [--workload N] [--capability ID] [--payload JSON]

  --grpc ADDR        serve gRPC on ADDR (HOST:PORT; port 0 picks a free one)
  --ws ADDR          serve WebSocket on ADDR (path /v1/connect)
  --approve POLICY   all (default): approve at once; pending: wait for
                     `approve KEY|all` / `reject KEY|all` on stdin; deny:
                     reject every registration (DENIED)
  --workload N       N executes a second per active registration (default 0)
  --capability ID    capability of the workload's executes (default echo)
  --payload JSON     payload of the workload's executes (default {\"seq\":N},
                     whose echo is checked)

The first stdout line lists the URLs listened on; then one status line a
second. SIGINT/SIGTERM stop it (exit 0); a bad flag exits 2.
";

/// A line on stdout. A closed stdout (a script that read the first line
/// and went away) is not a reason to stop serving, so write errors are
/// ignored rather than panicking as `println!` would.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// The most executes a second per registration `--workload` takes.
const MAX_WORKLOAD: u32 = 100_000;
/// How long one workload execute may go unanswered before it counts as
/// failed (the engine keeps it outstanding: a late answer still arrives).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The `timeout_ms` the workload's executes carry.
const EXECUTE_TIMEOUT_MS: u32 = 30_000;

/// What `--approve` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Approve {
    All,
    Pending,
    Deny,
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    grpc: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    approve: Approve,
    workload: u32,
    capability: String,
    /// `None`: `{"seq":N}`, answered by an echo with the same bytes.
    payload: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Run(Options),
    Help,
}

fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Parsed, String> {
    let mut opts = Options {
        grpc: None,
        ws: None,
        approve: Approve::All,
        workload: 0,
        capability: "echo".to_string(),
        payload: None,
    };
    let mut seen: Vec<String> = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        if arg == "--help" || arg == "-h" {
            return Ok(Parsed::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value)),
            _ => (arg.clone(), None),
        };
        if !matches!(
            flag.as_str(),
            "--grpc" | "--ws" | "--approve" | "--workload" | "--capability" | "--payload"
        ) {
            return Err(format!("unknown argument `{arg}`"));
        }
        if seen.contains(&flag) {
            return Err(format!("`{flag}` given twice"));
        }
        seen.push(flag.clone());
        let value = match inline {
            Some(v) => v.to_string(),
            None => args
                .next()
                .ok_or_else(|| format!("`{flag}` needs a value"))?
                .into_string()
                .map_err(|a| format!("the value of `{flag}`, {a:?}, is not UTF-8"))?,
        };
        match flag.as_str() {
            "--grpc" => {
                if !cfg!(feature = "grpc") {
                    return Err(not_built("--grpc", "grpc"));
                }
                opts.grpc = Some(address(&flag, &value)?);
            }
            "--ws" => {
                if !cfg!(feature = "ws") {
                    return Err(not_built("--ws", "ws"));
                }
                opts.ws = Some(address(&flag, &value)?);
            }
            "--approve" => {
                opts.approve = match value.as_str() {
                    "all" => Approve::All,
                    "pending" => Approve::Pending,
                    "deny" => Approve::Deny,
                    other => {
                        return Err(format!(
                            "`--approve {other}`: expected all, pending or deny"
                        ))
                    }
                }
            }
            "--workload" => {
                opts.workload = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n <= MAX_WORKLOAD)
                    .ok_or_else(|| {
                        format!(
                            "`--workload {value}`: expected executes a second per registration, \
                             0 to {MAX_WORKLOAD}"
                        )
                    })?;
            }
            "--capability" => opts.capability = value,
            "--payload" => opts.payload = Some(value),
            _ => unreachable!("flags are checked above"),
        }
    }
    if opts.grpc.is_none() && opts.ws.is_none() {
        return Err("nothing to serve: give --grpc ADDR, --ws ADDR or both".to_string());
    }
    Ok(Parsed::Run(opts))
}

fn not_built(flag: &str, feature: &str) -> String {
    format!("`{flag}`: this testkit-server was built without the `{feature}` feature")
}

/// `HOST:PORT` (a name is resolved once, the first address taken).
fn address(flag: &str, value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let bad = || format!("`{flag} {value}`: expected HOST:PORT, e.g. 127.0.0.1:50051");
    if !value.contains(':') {
        return Err(bad());
    }
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(bad)
}

fn main() -> ExitCode {
    let opts = match parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(opts)) => opts,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("testkit-server: error: {e} (see --help)");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testkit-server: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testkit-server: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The front-ends, all on one engine.
#[derive(Default)]
struct Servers {
    #[cfg(feature = "grpc")]
    grpc: Option<GrpcTestServer>,
    #[cfg(feature = "ws")]
    ws: Option<WsTestServer>,
}

impl Servers {
    #[cfg_attr(
        not(all(feature = "grpc", feature = "ws")),
        allow(
            unused_variables,
            reason = "the flag of a front-end not built is refused"
        )
    )]
    async fn start(engine: &TestServer, opts: &Options) -> Result<Self, String> {
        let mut servers = Servers::default();
        #[cfg(feature = "grpc")]
        if let Some(addr) = opts.grpc {
            let server =
                GrpcTestServer::start(engine.clone(), GrpcServerOptions::default().bind(addr))
                    .await
                    .map_err(|e| format!("cannot serve gRPC on {addr}: {e}"))?;
            servers.grpc = Some(server);
        }
        #[cfg(feature = "ws")]
        if let Some(addr) = opts.ws {
            let server = WsTestServer::start(engine.clone(), WsServerOptions::default().bind(addr))
                .await
                .map_err(|e| format!("cannot serve WebSocket on {addr}: {e}"))?;
            servers.ws = Some(server);
        }
        Ok(servers)
    }

    fn urls(&self) -> Vec<String> {
        let mut urls = Vec::new();
        #[cfg(feature = "grpc")]
        urls.extend(self.grpc.iter().map(GrpcTestServer::url));
        #[cfg(feature = "ws")]
        urls.extend(self.ws.iter().map(WsTestServer::url));
        urls
    }

    fn connections(&self) -> usize {
        let mut n = 0;
        #[cfg(feature = "grpc")]
        {
            n += self
                .grpc
                .as_ref()
                .map_or(0, GrpcTestServer::connection_count);
        }
        #[cfg(feature = "ws")]
        {
            n += self.ws.as_ref().map_or(0, WsTestServer::connection_count);
        }
        n
    }

    async fn stop(self) {
        #[cfg(feature = "grpc")]
        if let Some(s) = self.grpc {
            s.stop().await;
        }
        #[cfg(feature = "ws")]
        if let Some(s) = self.ws {
            s.stop().await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM with the signal's name. Installed before
/// the first line is printed, so a signal sent right after it is seen.
fn shutdown_signal() -> Result<impl std::future::Future<Output = &'static str>, String> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| format!("cannot listen for SIGTERM: {e}"))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| format!("cannot listen for SIGINT: {e}"))?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        })
    }
}

async fn run(opts: Options) -> Result<(), String> {
    let engine = TestServer::new();
    // A server for people, not a test: a client's protocol error is printed
    // as an event line (below) and the run goes on.
    engine.expect_protocol_errors();
    engine.set_policy(match opts.approve {
        Approve::All => ApprovalPolicy::Approve,
        Approve::Pending => ApprovalPolicy::Pending,
        Approve::Deny => ApprovalPolicy::Reject(RejectReason::Denied),
    });
    let shutdown = shutdown_signal()?;
    let servers = Servers::start(&engine, &opts).await?;
    say!("listening on {}", servers.urls().join(" "));
    if opts.approve == Approve::Pending {
        say!(
            "registrations wait for approval: type `approve KEY`, `approve all`, \
             `reject KEY` or `reject all`"
        );
    }
    let commands = stdin_commands();
    let mut workload = Workload::new(&opts);
    let started = Instant::now();
    let signal = workload.run(&engine, &servers, commands, shutdown).await;
    let totals = workload.fold_second();
    servers.stop().await;
    say!(
        "stopped: {signal} after {} s; sent {}, answered {}, failed {}",
        started.elapsed().as_secs(),
        totals.sent,
        totals.answered,
        totals.failed
    );
    Ok(())
}

/// Lines typed on stdin, read on a thread of their own (stdin has no
/// async reader without another tokio feature; EOF just ends the thread).
fn stdin_commands() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn command(engine: &TestServer, line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let pending = || -> Vec<String> {
        let mut keys: Vec<String> = engine
            .registrations()
            .into_iter()
            .filter(|r| r.status == RegistrationStatus::Pending)
            .map(|r| r.key)
            .collect();
        keys.dedup();
        keys
    };
    match words.as_slice() {
        [] => {}
        ["approve", target] | ["reject", target] => {
            let keys = if *target == "all" {
                pending()
            } else {
                vec![target.to_string()]
            };
            for key in keys {
                let key: RegistrationKey = match key.parse() {
                    Ok(k) => k,
                    Err(why) => {
                        say!("{key}: {why}");
                        continue;
                    }
                };
                let done = if words[0] == "approve" {
                    engine.approve(&key)
                } else {
                    engine.reject(
                        &key,
                        RejectReason::Denied,
                        "rejected at the testkit-server prompt",
                    )
                };
                if let Err(why) = done {
                    say!("{key}: {why}");
                }
            }
        }
        ["list"] => {
            for r in engine.registrations() {
                say!(
                    "  {} {} ({} connection {}, stream {})",
                    r.key,
                    short(r.status.as_str_name()),
                    r.transport,
                    r.connection_id,
                    r.stream_id
                );
            }
        }
        _ => say!("commands: approve KEY|all, reject KEY|all, list"),
    }
}

/// `DENIED` for `REJECT_REASON_DENIED`, `PENDING` for
/// `REGISTRATION_STATUS_PENDING`: the proto names without their enum's
/// prefix.
fn short(name: &str) -> &str {
    ["REJECT_REASON_", "REGISTRATION_STATUS_"]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name)
}

/// A line for the registration changes worth a user's eye.
fn describe(event: &ServerEvent) -> Option<String> {
    Some(match event {
        ServerEvent::Pending { key, stream_id, .. } => {
            format!("pending {key} (stream {stream_id})")
        }
        ServerEvent::Approved { key, stream_id, .. } => {
            format!("approved {key} (stream {stream_id})")
        }
        ServerEvent::Rejected { key, reason, .. } => {
            format!("rejected {key}: {}", short(reason.as_str_name()))
        }
        ServerEvent::StreamClosed {
            key: Some(key),
            cause,
            ..
        } => format!("closed {key}: {cause:?}"),
        ServerEvent::ProtocolError { message, .. } => format!("protocol error: {message}"),
        _ => return None,
    })
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    sent: u64,
    answered: u64,
    failed: u64,
    skipped: u64,
}

/// One workload execute's fate.
enum Fate {
    Ok,
    /// Answered with `success = false`, or an echo that came back changed.
    Failed,
    /// Not answered in [`ANSWER_TIMEOUT`].
    Unanswered,
}

struct Workload {
    per_key: u32,
    capability: String,
    payload: Option<Vec<u8>>,
    seq: u64,
    /// Executes of each key not answered yet, bounded so that a host that
    /// does not keep up is not buried.
    in_flight: HashMap<String, u32>,
    totals: Counts,
    second: Counts,
}

impl Workload {
    fn new(opts: &Options) -> Self {
        Self {
            per_key: opts.workload,
            capability: opts.capability.clone(),
            payload: opts.payload.clone().map(String::into_bytes),
            seq: 0,
            in_flight: HashMap::new(),
            totals: Counts::default(),
            second: Counts::default(),
        }
    }

    /// Most executes of one key in flight: two seconds' worth.
    fn cap(&self) -> u32 {
        self.per_key.max(8).saturating_mul(2)
    }

    /// Runs until `shutdown`; returns the signal's name.
    async fn run(
        &mut self,
        engine: &TestServer,
        servers: &Servers,
        mut commands: mpsc::UnboundedReceiver<String>,
        shutdown: impl std::future::Future<Output = &'static str>,
    ) -> &'static str {
        tokio::pin!(shutdown);
        let started = Instant::now();
        // One send round per registration every 1/N s: the load is even
        // rather than a burst per second.
        let period = Duration::from_secs(1) / self.per_key.max(1);
        let mut send = tokio::time::interval(period);
        send.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut report =
            tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
        report.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut answers: JoinSet<(String, Fate)> = JoinSet::new();
        let mut commands_open = true;
        loop {
            tokio::select! {
                signal = &mut shutdown => return signal,
                line = commands.recv(), if commands_open => match line {
                    Some(line) => command(engine, &line),
                    None => commands_open = false,
                },
                _ = send.tick(), if self.per_key > 0 => self.send_round(engine, &mut answers),
                Some(joined) = answers.join_next(), if !answers.is_empty() => {
                    if let Ok((key, fate)) = joined {
                        self.record(&key, fate);
                    }
                }
                _ = report.tick() => self.report(engine, servers, started),
            }
        }
    }

    fn send_round(&mut self, engine: &TestServer, answers: &mut JoinSet<(String, Fate)>) {
        let cap = self.cap();
        for k in engine.active_keys() {
            let key = k.to_string();
            let in_flight = self.in_flight.entry(key.clone()).or_default();
            if *in_flight >= cap {
                self.second.skipped += 1;
                continue;
            }
            self.seq += 1;
            let payload = match &self.payload {
                Some(p) => p.clone(),
                None => format!("{{\"seq\":{}}}", self.seq).into_bytes(),
            };
            let request = ExecuteRequest {
                request_id: format!("tk-{}", self.seq),
                payload: payload.clone().into(),
                encoding: PayloadEncoding::Json as i32,
                capability_id: self.capability.clone(),
                timeout_ms: EXECUTE_TIMEOUT_MS,
                ..Default::default()
            };
            // Fails only when the stream went away since `active_keys`.
            let Ok(pending) = engine.send_execute(&k, request) else {
                continue;
            };
            *in_flight += 1;
            self.second.sent += 1;
            let echo = self.payload.is_none().then_some(payload);
            answers.spawn(async move {
                let fate = fate(pending.wait(ANSWER_TIMEOUT).await, echo.as_deref());
                (key, fate)
            });
        }
    }

    fn record(&mut self, key: &str, fate: Fate) {
        if let Some(n) = self.in_flight.get_mut(key) {
            *n = n.saturating_sub(1);
        }
        match fate {
            Fate::Ok => self.second.answered += 1,
            Fate::Failed => {
                self.second.answered += 1;
                self.second.failed += 1;
            }
            Fate::Unanswered => self.second.failed += 1,
        }
    }

    /// Adds the second under way to the totals and starts a new one;
    /// returns the totals.
    fn fold_second(&mut self) -> Counts {
        let s = std::mem::take(&mut self.second);
        self.totals.sent += s.sent;
        self.totals.answered += s.answered;
        self.totals.failed += s.failed;
        self.totals.skipped += s.skipped;
        self.totals
    }

    fn report(&mut self, engine: &TestServer, servers: &Servers, started: Instant) {
        for event in engine.take_events() {
            if let Some(line) = describe(&event) {
                say!("{line}");
            }
        }
        // Nothing reads the answered ids again; a long run must not keep them.
        engine.forget_answered();
        let regs = engine.registrations();
        let active = engine.active_keys().len();
        let pending = regs
            .iter()
            .filter(|r| r.status == RegistrationStatus::Pending)
            .count();
        let s = self.second;
        self.fold_second();
        // Keys that went away keep no slot.
        self.in_flight.retain(|_, n| *n > 0);
        let mut line = format!(
            "t={}s active={active} pending={pending} connections={} answers/s={} failed/s={} \
             sent/s={} outstanding={}",
            started.elapsed().as_secs(),
            servers.connections(),
            s.answered,
            s.failed,
            s.sent,
            engine.stats().outstanding,
        );
        if s.skipped > 0 {
            line.push_str(&format!(
                " skipped/s={} (the host is not keeping up)",
                s.skipped
            ));
        }
        say!("{line}");
    }
}

fn fate(answer: Result<ExecuteResponse, TestkitError>, echo: Option<&[u8]>) -> Fate {
    match answer {
        Ok(r) if !r.success => Fate::Failed,
        Ok(r) => match echo {
            Some(sent) if r.payload.as_ref() != sent => Fate::Failed,
            _ => Fate::Ok,
        },
        Err(_) => Fate::Unanswered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<std::ffi::OsString> {
        v.iter().map(Into::into).collect()
    }

    #[test]
    fn flags_parse_and_bad_ones_are_named() {
        let parsed = parse(args(&[
            "--grpc",
            "127.0.0.1:0",
            "--approve=pending",
            "--workload",
            "5",
        ]));
        let Ok(Parsed::Run(o)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(o.grpc, Some("127.0.0.1:0".parse().expect("addr")));
        assert_eq!((o.approve, o.workload), (Approve::Pending, 5));
        assert_eq!(o.capability, "echo");
        assert_eq!(parse(args(&["-h"])), Ok(Parsed::Help));
        for (bad, needle) in [
            (
                &["--grpc", "127.0.0.1:0", "--nope"][..],
                "unknown argument `--nope`",
            ),
            (&["--grpc"], "`--grpc` needs a value"),
            (&["--grpc", "nowhere"], "expected HOST:PORT"),
            (
                &["--grpc", "127.0.0.1:0", "--approve", "maybe"],
                "all, pending or deny",
            ),
            (
                &["--grpc", "127.0.0.1:0", "--workload", "-1"],
                "0 to 100000",
            ),
            (
                &["--grpc", "127.0.0.1:0", "--grpc", "127.0.0.1:0"],
                "given twice",
            ),
            (&[], "nothing to serve"),
        ] {
            match parse(args(bad)) {
                Err(e) => assert!(e.contains(needle), "{bad:?}: {e}"),
                other => panic!("{bad:?} parsed: {other:?}"),
            }
        }
    }

    #[test]
    fn an_echo_that_comes_back_changed_is_a_failure() {
        let ok = |payload: &[u8]| {
            Ok(ExecuteResponse {
                success: true,
                payload: payload.to_vec().into(),
                ..Default::default()
            })
        };
        assert!(matches!(
            fate(ok(b"{\"seq\":1}"), Some(b"{\"seq\":1}")),
            Fate::Ok
        ));
        assert!(matches!(
            fate(ok(b"{\"seq\":2}"), Some(b"{\"seq\":1}")),
            Fate::Failed
        ));
        assert!(matches!(fate(ok(b"anything"), None), Fate::Ok));
        let failed = Ok(ExecuteResponse::default());
        assert!(matches!(fate(failed, None), Fate::Failed));
        assert!(matches!(
            fate(Err(TestkitError::StreamClosed), None),
            Fate::Unanswered
        ));
    }
}

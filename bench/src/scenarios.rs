//! The orchestrator: runs each scenario with the server and the client as
//! separate processes, turns their reports into tables and JSON.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::child::ChildProc;
use crate::profile::{short, Recording};
use crate::report::{median, progress, si, us, Row, Section, Spread};
use crate::wire::Result;

/// Every scenario, in the order a full run takes them.
pub(crate) const SCENARIOS: &[&str] = &[
    "throughput",
    "idle-grpc",
    "server-limit",
    "shared-vs-single",
    "idle-ws",
    "storm",
];

/// Scenarios a full run adds (about two minutes: 100 000 registrations
/// three times on each side); `--quick` and `--smoke` run them only when
/// named.
pub(crate) const FULL_RUN_EXTRAS: &[&str] = &["idle-grpc-100k"];

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The sizes the issue asks for.
    Full,
    /// Reduced sizes: the whole suite in under two minutes (release).
    Quick,
    /// Tiny sizes, seconds, debug build: proves the bench still works.
    Smoke,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Quick => "quick",
            Mode::Smoke => "smoke",
        }
    }
}

/// Sizes and durations of one mode.
#[derive(Debug, Clone)]
struct Plan {
    throughput_regs: Vec<usize>,
    throughput_payloads: Vec<usize>,
    warmup_secs: f64,
    measure_secs: f64,
    idle_grpc: Vec<usize>,
    shared_vs_single: Vec<usize>,
    idle_ws: Vec<usize>,
    storm: usize,
    /// The `idle-grpc-100k` size (full runs only, unless named).
    scale: usize,
    /// Every compared figure is measured in this many interleaved pairs
    /// (SDK, raw, SDK, raw, …); the ratio reported is the median of the
    /// per-pair ratios, with their range.
    pairs: usize,
}

impl Plan {
    fn of(mode: Mode) -> Self {
        match mode {
            Mode::Full => Self {
                throughput_regs: vec![1, 80, 1000],
                throughput_payloads: vec![64, 4096],
                warmup_secs: 1.0,
                measure_secs: 3.0,
                idle_grpc: vec![1000, 10_000],
                shared_vs_single: vec![1000, 10_000],
                idle_ws: vec![1000, 5000],
                storm: 10_000,
                scale: 100_000,
                pairs: 3,
            },
            Mode::Quick => Self {
                throughput_regs: vec![1, 80, 1000],
                throughput_payloads: vec![64, 4096],
                warmup_secs: 0.5,
                measure_secs: 1.5,
                idle_grpc: vec![1000, 5000],
                shared_vs_single: vec![1000],
                idle_ws: vec![1000, 2000],
                storm: 5000,
                scale: 100_000,
                pairs: 3,
            },
            Mode::Smoke => Self {
                throughput_regs: vec![1, 10],
                throughput_payloads: vec![64],
                warmup_secs: 0.2,
                measure_secs: 0.5,
                idle_grpc: vec![10],
                shared_vs_single: vec![10],
                idle_ws: vec![10],
                storm: 10,
                scale: 200,
                pairs: 1,
            },
        }
    }
}

/// Requests each bench-server stream keeps outstanding.
const WINDOW: usize = 32;
/// The SDK's default, and the raw baseline's channel size.
const STREAMS_PER_CHANNEL: usize = 80;
/// Time for a child to print `ready`.
const READY: Duration = Duration::from_secs(30);
/// Short answers (`count`, `stats`).
const ANSWER: Duration = Duration::from_secs(30);
/// Pause between all-Active and reading RSS, so allocations made while the
/// last approvals were processed are counted.
const SETTLE: Duration = Duration::from_millis(300);

/// Bound on the wait for N registrations to become active.
fn active_timeout(n: usize, per_reg: f64) -> f64 {
    30.0 + n as f64 * per_reg
}

/// Runs scenarios and collects their sections.
pub(crate) struct Orchestrator {
    mode: Mode,
    plan: Plan,
    /// Where children's logs and TLS files go.
    work_dir: PathBuf,
    /// `--profile`: `perf record` on each throughput client.
    profile: bool,
}

/// Which client to start.
#[derive(Debug, Clone, Copy)]
enum Client {
    Sdk,
    RawGrpc,
    RawWs,
}

impl Client {
    fn arg(self) -> &'static str {
        match self {
            Client::Sdk => "sdk",
            Client::RawGrpc => "raw-grpc",
            Client::RawWs => "raw-ws",
        }
    }
}

/// One side of an interleaved idle comparison.
struct IdleSpec<'a> {
    /// Names the run in progress lines and child logs.
    name: &'a str,
    server_args: &'a [&'a str],
    kind: Client,
    /// Streams per connection.
    k: usize,
}

impl<'a> IdleSpec<'a> {
    fn new(name: &'a str, server_args: &'a [&'a str], kind: Client, k: usize) -> Self {
        Self {
            name,
            server_args,
            kind,
            k,
        }
    }
}

/// What an idle-scale run measured.
#[derive(Debug, Clone)]
struct Idle {
    n: usize,
    secs: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    client_connections: u64,
    server_connections: u64,
    server: Value,
}

impl Idle {
    fn per_reg_kib(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.n.max(1) as f64
    }

    fn json(&self) -> Value {
        json!({
            "n": self.n,
            "secs_to_all_active": self.secs,
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "rss_per_registration_kib": self.per_reg_kib(),
            "client_connections": self.client_connections,
            "server_connections": self.server_connections,
            "server": self.server,
        })
    }
}

/// The `url` of a server's `ready` event.
fn url_of(ready: &Value) -> Result<String> {
    Ok(ready["url"].as_str().ok_or("server url")?.to_string())
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn cpu_per_response(v: &Value) -> f64 {
    f(v, "client_cpu_us_per_response")
}

fn mib(v: &Value) -> f64 {
    u(v, "client_rss_kib") as f64 / 1024.0
}

impl Orchestrator {
    pub(crate) fn new(mode: Mode, work_dir: PathBuf, profile: bool) -> Self {
        let mut plan = Plan::of(mode);
        if profile {
            // The sizes the issue's per-response goals are set for, once.
            plan.throughput_payloads = vec![64];
            plan.throughput_regs = vec![80, 1000];
            plan.pairs = 1;
        }
        Self {
            mode,
            plan,
            work_dir,
            profile,
        }
    }

    pub(crate) fn mode_name(&self) -> &'static str {
        self.mode.name()
    }

    /// Runs one scenario by name.
    pub(crate) fn run(&self, scenario: &str) -> Result<Vec<Section>> {
        match scenario {
            "throughput" => self.throughput(),
            "idle-grpc" => self.idle_grpc(),
            "idle-grpc-100k" => self.idle_grpc_scale(),
            "server-limit" => self.server_limit(),
            "shared-vs-single" => self.shared_vs_single(),
            "idle-ws" => self.idle_ws(),
            "storm" => self.storm(),
            other => Err(format!("unknown scenario {other:?}").into()),
        }
    }

    fn logs(&self) -> PathBuf {
        self.work_dir.join("logs")
    }

    fn server(&self, name: &str, args: &[&str]) -> Result<(ChildProc, Value)> {
        let mut all = vec!["child-server".to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let mut child = ChildProc::spawn(name, &all, &self.logs())?;
        let ready = child.expect("ready", READY)?;
        Ok((child, ready))
    }

    /// Starts a client child and waits for its `ready`; `extra` are more
    /// `child-client` arguments (`--reconnect-rate 0`).
    #[allow(clippy::too_many_arguments)] // a private helper with named call sites
    fn client(
        &self,
        name: &str,
        kind: Client,
        url: &str,
        n: usize,
        k: usize,
        ca: Option<&str>,
        timeout_secs: f64,
        extra: &[&str],
    ) -> Result<ChildProc> {
        let mut args = vec![
            "child-client".to_string(),
            "--kind".into(),
            kind.arg().into(),
            "--url".into(),
            url.into(),
            "--n".into(),
            n.to_string(),
            "--streams-per-channel".into(),
            k.to_string(),
            "--timeout-secs".into(),
            timeout_secs.to_string(),
        ];
        if let Some(ca) = ca {
            args.push("--ca".into());
            args.push(ca.into());
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut child = ChildProc::spawn(name, &args, &self.logs())?;
        child.expect("ready", READY)?;
        Ok(child)
    }

    /// Starts a client against `url`, waits for all N Active, reads its
    /// memory and the server's count.
    #[allow(clippy::too_many_arguments)]
    fn idle_run(
        &self,
        name: &str,
        server: &mut ChildProc,
        kind: Client,
        url: &str,
        n: usize,
        k: usize,
        ca: Option<&str>,
        per_reg_timeout: f64,
    ) -> Result<Idle> {
        let timeout = active_timeout(n, per_reg_timeout);
        let mut client = self.client(name, kind, url, n, k, ca, timeout, &[])?;
        let rss_before_kib = client.rss_kib()?;
        client.send("go")?;
        let active = client.expect("active", Duration::from_secs_f64(timeout + 10.0))?;
        std::thread::sleep(SETTLE);
        let rss_after_kib = client.rss_kib()?;
        let server_count = server.ask("count", "count", ANSWER)?;
        Ok(Idle {
            n,
            secs: f(&active, "secs"),
            rss_before_kib,
            rss_after_kib,
            client_connections: u(&active, "connections"),
            server_connections: u(&server_count, "connections"),
            server: server_count,
        })
    }

    /// One [`Orchestrator::idle_run`] against a fresh server.
    fn idle_once(&self, spec: &IdleSpec<'_>, n: usize, per_reg_timeout: f64) -> Result<Idle> {
        let (mut server, ready) =
            self.server(&format!("server-{}", spec.name), spec.server_args)?;
        let url = url_of(&ready)?;
        let ca = ready["ca"].as_str().map(str::to_string);
        self.idle_run(
            &format!("client-{}", spec.name),
            &mut server,
            spec.kind,
            &url,
            n,
            spec.k,
            ca.as_deref(),
            per_reg_timeout,
        )
    }

    /// `pairs` interleaved idle runs of `a` and `b` (a, b, a, b, …), each
    /// against a fresh server, printed as they are measured.
    fn idle_pairs(
        &self,
        label: &str,
        a: &IdleSpec<'_>,
        b: &IdleSpec<'_>,
        n: usize,
        per_reg_timeout: f64,
    ) -> Result<Vec<(Idle, Idle)>> {
        let pairs = self.plan.pairs.max(1);
        let mut out = Vec::new();
        for pair in 1..=pairs {
            let x = self.idle_once(a, n, per_reg_timeout)?;
            let y = self.idle_once(b, n, per_reg_timeout)?;
            progress(format!(
                "{label} N={n} pair {pair}/{pairs}: {} {:.3} s {:.2} KiB/reg | {} {:.3} s {:.2} KiB/reg \
                 | time ratio {:.2}, memory ratio {:.2}",
                a.name,
                x.secs,
                x.per_reg_kib(),
                b.name,
                y.secs,
                y.per_reg_kib(),
                x.secs / y.secs,
                x.per_reg_kib() / y.per_reg_kib(),
            ));
            out.push((x, y));
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- throughput

    fn throughput(&self) -> Result<Vec<Section>> {
        let mut sections = Vec::new();
        let pairs = self.plan.pairs.max(1);
        for &payload in &self.plan.throughput_payloads {
            let mut section = Section::new(format!(
                "throughput: {payload} B JSON echo, window {WINDOW} per stream, \
                 {STREAMS_PER_CHANNEL} streams/connection, {pairs} interleaved SDK/raw pairs"
            ));
            let mut data = Vec::new();
            for &n in &self.plan.throughput_regs {
                // SDK, raw, SDK, raw, …: each ratio compares two runs taken
                // back to back, so a build starting elsewhere on the machine
                // moves both sides of most pairs.
                let (mut sdks, mut raws) = (Vec::new(), Vec::new());
                for pair in 1..=pairs {
                    let sdk = self.throughput_run(Client::Sdk, n, payload)?;
                    let raw = self.throughput_run(Client::RawGrpc, n, payload)?;
                    progress(format!(
                        "throughput {payload} B N={n} pair {pair}/{pairs}: SDK {} resp/s {:.2} µs CPU/resp \
                         {:.0} MiB | raw {} resp/s {:.2} µs {:.0} MiB | resp/s ratio {:.2}, CPU ratio {:.2}",
                        si(f(&sdk, "rps")),
                        cpu_per_response(&sdk),
                        mib(&sdk),
                        si(f(&raw, "rps")),
                        cpu_per_response(&raw),
                        mib(&raw),
                        f(&sdk, "rps") / f(&raw, "rps"),
                        cpu_per_response(&sdk) / cpu_per_response(&raw),
                    ));
                    sdks.push(sdk);
                    raws.push(raw);
                }
                let col = |v: &[Value], g: &dyn Fn(&Value) -> f64| -> Vec<f64> {
                    v.iter().map(g).collect()
                };
                let rps = |v: &Value| f(v, "rps");
                let (sdk_rps, raw_rps) = (col(&sdks, &rps), col(&raws, &rps));
                // The issue's goals are set for 64 B at N = 80 and 1000;
                // elsewhere the earlier ≥ 0.8 stays as the bar.
                let issue_size = payload == 64 && (n == 80 || n == 1000);
                let (rps_min, cpu_max) = if issue_size {
                    (0.85, Some(1.3))
                } else {
                    (0.8, None)
                };
                let (rps_row, rps_ratio) =
                    spread_row(format!("responses/s, N={n}"), &sdk_rps, &raw_rps, si, false);
                section.rows.push(
                    rps_row.target(format!("SDK/raw ≥ {rps_min}"), rps_ratio.median >= rps_min),
                );
                for (label, key) in [("p50", "p50_us"), ("p99", "p99_us")] {
                    let g = |v: &Value| f(v, key);
                    let (a, b) = (col(&sdks, &g), col(&raws, &g));
                    let (row, _) = spread_row(format!("{label} latency, N={n}"), &a, &b, us, false);
                    section.rows.push(row);
                }
                let (sdk_cpu, raw_cpu) =
                    (col(&sdks, &cpu_per_response), col(&raws, &cpu_per_response));
                let (mut cpu_row, cpu_ratio) = spread_row(
                    format!("client CPU per response, N={n} (µs)"),
                    &sdk_cpu,
                    &raw_cpu,
                    |v| format!("{v:.2}"),
                    false,
                );
                if let Some(max) = cpu_max {
                    cpu_row = cpu_row.target(format!("SDK/raw ≤ {max}"), cpu_ratio.median <= max);
                }
                section.rows.push(cpu_row);
                let cores = |v: &[Value]| {
                    format!(
                        "{:.2} / {:.2}",
                        median(&col(v, &|x| f(x, "client_cores"))),
                        median(&col(v, &|x| f(x, "server_cores")))
                    )
                };
                section.rows.push(Row::new(
                    format!("cores used client / server, N={n}"),
                    cores(&sdks),
                    cores(&raws),
                ));
                let (sdk_mib, raw_mib) = (col(&sdks, &mib), col(&raws, &mib));
                let (mut mem_row, mib_ratio) = spread_row(
                    format!("client RSS after, N={n} (MiB)"),
                    &sdk_mib,
                    &raw_mib,
                    |v| format!("{v:.0}"),
                    false,
                );
                if payload == 4096 && n == 1000 {
                    mem_row = mem_row.target("SDK/raw ≤ 1.5", mib_ratio.median <= 1.5);
                }
                section.rows.push(mem_row);
                for (who, runs) in [("SDK", &sdks), ("raw", &raws)] {
                    for v in runs.iter() {
                        if u(v, "failures") > 0 || u(v, "unexpected") > 0 {
                            section.notes.push(format!(
                                "N={n} {who}: {} failed and {} unexpected responses",
                                u(v, "failures"),
                                u(v, "unexpected")
                            ));
                        }
                    }
                }
                data.push(json!({
                    "n": n,
                    "payload": payload,
                    "sdk": sdks,
                    "raw": raws,
                    "rps_ratio": rps_ratio,
                    "cpu_ratio": cpu_ratio,
                    "rss_ratio": mib_ratio,
                }));
            }
            section.notes.push(format!(
                "server and client are separate processes on the same {} cores; \
                 latency is send→response at the server, {} s measured after {} s warm-up; \
                 figures are medians of the pairs, ratio = median of the per-pair ratios (range)",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0),
                self.plan.measure_secs,
                self.plan.warmup_secs
            ));
            section.data = Value::Array(data);
            sections.push(section);
        }
        Ok(sections)
    }

    fn throughput_run(&self, kind: Client, n: usize, payload: usize) -> Result<Value> {
        let (mut server, ready) = self.server(
            "server-throughput",
            &[
                "--kind",
                "bench-grpc",
                "--window",
                &WINDOW.to_string(),
                "--payload",
                &payload.to_string(),
            ],
        )?;
        let url = url_of(&ready)?;
        let timeout = active_timeout(n, 0.02);
        let mut client = self.client(
            &format!("client-throughput-{}", kind.arg()),
            kind,
            &url,
            n,
            STREAMS_PER_CHANNEL,
            None,
            timeout,
            &[],
        )?;
        client.send("go")?;
        client.expect("active", Duration::from_secs_f64(timeout + 10.0))?;
        std::thread::sleep(Duration::from_secs_f64(self.plan.warmup_secs));
        let recording = if self.profile {
            let data = self
                .work_dir
                .join("profile")
                .join(format!("{}-n{n}-{payload}b.data", kind.arg()));
            Some(Recording::start(
                client.pid(),
                self.plan.measure_secs,
                &data,
            )?)
        } else {
            None
        };
        let (client_cpu0, server_cpu0) = (client.cpu_secs(), server.cpu_secs());
        let mut m = server.ask(
            &format!("measure {}", self.plan.measure_secs),
            "throughput",
            Duration::from_secs_f64(self.plan.measure_secs + 30.0),
        )?;
        // CPU over the measurement: what one response costs the client is
        // a figure that holds even when the two processes compete for cores.
        let client_cpu = client.cpu_secs() - client_cpu0;
        let server_cpu = server.cpu_secs() - server_cpu0;
        let secs = f(&m, "secs");
        m["client_cores"] = json!(client_cpu / secs);
        m["server_cores"] = json!(server_cpu / secs);
        m["client_cpu_us_per_response"] =
            json!(client_cpu * 1e6 / u(&m, "responses").max(1) as f64);
        let rss_kib = client.rss_kib()?;
        let stats = client.ask("stats", "stats", ANSWER)?;
        m["client_rss_kib"] = json!(rss_kib);
        if u(&m, "responses") == 0 {
            return Err(format!(
                "{} client with N={n}: no execute responses at all",
                kind.arg()
            )
            .into());
        }
        m["client"] = stats;
        if let Some(recording) = recording {
            let frames = recording.finish()?;
            let per_response = cpu_per_response(&m);
            println!(
                "\n  profile: {} client, {payload} B, N={n}: top frames by self time \
                 ({per_response:.2} µs of client CPU per response)",
                kind.arg()
            );
            for fr in frames.iter().take(25) {
                println!(
                    "    {:5.1} %  {:5.3} µs/resp  {}",
                    fr.percent,
                    fr.percent / 100.0 * per_response,
                    short(&fr.symbol)
                );
            }
            m["profile"] = json!(frames);
        }
        Ok(m)
    }

    // ----------------------------------------------------------------- idle-grpc

    fn idle_grpc(&self) -> Result<Vec<Section>> {
        let mut sections = Vec::new();
        for &n in &self.plan.idle_grpc {
            sections.push(self.idle_grpc_at(n, "idle-grpc")?);
        }
        Ok(sections)
    }

    /// The scale run (full runs, or when named): 100 000 idle registrations (1 250 connections)
    /// in one client process, beside raw tonic at the same N.
    fn idle_grpc_scale(&self) -> Result<Vec<Section>> {
        Ok(vec![self.idle_grpc_at(self.plan.scale, "idle-grpc-100k")?])
    }

    fn idle_grpc_at(&self, n: usize, label: &str) -> Result<Section> {
        let args = ["--kind", "bench-grpc"];
        let sdk = IdleSpec::new("idle-grpc-sdk", &args, Client::Sdk, STREAMS_PER_CHANNEL);
        let raw = IdleSpec::new("idle-grpc-raw", &args, Client::RawGrpc, STREAMS_PER_CHANNEL);
        let pairs = self.idle_pairs(label, &sdk, &raw, n, 0.02)?;
        let mut s = Section::new(format!(
            "{label}: N = {n}, {STREAMS_PER_CHANNEL} streams/connection, plaintext, {} interleaved pairs",
            pairs.len()
        ));
        idle_rows(
            &mut s,
            &pairs,
            Some(1.3),
            (1.0, "SDK/raw ≤ 1.0 (moonshot 0.6)"),
        );
        let want = n.div_ceil(STREAMS_PER_CHANNEL) as u64;
        let (sdk_conns, raw_conns) = (
            most_connections(&pairs, first),
            most_connections(&pairs, second),
        );
        s.rows.push(
            Row::new(
                "TCP connections (server side, most in a run)",
                sdk_conns.to_string(),
                raw_conns.to_string(),
            )
            .target(format!("= {want}"), sdk_conns == want),
        );
        let before_after = |side: Side| {
            let b = column(&pairs, side, |i| i.rss_before_kib as f64);
            let a = column(&pairs, side, |i| i.rss_after_kib as f64);
            format!("{:.1} → {:.1}", median(&b) / 1024.0, median(&a) / 1024.0)
        };
        s.rows.push(Row::new(
            "client RSS before → after (MiB)",
            before_after(first),
            before_after(second),
        ));
        let span = |side: Side| {
            let v = column(&pairs, side, |i| f(&i.server, "register_span_secs"));
            format!("{:.3}", median(&v))
        };
        s.rows.push(Row::new(
            "server: first register → last approval (s)",
            span(first),
            span(second),
        ));
        s.data = pairs_json(n, &pairs, ["sdk", "raw"]);
        Ok(s)
    }

    // -------------------------------------------------------------- server-limit

    /// A server whose `SETTINGS_MAX_CONCURRENT_STREAMS` (5) is below the
    /// cap (80): how long until 12 registrations are all Active. A raw
    /// tonic client cannot do it at all (h2 queues the streams past the
    /// limit forever), so the SDK is measured alone.
    fn server_limit(&self) -> Result<Vec<Section>> {
        const LIMIT: usize = 5;
        const N: usize = 12;
        let args = ["--kind", "bench-grpc", "--max-streams", "5"];
        let spec = IdleSpec::new("server-limit-sdk", &args, Client::Sdk, STREAMS_PER_CHANNEL);
        let mut runs = Vec::new();
        for run in 1..=self.plan.pairs.max(1) {
            let r = self.idle_once(&spec, N, 1.0)?;
            progress(format!(
                "server-limit N={N} limit {LIMIT} run {run}: all Active in {:.3} s, {} connections",
                r.secs, r.server_connections
            ));
            runs.push(r);
        }
        let secs: Vec<f64> = runs.iter().map(|r| r.secs).collect();
        let worst = secs.iter().copied().fold(0.0, f64::max);
        let conns = runs.iter().map(|r| r.server_connections).max().unwrap_or(0);
        let mut s = Section::new(format!(
            "server-limit: server MAX_CONCURRENT_STREAMS = {LIMIT}, {N} registrations, cap {STREAMS_PER_CHANNEL}"
        ));
        s.columns = ["SDK".into(), "-".into()];
        s.rows.push(
            Row::new(
                "time to all Active (s), median / worst",
                format!("{:.3} / {worst:.3}", median(&secs)),
                "",
            )
            .target("≤ 2 s", worst <= 2.0),
        );
        let want = N.div_ceil(LIMIT) as u64;
        s.rows.push(
            Row::new("TCP connections (server side)", conns.to_string(), "")
                .target(format!("= {want}"), conns == want),
        );
        s.data = json!({ "n": N, "limit": LIMIT, "runs": runs.iter().map(Idle::json).collect::<Vec<_>>() });
        Ok(vec![s])
    }

    // ---------------------------------------------------------- shared-vs-single

    fn shared_vs_single(&self) -> Result<Vec<Section>> {
        let mut sections = Vec::new();
        let tls_dir = self.work_dir.join("tls");
        let tls_dir = tls_dir.to_string_lossy().to_string();
        for &n in &self.plan.shared_vs_single {
            let args = ["--kind", "testkit-grpc", "--tls", "--ca-dir", &tls_dir];
            let shared_name = format!("svs-{STREAMS_PER_CHANNEL}");
            let shared = IdleSpec::new(&shared_name, &args, Client::Sdk, STREAMS_PER_CHANNEL);
            let single = IdleSpec::new("svs-1", &args, Client::Sdk, 1);
            let pairs = self.idle_pairs("shared-vs-single", &shared, &single, n, 0.05)?;
            let mut s = Section::new(format!(
                "shared-vs-single: N = {n}, TLS (testkit CA), SDK with {STREAMS_PER_CHANNEL} vs 1 streams/connection, {} pairs",
                pairs.len()
            ));
            s.columns = [
                format!("shared ({STREAMS_PER_CHANNEL})"),
                "single (1)".into(),
            ];
            // The ratio is single / shared: how much sharing saves.
            let (time, time_ratio) = pair_row("time to all Active (s)", &pairs, secs, 3, true);
            s.rows
                .push(time.target("single/shared ≥ 5", time_ratio.median >= 5.0));
            let (mem, mem_ratio) =
                pair_row("client RSS per registration (KiB)", &pairs, kib, 1, true);
            s.rows
                .push(mem.target("single/shared ≥ 3", mem_ratio.median >= 3.0));
            connections_row(&mut s, "TCP connections (server side)", &pairs);
            s.notes.push("ratio column: single / shared".into());
            s.data = pairs_json(n, &pairs, ["shared", "single"]);
            sections.push(s);
        }
        Ok(sections)
    }

    // ------------------------------------------------------------------- idle-ws

    fn idle_ws(&self) -> Result<Vec<Section>> {
        let mut sections = Vec::new();
        for &n in &self.plan.idle_ws {
            let args = ["--kind", "bench-ws"];
            let sdk = IdleSpec::new("idle-ws-sdk", &args, Client::Sdk, 1);
            let raw = IdleSpec::new("idle-ws-raw", &args, Client::RawWs, 1);
            let pairs = self.idle_pairs("idle-ws", &sdk, &raw, n, 0.02)?;
            let mut s = Section::new(format!(
                "idle-ws: N = {n} sockets, 4 KiB read buffer, 64 handshakes at once (both), {} pairs",
                pairs.len()
            ));
            idle_rows(&mut s, &pairs, None, (1.3, "SDK/raw ≤ 1.3"));
            connections_row(&mut s, "sockets (server side)", &pairs);
            s.data = pairs_json(n, &pairs, ["sdk", "raw"]);
            sections.push(s);
        }
        Ok(sections)
    }

    // --------------------------------------------------------------------- storm

    fn storm(&self) -> Result<Vec<Section>> {
        let mut sections = vec![self.storm_run(true)?];
        if self.mode != Mode::Smoke {
            // Not the default: the same storm with the runner's reconnect
            // pacing turned off, to show what it does.
            sections.push(self.storm_run(false)?);
        }
        Ok(sections)
    }

    fn storm_run(&self, paced: bool) -> Result<Section> {
        let n = self.plan.storm;
        let (mut server, ready) = self.server("server-storm", &["--kind", "testkit-grpc"])?;
        let url = url_of(&ready)?;
        let timeout = active_timeout(n, 0.02);
        let mut client = self.client(
            "client-storm",
            Client::Sdk,
            &url,
            n,
            STREAMS_PER_CHANNEL,
            None,
            timeout,
            if paced {
                &[]
            } else {
                &["--reconnect-rate", "0"]
            },
        )?;
        client.send("go")?;
        let active = client.expect("active", Duration::from_secs_f64(timeout + 10.0))?;
        client.ask("watch-reconnect", "watching", ANSWER)?;
        let restarted = server.ask("restart", "restarted", Duration::from_secs(60))?;
        let back = client.expect("reconnected", Duration::from_secs_f64(timeout + 10.0))?;
        let report = server.ask("storm-report", "storm", ANSWER)?;

        let t0 = u(&restarted, "t0_unix_us");
        let back_secs = u(&back, "unix_us").saturating_sub(t0) as f64 / 1e6;
        let n_back = u(&back, "back");
        let dups = u(&report, "duplicate_active");
        let sliding = f(&report, "max_share_sliding_1s");
        let aligned = f(&report, "max_share_aligned_1s");
        let mut s = Section::new(if paced {
            format!(
                "storm: {n} gRPC registrations, server restarted (testkit server), SDK defaults \
                 (backoff 500 ms + up to 500 ms jitter; reconnects paced at 2 000/s after a \
                 burst of 200)"
            )
        } else {
            "storm, informational: the same with reconnect pacing off \
             (MultiTransportOptions::reconnect_rate = 0)"
                .to_string()
        });
        s.columns = ["SDK".into(), "-".into()];
        s.rows.push(
            Row::new(
                "registrations back (reconnected and Active)",
                format!("{n_back}/{n}"),
                "",
            )
            .target("all", n_back == n as u64),
        );
        s.rows.push(Row::new(
            "time until all Active again (s)",
            format!("{back_secs:.2}"),
            "",
        ));
        s.rows.push(Row::new(
            "server restart took (ms)",
            format!("{:.1}", f(&restarted, "restart_ms")),
            "",
        ));
        s.rows.push(Row::new(
            "registers reaching the server after restart",
            u(&report, "registers_after_restart").to_string(),
            "",
        ));
        let share = Row::new(
            "largest share of reconnects in any 1 s window",
            format!("{:.1} %", sliding * 100.0),
            "",
        );
        // The run with pacing off is the contrast the pacing is measured
        // against, not a figure with a target: it is not counted as missed.
        s.rows.push(if paced {
            share.target("≤ 25 %", sliding <= 0.25)
        } else {
            share
        });
        s.rows.push(Row::new(
            "largest share in a whole second since restart",
            format!("{:.1} %", aligned * 100.0),
            "",
        ));
        s.rows.push(
            Row::new(
                "duplicate active streams seen by the server",
                dups.to_string(),
                "",
            )
            .target("0", dups == 0),
        );
        s.rows.push(Row::new(
            "client: disconnects / failed connects",
            format!(
                "{} / {}",
                u(&back, "disconnects"),
                u(&back, "connect_failures")
            ),
            "",
        ));
        let buckets: Vec<u64> = report["per_bucket"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        s.notes.push(format!(
            "reconnects per 100 ms since the restart: {}",
            histogram_line(&buckets)
        ));
        s.data = json!({
            "n": n,
            "reconnect_paced": paced,
            "initial_active": active,
            "restarted": restarted,
            "back": back,
            "server": report,
        });
        if n_back < n as u64 {
            s.print();
            return Err(format!("storm: only {n_back} of {n} registrations came back").into());
        }
        Ok(s)
    }
}

/// `[0 0 12 870 ...]` from the first to the last non-empty bucket, with the
/// offset of the first.
fn histogram_line(buckets: &[u64]) -> String {
    let Some(first) = buckets.iter().position(|&c| c > 0) else {
        return "none".into();
    };
    let last = buckets.iter().rposition(|&c| c > 0).unwrap_or(first);
    let body: Vec<String> = buckets[first..=last].iter().map(u64::to_string).collect();
    format!("from {} ms: [{}]", first * 100, body.join(" "))
}

/// The two rows every idle-scale table starts with, from interleaved
/// (SDK, raw) pairs: time to all Active (against `time_target` × raw, when
/// there is one) and client RSS per registration (against `rss_target`:
/// the largest SDK/raw ratio met, and how the target reads).
fn idle_rows(
    s: &mut Section,
    pairs: &[(Idle, Idle)],
    time_target: Option<f64>,
    rss_target: (f64, &str),
) {
    let (mut time, time_ratio) = pair_row("time to all Active (s)", pairs, secs, 3, false);
    if let Some(max) = time_target {
        time = time.target(format!("SDK/raw ≤ {max}"), time_ratio.median <= max);
    }
    s.rows.push(time);
    let (mem, mem_ratio) = pair_row("client RSS per registration (KiB)", pairs, kib, 2, false);
    s.rows
        .push(mem.target(rss_target.1, mem_ratio.median <= rss_target.0));
}

/// Picks one side of an interleaved pair.
type Side = fn(&(Idle, Idle)) -> &Idle;

fn first(p: &(Idle, Idle)) -> &Idle {
    &p.0
}

fn second(p: &(Idle, Idle)) -> &Idle {
    &p.1
}

fn secs(i: &Idle) -> f64 {
    i.secs
}

fn kib(i: &Idle) -> f64 {
    i.per_reg_kib()
}

/// Figure `g` of one side of every pair.
fn column(pairs: &[(Idle, Idle)], side: Side, g: impl Fn(&Idle) -> f64) -> Vec<f64> {
    pairs.iter().map(|p| g(side(p))).collect()
}

/// [`spread_row`] of figure `g` of both sides of `pairs`, the medians
/// with `decimals`.
fn pair_row(
    figure: &str,
    pairs: &[(Idle, Idle)],
    g: fn(&Idle) -> f64,
    decimals: usize,
    inverse: bool,
) -> (Row, Spread) {
    let (a, b) = (column(pairs, first, g), column(pairs, second, g));
    spread_row(figure, &a, &b, |v| format!("{v:.decimals$}"), inverse)
}

/// A row of one figure over interleaved pairs, `a` and `b` its two sides:
/// each side's median as `cell` writes it, and the spread of the per-pair
/// ratios a / b (b / a when `inverse`). The caller adds the target.
fn spread_row(
    figure: impl Into<String>,
    a: &[f64],
    b: &[f64],
    cell: impl Fn(f64) -> String,
    inverse: bool,
) -> (Row, Spread) {
    let ratio = if inverse {
        Spread::of_pairs(b, a)
    } else {
        Spread::of_pairs(a, b)
    };
    let row = Row::new(figure, cell(median(a)), cell(median(b))).spread(&ratio);
    (row, ratio)
}

/// The most connections the server saw in one run of `side`.
fn most_connections(pairs: &[(Idle, Idle)], side: Side) -> u64 {
    pairs
        .iter()
        .map(|p| side(p).server_connections)
        .max()
        .unwrap_or(0)
}

/// An informational row: the most server-side connections of each side.
fn connections_row(s: &mut Section, figure: &str, pairs: &[(Idle, Idle)]) {
    s.rows.push(Row::new(
        figure,
        most_connections(pairs, first).to_string(),
        most_connections(pairs, second).to_string(),
    ));
}

/// The `data` of an idle section: N and every pair, its sides named.
fn pairs_json(n: usize, pairs: &[(Idle, Idle)], names: [&str; 2]) -> Value {
    let pairs: Vec<Value> = pairs
        .iter()
        .map(|(a, b)| {
            let mut pair = serde_json::Map::new();
            pair.insert(names[0].into(), a.json());
            pair.insert(names[1].into(), b.json());
            Value::Object(pair)
        })
        .collect();
    json!({ "n": n, "pairs": pairs })
}

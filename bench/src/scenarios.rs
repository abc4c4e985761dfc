//! The orchestrator: runs each scenario with the server and the client as
//! separate processes, turns their reports into tables and JSON.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::child::ChildProc;
use crate::report::{si, us, Row, Section};
use crate::wire::Result;

/// Every scenario, in the order a full run takes them.
pub(crate) const SCENARIOS: &[&str] = &[
    "throughput",
    "idle-grpc",
    "shared-vs-single",
    "idle-ws",
    "storm",
];

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
    /// Idle-scale runs are short and noisy: each is repeated this many
    /// times and the median reported.
    repeats: usize,
}

impl Plan {
    fn of(mode: Mode) -> Self {
        match mode {
            Mode::Full => Self {
                throughput_regs: vec![1, 80, 1000],
                throughput_payloads: vec![64, 4096],
                warmup_secs: 1.0,
                measure_secs: 5.0,
                idle_grpc: vec![1000, 10_000],
                shared_vs_single: vec![1000, 10_000],
                idle_ws: vec![1000, 5000],
                storm: 10_000,
                repeats: 3,
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
                repeats: 3,
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
                repeats: 1,
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
    /// Every repetition, when this is their median.
    runs: Vec<Value>,
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
            "runs": self.runs,
        })
    }

    /// The median of repeated runs: median time, median memory growth,
    /// the connection counts of the last run; every run kept for the JSON.
    fn median(mut runs: Vec<Idle>) -> Option<Idle> {
        let all: Vec<Value> = runs.iter().map(Idle::json).collect();
        if runs.is_empty() {
            return None;
        }
        let mid = runs.len() / 2;
        runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
        let secs = runs[mid].secs;
        let server = runs[mid].server.clone();
        runs.sort_by(|a, b| a.per_reg_kib().total_cmp(&b.per_reg_kib()));
        let mut m = runs.swap_remove(mid);
        m.secs = secs;
        m.server = server;
        if all.len() > 1 {
            m.runs = all;
        }
        Some(m)
    }
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

impl Orchestrator {
    pub(crate) fn new(mode: Mode, work_dir: PathBuf) -> Self {
        Self {
            mode,
            plan: Plan::of(mode),
            work_dir,
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
    ) -> Result<ChildProc> {
        self.client_with(name, kind, url, n, k, ca, timeout_secs, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn client_with(
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
        let mut client = self.client(name, kind, url, n, k, ca, timeout)?;
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
            runs: Vec::new(),
        })
    }

    /// [`Orchestrator::idle_run`] `repeats` times, each against a fresh
    /// server, and the median.
    #[allow(clippy::too_many_arguments)]
    fn idle_median(
        &self,
        name: &str,
        server_args: &[&str],
        kind: Client,
        n: usize,
        k: usize,
        per_reg_timeout: f64,
    ) -> Result<Idle> {
        let mut runs = Vec::new();
        for _ in 0..self.plan.repeats.max(1) {
            let (mut server, ready) = self.server(&format!("server-{name}"), server_args)?;
            let url = ready["url"].as_str().ok_or("server url")?.to_string();
            let ca = ready["ca"].as_str().map(str::to_string);
            runs.push(self.idle_run(
                &format!("client-{name}"),
                &mut server,
                kind,
                &url,
                n,
                k,
                ca.as_deref(),
                per_reg_timeout,
            )?);
        }
        Idle::median(runs).ok_or_else(|| "no run".into())
    }

    // ---------------------------------------------------------------- throughput

    fn throughput(&self) -> Result<Vec<Section>> {
        let mut sections = Vec::new();
        for &payload in &self.plan.throughput_payloads {
            let mut section = Section::new(format!(
                "throughput: {payload} B JSON echo, window {WINDOW} per stream, \
                 {STREAMS_PER_CHANNEL} streams/connection"
            ));
            let mut data = Vec::new();
            for &n in &self.plan.throughput_regs {
                let sdk = self.throughput_run(Client::Sdk, n, payload)?;
                let raw = self.throughput_run(Client::RawGrpc, n, payload)?;
                let ratio = f(&sdk, "rps") / f(&raw, "rps");
                section.rows.push(
                    Row::new(
                        format!("responses/s, N={n}"),
                        si(f(&sdk, "rps")),
                        si(f(&raw, "rps")),
                    )
                    .ratio(ratio)
                    .target("SDK/raw ≥ 0.8", ratio >= 0.8),
                );
                for (label, key) in [("p50", "p50_us"), ("p99", "p99_us")] {
                    section.rows.push(
                        Row::new(
                            format!("{label} latency, N={n}"),
                            us(f(&sdk, key)),
                            us(f(&raw, key)),
                        )
                        .ratio(f(&sdk, key) / f(&raw, key)),
                    );
                }
                let cpu = |v: &Value| f(v, "client_cpu_us_per_response");
                section.rows.push(
                    Row::new(
                        format!("client CPU per response, N={n} (µs)"),
                        format!("{:.2}", cpu(&sdk)),
                        format!("{:.2}", cpu(&raw)),
                    )
                    .ratio(cpu(&sdk) / cpu(&raw)),
                );
                let cores = |v: &Value| {
                    format!("{:.2} / {:.2}", f(v, "client_cores"), f(v, "server_cores"))
                };
                section.rows.push(Row::new(
                    format!("cores used client / server, N={n}"),
                    cores(&sdk),
                    cores(&raw),
                ));
                let mib = |v: &Value| u(v, "client_rss_kib") as f64 / 1024.0;
                section.rows.push(
                    Row::new(
                        format!("client RSS after, N={n} (MiB)"),
                        format!("{:.0}", mib(&sdk)),
                        format!("{:.0}", mib(&raw)),
                    )
                    .ratio(mib(&sdk) / mib(&raw)),
                );
                for (who, v) in [("SDK", &sdk), ("raw", &raw)] {
                    if u(v, "failures") > 0 || u(v, "unexpected") > 0 {
                        section.notes.push(format!(
                            "N={n} {who}: {} failed and {} unexpected responses",
                            u(v, "failures"),
                            u(v, "unexpected")
                        ));
                    }
                }
                data.push(
                    json!({ "n": n, "payload": payload, "sdk": sdk, "raw": raw, "ratio": ratio }),
                );
            }
            section.notes.push(format!(
                "server and client are separate processes on the same {} cores; \
                 latency is send→response at the server, {} s measured after {} s warm-up",
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
        let url = ready["url"].as_str().ok_or("server url")?.to_string();
        let timeout = active_timeout(n, 0.02);
        let mut client = self.client(
            &format!("client-throughput-{}", kind.arg()),
            kind,
            &url,
            n,
            STREAMS_PER_CHANNEL,
            None,
            timeout,
        )?;
        client.send("go")?;
        client.expect("active", Duration::from_secs_f64(timeout + 10.0))?;
        std::thread::sleep(Duration::from_secs_f64(self.plan.warmup_secs));
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
        Ok(m)
    }

    // ----------------------------------------------------------------- idle-grpc

    fn idle_grpc(&self) -> Result<Vec<Section>> {
        let mut sections = Vec::new();
        for &n in &self.plan.idle_grpc {
            let args = ["--kind", "bench-grpc"];
            let sdk = self.idle_median(
                "idle-grpc-sdk",
                &args,
                Client::Sdk,
                n,
                STREAMS_PER_CHANNEL,
                0.02,
            )?;
            let raw = self.idle_median(
                "idle-grpc-raw",
                &args,
                Client::RawGrpc,
                n,
                STREAMS_PER_CHANNEL,
                0.02,
            )?;

            let mut s = Section::new(format!(
                "idle-grpc: N = {n}, {STREAMS_PER_CHANNEL} streams/connection, plaintext"
            ));
            idle_rows(&mut s, &sdk, &raw, Some(1.5), 20.0);
            let want = n.div_ceil(STREAMS_PER_CHANNEL) as u64;
            s.rows.push(
                Row::new(
                    "TCP connections (server side)",
                    sdk.server_connections.to_string(),
                    raw.server_connections.to_string(),
                )
                .target(format!("= {want}"), sdk.server_connections == want),
            );
            s.rows.push(Row::new(
                "client RSS before → after (MiB)",
                format!(
                    "{:.1} → {:.1}",
                    sdk.rss_before_kib as f64 / 1024.0,
                    sdk.rss_after_kib as f64 / 1024.0
                ),
                format!(
                    "{:.1} → {:.1}",
                    raw.rss_before_kib as f64 / 1024.0,
                    raw.rss_after_kib as f64 / 1024.0
                ),
            ));
            s.rows.push(Row::new(
                "server: first register → last approval (s)",
                format!("{:.3}", f(&sdk.server, "register_span_secs")),
                format!("{:.3}", f(&raw.server, "register_span_secs")),
            ));
            s.data = json!({ "n": n, "sdk": sdk.json(), "raw": raw.json() });
            sections.push(s);
        }
        Ok(sections)
    }

    // ---------------------------------------------------------- shared-vs-single

    fn shared_vs_single(&self) -> Result<Vec<Section>> {
        let mut sections = Vec::new();
        let tls_dir = self.work_dir.join("tls");
        let tls_dir = tls_dir.to_string_lossy().to_string();
        for &n in &self.plan.shared_vs_single {
            let args = ["--kind", "testkit-grpc", "--tls", "--ca-dir", &tls_dir];
            let runs = [
                self.idle_median(
                    &format!("svs-{STREAMS_PER_CHANNEL}"),
                    &args,
                    Client::Sdk,
                    n,
                    STREAMS_PER_CHANNEL,
                    0.05,
                )?,
                self.idle_median("svs-1", &args, Client::Sdk, n, 1, 0.05)?,
            ];
            let (shared, single) = (&runs[0], &runs[1]);
            let mut s = Section::new(format!(
                "shared-vs-single: N = {n}, TLS (testkit CA), SDK with {STREAMS_PER_CHANNEL} vs 1 streams/connection"
            ));
            s.columns = [
                format!("shared ({STREAMS_PER_CHANNEL})"),
                "single (1)".into(),
            ];
            let mem_ratio = single.per_reg_kib() / shared.per_reg_kib();
            let time_ratio = single.secs / shared.secs;
            s.rows.push(
                Row::new(
                    "time to all Active (s)",
                    format!("{:.3}", shared.secs),
                    format!("{:.3}", single.secs),
                )
                .ratio(time_ratio)
                .target("single/shared ≥ 5", time_ratio >= 5.0),
            );
            s.rows.push(
                Row::new(
                    "client RSS per registration (KiB)",
                    format!("{:.1}", shared.per_reg_kib()),
                    format!("{:.1}", single.per_reg_kib()),
                )
                .ratio(mem_ratio)
                .target("single/shared ≥ 3", mem_ratio >= 3.0),
            );
            s.rows.push(Row::new(
                "TCP connections (server side)",
                shared.server_connections.to_string(),
                single.server_connections.to_string(),
            ));
            s.notes.push("ratio column: single / shared".into());
            s.data = json!({ "n": n, "shared": shared.json(), "single": single.json() });
            sections.push(s);
        }
        Ok(sections)
    }

    // ------------------------------------------------------------------- idle-ws

    fn idle_ws(&self) -> Result<Vec<Section>> {
        let mut sections = Vec::new();
        for &n in &self.plan.idle_ws {
            let args = ["--kind", "bench-ws"];
            let sdk = self.idle_median("idle-ws-sdk", &args, Client::Sdk, n, 1, 0.02)?;
            let raw = self.idle_median("idle-ws-raw", &args, Client::RawWs, n, 1, 0.02)?;

            let mut s = Section::new(format!(
                "idle-ws: N = {n} sockets, 4 KiB read buffer, 64 handshakes at once (both)"
            ));
            idle_rows(&mut s, &sdk, &raw, None, 16.0);
            s.rows.push(Row::new(
                "sockets (server side)",
                sdk.server_connections.to_string(),
                raw.server_connections.to_string(),
            ));
            s.data = json!({ "n": n, "sdk": sdk.json(), "raw": raw.json() });
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
        let url = ready["url"].as_str().ok_or("server url")?.to_string();
        let timeout = active_timeout(n, 0.02);
        let mut client = self.client_with(
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
        s.rows.push(
            Row::new(
                "largest share of reconnects in any 1 s window",
                format!("{:.1} %", sliding * 100.0),
                "",
            )
            .target("≤ 25 %", sliding <= 0.25),
        );
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

/// The two rows every idle-scale table starts with: time to all Active
/// (against `time_target` × raw, when there is one) and client RSS per
/// registration (against `rss_target_kib`).
fn idle_rows(
    s: &mut Section,
    sdk: &Idle,
    raw: &Idle,
    time_target: Option<f64>,
    rss_target_kib: f64,
) {
    let time_ratio = sdk.secs / raw.secs;
    let mut time = Row::new(
        "time to all Active (s)",
        format!("{:.3}", sdk.secs),
        format!("{:.3}", raw.secs),
    )
    .ratio(time_ratio);
    if let Some(max) = time_target {
        time = time.target(format!("≤ {max}× raw"), time_ratio <= max);
    }
    s.rows.push(time);
    let per = sdk.per_reg_kib();
    s.rows.push(
        Row::new(
            "client RSS per registration (KiB)",
            format!("{per:.1}"),
            format!("{:.1}", raw.per_reg_kib()),
        )
        .ratio(per / raw.per_reg_kib())
        .target(format!("≤ {rss_target_kib} KiB"), per <= rss_target_kib),
    );
}

//! Helpers of the fleet tests (`fleet_*.rs`): a real etcd on free loopback
//! ports, and a monitor that fails a test on any moment with two live
//! streams for one key.
#![allow(
    dead_code,
    reason = "each fleet test file uses a part of these helpers"
)]
#![allow(unreachable_pub, reason = "a test helper module")]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connector_testkit::{GrpcServerOptions, GrpcTestServer, TestServer};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

pub const ETCD: &str = "/usr/bin/etcd";

/// A real etcd on free loopback ports with its data in a temp dir.
pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    dir: PathBuf,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Etcd {
    /// Started and healthy; None (and a message) when the etcd binary is
    /// not installed.
    pub async fn start(name: &str) -> Option<Etcd> {
        let mut etcd = Self::prepare(name)?;
        etcd.spawn().await;
        Some(etcd)
    }

    /// Ports and data directory chosen, not started yet ([`Etcd::spawn`]):
    /// for a test that starts its hosts before etcd. None (and a message)
    /// when the etcd binary is not installed.
    pub fn prepare(name: &str) -> Option<Etcd> {
        if !std::path::Path::new(ETCD).exists() {
            eprintln!("SKIPPED: {ETCD} is missing (apt-get install etcd-server)");
            return None;
        }
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("fleet-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Some(Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
        })
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.client_port)
    }

    /// Starts it (again) and waits until it is healthy.
    pub async fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(format!("{}.log", self.dir.display())).expect("log file");
        let child = Command::new(ETCD)
            .arg("--name=fleet-test")
            .arg(format!("--data-dir={}", self.dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=fleet-test={peer}"))
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        // Healthy = answers a status request; polled, bounded.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = healthy(self.client_port).await;
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy in 15 s (log: {}.log)",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills it (as a crash or an outage would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(format!("{}.log", self.dir.display()));
    }
}

/// etcd's `/health` on the client port says `"health":"true"`.
async fn healthy(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).contains("\"health\":\"true\""))
    };
    matches!(
        timeout(Duration::from_millis(500), probe).await,
        Ok(Some(true))
    )
}

/// A started etcd, a testkit gRPC server (and its engine) and a monitor on
/// it; None when etcd is not installed. Test logs go to the test writer
/// (`RUST_LOG`).
pub async fn setup(name: &str) -> Option<(Etcd, TestServer, GrpcTestServer, Monitor)> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let etcd = Etcd::start(name).await?;
    let engine = TestServer::new();
    let server = GrpcTestServer::start(engine.clone(), GrpcServerOptions::default())
        .await
        .expect("server starts");
    let monitor = Monitor::start(&engine);
    Some((etcd, engine, server, monitor))
}

/// Samples live streams per key on every server change; remembers the
/// worst moment.
pub struct Monitor {
    worst: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl Monitor {
    pub fn start(engine: &TestServer) -> Self {
        let worst = Arc::new(Mutex::new(None));
        let w = Arc::clone(&worst);
        let e = engine.clone();
        let task = tokio::spawn(async move {
            let _ = e
                .wait_until(Duration::from_secs(3600), |s| {
                    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
                    for r in s.registrations() {
                        per_key.entry(r.key).or_default().push(r.stream_id);
                    }
                    if let Some((k, ids)) = per_key.iter().find(|(_, ids)| ids.len() > 1) {
                        let mut worst = w.lock().unwrap_or_else(|p| p.into_inner());
                        worst.get_or_insert_with(|| format!("{k} had live streams {ids:?}"));
                    }
                    false
                })
                .await;
        });
        Monitor { worst, task }
    }

    pub fn assert_clean(&self, engine: &TestServer) {
        let worst = self.worst.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(worst, None, "a key was hosted twice at once");
        let stats = engine.stats();
        assert_eq!(stats.duplicate_active, 0, "server saw duplicate approvals");
        assert!(
            stats.protocol_errors.is_empty(),
            "{:?}",
            stats.protocol_errors
        );
    }
}

impl Monitor {
    /// Clean now; each of `replicas` stopped by `stop`, one after another;
    /// clean again after the last.
    pub async fn stop_all<R, F: Future>(
        &self,
        engine: &TestServer,
        replicas: impl IntoIterator<Item = R>,
        mut stop: impl FnMut(R) -> F,
    ) {
        self.assert_clean(engine);
        for r in replicas {
            stop(r).await;
        }
        self.assert_clean(engine);
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// key → stream id, once exactly `count` keys have one live approved
/// stream each (and no key has two).
pub fn streams(engine: &TestServer, count: usize) -> Option<BTreeMap<String, u64>> {
    let mut m = BTreeMap::new();
    for r in engine.registrations() {
        if r.status != connector_core::proto::RegistrationStatus::Approved {
            return None;
        }
        if m.insert(r.key, r.stream_id).is_some() {
            return None;
        }
    }
    (m.len() == count).then_some(m)
}

//! The orchestrator's side of a child process: spawn it (this same binary
//! with a role subcommand), read its JSON event lines with a timeout, send
//! it commands, read its memory. A child is killed when its handle drops,
//! so an error anywhere in a scenario leaves no process behind.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::wire::Result;

/// A running child process.
pub(crate) struct ChildProc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    log: String,
}

impl ChildProc {
    /// Spawns `connector-bench <args>`; its stderr (tracing output) goes to
    /// `log_dir/<name>.log`.
    pub(crate) fn spawn(name: &str, args: &[String], log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log)?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            lines,
            log: log.display().to_string(),
        })
    }

    /// The child's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now, in KiB.
    pub(crate) fn rss_kib(&self) -> Result<u64> {
        crate::sys::rss_kib(self.pid())
            .ok_or_else(|| format!("{}: cannot read VmRSS of pid {}", self.name, self.pid()).into())
    }

    /// CPU seconds it has used so far.
    pub(crate) fn cpu_secs(&self) -> f64 {
        crate::sys::cpu_secs(self.pid()).unwrap_or(f64::NAN)
    }

    /// Sends one command line.
    pub(crate) fn send(&mut self, cmd: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{cmd}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("{}: sending {cmd:?}: {e}", self.name).into())
    }

    /// Waits for the event `event`, skipping others. An `error` event, the
    /// child's exit or the timeout is an error that says which child and
    /// where its log is.
    pub(crate) fn expect(&mut self, event: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{}: no `{event}` within {timeout:?} (log: {})",
                        self.name, self.log
                    )
                    .into())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(format!(
                        "{}: exited ({status}) while waiting for `{event}` (log: {})",
                        self.name, self.log
                    )
                    .into());
                }
            };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            match v.get("event").and_then(Value::as_str) {
                Some(e) if e == event => return Ok(v),
                Some("error") => {
                    return Err(format!(
                        "{}: {} (log: {})",
                        self.name,
                        v.get("message").and_then(Value::as_str).unwrap_or("error"),
                        self.log
                    )
                    .into())
                }
                _ => {}
            }
        }
    }

    /// Sends `cmd` and waits for `event`.
    pub(crate) fn ask(&mut self, cmd: &str, event: &str, timeout: Duration) -> Result<Value> {
        self.send(cmd)?;
        self.expect(event, timeout)
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        // Closing stdin asks the child to exit; the kill makes sure.
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

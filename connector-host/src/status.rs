//! The live status of a run against a server: on a terminal, one line on
//! stderr redrawn in place (indicatif) every second; otherwise one `info`
//! line a minute. Log lines go through [`LogWriter`], which lifts the live
//! line out of the way while a log line is written, so the two never mix.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::hosting::{Counts, Host};

/// The live line, while one is shown; log lines suspend it.
static LIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn live() -> Option<ProgressBar> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// How often the terminal line is redrawn.
const TTY_EVERY: Duration = Duration::from_secs(1);
/// How often the plain `info` line is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The status line's text: `12 active, 3 pending, 0 backoff, 0 stopped
/// (1 paused) | 1 connection | 42.0 executes/s`.
pub(crate) fn line(counts: &Counts, connections: usize, executes_per_sec: f64) -> String {
    let paused = if counts.paused > 0 {
        format!(" ({} paused)", counts.paused)
    } else {
        String::new()
    };
    let other = counts.expected
        - (counts.count("active")
            + counts.count("pending")
            + counts.count("backoff")
            + counts.count("stopped"))
        .min(counts.expected);
    let connecting = if other > 0 {
        format!(", {other} connecting")
    } else {
        String::new()
    };
    format!(
        "{} active, {} pending, {} backoff, {} stopped{connecting}{paused} | {} connection{} | {:.1} executes/s",
        counts.count("active"),
        counts.count("pending"),
        counts.count("backoff"),
        counts.count("stopped"),
        connections,
        if connections == 1 { "" } else { "s" },
        executes_per_sec,
    )
}

/// The running status reporter; dropping it clears the live line.
#[derive(Debug)]
pub(crate) struct Status {
    task: JoinHandle<()>,
}

impl Drop for Status {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(bar) = LIVE.lock().unwrap_or_else(|p| p.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

/// Starts reporting `host`'s status: live on a terminal, else a log line a
/// minute.
pub(crate) fn start(host: Arc<Host>) -> Status {
    let tty = io::stderr().is_terminal();
    let bar = tty.then(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        *LIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.clone());
        bar
    });
    let every = if tty { TTY_EVERY } else { LOG_EVERY };
    let task = tokio::spawn(async move {
        let mut last = (Instant::now(), host.counts().executes);
        let mut tick = tokio::time::interval_at(Instant::now() + every.min(TTY_EVERY), every);
        loop {
            tick.tick().await;
            let counts = host.counts();
            let now = Instant::now();
            let secs = now
                .saturating_duration_since(last.0)
                .as_secs_f64()
                .max(1e-3);
            let rate = counts.executes.saturating_sub(last.1) as f64 / secs;
            last = (now, counts.executes);
            let connections = host.runner().summary().transport.open_connections();
            let text = line(&counts, connections, rate);
            match &bar {
                Some(bar) => {
                    bar.set_message(text);
                    bar.tick();
                }
                None => tracing::info!("status: {text}"),
            }
        }
    });
    Status { task }
}

/// Where log lines go: stderr, with the live line (if any) lifted while a
/// line is written.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LogWriter;

/// One log line, buffered and written in one go when dropped.
pub(crate) struct LineWriter(Vec<u8>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.0);
        let write = || {
            let _ = io::stderr().lock().write_all(&bytes);
        };
        match live() {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(Vec::with_capacity(256))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_counts_states_connections_and_rate() {
        let mut counts = Counts {
            expected: 5,
            active: 3,
            paused: 1,
            ..Counts::default()
        };
        counts.by_state.insert("active", 3);
        counts.by_state.insert("backoff", 1);
        counts.by_state.insert("connecting", 1);
        counts.by_state.insert("paused", 1);
        assert_eq!(
            line(&counts, 1, 42.0),
            "3 active, 0 pending, 1 backoff, 0 stopped, 1 connecting (1 paused) | 1 connection | 42.0 executes/s"
        );
        let none = Counts::default();
        assert_eq!(
            line(&none, 2, 0.0),
            "0 active, 0 pending, 0 backoff, 0 stopped | 2 connections | 0.0 executes/s"
        );
    }
}

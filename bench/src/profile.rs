//! `--profile`: `perf record` attached to a client process for the length
//! of a throughput measurement, and its top frames by self time.
//!
//! The recipe, by hand (what this module runs):
//!
//! ```text
//! perf record -e cpu-clock -F 1999 -g -p <client pid> -o client.data -- sleep <secs>
//! perf report -i client.data --no-children --sort symbol --stdio -q --percent-limit 1
//! ```
//!
//! `cpu-clock` is a software event, so it works in VMs without hardware
//! counters. Release builds carry line tables (`[profile.release] debug =
//! "line-tables-only"`) but no frame pointers, so self time per symbol is
//! exact while call chains are not; for inclusive time record with
//! `--call-graph dwarf` and report with `--children` (slow to report).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde::Serialize;

use crate::wire::Result;

/// A `perf record` running against one process.
#[derive(Debug)]
pub(crate) struct Recording {
    child: Child,
    data: PathBuf,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Frame {
    /// Share of the process's samples (0..100).
    pub(crate) percent: f64,
    pub(crate) symbol: String,
}

impl Recording {
    /// Starts sampling `pid` for `secs` seconds into `data`.
    pub(crate) fn start(pid: u32, secs: f64, data: &Path) -> Result<Self> {
        if let Some(dir) = data.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let child = Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "1999", "-g", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(data)
            .args(["--", "sleep"])
            .arg(format!("{secs}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run perf (install linux-perf): {e}"))?;
        Ok(Self {
            child,
            data: data.to_path_buf(),
        })
    }

    /// Waits for the recording to end and returns the top frames by self
    /// time (at least 1 % of the samples each).
    pub(crate) fn finish(mut self) -> Result<Vec<Frame>> {
        self.child.wait()?;
        let out = Command::new("perf")
            .arg("report")
            .arg("-i")
            .arg(&self.data)
            .args([
                "--no-children",
                "--sort",
                "symbol",
                "--stdio",
                "-q",
                "-g",
                "none",
                "--percent-limit",
                "1",
            ])
            .stderr(Stdio::null())
            .output()?;
        Ok(parse_report(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// Parses `perf report --stdio -q` lines: `    12.34%  [.] symbol`.
fn parse_report(text: &str) -> Vec<Frame> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let (pct, rest) = line.split_once('%')?;
            let percent: f64 = pct.trim().parse().ok()?;
            let symbol = rest
                .trim()
                .trim_start_matches("[.]")
                .trim_start_matches("[k]")
                .trim()
                .to_string();
            if symbol.is_empty() {
                return None;
            }
            Some(Frame { percent, symbol })
        })
        .collect()
}

/// Shortens a demangled Rust symbol for a terminal: the hash suffix
/// dropped, at most 110 characters.
pub(crate) fn short(symbol: &str) -> String {
    let out = match symbol.rfind("::h") {
        Some(i) if symbol[i + 3..].chars().all(|c| c.is_ascii_hexdigit()) => &symbol[..i],
        _ => symbol,
    };
    if out.chars().count() > 110 {
        out.chars().take(110).collect::<String>() + "…"
    } else {
        out.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_parsed_and_others_skipped() {
        let text = "
    12.50%  [.] connector_core::driver::run::h0123456789abcdef
     3.00%  [k] copy_user_generic
#
";
        let frames = parse_report(text);
        assert_eq!(frames.len(), 2);
        assert!((frames[0].percent - 12.5).abs() < 1e-9);
        assert_eq!(frames[1].symbol, "copy_user_generic");
        assert_eq!(short(&frames[0].symbol), "connector_core::driver::run");
    }
}

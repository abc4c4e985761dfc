//! What the bench needs from the operating system: the open-file limit,
//! a process's resident memory, and wall-clock timestamps that two
//! processes can compare.

use std::time::{SystemTime, UNIX_EPOCH};

/// The open-file limit after [`raise_nofile`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct NofileLimit {
    /// The soft limit before raising it.
    pub(crate) before: u64,
    /// The soft limit now.
    pub(crate) soft: u64,
    /// The hard limit (the most an unprivileged raise can reach).
    pub(crate) hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Every registration is
/// a socket on WebSocket (and on gRPC with one stream per channel), and the
/// server side holds as many again, so the default soft limit (often 1024)
/// would turn a scale run into a run of `EMFILE` errors.
pub(crate) fn raise_nofile() -> NofileLimit {
    let (before, hard) = rlimit::Resource::NOFILE.get().unwrap_or((0, 0));
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(before);
    NofileLimit { before, soft, hard }
}

/// `VmRSS` of process `pid` in KiB, from `/proc/PID/status` (Linux). `None`
/// when the process is gone or the file cannot be read.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time counters, to tell how much of the machine *other* processes
/// (builds, tests) used while a scenario ran: the bench shares the
/// machine, and its figures mean little when half of it was taken.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSnapshot {
    /// Busy jiffies of the whole machine (`/proc/stat`).
    busy: u64,
    /// Jiffies of this process and its waited-for children.
    ours: u64,
    at: std::time::Instant,
}

/// Takes a [`CpuSnapshot`] (Linux; zeros elsewhere).
pub(crate) fn cpu_snapshot() -> CpuSnapshot {
    let busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(
                v.iter()
                    .take(8)
                    .enumerate()
                    .filter(|(i, _)| *i != 3 && *i != 4)
                    .map(|(_, x)| x)
                    .sum(),
            )
        })
        .unwrap_or(0);
    let ours = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1.to_string();
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // utime stime cutime cstime are fields 14..=17; `rest` starts at field 3.
            Some(f.get(11..15)?.iter().sum())
        })
        .unwrap_or(0);
    CpuSnapshot {
        busy,
        ours,
        at: std::time::Instant::now(),
    }
}

impl CpuSnapshot {
    /// The share of the machine's CPU (0..1) used by processes other than
    /// the bench between `self` and `later` (jiffies of 10 ms).
    pub(crate) fn others_share(&self, later: &CpuSnapshot, cores: usize) -> f64 {
        let secs = later.at.duration_since(self.at).as_secs_f64();
        let busy = later.busy.saturating_sub(self.busy);
        let ours = later.ours.saturating_sub(self.ours);
        let capacity = secs * 100.0 * cores.max(1) as f64;
        if capacity <= 0.0 {
            return 0.0;
        }
        (busy.saturating_sub(ours) as f64 / capacity).clamp(0.0, 1.0)
    }
}

/// CPU time (user + system) process `pid` has used, in seconds, from
/// `/proc/PID/stat` (10 ms resolution).
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1.to_string();
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    Some((f.get(11)? + f.get(12)?) as f64 / 100.0)
}

/// Microseconds since the Unix epoch. Only used to compare instants taken
/// in *different* processes (the client's start, the server's restart);
/// durations inside one process use `Instant`.
pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `YYYYMMDD-HHMMSS` (UTC) for result file names, without a date crate.
pub(crate) fn timestamp() -> String {
    let secs = unix_us() / 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_of_self_is_readable() {
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn timestamp_has_the_expected_shape() {
        let t = timestamp();
        assert_eq!(t.len(), 15, "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}

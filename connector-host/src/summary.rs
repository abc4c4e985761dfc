//! The table `connector-host` prints when it stops.

use std::fmt::Write as _;
use std::time::Duration;

/// One registration's line in the summary table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryRow {
    /// `tenant.type.instance`.
    pub address: String,
    /// The state shown (for example `active`).
    pub state: String,
    /// Requests answered with success.
    pub ok: u64,
    /// Requests answered with an error (any kind).
    pub failed: u64,
    /// Approvals after a lost stream.
    pub reconnects: u64,
    /// Round trip of the last acknowledged heartbeat, if any.
    pub heartbeat_rtt: Option<Duration>,
}

fn fmt_rtt(rtt: Option<Duration>) -> String {
    match rtt {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(10) => {
            format!("{:.2} ms", d.as_secs_f64() * 1000.0)
        }
        Some(d) => format!("{} ms", d.as_millis()),
    }
}

/// Renders the summary table: a header, one row per registration, then a
/// totals row (`total (N)`, the count per state, the summed counters and
/// the worst heartbeat RTT) and `TCP connections used: N`. Every line ends
/// with a newline.
pub fn render_summary(rows: &[SummaryRow], tcp_connections: usize) -> String {
    let mut by_state: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in rows {
        *by_state.entry(r.state.as_str()).or_default() += 1;
    }
    let states = by_state
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ");
    let total = SummaryRow {
        address: format!("total ({})", rows.len()),
        state: states,
        ok: rows.iter().map(|r| r.ok).sum(),
        failed: rows.iter().map(|r| r.failed).sum(),
        reconnects: rows.iter().map(|r| r.reconnects).sum(),
        heartbeat_rtt: rows.iter().filter_map(|r| r.heartbeat_rtt).max(),
    };
    let header = [
        "address",
        "state",
        "ok",
        "failed",
        "reconnects",
        "heartbeat rtt",
    ];
    let cells = |r: &SummaryRow| {
        [
            r.address.clone(),
            r.state.clone(),
            r.ok.to_string(),
            r.failed.to_string(),
            r.reconnects.to_string(),
            fmt_rtt(r.heartbeat_rtt),
        ]
    };
    let body: Vec<[String; 6]> = rows.iter().chain([&total]).map(cells).collect();
    let mut widths = header.map(str::len);
    for line in &body {
        for (w, c) in widths.iter_mut().zip(line) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String; 6]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            // Text left-aligned, numbers right-aligned.
            let _ = match i {
                0 | 1 => write!(s, "{c:<w$}  "),
                _ => write!(s, "{c:>w$}  "),
            };
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    line(&widths.map(|w| "-".repeat(w)));
    for (i, cells) in body.iter().enumerate() {
        if i == rows.len() {
            line(&widths.map(|w| "-".repeat(w)));
        }
        line(cells);
    }
    let _ = writeln!(out, "TCP connections used: {tcp_connections}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_has_one_row_per_registration_and_totals() {
        let row = |i: u64, rtt| SummaryRow {
            address: format!("demo.echo.echo-{i}"),
            state: "active".into(),
            ok: 10 * i,
            failed: i,
            reconnects: 0,
            heartbeat_rtt: rtt,
        };
        let rows = [
            row(0, None),
            row(1, Some(Duration::from_micros(450))),
            row(2, Some(Duration::from_millis(12))),
        ];
        let table = render_summary(&rows, 1);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + 3 + 2 + 1, "{table}");
        assert!(lines[0].starts_with("address"), "{table}");
        assert!(lines[3].contains("0.45 ms"), "{table}");
        assert!(lines[4].contains("12 ms"), "{table}");
        assert!(lines[6].starts_with("total (3)"), "{table}");
        assert!(lines[6].contains("3 active"), "{table}");
        assert!(lines[6].contains("30"), "{table}");
        assert_eq!(lines[7], "TCP connections used: 1");
    }
}

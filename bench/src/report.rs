//! Tables on stdout and JSON files under `target/bench/`.

use serde::Serialize;
use serde_json::Value;

/// One line of a table: a figure for the SDK and the raw baseline, their
/// ratio, the target and whether it is met.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) figure: String,
    pub(crate) sdk: String,
    pub(crate) raw: String,
    pub(crate) ratio: String,
    pub(crate) target: String,
    /// `None`: informational, no target.
    pub(crate) met: Option<bool>,
}

impl Row {
    /// A row; `ratio`, `target` and `met` are filled in by the builders.
    pub(crate) fn new(
        figure: impl Into<String>,
        sdk: impl Into<String>,
        raw: impl Into<String>,
    ) -> Self {
        Self {
            figure: figure.into(),
            sdk: sdk.into(),
            raw: raw.into(),
            ratio: String::new(),
            target: String::new(),
            met: None,
        }
    }

    /// Sets the ratio column from interleaved pairs: median and range.
    pub(crate) fn spread(mut self, spread: &Spread) -> Self {
        self.ratio = spread.cell();
        self
    }

    /// Sets the target and whether it is met.
    pub(crate) fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = target.into();
        self.met = Some(met);
        self
    }
}

/// One table: a scenario at one size.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Section {
    pub(crate) title: String,
    /// Headers of the two value columns (normally `SDK` and `raw`).
    pub(crate) columns: [String; 2],
    pub(crate) rows: Vec<Row>,
    /// Lines printed under the table (caveats, what a miss means).
    pub(crate) notes: Vec<String>,
    /// Every raw figure, for the JSON file.
    pub(crate) data: Value,
}

impl Section {
    /// An empty section with the usual `SDK` / `raw` columns.
    pub(crate) fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            columns: ["SDK".into(), "raw".into()],
            rows: Vec::new(),
            notes: Vec::new(),
            data: Value::Null,
        }
    }

    /// Prints the table.
    pub(crate) fn print(&self) {
        println!("\n== {} ==", self.title);
        let headers = [
            "figure",
            self.columns[0].as_str(),
            self.columns[1].as_str(),
            "ratio",
            "target",
            "met?",
        ];
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.figure.clone(),
                    r.sdk.clone(),
                    r.raw.clone(),
                    r.ratio.clone(),
                    r.target.clone(),
                    match r.met {
                        Some(true) => "yes".into(),
                        Some(false) => "NO".into(),
                        None => String::new(),
                    },
                ]
            })
            .collect();
        let mut width = headers.map(|h| h.chars().count());
        for row in &cells {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cols: [&str; 6]| {
            let mut s = String::new();
            for (i, c) in cols.iter().enumerate() {
                let pad = width[i].saturating_sub(c.chars().count());
                if i == 0 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str("  ");
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            println!("{}", s.trim_end());
        };
        line(headers);
        for row in &cells {
            line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
    }

    /// Rows whose target is missed.
    pub(crate) fn misses(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.met == Some(false))
    }
}

/// `1234567.8` → `1.23 M`, `4321` → `4.32 k`.
pub(crate) fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Microseconds, printed in the unit that reads best.
pub(crate) fn us(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2} ms", v / 1e3)
    } else {
        format!("{v:.0} µs")
    }
}

/// Prints one measurement the moment it is taken (stdout is flushed), so a
/// long run shows its figures as it goes rather than only in the tables.
pub(crate) fn progress(line: impl AsRef<str>) {
    use std::io::Write as _;
    println!("  · {}", line.as_ref());
    let _ = std::io::stdout().flush();
}

/// The median of `values` (NaN-free; the mean of the two middle ones for
/// an even count). `NaN` when empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// The ratios of interleaved pairs (SDK, raw, SDK, raw, …): their median
/// and their range. A ratio taken from one pair run back to back is far
/// steadier on a shared machine than either absolute figure, and the range
/// says how far to trust it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) pairs: usize,
    pub(crate) ratios: Vec<f64>,
}

impl Spread {
    /// The spread of per-pair ratios `a[i] / b[i]`.
    pub(crate) fn of_pairs(a: &[f64], b: &[f64]) -> Self {
        let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        Self::of(ratios)
    }

    /// The spread of `ratios`.
    pub(crate) fn of(ratios: Vec<f64>) -> Self {
        let finite = || ratios.iter().copied().filter(|x| x.is_finite());
        Self {
            median: median(&ratios),
            min: finite().fold(f64::NAN, f64::min),
            max: finite().fold(f64::NAN, f64::max),
            pairs: ratios.len(),
            ratios,
        }
    }

    /// `0.46 (0.44–0.49)`: the median and the range over the pairs.
    pub(crate) fn cell(&self) -> String {
        if !self.median.is_finite() {
            return "-".into();
        }
        if self.pairs <= 1 {
            return format!("{:.2}", self.median);
        }
        format!("{:.2} ({:.2}–{:.2})", self.median, self.min, self.max)
    }
}

//! The figures a run produced, printed as a table or as JSON.

use serde::Serialize;

/// Which direction of a figure is the good one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Throughputs: more is better.
    Higher,
    /// Latencies, memory: less is better.
    Lower,
}

/// A goal from the issue and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The goal in words, e.g. `>= 3x etcd`.
    pub goal: String,
    /// Whether the measured figure meets it.
    pub met: bool,
}

/// One measured quantity, for our system and (when there is one) the system
/// it is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Which of the six measures it belongs to (`register`, `resolve`, ...).
    pub group: &'static str,
    /// What was measured, e.g. `register, 16 clients`.
    pub name: String,
    /// Unit of `ours` and `reference`, e.g. `ops/s` or `ms`.
    pub unit: &'static str,
    /// Which direction is good.
    pub better: Better,
    /// Our figure; `None` when it could not be measured (see `note`).
    pub ours: Option<f64>,
    /// What we compare with: `etcd`, `typed tonic`, or empty for none.
    pub reference_name: &'static str,
    /// The reference's figure, when measured.
    pub reference: Option<f64>,
    /// `ours / reference`, when both exist.
    pub ratio: Option<f64>,
    /// Further systems measured on the same workload (r-nacos), each with
    /// its own column pair in the table.
    pub others: Vec<Other>,
    /// The goal for this figure, if it sets one.
    pub target: Option<Target>,
    /// Anything a reader needs to interpret the numbers.
    pub note: String,
}

/// Another system's value of a figure, beside the main reference.
#[derive(Debug, Clone, Serialize)]
pub struct Other {
    /// The system, e.g. `r-nacos`: names the table's column.
    pub name: &'static str,
    /// Its figure, when measured.
    pub value: Option<f64>,
    /// `ours / value` (or `value / reference`, see `ratio_name`), when
    /// both exist.
    pub ratio: Option<f64>,
    /// Names the ratio's column: `ours/<name>`, or `<name>/<reference>` for
    /// a system compared with the reference rather than with us (our
    /// registry over etcd, against raw etcd).
    pub ratio_name: String,
    /// False when the system has no equivalent of the measure (the table
    /// says `n/a`, and the note says why), rather than a figure that was not
    /// measured (`-`).
    pub equivalent: bool,
}

impl Figure {
    /// A figure with our value and no reference yet.
    pub fn new(
        group: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        better: Better,
        ours: Option<f64>,
    ) -> Figure {
        Figure {
            group,
            name: name.into(),
            unit,
            better,
            ours,
            reference_name: "",
            reference: None,
            ratio: None,
            others: Vec::new(),
            target: None,
            note: String::new(),
        }
    }

    /// Adds another system's value in its own column, with its ratio.
    pub fn and(mut self, name: &'static str, value: Option<f64>) -> Figure {
        let ratio = ratio(self.ours, value);
        self.others.push(Other {
            name,
            value,
            ratio,
            ratio_name: format!("ours/{name}"),
            equivalent: true,
        });
        self
    }

    /// Adds another system's value in its own column, with its ratio to
    /// the reference set by [`vs`](Self::vs) (call that first): for our
    /// registry over etcd, whose question is what it costs over raw etcd.
    pub fn and_over_reference(mut self, name: &'static str, value: Option<f64>) -> Figure {
        let ratio = ratio(value, self.reference);
        self.others.push(Other {
            name,
            value,
            ratio,
            ratio_name: format!("{name}/{}", self.reference_name),
            equivalent: true,
        });
        self
    }

    /// Marks `name`'s column `n/a` for this figure: the system has no
    /// equivalent of the measure, for the reason given (added to the note).
    pub fn none_for(mut self, name: &'static str, why: &str) -> Figure {
        self.others.push(Other {
            name,
            value: None,
            ratio: None,
            ratio_name: format!("ours/{name}"),
            equivalent: false,
        });
        self.note(format!("{name}: no equivalent ({why})"))
    }

    /// Adds the reference system's value and computes the ratio.
    pub fn vs(mut self, reference_name: &'static str, reference: Option<f64>) -> Figure {
        self.reference_name = reference_name;
        self.reference = reference;
        self.ratio = ratio(self.ours, reference);
        self
    }

    /// Attaches a goal; `met` is computed by the caller from the figures.
    pub fn target(mut self, goal: impl Into<String>, met: Option<bool>) -> Figure {
        if let Some(met) = met {
            self.target = Some(Target {
                goal: goal.into(),
                met,
            });
        } else {
            self.note_push(&format!("target {} not evaluated", goal.into()));
        }
        self
    }

    /// Appends a note.
    pub fn note(mut self, note: impl AsRef<str>) -> Figure {
        self.note_push(note.as_ref());
        self
    }

    fn note_push(&mut self, note: &str) {
        if note.is_empty() {
            return;
        }
        if !self.note.is_empty() {
            self.note.push_str("; ");
        }
        self.note.push_str(note);
    }
}

/// `ours / reference`, when both exist and the reference is not zero.
fn ratio(ours: Option<f64>, reference: Option<f64>) -> Option<f64> {
    match (ours, reference) {
        (Some(o), Some(r)) if r != 0.0 => Some(o / r),
        _ => None,
    }
}

/// A ratio as the table shows it.
fn times(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

/// Formats a number with a precision suited to its size.
fn num(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v.abs() >= 1000.0 => group_thousands(v.round() as i64),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 0.1 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// 1234567 -> "1 234 567": easier to read in a table than a raw number.
fn group_thousands(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    if v < 0 { format!("-{out}") } else { out }
}

/// The figures as a Markdown table (readable in a terminal and pasteable into
/// BENCHMARKS.md). Each other system any figure has (etcd-store, r-nacos)
/// gets two columns after the main reference's: its value and its ratio,
/// named as the first figure with that system names it (`ours/<name>` or
/// `<name>/etcd`).
pub fn table(figures: &[Figure]) -> String {
    let mut others: Vec<(&'static str, &str)> = Vec::new();
    for o in figures.iter().flat_map(|f| &f.others) {
        if !others.iter().any(|(n, _)| *n == o.name) {
            others.push((o.name, &o.ratio_name));
        }
    }
    let mut header: Vec<String> = ["measure", "unit", "ours", "reference", "value", "ours/ref"]
        .map(String::from)
        .to_vec();
    for (name, ratio_name) in &others {
        header.push(name.to_string());
        header.push(ratio_name.to_string());
    }
    header.push("target".into());
    header.push("note".into());
    let rows: Vec<Vec<String>> = figures
        .iter()
        .map(|f| {
            let arrow = match f.better {
                Better::Higher => "↑",
                Better::Lower => "↓",
            };
            let mut row = vec![
                format!("{}: {}", f.group, f.name),
                format!("{} {arrow}", f.unit),
                num(f.ours),
                f.reference_name.to_string(),
                num(f.reference),
                times(f.ratio),
            ];
            for (name, _) in &others {
                match f.others.iter().find(|o| o.name == *name) {
                    Some(o) if !o.equivalent => {
                        row.push("n/a".into());
                        row.push("n/a".into());
                    }
                    Some(o) => {
                        row.push(num(o.value));
                        row.push(times(o.ratio));
                    }
                    None => {
                        row.push("-".into());
                        row.push("-".into());
                    }
                }
            }
            row.push(
                f.target
                    .as_ref()
                    .map(|t| format!("{} {}", t.goal, if t.met { "MET" } else { "NOT MET" }))
                    .unwrap_or_default(),
            );
            row.push(f.note.clone());
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (cell, w) in cells.iter().zip(&widths) {
            let pad = w - cell.chars().count();
            s.push_str(&format!(" {cell}{} |", " ".repeat(pad)));
        }
        s.push('\n');
        s
    };
    let mut out = line(&header);
    out.push_str(&line(
        &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
    ));
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_needs_both_values() {
        let f = Figure::new("x", "y", "ops/s", Better::Higher, Some(300.0)).vs("etcd", Some(100.0));
        assert_eq!(f.ratio, Some(3.0));
        let f = Figure::new("x", "y", "ops/s", Better::Higher, Some(300.0)).vs("etcd", None);
        assert_eq!(f.ratio, None);
    }

    #[test]
    fn unevaluated_target_becomes_a_note() {
        let f = Figure::new("x", "y", "ms", Better::Lower, None).target("< 10 ms", None);
        assert!(f.target.is_none());
        assert!(f.note.contains("< 10 ms"));
    }

    #[test]
    fn table_aligns_columns() {
        let figs = [
            Figure::new(
                "register",
                "1 client",
                "ops/s",
                Better::Higher,
                Some(12345.6),
            )
            .vs("etcd", Some(2000.0))
            .target(">= 3x etcd", Some(true)),
            Figure::new("watch", "p99", "ms", Better::Lower, Some(0.42)),
        ];
        let t = table(&figs);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{t}");
        assert!(t.contains("12 346"));
        assert!(t.contains("6.17x"));
        assert!(t.contains(">= 3x etcd MET"));
    }

    #[test]
    fn other_systems_get_their_own_columns() {
        let figs = [
            Figure::new(
                "register",
                "1 client",
                "inst/s",
                Better::Higher,
                Some(300.0),
            )
            .vs("etcd", Some(100.0))
            .and("r-nacos", Some(600.0)),
            Figure::new("failure", "expiry", "ms", Better::Lower, Some(1.0))
                .vs("etcd", Some(2.0))
                .none_for("r-nacos", "no TTL"),
            Figure::new("generic", "p99", "ms", Better::Lower, Some(1.0)),
        ];
        let t = table(&figs);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("| r-nacos ") && lines[0].contains("| ours/r-nacos "));
        assert!(
            lines[2].contains("| 600 ") && lines[2].contains("| 0.50x "),
            "{t}"
        );
        assert!(lines[3].contains("| n/a "), "{t}");
        assert!(lines[3].contains("r-nacos: no equivalent (no TTL)"), "{t}");
        // A figure the other system was not asked about shows a dash.
        assert_eq!(lines[4].matches("| - ").count(), 4, "{t}");
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{t}");
        // No other system, no extra column.
        assert!(!table(&figs[2..]).contains("r-nacos"));
    }

    #[test]
    fn a_system_compared_with_the_reference_gets_its_ratio_to_it() {
        let figs = [Figure::new(
            "register",
            "1 client",
            "inst/s",
            Better::Higher,
            Some(900.0),
        )
        .vs("etcd", Some(300.0))
        .and_over_reference("etcd-store", Some(150.0))
        .and("r-nacos", Some(100.0))];
        assert_eq!(figs[0].others[0].ratio, Some(0.5));
        assert_eq!(figs[0].others[1].ratio, Some(9.0));
        let t = table(&figs);
        let cells =
            |line: &str| -> Vec<String> { line.split('|').map(|c| c.trim().to_string()).collect() };
        let lines: Vec<Vec<String>> = t.lines().map(cells).collect();
        assert_eq!(
            lines[0][7..11],
            ["etcd-store", "etcd-store/etcd", "r-nacos", "ours/r-nacos"],
            "{t}"
        );
        assert_eq!(lines[2][7..11], ["150", "0.50x", "100", "9.00x"], "{t}");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands(1_000_000), "1 000 000");
        assert_eq!(group_thousands(-1234), "-1 234");
        assert_eq!(group_thousands(999), "999");
    }
}

//! Machine-readable figures: each bench records what it prints here, and
//! `scripts/bench` turns them into `bench-results/latest.{json,md}`
//! (`scripts/bench-report.py`). One JSON object per line, appended to the
//! file named by `ROBENCH_OUT` (an absolute path: cargo runs a bench in the
//! crate's directory); without `ROBENCH_OUT` nothing is written.
//!
//! A line: `{"bench", "figure", "value", "unit", "baseline": null or
//! {"what", "value"} (in the figure's unit, measured in the same run),
//! "goal": null or a string}`. The ratio is left to the reader.

use serde::Serialize;
use std::io::Write;

/// One line; a struct, not `json!`, so the keys keep this order.
#[derive(Serialize)]
struct Figure<'a> {
    bench: &'a str,
    figure: &'a str,
    value: f64,
    unit: &'a str,
    baseline: Option<Baseline<'a>>,
    goal: Option<&'a str>,
}

#[derive(Serialize)]
struct Baseline<'a> {
    what: &'a str,
    value: f64,
}

/// Records one figure (see the module's doc). Panics when `ROBENCH_OUT` is
/// set but cannot be written: a run that loses its figures must not pass.
pub fn record(
    bench: &str,
    figure: &str,
    value: f64,
    unit: &str,
    baseline: Option<(&str, f64)>,
    goal: Option<&str>,
) {
    let Some(path) = std::env::var_os("ROBENCH_OUT") else {
        return;
    };
    let line = serde_json::to_string(&Figure {
        bench,
        figure,
        value,
        unit,
        baseline: baseline.map(|(what, value)| Baseline { what, value }),
        goal,
    })
    .expect("a figure serializes");
    // One write per line, in append mode: lines of benches writing one
    // after the other never interleave.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()))
        .unwrap_or_else(|e| panic!("ROBENCH_OUT={}: {e}", path.to_string_lossy()));
}

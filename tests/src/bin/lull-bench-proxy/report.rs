//! The report: rows measured against their targets, the closed-loop medians and the run's
//! details, printed as tables and written as markdown.

use std::fmt::Write as _;

use crate::closed_loop::{Load, cpu_text};

/// One line of the table.
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) target: String,
    pub(crate) measured: String,
    pub(crate) baseline: String,
    /// The figure compared with the target (a ratio, or the measured value itself).
    pub(crate) ratio: String,
    pub(crate) pass: Option<bool>,
}

fn pass_text(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) details: Vec<String>,
    /// Per protocol and concurrency: medians of direct, lull, nginx, haproxy.
    pub(crate) tables: Vec<(String, usize, [Option<Load>; 4])>,
}

impl Report {
    fn cells(&self) -> Vec<[String; 6]> {
        self.rows
            .iter()
            .map(|r| {
                [
                    r.name.clone(),
                    r.target.clone(),
                    r.measured.clone(),
                    r.baseline.clone(),
                    r.ratio.clone(),
                    pass_text(r.pass).to_owned(),
                ]
            })
            .collect()
    }

    /// The closed-loop medians as rows of (load, contender, req/s, ratio, p50, p99, CPU per
    /// request).
    fn load_cells(&self) -> Vec<[String; 7]> {
        let names = ["direct", "lull", "nginx", "haproxy"];
        let mut cells = Vec::new();
        for (protocol, conns, loads) in &self.tables {
            let direct = loads[0];
            for (name, load) in names.iter().zip(loads) {
                let Some(l) = load else { continue };
                cells.push([
                    format!("{protocol} c={conns}"),
                    (*name).to_owned(),
                    format!("{:.0}", l.rps),
                    direct.map_or_else(|| "-".into(), |d| format!("{:.2}x", l.rps / d.rps)),
                    format!("{:.0} µs", l.p50_us),
                    format!("{:.0} µs", l.p99_us),
                    cpu_text(l.cpu_per_request),
                ]);
            }
        }
        cells
    }

    pub(crate) fn print(&self) {
        print_table(
            &[
                "measurement",
                "target",
                "measured",
                "baseline",
                "ratio",
                "pass",
            ],
            &self.cells(),
        );
        print_table(
            &[
                "load",
                "contender",
                "req/s",
                "vs direct",
                "p50",
                "p99",
                "CPU/request",
            ],
            &self.load_cells(),
        );
        for d in &self.details {
            println!("  {d}");
        }
    }

    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("| measurement | target | measured | baseline | ratio | pass |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for row in self.cells() {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        let missed: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.pass == Some(false))
            .map(|r| r.name.as_str())
            .collect();
        out.push('\n');
        if missed.is_empty() {
            out.push_str("Every target was met in this run.\n");
        } else {
            let _ = writeln!(
                out,
                "**Targets missed in this run:** {}.",
                missed.join("; ")
            );
        }
        out.push_str("\nClosed-loop medians (req/s as a ratio to direct HTTP/1.1 at the same connections; CPU/request: the contender's CPU time over the run divided by the requests served):\n\n");
        out.push_str("| load | contender | req/s | vs direct | p50 | p99 | CPU/request |\n");
        out.push_str("|---|---|---|---|---|---|---|\n");
        for row in self.load_cells() {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out.push_str("\nDetails:\n\n");
        for d in &self.details {
            let _ = writeln!(out, "- {d}");
        }
        out
    }
}

fn print_table<const N: usize>(headers: &[&str], cells: &[[String; N]]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String]| {
        let mut out = String::new();
        for (c, w) in row.iter().zip(&widths) {
            let pad = w.saturating_sub(c.chars().count());
            let _ = write!(out, "{c}{}  ", " ".repeat(pad));
        }
        out.trim_end().to_owned()
    };
    let headers: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    println!();
    println!("{}", line(&headers));
    println!(
        "{}",
        line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>())
    );
    for row in cells {
        println!("{}", line(row));
    }
    println!();
}

//! `cargo xtask bench runtime [--smoke]`: builds the benchmark driver (`lull-bench`, in the
//! lull-tests crate) and the test zygote in release mode, makes sure the fixture images are in
//! the local registry, runs the driver as root and prints its table. The full run also writes
//! the results into `docs/benchmarks.md`, between markers, keeping the hand-written text around
//! them. `--smoke` (what CI runs) does few iterations and fails only when the harness does.
//!
//! `cargo xtask bench netns [--smoke]` does the same for the network benchmarks
//! ([`crate::bench_netns`]), in a section of its own with its own markers, and
//! `cargo xtask bench proxy [--smoke]` for the proxy against nginx and haproxy
//! ([`crate::bench_proxy`]), and `cargo xtask bench lifecycle [--smoke]` for the daemon's
//! deploy, failed deploy, pause, resume and restart times ([`crate::bench_lifecycle`]), and
//! `cargo xtask bench autoscale [--smoke]` for scale-out reaction, cold start, wake from the
//! idle tiers and density ([`crate::bench_autoscale`]), and `cargo xtask bench build [--smoke]`
//! for source builds against buildah and the cold start with scale to zero
//! ([`crate::bench_build`]), and `cargo xtask bench tls [--smoke]` for TLS handshakes and HTTPS
//! against nginx and haproxy terminating TLS ([`crate::bench_tls`]).

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::fixtures::{self, FixturesArgs};

const BEGIN: &str = "<!-- bench runtime: begin (written by `cargo xtask bench runtime`) -->";
const END: &str = "<!-- bench runtime: end -->";

/// The generated part of one suite's results in docs/benchmarks.md.
pub struct Section<'a> {
    /// The markers around the generated part; everything outside them is kept.
    pub begin: &'a str,
    pub end: &'a str,
    /// The heading above the table, e.g. `## Latest results`.
    pub heading: &'a str,
    /// The command that produced it, e.g. `sudo -E cargo xtask bench runtime`.
    pub command: &'a str,
    /// What the peers are (tool versions), one line.
    pub peers: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Cold start against runc, the CPU gate, pull + unpack against skopeo + umoci
    Runtime,
    /// Wiring an instance's network against `ip` commands, veth against loopback throughput
    Netns,
    /// The proxy against direct, nginx and haproxy (wrk, h2load, a fixed rate), and the CPU
    /// gate's cost per request
    Proxy,
    /// `lull daemon` end to end: deploy, failed deploy, pause, resume and restart times
    Lifecycle,
    /// The autoscaler end to end: scale-out reaction, cold start, wake from each idle tier,
    /// density of idle instances
    Autoscale,
    /// Source builds end to end: cold, warm and no-op builds of a Flask and an Express app
    /// against buildah, and a cold start with scale to zero
    Build,
    /// TLS: server CPU per full and resumed handshake (P-256, RSA-2048) and HTTPS keep-alive
    /// req/s (h1, h2) against nginx and haproxy with the same certificate
    Tls,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub suite: Suite,
    /// Few iterations: checks that every measurement produces a number (CI); targets are
    /// reported but not enforced, and docs/benchmarks.md is left alone
    #[arg(long)]
    pub smoke: bool,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    match args.suite {
        Suite::Runtime => run_runtime(args),
        Suite::Netns => crate::bench_netns::run(args.smoke),
        Suite::Proxy => crate::bench_proxy::run(args.smoke),
        Suite::Lifecycle => crate::bench_lifecycle::run(args.smoke),
        Suite::Autoscale => crate::bench_autoscale::run(args.smoke),
        Suite::Build => crate::bench_build::run(args.smoke),
        Suite::Tls => crate::bench_tls::run(args.smoke),
    }
}

fn run_runtime(args: &BenchArgs) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the runtime benchmarks need root (namespaces, cgroups, mounts): run `sudo -E cargo xtask bench runtime`"
        );
    }
    let root = fixtures::workspace_root();

    eprintln!("==> fixture images (with the ~100 MB bulk image)");
    fixtures::run(&FixturesArgs { bulk: true })?;

    eprintln!("==> building lull-bench and lull-test-zygote (release)");
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "lull-tests",
            "--bin",
            "lull-bench",
            "--bin",
            "lull-test-zygote",
        ])
        .current_dir(&root)
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p lull-tests: {status}");
    }

    let release = root.join("target/release");
    let results = root.join("target/bench/runtime.md");
    if let Some(dir) = results.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = fs::remove_file(&results);
    let mut command = Command::new(release.join("lull-bench"));
    command
        .arg("runtime")
        .arg("--zygote")
        .arg(release.join("lull-test-zygote"))
        .arg("--markdown")
        .arg(&results);
    if args.smoke {
        command.arg("--smoke");
    }
    if let Ok(registry) = std::env::var("LULL_REGISTRY") {
        command.arg("--registry").arg(registry);
    }
    eprintln!(
        "==> lull-bench runtime{}",
        if args.smoke { " --smoke" } else { "" }
    );
    let status = command.status().context("run lull-bench")?;
    if !status.success() {
        bail!("lull-bench runtime: {status}");
    }
    if args.smoke {
        return Ok(());
    }

    let table = fs::read_to_string(&results)
        .with_context(|| format!("read {} (written by lull-bench)", results.display()))?;
    let runc = first_line(&root, "runc", &["--version"]);
    let skopeo = first_line(&root, "skopeo", &["--version"]);
    let umoci = first_line(&root, "umoci", &["--version"]);
    let section = Section {
        begin: BEGIN,
        end: END,
        heading: "## Latest results",
        command: "sudo -E cargo xtask bench runtime",
        peers: format!("{runc}; {skopeo}; {umoci}"),
    };
    let doc = root.join("docs/benchmarks.md");
    update_doc(&doc, BEGIN, END, &results_section(&root, &section, &table))?;
    eprintln!("==> results written to docs/benchmarks.md");
    Ok(())
}

/// The first line `program args` prints, trimmed, or `unknown`.
pub fn first_line(root: &Path, program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The generated part of the doc: markers, heading, command, date, machine, peers, table.
pub fn results_section(root: &Path, section: &Section<'_>, table: &str) -> String {
    let first_line = |program: &str, args: &[&str]| first_line(root, program, args);
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let memory_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown".to_owned(),
            |kb| format!("{:.0}", kb / 1048576.0),
        );
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let load = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());

    let mut out = String::new();
    out.push_str(section.begin);
    out.push_str(&format!("\n\n{}\n\n", section.heading));
    out.push_str(&format!(
        "- Command: `{}` (commit {commit}, {date})\n\
         - Machine: {cpus} CPUs ({cpu_model}), {memory_gib} GiB, kernel {kernel}, cgroups {}, \
         load average {load} when the run ended\n\
         - Peers: {}\n\n",
        section.command,
        cgroup_mode(),
        section.peers
    ));
    out.push_str(table.trim_end());
    out.push_str("\n\n");
    out.push_str(section.end);
    out.push('\n');
    out
}

fn cgroup_mode() -> &'static str {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2 (unified)"
    } else if Path::new("/sys/fs/cgroup/unified").exists() {
        "hybrid (v1 controllers, v2 without cpu)"
    } else {
        "v1"
    }
}

/// Replaces the part from `begin_marker` to `end_marker` with `text` (or appends `text`),
/// keeping the rest of the doc, other suites' sections included.
pub fn update_doc(doc: &Path, begin_marker: &str, end_marker: &str, text: &str) -> Result<()> {
    let existing = match fs::read_to_string(doc) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Benchmarks\n\nRun with `sudo -E cargo xtask bench runtime`.\n\n".to_owned()
        }
        Err(e) => return Err(e).with_context(|| format!("read {}", doc.display())),
    };
    let begin = existing.find(begin_marker);
    let end = begin.and_then(|b| existing[b..].find(end_marker).map(|e| b + e));
    let updated = match (begin, end) {
        (Some(begin), Some(end)) => {
            let after = &existing[end + end_marker.len()..];
            format!("{}{}{after}", &existing[..begin], text.trim_end())
        }
        _ => format!("{}\n\n{}\n", existing.trim_end(), text.trim_end()),
    };
    if let Some(dir) = doc.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    fs::write(doc, updated).with_context(|| format!("write {}", doc.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_replace_the_marked_section_only() {
        let dir = tempdir();
        let doc = dir.join("benchmarks.md");
        fs::write(
            &doc,
            format!("# B\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Notes\n\nkept\n"),
        )
        .unwrap();
        update_doc(&doc, BEGIN, END, &format!("{BEGIN}\nnew table\n{END}\n")).unwrap();
        let text = fs::read_to_string(&doc).unwrap();
        assert!(text.contains("new table"), "{text}");
        assert!(!text.contains("old table"), "{text}");
        assert!(text.starts_with("# B\n\nintro\n\n"), "{text}");
        assert!(text.ends_with("\n\n## Notes\n\nkept\n"), "{text}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn results_are_appended_when_the_doc_has_no_markers() {
        let dir = tempdir();
        let doc = dir.join("benchmarks.md");
        update_doc(&doc, BEGIN, END, &format!("{BEGIN}\ntable\n{END}\n")).unwrap();
        let text = fs::read_to_string(&doc).unwrap();
        assert!(text.starts_with("# Benchmarks\n"), "{text}");
        assert!(text.contains(&format!("{BEGIN}\ntable\n{END}")), "{text}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn each_suite_rewrites_only_its_own_section() {
        let dir = tempdir();
        let doc = dir.join("benchmarks.md");
        let (b2, e2) = ("<!-- other: begin -->", "<!-- other: end -->");
        fs::write(
            &doc,
            format!("# B\n\n{BEGIN}\nruntime table\n{END}\n\n## Notes\n\nkept\n"),
        )
        .unwrap();
        // No markers of its own yet: appended after everything, the runtime section untouched.
        update_doc(&doc, b2, e2, &format!("{b2}\nfirst\n{e2}\n")).unwrap();
        let text = fs::read_to_string(&doc).unwrap();
        assert!(
            text.ends_with(&format!("kept\n\n{b2}\nfirst\n{e2}\n")),
            "{text}"
        );
        update_doc(&doc, b2, e2, &format!("{b2}\nsecond\n{e2}\n")).unwrap();
        update_doc(&doc, BEGIN, END, &format!("{BEGIN}\nnew runtime\n{END}\n")).unwrap();
        let text = fs::read_to_string(&doc).unwrap();
        assert_eq!(
            text,
            format!(
                "# B\n\n{BEGIN}\nnew runtime\n{END}\n\n## Notes\n\nkept\n\n{b2}\nsecond\n{e2}\n"
            )
        );
        // An end marker before the begin marker belongs to another section: not a match.
        fs::write(&doc, format!("{e2}\n{b2}\nold\n{e2}\n")).unwrap();
        update_doc(&doc, b2, e2, &format!("{b2}\nnew\n{e2}\n")).unwrap();
        let text = fs::read_to_string(&doc).unwrap();
        assert_eq!(text, format!("{e2}\n{b2}\nnew\n{e2}\n"));
        fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "xtask-bench-{}-{nanos:x}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}

//! `lull-bench runtime [--smoke]`: the runtime benchmarks that `cargo xtask bench runtime` builds
//! and runs (as root). Each figure is measured side by side with its peer in the same run and
//! reported as a ratio, since the machines it runs on are shared and noisy:
//!
//! - cold start: `launch()` to the fixture app's first `200` inside its network namespace, against
//!   the same pipeline done with `runc run -d` (same layers, same overlay, same `config.json`);
//! - process spawn: `launch()` returning against `runc run -d` returning on an already mounted
//!   bundle;
//! - the CPU gate on a 1-vCPU busybox spinner: restore and throttle latencies and the throttle
//!   factor;
//! - pull + unpack of `lull/bulk:latest` against `skopeo copy` + `umoci unpack`.
//!
//! `--oci-runtime crun` compares against crun instead of runc (on cgroup v2, inside the VM of
//! `cargo xtask vm-test`); `--layouts DIR` imports the fixture images from OCI layouts instead
//! of pulling them, and leaves the pull comparison out.
//!
//! Targets are reported, never enforced: the program fails only when the harness does.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lull_netns::NetNs;
use lull_runtime::cgroup::{CpuGate, Gate, Resources};
use lull_runtime::host::{Runtime, RuntimeConfig};
use lull_runtime::instance::config::LaunchConfig;
use lull_runtime::instance::{
    Instance, InstanceRequest, ProcessOverrides, overlay, resolve_process, spec, user,
};
use lull_runtime::layers::UnpackLimits;
use lull_runtime::logs::LogLimits;
use lull_runtime::pull::PullOptions;
use lull_runtime::reference::Reference;
use lull_runtime::store::ImageRecord;
use lull_tests::scratch::{CgroupParentGuard, ScratchDir, unique_name};

const USAGE: &str = "usage: lull-bench runtime [--smoke] [--zygote PATH] [--registry HOST:PORT] \
     [--layouts DIR] [--oci-runtime runc|crun] [--markdown PATH]";

/// The port the fixture app listens on inside its namespace.
const APP_PORT: u16 = 8080;
/// Every instance (lull's and runc's) gets these limits.
const INSTANCE_RESOURCES: Resources = Resources {
    cpu: Some(1.0),
    memory_bytes: Some(512 << 20),
    pids: None,
};
/// How often the HTTP probe retries a refused connection.
const PROBE_INTERVAL: Duration = Duration::from_micros(200);
const PROBE_DEADLINE: Duration = Duration::from_secs(10);
/// A spinner is "stopped" once its CPU time has not grown for this long: more than two
/// scheduler ticks (4 ms at HZ=250), since a running task's time is only brought up to date at
/// a tick or when it leaves the CPU.
const STILL_FOR: Duration = Duration::from_millis(12);
/// The window right after a restore whose CPU share is reported.
const AFTER_RESTORE_WINDOW: Duration = Duration::from_millis(300);
/// Longest wait for a throttled spinner to be given CPU time again.
const THROTTLE_DEBT_DEADLINE: Duration = Duration::from_secs(30);
/// Longest wait for the gate to take effect before the harness gives up.
const GATE_DEADLINE: Duration = Duration::from_millis(500);

struct Args {
    smoke: bool,
    zygote: PathBuf,
    registry: String,
    /// Import `fixture-app` and `busybox` from the OCI layouts in this directory instead of
    /// pulling them (where no registry answers: inside the VM); skips the pull comparison.
    layouts: Option<PathBuf>,
    /// The OCI runtime compared against (`runc`, or `crun`, which runs on cgroup v2 hosts).
    oci_runtime: String,
    markdown: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("runtime") => {}
        Some(other) => bail!("unknown benchmark suite {other:?}\n{USAGE}"),
        None => bail!("{USAGE}"),
    }
    let exe = std::env::current_exe().context("find this executable")?;
    let mut parsed = Args {
        smoke: false,
        zygote: exe.with_file_name("lull-test-zygote"),
        registry: "127.0.0.1:5000".to_owned(),
        layouts: None,
        oci_runtime: "runc".to_owned(),
        markdown: None,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--smoke" => parsed.smoke = true,
            "--zygote" => parsed.zygote = value("--zygote")?.into(),
            "--registry" => parsed.registry = value("--registry")?,
            "--layouts" => parsed.layouts = Some(value("--layouts")?.into()),
            "--oci-runtime" => match value("--oci-runtime")?.as_str() {
                name @ ("runc" | "crun") => parsed.oci_runtime = name.to_owned(),
                other => bail!("--oci-runtime: {other:?} is not runc or crun\n{USAGE}"),
            },
            "--markdown" => parsed.markdown = Some(value("--markdown")?.into()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(parsed)
}

/// Iteration counts and windows of one run.
struct Plan {
    cold_starts: usize,
    gate_cycles: usize,
    restored_window: Duration,
    /// At least this long, and whole throttled cycles (at least one).
    throttled_window: Duration,
    pulls: usize,
}

impl Plan {
    fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                cold_starts: 3,
                gate_cycles: 6,
                restored_window: Duration::from_millis(300),
                throttled_window: Duration::ZERO,
                pulls: 1,
            }
        } else {
            Plan {
                cold_starts: 50,
                gate_cycles: 200,
                restored_window: Duration::from_secs(1),
                throttled_window: Duration::from_secs(8),
                pulls: 3,
            }
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LULL_LOG")
                .unwrap_or_else(|_| "warn,libcgroups=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = parse_args().and_then(|args| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the async runtime")?
            .block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lull-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report

/// Nearest-rank percentile of `samples` (any order), `p` in 0..=100.
fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One line of the table.
struct Row {
    name: String,
    target: String,
    measured: String,
    baseline: String,
    /// The figure compared with the target (a ratio, or the measured value itself).
    ratio: String,
    pass: Option<bool>,
}

fn pass_text(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

struct Report {
    rows: Vec<Row>,
    details: Vec<String>,
}

impl Report {
    fn print(&self) {
        let headers = [
            "measurement",
            "target",
            "measured",
            "baseline",
            "ratio",
            "pass",
        ];
        let cells: Vec<[String; 6]> = self
            .rows
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
            .collect();
        let mut widths = headers.map(str::len);
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |row: &[String]| {
            let mut out = String::new();
            for (c, w) in row.iter().zip(widths) {
                let _ = write!(out, "{c:<w$}  ");
            }
            out.trim_end().to_owned()
        };
        println!();
        println!("{}", line(&headers.map(str::to_owned)));
        println!(
            "{}",
            line(
                &widths
                    .map(|w| "-".repeat(w))
                    .into_iter()
                    .collect::<Vec<_>>()
            )
        );
        for row in &cells {
            println!("{}", line(row));
        }
        println!();
        for d in &self.details {
            println!("  {d}");
        }
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("| measurement | target | measured | baseline | ratio | pass |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.name,
                r.target,
                r.measured,
                r.baseline,
                r.ratio,
                pass_text(r.pass)
            );
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
        out.push_str("\nDetails:\n\n");
        for d in &self.details {
            let _ = writeln!(out, "- {d}");
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// Everything one run creates, removed when dropped: instances are killed through the cgroup
/// guard (dropped first), then the scratch dir's mounts (overlays, namespaces) are unmounted.
struct Bench {
    runtime: Runtime,
    registry: String,
    layouts: Option<PathBuf>,
    /// `runc` or `crun`: the same command line for what is used here.
    oci: String,
    zygote: PathBuf,
    runc_root: PathBuf,
    bundles: PathBuf,
    cgroups: CgroupParentGuard,
    _scratch: ScratchDir,
}

async fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the runtime benchmarks need root (namespaces, cgroups, mounts)");
    }
    if !args.zygote.is_file() {
        bail!(
            "zygote program {} not found (build it: cargo build --release -p lull-tests --bin lull-test-zygote)",
            args.zygote.display()
        );
    }
    let mut tools = vec![args.oci_runtime.as_str()];
    if args.layouts.is_none() {
        tools.extend(["skopeo", "umoci"]);
    }
    for tool in tools {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("{tool} is not installed (Debian package {tool})");
        }
    }
    let plan = Plan::new(args.smoke);
    let scratch = ScratchDir::new("lull-bench").context("create the scratch dir")?;
    let cgroups = CgroupParentGuard::new("lull-bench");
    let runtime = open_runtime(scratch.path(), &cgroups.parent, &args.zygote)?;
    let bench = Bench {
        runtime,
        registry: args.registry.clone(),
        layouts: args.layouts.clone(),
        oci: args.oci_runtime.clone(),
        zygote: args.zygote.clone(),
        runc_root: scratch.path().join("runc-state"),
        bundles: scratch.path().join("runc-bundles"),
        cgroups,
        _scratch: scratch,
    };
    fs::create_dir_all(&bench.runc_root)
        .with_context(|| format!("create {}", bench.runc_root.display()))?;
    fs::create_dir_all(&bench.bundles)
        .with_context(|| format!("create {}", bench.bundles.display()))?;

    let mut report = Report {
        rows: Vec::new(),
        details: Vec::new(),
    };
    eprintln!(
        "lull-bench: {} run, cgroups {}",
        if args.smoke { "smoke" } else { "full" },
        if bench.runtime.instances.cgroup_layout().is_v2() {
            "v2"
        } else {
            "v1 (hybrid)"
        }
    );
    cold_start(&bench, &plan, &mut report).await?;
    gate(&bench, &plan, &mut report).await?;
    if bench.layouts.is_none() {
        pull_unpack(&bench, &plan, &mut report).await?;
    } else {
        report
            .details
            .push("pull + unpack: not measured (images imported from OCI layouts)".to_owned());
    }

    report.print();
    if let Some(path) = &args.markdown {
        fs::write(path, report.markdown()).with_context(|| format!("write {}", path.display()))?;
    }
    drop(bench);
    Ok(())
}

fn open_runtime(dir: &Path, cgroup_parent: &str, zygote: &Path) -> Result<Runtime> {
    let config = RuntimeConfig {
        data_dir: dir.join("data"),
        run_dir: dir.join("run"),
        cgroup_parent: cgroup_parent.to_owned(),
        zygote_program: zygote.to_owned(),
        zygote_args: vec![],
        unpack_limits: UnpackLimits::default(),
    };
    Runtime::open(config).context("open the runtime")
}

fn reference(registry: &str, repo: &str) -> Result<Reference> {
    let text = format!("{registry}/{repo}");
    text.parse()
        .map_err(|e| anyhow::anyhow!("image reference {text}: {e}"))
}

/// Pulls (or imports, with `--layouts`) and unpacks an image into the bench's runtime;
/// returns it and its layer dir names.
async fn image(bench: &Bench, repo: &str) -> Result<(ImageRecord, Vec<String>)> {
    let reference = reference(&bench.registry, repo)?;
    let image = match &bench.layouts {
        Some(dir) => {
            let name = repo.trim_start_matches("lull/");
            let name = name.split(':').next().unwrap_or(name);
            let layout = dir.join(name);
            bench
                .runtime
                .store
                .import_oci_layout(&layout, None, &reference)
                .await
                .with_context(|| format!("import the OCI layout {}", layout.display()))?
        }
        None => bench
            .runtime
            .store
            .pull(&reference, &PullOptions::default())
            .await
            .with_context(|| {
                format!(
                    "pull {reference} (is the registry up and `cargo xtask fixtures --bulk` run?)"
                )
            })?,
    };
    let layers = bench.runtime.prepare(&image).await?;
    Ok((image, layers))
}

// ---------------------------------------------------------------------------------------------
// Cold start

/// One cold start: how long the runtime call took and how long until the first `200`.
struct ColdStart {
    spawn: Duration,
    first_response: Duration,
}

async fn cold_start(bench: &Bench, plan: &Plan, report: &mut Report) -> Result<()> {
    let (image, layers) = image(bench, "lull/fixture-app:latest").await?;
    let netns_dir = bench.runtime.config.netns_dir();
    let mut lull = Vec::new();
    let mut runc = Vec::new();
    // One warm-up of each (page cache, runc binary, first cgroup creation), then interleaved.
    for i in 0..=plan.cold_starts {
        let l = lull_cold_start(bench, &image, &layers, &netns_dir).await?;
        let r = runc_cold_start(bench, &image, &layers, &netns_dir)?;
        if i > 0 {
            lull.push(l);
            runc.push(r);
        }
        eprint!(
            "\rcold start {i}/{}: lull {:.1} ms, {} {:.1} ms   ",
            plan.cold_starts,
            ms(last_total(&lull)),
            bench.oci,
            ms(last_total(&runc))
        );
    }
    eprintln!();

    let stats = |samples: &[ColdStart], f: fn(&ColdStart) -> Duration| {
        let v: Vec<f64> = samples.iter().map(|s| ms(f(s))).collect();
        (percentile(&v, 50.0), percentile(&v, 99.0))
    };
    let (lull_total50, lull_total99) = stats(&lull, |s| s.first_response);
    let (runc_total50, runc_total99) = stats(&runc, |s| s.first_response);
    let (lull_spawn50, lull_spawn99) = stats(&lull, |s| s.spawn);
    let (runc_spawn50, runc_spawn99) = stats(&runc, |s| s.spawn);

    let total_ratio = lull_total50 / runc_total50;
    report.rows.push(Row {
        name: format!(
            "cold start to first HTTP 200 (p50) vs {} pipeline",
            bench.oci
        ),
        target: "<= 0.8x".into(),
        measured: format!("{lull_total50:.1} ms"),
        baseline: format!("{runc_total50:.1} ms"),
        ratio: format!("{total_ratio:.2}x"),
        pass: Some(total_ratio <= 0.8),
    });
    report.rows.push(Row {
        name: "cold start to first HTTP 200 (p50), absolute".into(),
        target: "< 30 ms".into(),
        measured: format!("{lull_total50:.1} ms"),
        baseline: "-".into(),
        ratio: "-".into(),
        pass: Some(lull_total50 < 30.0),
    });
    let spawn_ratio = lull_spawn50 / runc_spawn50;
    report.rows.push(Row {
        name: format!("process spawn (p50): launch() vs {} run -d", bench.oci),
        target: "<= 0.6x".into(),
        measured: format!("{lull_spawn50:.1} ms"),
        baseline: format!("{runc_spawn50:.1} ms"),
        ratio: format!("{spawn_ratio:.2}x"),
        pass: Some(spawn_ratio <= 0.6),
    });
    report.details.push(format!(
        "cold start, fixture app, {} interleaved iterations each: lull p50 {lull_total50:.1} ms p99 {lull_total99:.1} ms; {} pipeline p50 {runc_total50:.1} ms p99 {runc_total99:.1} ms",
        lull.len(),
        bench.oci
    ));
    report.details.push(format!(
        "process spawn: lull launch() p50 {lull_spawn50:.1} ms p99 {lull_spawn99:.1} ms (overlay mount, spec, log pipes included); {} run -d p50 {runc_spawn50:.1} ms p99 {runc_spawn99:.1} ms (bundle already mounted)",
        bench.oci
    ));
    Ok(())
}

fn last_total(samples: &[ColdStart]) -> Duration {
    samples.last().map(|s| s.first_response).unwrap_or_default()
}

fn cold_request(
    id: &str,
    image: &ImageRecord,
    layers: &[String],
    netns: &NetNs,
) -> InstanceRequest {
    InstanceRequest {
        id: id.to_owned(),
        layers: layers.to_vec(),
        image: Runtime::image_process(image),
        overrides: ProcessOverrides {
            port: Some(APP_PORT),
            ..Default::default()
        },
        resources: INSTANCE_RESOURCES,
        netns: Some(netns.path().to_owned()),
        files: Vec::new(),
        log_limits: LogLimits::default(),
    }
}

async fn lull_cold_start(
    bench: &Bench,
    image: &ImageRecord,
    layers: &[String],
    netns_dir: &Path,
) -> Result<ColdStart> {
    let id = unique_name("lb");
    let netns = NetNs::create(netns_dir, &id).context("create a network namespace")?;
    let request = cold_request(&id, image, layers, &netns);
    let started = Instant::now();
    let launched = bench.runtime.instances.launch(request).await;
    let spawn = started.elapsed();
    let result = match launched {
        Ok(instance) => {
            let answered = probe_in(&netns);
            let deleted = bench.runtime.instances.delete(instance).await;
            answered.and_then(|at| {
                deleted.with_context(|| format!("delete instance {id}"))?;
                Ok(ColdStart {
                    spawn,
                    first_response: at - started,
                })
            })
        }
        Err(e) => {
            let _ = bench.runtime.instances.remove_files(&id);
            Err(e).with_context(|| format!("launch instance {id}"))
        }
    };
    netns.destroy().context("destroy a network namespace")?;
    result
}

/// The same pipeline with runc: overlay of the same layers, the same `config.json`, then
/// `runc run -d`.
fn runc_cold_start(
    bench: &Bench,
    image: &ImageRecord,
    layers: &[String],
    netns_dir: &Path,
) -> Result<ColdStart> {
    let id = unique_name("rb");
    let netns = NetNs::create(netns_dir, &id).context("create a network namespace")?;
    let bundle = bench.bundles.join(&id);
    let started = Instant::now();
    let result = runc_bundle(bench, &id, &bundle, image, layers, &netns).and_then(|()| {
        let spawn_started = Instant::now();
        runc_run_detached(bench, &id, &bundle)?;
        let spawn = spawn_started.elapsed();
        let at = probe_in(&netns)?;
        Ok(ColdStart {
            spawn,
            first_response: at - started,
        })
    });
    let cleaned = runc_cleanup(bench, &id, &bundle);
    netns.destroy().context("destroy a network namespace")?;
    let sample = result?;
    cleaned?;
    Ok(sample)
}

/// Mounts the overlay and writes `config.json` as the shim does.
fn runc_bundle(
    bench: &Bench,
    id: &str,
    bundle: &Path,
    image: &ImageRecord,
    layers: &[String],
    netns: &NetNs,
) -> Result<()> {
    let (rootfs, upper, work) = (
        bundle.join("rootfs"),
        bundle.join("upper"),
        bundle.join("work"),
    );
    for dir in [&rootfs, &upper, &work] {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let layers_dir = bench.runtime.config.layers_dir();
    overlay::mount_overlay(&layers_dir, layers, &upper, &work, &rootfs)?;
    let process = resolve_process(
        &Runtime::image_process(image),
        &ProcessOverrides {
            port: Some(APP_PORT),
            ..Default::default()
        },
    )?;
    let passwd = fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let group = fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let resolved = user::resolve_user(&process.user, &passwd, &group)?;
    let cfg = LaunchConfig {
        id: id.to_owned(),
        dir: bundle.to_owned(),
        layers_dir,
        layers: layers.to_vec(),
        state_root: bench.runc_root.clone(),
        process,
        hostname: id.to_owned(),
        netns: Some(netns.path().to_owned()),
        files: Vec::new(),
        cgroups_path: bench.runtime.instances.cgroups_path(id),
        resources: INSTANCE_RESOURCES.to_linux_resources()?,
        log_limits: LogLimits::default(),
        cgroup_binds: bench.runtime.instances.cgroup_binds(id)?,
        // runc applies the CPU limit from the spec's resources, on the instance's own group.
        cpu_limit_writes: Vec::new(),
        start_gate: None,
    };
    let config = bundle.join("config.json");
    spec::build_spec(&cfg, &resolved)
        .save(&config)
        .with_context(|| format!("write {}", config.display()))?;
    Ok(())
}

fn runc_run_detached(bench: &Bench, id: &str, bundle: &Path) -> Result<()> {
    // runc hands its stdio to the detached container: /dev/null in, a file out.
    let log_path = bundle.join("runc.log");
    let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let status = Command::new(&bench.oci)
        .arg("--root")
        .arg(&bench.runc_root)
        .args(["run", "-d", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicate the runc log fd")?)
        .stderr(log)
        .status()
        .with_context(|| format!("run {}", bench.oci))?;
    if !status.success() {
        let output = fs::read_to_string(&log_path).unwrap_or_default();
        bail!("{} run -d {id}: {status}: {}", bench.oci, output.trim());
    }
    Ok(())
}

fn runc_cleanup(bench: &Bench, id: &str, bundle: &Path) -> Result<()> {
    let output = Command::new(&bench.oci)
        .arg("--root")
        .arg(&bench.runc_root)
        .args(["delete", "-f", id])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {} delete", bench.oci))?;
    let deleted = if output.status.success()
        || String::from_utf8_lossy(&output.stderr).contains("does not exist")
    {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "{} delete -f {id}: {}: {}",
            bench.oci,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    };
    overlay::unmount(&bundle.join("rootfs"))?;
    if bundle.exists() {
        fs::remove_dir_all(bundle).with_context(|| format!("remove {}", bundle.display()))?;
    }
    deleted
}

/// Polls `GET /` on the app's port inside `netns` until it answers `200`; returns when.
fn probe_in(netns: &NetNs) -> Result<Instant> {
    netns
        .run_in(probe_until_ok)
        .context("enter the namespace")?
}

fn probe_until_ok() -> Result<Instant> {
    let addr = SocketAddr::from(([127, 0, 0, 1], APP_PORT));
    let started = Instant::now();
    loop {
        let last_error = match get_status(addr) {
            Ok(line) if line.split(' ').nth(1) == Some("200") => return Ok(Instant::now()),
            Ok(line) => format!("answered {line:?}"),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > PROBE_DEADLINE {
            bail!("GET http://{addr}/ did not answer 200 within {PROBE_DEADLINE:?}: {last_error}");
        }
        std::thread::sleep(PROBE_INTERVAL);
    }
}

/// The status line of `GET /`.
fn get_status(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

// ---------------------------------------------------------------------------------------------
// The CPU gate

/// `/proc/<pid>/schedstat` held open: time on CPU (ns), time waiting to run (ns), times
/// scheduled in. The third field changes the moment the task is switched in, which the cgroup's
/// usage counter does not show until the next scheduler tick.
struct SchedStat {
    file: File,
    path: PathBuf,
}

impl SchedStat {
    fn open(pid: i32) -> Result<SchedStat> {
        let path = PathBuf::from(format!("/proc/{pid}/schedstat"));
        let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        Ok(SchedStat { file, path })
    }

    /// (ns on CPU, times scheduled in).
    fn read(&self) -> Result<(u64, u64)> {
        let mut buf = [0u8; 128];
        let n = self
            .file
            .read_at(&mut buf, 0)
            .with_context(|| format!("read {}", self.path.display()))?;
        let text = std::str::from_utf8(&buf[..n]).unwrap_or_default();
        let fields: Vec<u64> = text
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        match fields.as_slice() {
            [run, _, count, ..] => Ok((*run, *count)),
            _ => bail!("{}: unexpected contents {text:?}", self.path.display()),
        }
    }
}

/// How long the gate's pollers sleep between reads: short enough to time the restore to a few
/// tens of microseconds, long enough that the poller leaves the CPU to the spinner when both
/// share one (a busy-polling poller delays the very thing it measures by up to a tick).
const POLL_NAP: Duration = Duration::from_micros(10);

fn nap() {
    std::thread::sleep(POLL_NAP);
}

/// Polls `read` until its value has not changed for [`STILL_FOR`]; returns the time of
/// the last change (the moment the task left the CPU, since its time is brought up to date
/// then), or `since` when it never changed.
fn wait_until_still<T: PartialEq>(
    since: Instant,
    mut read: impl FnMut() -> Result<T>,
) -> Result<Instant> {
    let mut last = read()?;
    let mut last_change = since;
    loop {
        let now = Instant::now();
        if now - last_change >= STILL_FOR {
            return Ok(last_change);
        }
        if now - since > GATE_DEADLINE {
            bail!("the throttled spinner kept running for {GATE_DEADLINE:?}");
        }
        nap();
        let value = read()?;
        if value != last {
            last = value;
            last_change = Instant::now();
        }
    }
}

/// Polls `read` until it differs from its value before; returns when.
fn wait_until_changed<T: PartialEq>(
    since: Instant,
    before: T,
    mut read: impl FnMut() -> Result<T>,
) -> Result<Instant> {
    loop {
        if read()? != before {
            return Ok(Instant::now());
        }
        nap();
        if since.elapsed() > GATE_DEADLINE {
            bail!("the restored spinner did not run within {GATE_DEADLINE:?}");
        }
    }
}

async fn gate(bench: &Bench, plan: &Plan, report: &mut Report) -> Result<()> {
    let (image, layers) = image(bench, "lull/busybox:latest").await?;
    let id = unique_name("gb");
    let request = InstanceRequest {
        id: id.clone(),
        layers,
        image: Runtime::image_process(&image),
        overrides: ProcessOverrides {
            entrypoint: Some(vec!["sh".into()]),
            cmd: Some(vec!["-c".into(), "while :; do :; done".into()]),
            ..Default::default()
        },
        resources: Resources {
            cpu: Some(1.0),
            ..Default::default()
        },
        netns: None,
        files: Vec::new(),
        log_limits: LogLimits::default(),
    };
    let instance = match bench.runtime.instances.launch(request).await {
        Ok(instance) => instance,
        Err(e) => {
            let _ = bench.runtime.instances.remove_files(&id);
            return Err(e).context("launch the spinner");
        }
    };
    let measured = measure_gate(&instance, plan);
    // Leave the spinner unthrottled so that it dies promptly.
    bench
        .runtime
        .instances
        .delete(instance)
        .await
        .context("delete the spinner")?;
    let m = measured?;

    let restore99 = percentile(&m.restore_us, 99.0);
    report.rows.push(Row {
        name: "gate: restore to spinner on CPU (p99)".into(),
        target: "<= 200 us".into(),
        measured: format!("{restore99:.0} us"),
        baseline: "-".into(),
        ratio: "-".into(),
        pass: Some(restore99 <= 200.0),
    });
    report.rows.push(Row {
        name: "gate: throttle to spinner off CPU (p99)".into(),
        target: "(none)".into(),
        measured: format!("{:.2} ms", percentile(&m.throttle_ms, 99.0)),
        baseline: "-".into(),
        ratio: "-".into(),
        pass: None,
    });
    report.rows.push(Row {
        name: format!(
            "gate: CPU share in the first {} ms after restore",
            AFTER_RESTORE_WINDOW.as_millis()
        ),
        target: "(none)".into(),
        measured: format!("{:.1}%", m.after_restore_share * 100.0),
        baseline: format!("{:.1}%", m.restored_share * 100.0),
        ratio: format!("{:.2}x", m.after_restore_share / m.restored_share),
        pass: None,
    });
    let factor = m.restored_share / m.throttled_share;
    report.rows.push(Row {
        name: "gate: throttle factor (CPU share restored / throttled)".into(),
        target: ">= 300x".into(),
        measured: format!("{:.3}%", m.throttled_share * 100.0),
        baseline: format!("{:.1}%", m.restored_share * 100.0),
        ratio: format!("{factor:.0}x"),
        pass: Some(factor >= 300.0),
    });
    report.details.push(format!(
        "gate restore, {} cycles (write to the spinner's next switch-in, /proc/<pid>/schedstat): p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        m.restore_us.len(),
        percentile(&m.restore_us, 50.0),
        restore99,
        percentile(&m.restore_us, 100.0)
    ));
    report.details.push(format!(
        "gate restore seen through the cgroup's usage counter instead, {} cycles: p50 {:.0} us, p99 {:.0} us (the counter only moves at a scheduler tick or a switch)",
        m.restore_usage_us.len(),
        percentile(&m.restore_usage_us, 50.0),
        percentile(&m.restore_usage_us, 99.0)
    ));
    report.details.push(format!(
        "CPU share right after a restore: {:.1}% over the first {} ms, against {:.1}% in the steady state",
        m.after_restore_share * 100.0,
        AFTER_RESTORE_WINDOW.as_millis(),
        m.restored_share * 100.0
    ));
    report.details.push(format!(
        "gate throttle (write to the spinner's last time on CPU, confirmed by {} ms without running): p50 {:.2} ms, p99 {:.2} ms",
        STILL_FOR.as_millis(),
        percentile(&m.throttle_ms, 50.0),
        percentile(&m.throttle_ms, 99.0)
    ));
    report.details.push(format!(
        "throttle factor: busybox spinner with cpu 1.0 got {:.1}% of a CPU over {:?} restored (steady state, over 1 s after the restore) and {:.3}% over {:.1} s throttled (whole throttled cycles; quota 1 ms per 1 s period); against its 1-vCPU limit instead of what it got restored, the factor is {:.0}x",
        m.restored_share * 100.0,
        plan.restored_window,
        m.throttled_share * 100.0,
        m.throttled_window.as_secs_f64(),
        1.0 / m.throttled_share
    ));
    Ok(())
}

struct GateFigures {
    restore_us: Vec<f64>,
    restore_usage_us: Vec<f64>,
    throttle_ms: Vec<f64>,
    after_restore_share: f64,
    restored_share: f64,
    throttled_share: f64,
    throttled_window: Duration,
}

fn measure_gate(instance: &Instance, plan: &Plan) -> Result<GateFigures> {
    let gate: CpuGate = instance.open_gate().context("open the gate")?;
    let sched = SchedStat::open(instance.init_pid())?;
    let usage = || {
        instance
            .cgroup
            .cpu_usage_ns()
            .context("read the spinner's cgroup CPU usage")
    };
    let mut figures = GateFigures {
        restore_us: Vec::new(),
        restore_usage_us: Vec::new(),
        throttle_ms: Vec::new(),
        after_restore_share: 0.0,
        restored_share: 0.0,
        throttled_share: 0.0,
        throttled_window: Duration::ZERO,
    };
    // SAFETY: prctl with PR_SET_TIMERSLACK takes an integer; 1 ns makes the pollers' short
    // sleeps as short as asked (the default slack is 50 us).
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    std::thread::sleep(Duration::from_millis(100)); // the shell is up and spinning

    // Every cycle: throttle, wait until the spinner is off the CPU, restore, wait until it
    // runs again. Every fourth restore is watched through the cgroup's usage counter instead.
    for cycle in 0..plan.gate_cycles {
        let written = Instant::now();
        gate.throttle().context("throttle")?;
        let stopped = wait_until_still(written, || sched.read())?;
        figures.throttle_ms.push(ms(stopped - written));

        let watch_usage = cycle % 4 == 3;
        let restored_at = if watch_usage {
            let before = usage()?;
            let written = Instant::now();
            gate.restore().context("restore")?;
            let at = wait_until_changed(written, before, usage)?;
            figures.restore_usage_us.push(us(at - written));
            at
        } else {
            let before = sched.read()?;
            let written = Instant::now();
            gate.restore().context("restore")?;
            let at = wait_until_changed(written, before, || sched.read())?;
            figures.restore_us.push(us(at - written));
            at
        };
        // Let it run a little before throttling again.
        std::thread::sleep(Duration::from_millis(2).saturating_sub(restored_at.elapsed()));
    }

    let share = |window: Duration| -> Result<f64> {
        let before = usage()?;
        let started = Instant::now();
        std::thread::sleep(window);
        let used = usage()? - before;
        Ok(used as f64 / started.elapsed().as_nanos() as f64)
    };
    // Right after a restore from a settled throttle: the CPU the spinner gets in the first
    // moments is what a request arriving at an idle instance gets.
    let written = Instant::now();
    gate.throttle().context("throttle")?;
    wait_until_still(written, || sched.read())?;
    std::thread::sleep(Duration::from_millis(100));
    gate.restore().context("restore")?;
    figures.after_restore_share = share(AFTER_RESTORE_WINDOW)?;
    // Steady state: past the end of any period that began while throttled (1 s).
    std::thread::sleep(Duration::from_millis(1100));
    figures.restored_share = share(plan.restored_window)?;
    let written = Instant::now();
    gate.throttle().context("throttle")?;
    wait_until_still(written, || sched.read())?;
    // A throttled spinner runs in bursts: each period's 1 ms, overrun until the next tick, the
    // overrun paid back from the following periods. The window runs from the start of one burst
    // to the start of a later one, so that it holds whole cycles and no partial one.
    let next_burst = || -> Result<()> {
        let started = Instant::now();
        wait_until_still(started, || sched.read())?;
        let (_, count) = sched.read()?;
        while sched.read()?.1 == count {
            if started.elapsed() > THROTTLE_DEBT_DEADLINE {
                bail!("the throttled spinner did not run at all in {THROTTLE_DEBT_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    };
    next_burst()?;
    let (before, started) = (usage()?, Instant::now());
    loop {
        next_burst()?;
        if started.elapsed() >= plan.throttled_window {
            break;
        }
    }
    let used = usage()? - before;
    figures.throttled_window = started.elapsed();
    figures.throttled_share = used as f64 / figures.throttled_window.as_nanos() as f64;
    gate.restore().context("restore")?;
    Ok(figures)
}

// ---------------------------------------------------------------------------------------------
// Pull + unpack

async fn pull_unpack(bench: &Bench, plan: &Plan, report: &mut Report) -> Result<()> {
    let repo = "lull/bulk:latest";
    let reference = reference(&bench.registry, repo)?;
    let mut lull = Vec::new();
    let mut peer = Vec::new();
    let mut bytes = 0u64;
    // One warm-up each (the registry's files into the page cache), then interleaved.
    for i in 0..=plan.pulls {
        let dir = ScratchDir::new("lull-bench-pull").context("create a pull scratch dir")?;
        let runtime = open_runtime(dir.path(), &bench.cgroups.parent, &bench.zygote)?;
        let started = Instant::now();
        let image = runtime
            .store
            .pull(&reference, &PullOptions::default())
            .await
            .with_context(|| {
                format!("pull {reference} (run `cargo xtask fixtures --bulk` to push it)")
            })?;
        runtime.prepare(&image).await?;
        let lull_took = started.elapsed();
        bytes = image.layers.iter().map(|l| l.size).sum();
        drop(runtime);
        drop(dir);

        let dir = ScratchDir::new("lull-bench-skopeo").context("create a pull scratch dir")?;
        let layout = dir.path().join("layout");
        let bundle = dir.path().join("bundle");
        let started = Instant::now();
        run_tool(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .arg(format!("docker://{}/{repo}", bench.registry))
                .arg(format!("oci:{}:latest", layout.display())),
        )?;
        run_tool(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:latest", layout.display()))
                .arg(&bundle),
        )?;
        let peer_took = started.elapsed();
        drop(dir);
        if i > 0 {
            lull.push(lull_took.as_secs_f64());
            peer.push(peer_took.as_secs_f64());
        }
        eprintln!(
            "pull + unpack {i}/{}: lull {:.2} s, skopeo + umoci {:.2} s",
            plan.pulls,
            lull_took.as_secs_f64(),
            peer_took.as_secs_f64()
        );
    }
    let (lull50, peer50) = (percentile(&lull, 50.0), percentile(&peer, 50.0));
    let mb = bytes as f64 / 1e6;
    let ratio = lull50 / peer50;
    report.rows.push(Row {
        name: format!("pull + unpack {repo} ({mb:.0} MB) vs skopeo + umoci"),
        target: "<= 1.0x time".into(),
        measured: format!("{lull50:.2} s ({:.0} MB/s)", mb / lull50),
        baseline: format!("{peer50:.2} s ({:.0} MB/s)", mb / peer50),
        ratio: format!("{ratio:.2}x"),
        pass: Some(ratio <= 1.0),
    });
    report.details.push(format!(
        "pull + unpack, {} interleaved iterations each, fresh store each time, compressed size {mb:.1} MB: lull p50 {lull50:.2} s; skopeo copy + umoci unpack p50 {peer50:.2} s",
        lull.len()
    ));
    Ok(())
}

fn run_tool(command: &mut Command) -> Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

//! Privileged: instances launched through the zygote, shim and libcontainer, on a layer made by
//! hand from Debian's busybox-static (the image store has its own tests).

use std::time::Duration;

use lull_runtime::cgroup::{Gate, Resources};
use lull_runtime::instance::{InstanceRequest, StartGate};
use lull_runtime::logs::{self, Stream};
use lull_tests::busybox::BusyboxHost;
use lull_tests::scratch::{mounts_under, unique_name};

fn fixture() -> BusyboxHost {
    BusyboxHost::new("lull-inst", env!("CARGO_BIN_EXE_lull-test-zygote"))
}

fn request(f: &BusyboxHost, id: &str, script: &str) -> InstanceRequest {
    f.script(id, script)
}

#[tokio::test]
async fn runs_isolated_and_records_output_and_exit() {
    let f = fixture();
    let id = unique_name("i");
    let script = "echo out-line; echo err-line >&2; echo host=$(hostname); echo pid=$$; echo uid=$(id -u); ls /proc | grep -c '^[0-9]'; exit 3";
    let mut req = request(&f, &id, script);
    req.overrides.user = Some("app".into());
    let inst = f.manager.launch(req).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), inst.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code, Some(3), "{status:?}");

    let records = logs::read_all(&inst.paths().logs()).unwrap();
    let out: Vec<&str> = records
        .iter()
        .filter(|r| r.stream == Stream::Stdout)
        .map(|r| r.text.as_str())
        .collect();
    let err: Vec<&str> = records
        .iter()
        .filter(|r| r.stream == Stream::Stderr)
        .map(|r| r.text.as_str())
        .collect();
    assert_eq!(out[0], "out-line");
    assert_eq!(err, vec!["err-line"]);
    assert!(out.contains(&format!("host={id}").as_str()), "{out:?}");
    assert!(
        out.contains(&"pid=1"),
        "the shell is pid 1 in its own pid namespace: {out:?}"
    );
    assert!(out.contains(&"uid=1000"), "runs as the image user: {out:?}");
    // Only the shell and the few commands of the pipeline are visible, not the host's processes.
    let visible: usize = out.last().unwrap().parse().unwrap();
    assert!(visible <= 4, "{visible} processes visible inside: {out:?}");

    f.manager.delete(inst).await.unwrap();
    assert!(mounts_under(f.scratch.path()).is_empty());
    assert!(!f.scratch.path().join("instances").join(&id).exists());
    assert!(!f.scratch.path().join("state").join(&id).exists());
    for dir in f.cgroups.dirs() {
        assert!(
            !dir.join(&id).exists(),
            "cgroup {} left behind",
            dir.join(&id).display()
        );
    }
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill() {
    let f = fixture();
    // A pid 1 that ignores SIGTERM must be killed after the grace period.
    let inst = f
        .manager
        .launch(request(
            &f,
            &unique_name("i"),
            "trap '' TERM; while :; do sleep 1; done",
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let status = inst.stop(Duration::from_millis(500)).await.unwrap();
    assert_eq!(status.signal, Some(libc::SIGKILL), "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    f.manager.delete(inst).await.unwrap();
}

#[tokio::test]
async fn a_missing_command_fails_with_the_reason() {
    let f = fixture();
    let mut req = request(&f, &unique_name("i"), "");
    req.image.cmd = vec!["/no/such/binary".into()];
    let id = req.id.clone();
    // libcontainer checks the executable before the instance starts: the launch itself fails,
    // at once, naming it, and leaves no mount, state or cgroup behind.
    let started = std::time::Instant::now();
    let err = f
        .manager
        .launch(req)
        .await
        .expect_err("a missing executable must fail the launch");
    assert!(err.to_string().contains("/no/such/binary"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(mounts_under(f.scratch.path()).is_empty());
    assert!(!f.scratch.path().join("state").join(&id).exists());
    f.manager.remove_files(&id).unwrap();
}

#[tokio::test]
async fn a_start_gate_holds_the_process_until_it_opens() {
    let f = fixture();
    let id = unique_name("i");
    let req = request(&f, &id, "echo started; sleep 30");
    // The gate opens 500 ms after the launch begins (the daemon's network wiring, say); the
    // instance's process must not have run before.
    let opened_at = std::sync::Arc::new(std::sync::Mutex::new(None));
    let opened = opened_at.clone();
    let gate: StartGate = Box::pin(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        *opened.lock().unwrap() = Some(chrono::Utc::now());
        Ok(())
    });
    let inst = f.manager.launch_when(req, Some(gate)).await.unwrap();
    let opened = opened_at.lock().unwrap().expect("the gate was awaited");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let first = loop {
        let records = logs::read_all(&inst.paths().logs()).unwrap();
        if let Some(r) = records.into_iter().find(|r| r.text == "started") {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no output");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let printed = chrono::DateTime::parse_from_rfc3339(&first.time).unwrap();
    assert!(
        printed >= opened,
        "the process printed at {printed}, before its gate opened at {opened}"
    );
    assert!(!inst.paths().start_gate().exists(), "the FIFO is removed");
    f.manager.delete(inst).await.unwrap();
}

#[tokio::test]
async fn a_start_called_off_leaves_no_process_mount_or_state() {
    let f = fixture();
    let id = unique_name("i");
    let req = request(&f, &id, "echo started; sleep 30");
    let gate: StartGate = Box::pin(async { Err("network: no veth for you".to_string()) });
    let err = f
        .manager
        .launch_when(req, Some(gate))
        .await
        .expect_err("a start called off must fail the launch");
    assert!(
        err.to_string().contains("network: no veth for you"),
        "the gate's reason: {err}"
    );
    assert!(mounts_under(f.scratch.path()).is_empty());
    assert!(!f.scratch.path().join("state").join(&id).exists());
    let logs_dir = f.scratch.path().join("instances").join(&id).join("logs");
    let records = logs::read_all(&logs_dir).unwrap_or_default();
    assert!(records.is_empty(), "the process ran: {records:?}");
    f.manager.remove_files(&id).unwrap();
    for dir in f.cgroups.dirs() {
        assert!(
            !dir.join(&id).exists(),
            "cgroup {} left",
            dir.join(&id).display()
        );
    }
}

#[tokio::test]
async fn memory_limit_kills_are_reported_as_oom() {
    let f = fixture();
    let mut req = request(
        &f,
        &unique_name("i"),
        "exec dd if=/dev/zero of=/dev/null bs=64M count=1",
    );
    req.resources = Resources {
        memory_bytes: Some(16 << 20),
        ..Default::default()
    };
    let inst = f.manager.launch(req).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), inst.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.oom_killed, "{status:?}");
    assert!(status.to_string().contains("OOM"), "{status}");
    f.manager.delete(inst).await.unwrap();
}

/// CPU used by the instance over `window`, as a fraction of one CPU, from its cgroup counter.
async fn cpu_share(inst: &lull_runtime::instance::Instance, window: Duration) -> f64 {
    let before = inst.cgroup.cpu_usage_ns().unwrap();
    let started = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let used = inst.cgroup.cpu_usage_ns().unwrap() - before;
    used as f64 / started.elapsed().as_nanos() as f64
}

#[tokio::test]
async fn the_gate_throttles_a_spinner_and_restores_it() {
    let f = fixture();
    let mut req = request(&f, &unique_name("i"), "while :; do :; done");
    req.resources = Resources {
        cpu: Some(1.0),
        ..Default::default()
    };
    let inst = f.manager.launch(req).await.unwrap();
    let gate = inst.open_gate().unwrap();

    // Thresholds for the unthrottled share stay low: CI machines are shared and busy.
    let restored = cpu_share(&inst, Duration::from_millis(500)).await;
    assert!(
        restored > 0.1,
        "spinner got only {:.1}% of a CPU before throttling",
        restored * 100.0
    );

    assert!(gate.throttle().unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await; // the quota already granted runs out
    let throttled = cpu_share(&inst, Duration::from_secs(2)).await;
    assert!(
        throttled <= 0.003,
        "throttled spinner still got {:.3}% of a CPU",
        throttled * 100.0
    );

    assert!(gate.restore().unwrap());
    // Measured from 150 ms after the restore: by then a spinner has spent a whole 100 ms quota,
    // so a restore that left the kernel's 1 s throttled period timer in charge would show
    // (almost) nothing here.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let resumed = cpu_share(&inst, Duration::from_millis(700)).await;
    assert!(
        resumed > 0.1,
        "spinner got only {:.1}% of a CPU after restore",
        resumed * 100.0
    );
    eprintln!(
        "restored {:.1}%, throttled {:.3}%, resumed {:.1}%",
        restored * 100.0,
        throttled * 100.0,
        resumed * 100.0
    );
    f.manager.delete(inst).await.unwrap();
}

/// Runs `req` to its end, requires exit code 0, and returns the instance and its output lines.
async fn run_to_success(
    f: &BusyboxHost,
    req: InstanceRequest,
) -> (lull_runtime::instance::Instance, Vec<String>) {
    let inst = f.manager.launch(req).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), inst.wait())
        .await
        .unwrap()
        .unwrap();
    let out: Vec<String> = logs::read_all(&inst.paths().logs())
        .unwrap()
        .into_iter()
        .map(|r| r.text)
        .collect();
    assert_eq!(status.code, Some(0), "{status:?} {out:?}");
    (inst, out)
}

#[tokio::test]
async fn a_root_app_reads_but_cannot_raise_its_own_limits() {
    let f = fixture();
    let script = "if [ -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; \
                  then f=/sys/fs/cgroup/cpu/cpu.cfs_quota_us; v=-1; else f=/sys/fs/cgroup/cpu.max; v=max; fi; \
                  cat $f; if (echo $v > $f) 2>/dev/null; then echo raised; else echo refused; fi";
    let mut req = request(&f, &unique_name("i"), script);
    req.resources = Resources {
        cpu: Some(0.1),
        ..Default::default()
    };
    let (inst, out) = run_to_success(&f, req).await;
    assert!(
        out[0] == "10000" || out[0] == "10000 100000",
        "the app sees its own limit: {out:?}"
    );
    assert_eq!(
        out[1], "refused",
        "a root app raised its own CPU limit: {out:?}"
    );
    assert_eq!(
        inst.limit_cgroup.cpu_limit().unwrap().quota_us(),
        Some(10_000)
    );
    f.manager.delete(inst).await.unwrap();
}

#[tokio::test]
async fn a_root_app_runs_under_the_seccomp_filter() {
    let f = fixture();
    // A user namespace needs no capability, only the filter refuses it; threads and forks
    // (busybox forks for each command) still work.
    let script = "grep '^Seccomp:' /proc/self/status; \
                  if unshare -U true 2>/dev/null; then echo userns; else echo refused; fi; \
                  if unshare -n true 2>/dev/null; then echo netns; else echo refused; fi; \
                  echo forked | cat";
    let (inst, out) = run_to_success(&f, request(&f, &unique_name("i"), script)).await;
    assert_eq!(
        out,
        ["Seccomp:\t2", "refused", "refused", "forked"],
        "the filter (mode 2) refuses new namespaces"
    );
    f.manager.delete(inst).await.unwrap();
}

#[tokio::test]
async fn a_root_app_cannot_open_host_devices() {
    let f = fixture();
    // The host's first disk (virtio or SCSI) and /dev/mem: made with CAP_MKNOD, refused by the
    // devices cgroup when opened.
    let script = "for d in 'b 253 0' 'b 8 0' 'c 1 1'; do mknod /tmp/dev $d; \
                  if head -c 1 /tmp/dev >/dev/null 2>&1; then echo \"opened $d\"; else echo \"refused $d\"; fi; \
                  rm /tmp/dev; done; head -c 1 /dev/zero | wc -c";
    let (inst, out) = run_to_success(&f, request(&f, &unique_name("i"), script)).await;
    assert_eq!(
        out[..3],
        ["refused b 253 0", "refused b 8 0", "refused c 1 1"],
        "{out:?}"
    );
    f.manager.delete(inst).await.unwrap();
}

#[tokio::test]
async fn a_dead_zygote_is_replaced_for_the_next_launch() {
    let f = fixture();
    let first = f
        .manager
        .launch(request(&f, &unique_name("i"), "true"))
        .await
        .unwrap();
    first.wait().await.unwrap();
    f.manager.delete(first).await.unwrap();
    let ours = f.manager.zygote_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ours),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let id = unique_name("i");
    match f.manager.launch(request(&f, &id, "true")).await {
        Err(e) => assert!(e.to_string().contains("zygote"), "{e}"),
        Ok(inst) => panic!("launched {} through a dead zygote", inst.id),
    }
    let _ = f.manager.remove_files(&id);
    let again = f
        .manager
        .launch(request(&f, &unique_name("i"), "echo back"))
        .await
        .unwrap();
    assert_eq!(again.wait().await.unwrap().code, Some(0));
    assert_ne!(
        f.manager.zygote_pid(),
        ours,
        "a new zygote serves the next launch"
    );
    f.manager.delete(again).await.unwrap();
}

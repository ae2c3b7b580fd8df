//! Privileged: the process managing instances is killed with SIGKILL while an app logs
//! continuously. The app keeps running, no log line is lost, an instance that exits meanwhile
//! has its status recorded, and a new manager adopts what still runs.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use lull_runtime::instance::{InstanceManager, InstancesConfig, Recovered, ShimState};
use lull_runtime::logs;
use lull_tests::busybox::busybox_layer;
use lull_tests::scratch::{CgroupParentGuard, ScratchDir, mounts_under, unique_name};

#[tokio::test]
async fn instances_outlive_a_killed_manager_without_losing_output() {
    let scratch = ScratchDir::new("lull-death").unwrap();
    let cgroups = CgroupParentGuard::new("lull-test");
    let dirs = ["instances", "layers", "state"].map(|d| scratch.path().join(d));
    let layer = busybox_layer(&dirs[1]);
    let logger = unique_name("log");
    let quitter = unique_name("quit");
    let victim = unique_name("victim");
    let orphan = unique_name("orphan");
    let mut manager = Command::new(env!("CARGO_BIN_EXE_lull-test-manager"))
        .args(dirs.iter().map(|d| d.as_os_str()))
        .arg(&cgroups.parent)
        .arg(env!("CARGO_BIN_EXE_lull-test-zygote"))
        .arg(&layer)
        .args([
            &logger,
            "trap 'exit 0' TERM; i=0; while :; do i=$((i+1)); echo tick $i; usleep 500; done",
        ])
        .args([&quitter, "sleep 1; echo bye; exit 7"])
        .args([&victim, "while :; do sleep 1; done"])
        .args([&orphan, "while :; do echo still here; sleep 1; done"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(manager.stdout.take().unwrap()).lines();
    let mut zygote_pids = Vec::new();
    loop {
        let line = lines.next().expect("manager output").unwrap();
        if line == "ready" {
            break;
        }
        assert!(line.starts_with("launched "), "{line}");
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if stat.contains("(lull-test-zygo")
            && stat.split(' ').nth(3) == Some(&manager.id().to_string())
        {
            zygote_pids.push(entry.file_name().into_string().unwrap());
        }
    }
    assert_eq!(zygote_pids.len(), 1, "the manager has one zygote");

    tokio::time::sleep(Duration::from_millis(300)).await;
    manager.kill().unwrap(); // SIGKILL
    manager.wait().unwrap();
    // A third instance loses its shim and its process while nobody watches (a crash of the
    // machine's own making): its status is lost and the next manager must clean it up.
    let victim_state: ShimState =
        serde_json::from_slice(&std::fs::read(dirs[0].join(&victim).join("state.json")).unwrap())
            .unwrap();
    // A fourth loses only its shim: it would run on with nobody draining its output.
    let orphan_state: ShimState =
        serde_json::from_slice(&std::fs::read(dirs[0].join(&orphan).join("state.json")).unwrap())
            .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(orphan_state.shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    for pid in [victim_state.shim_pid, victim_state.init_pid] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    // The app goes on logging, and the second instance exits, while nobody manages them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let zygote_stat =
        std::fs::read_to_string(PathBuf::from("/proc").join(&zygote_pids[0]).join("stat"))
            .unwrap_or_default();
    let zygote_state = zygote_stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
    assert!(
        !zygote_stat.contains("(lull-test-zygo") || zygote_state == Some("Z"),
        "the zygote dies with its manager: {zygote_stat}"
    );

    let manager = InstanceManager::new(InstancesConfig {
        instances_dir: dirs[0].clone(),
        layers_dir: dirs[1].clone(),
        state_root: dirs[2].clone(),
        cgroup_parent: cgroups.parent.clone(),
        zygote_program: PathBuf::from(env!("CARGO_BIN_EXE_lull-test-zygote")),
        zygote_args: vec![],
    })
    .unwrap();
    let mut running = None;
    let mut exited = None;
    let mut removed = false;
    let mut orphan_removed = false;
    for found in manager.recover().unwrap() {
        match found {
            Recovered::Running(inst) if inst.id == logger => running = Some(inst),
            Recovered::Exited(inst, status) if inst.id == quitter => exited = Some((inst, status)),
            Recovered::Removed { id } if id == victim => removed = true,
            Recovered::Removed { id } if id == orphan => orphan_removed = true,
            other => panic!("unexpected recovery result {other:?}"),
        }
    }
    assert!(removed, "the dead instance is classified as removed");
    assert!(
        orphan_removed,
        "the instance without a shim is ended and removed"
    );
    let orphan_stat = std::fs::read_to_string(format!("/proc/{}/stat", orphan_state.init_pid))
        .unwrap_or_default();
    assert!(
        orphan_stat.is_empty()
            || orphan_stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        "the shimless instance's process was ended: {orphan_stat}"
    );
    assert!(!dirs[0].join(&orphan).exists());
    assert!(!dirs[0].join(&victim).exists(), "its instance dir is gone");
    assert!(
        !dirs[2].join(&victim).exists(),
        "its libcontainer state is gone"
    );
    assert!(
        !mounts_under(scratch.path())
            .iter()
            .any(|m| m.to_string_lossy().contains(&victim)),
        "its rootfs is unmounted"
    );
    for dir in cgroups.dirs() {
        assert!(
            !dir.join(&victim).exists(),
            "its cgroup {} is gone",
            dir.join(&victim).display()
        );
    }
    let (quit_inst, status) =
        exited.expect("the instance that exited meanwhile is found with its status");
    assert_eq!(status.code, Some(7));
    let quit_logs = logs::read_all(&quit_inst.paths().logs()).unwrap();
    assert_eq!(
        quit_logs
            .iter()
            .map(|r| r.text.as_str())
            .collect::<Vec<_>>(),
        vec!["bye"]
    );

    let inst = running.expect("the logging instance is adopted");
    let status = inst.stop(Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.code, Some(0), "{status:?}");
    let records = logs::read_all(&inst.paths().logs()).unwrap();
    let ticks: Vec<u64> = records
        .iter()
        .map(|r| {
            r.text
                .strip_prefix("tick ")
                .expect("only ticks")
                .parse()
                .unwrap()
        })
        .collect();
    assert!(ticks.len() > 100, "only {} lines logged", ticks.len());
    for (i, t) in ticks.iter().enumerate() {
        assert_eq!(*t, i as u64 + 1, "line {} lost or duplicated", i + 1);
    }
    manager.delete(inst).await.unwrap();
    manager.delete(quit_inst).await.unwrap();
    assert!(mounts_under(scratch.path()).is_empty());
}

//! Privileged: `exec` in a real instance (libcontainer's tenant builder through the zygote).
//! The daemon's real host starts the busybox fixture image (the fixture app's image has no
//! shell) and runs commands in it: output on stdout and stderr, stdin forwarded and closed, an
//! exit code, a missing command (127), a terminal of the asked size with a resize, and, through
//! the runtime, the command's process checked to be in the instance's cgroup and network
//! namespace. Then everything is removed. Preconditions: root, the registry on 127.0.0.1:5000
//! with the fixture images (`cargo xtask fixtures`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lull_daemon::host::real::{RealHost, RealHostConfig};
use lull_daemon::host::{
    ExecProcess, ExecRequest, HostError, InstanceHost, InstanceLimits, StartRequest, instance_id,
};
use lull_netns::network::InstanceNetwork;
use lull_runtime::instance::{ExecRequest as RuntimeExec, Recovered, WindowSize};
use lull_tests::e2e::{BUSYBOX, TestRuntime, reference, require_registry};
use lull_tests::host_net::Host;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn exec_runs_commands_inside_a_real_instance() {
    let host = Host::new();
    let zygote = Path::new(env!("CARGO_BIN_EXE_lull-test-zygote"));
    require_registry();
    let t = TestRuntime::new("lull-exec-host", zygote);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        t.runtime
            .store
            .pull(&reference(BUSYBOX), &Default::default())
            .await
            .unwrap();
    });
    host.run(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(scenario(&host, &t));
    });
}

fn command(args: &[&str]) -> ExecRequest {
    ExecRequest {
        command: args.iter().map(|s| s.to_string()).collect(),
        ..ExecRequest::default()
    }
}

/// Everything a command wrote and how it ended, after `input` on its stdin (then closed).
async fn run(process: ExecProcess, input: &[u8]) -> (String, String, Option<i32>) {
    let ExecProcess {
        mut stdin,
        mut stdout,
        stderr,
        exit,
        ..
    } = process;
    stdin.write_all(input).await.unwrap();
    drop(stdin);
    let mut out = Vec::new();
    let mut err = Vec::new();
    let read_err = async {
        if let Some(mut stderr) = stderr {
            stderr.read_to_end(&mut err).await.unwrap();
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let (_, _, exit) = tokio::join!(stdout.read_to_end(&mut out), read_err, exit);
        exit
    })
    .await
    .expect("the command ends in time")
    .unwrap();
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        ended.code,
    )
}

async fn scenario(host: &Host, t: &TestRuntime) {
    let network: Arc<dyn InstanceNetwork> = Arc::new(host.start(host.config()));
    let config = RealHostConfig::under(&t.scratch.path().join("daemon"));
    let real = RealHost::new(t.runtime.clone(), network.clone(), config.clone()).unwrap();
    real.ensure_image(BUSYBOX).await.unwrap();
    let id = instance_id("shell", 1);
    real.start(StartRequest {
        service: "shell".into(),
        revision: 1,
        id: id.clone(),
        image: BUSYBOX.into(),
        command: Some(vec!["/bin/sleep".into()]),
        args: Some(vec!["600".into()]),
        env: vec![("FROM_SERVICE".into(), "yes".into())],
        port: 8080,
        limits: InstanceLimits {
            cpu: Some(0.5),
            memory_bytes: Some(64 << 20),
            pids: Some(64),
        },
        volumes: vec![],
        secret_files: vec![],
    })
    .await
    .unwrap();

    // Output and the instance's environment, with an addition.
    let mut echo = command(&["sh", "-c", "echo $FROM_SERVICE $EXTRA; echo oops >&2"]);
    echo.env.push(("EXTRA".into(), "more".into()));
    let (out, err, code) = run(real.exec(&id, echo).await.unwrap(), b"").await;
    assert_eq!(
        (out.as_str(), err.as_str(), code),
        ("yes more\n", "oops\n", Some(0))
    );

    // A working directory of the caller's choice.
    let mut pwd = command(&["pwd"]);
    pwd.cwd = Some("/tmp".into());
    let (out, _, code) = run(real.exec(&id, pwd).await.unwrap(), b"").await;
    assert_eq!((out.as_str(), code), ("/tmp\n", Some(0)));

    // stdin reaches the command and its end ends `cat`.
    let (out, _, code) = run(
        real.exec(&id, command(&["cat"])).await.unwrap(),
        b"through the instance\n",
    )
    .await;
    assert_eq!((out.as_str(), code), ("through the instance\n", Some(0)));

    // Exit codes: the command's own, and 127 for a command the image lacks.
    let (_, _, code) = run(
        real.exec(&id, command(&["sh", "-c", "exit 3"]))
            .await
            .unwrap(),
        b"",
    )
    .await;
    assert_eq!(code, Some(3));
    let (_, err, code) = run(
        real.exec(&id, command(&["no-such-command"])).await.unwrap(),
        b"",
    )
    .await;
    assert_eq!(code, Some(127), "{err}");
    assert!(err.contains("no-such-command"), "{err}");

    // A terminal of the asked size, inside the instance's /dev/pts; a resize reaches it.
    let mut tty = command(&[
        "sh",
        "-c",
        "busybox stty size; read x; busybox stty size; busybox tty",
    ]);
    tty.tty = Some((33, 101));
    let process = real.exec(&id, tty).await.unwrap();
    assert!(
        process.stderr.is_none(),
        "a terminal has no separate stderr"
    );
    let resize = process.resize.clone().expect("a terminal can be resized");
    let ExecProcess {
        mut stdin,
        mut stdout,
        exit,
        ..
    } = process;
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("33 101") {
        let n = tokio::time::timeout(Duration::from_secs(10), stdout.read(&mut buf))
            .await
            .expect("the first size in time")
            .unwrap();
        assert!(
            n > 0,
            "the terminal ended early: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    resize(40, 120).unwrap();
    stdin.write_all(b"go\r").await.unwrap();
    let mut rest = Vec::new();
    let (_, code) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(stdout.read_to_end(&mut rest), exit)
    })
    .await
    .expect("the terminal command ends in time");
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(code.unwrap().code, Some(0), "{rest}");
    assert!(rest.contains("40 120"), "{rest}");
    assert!(rest.contains("/dev/pts/"), "{rest}");

    // Through the runtime: the command's process is in the instance's cgroup and network
    // namespace (compared on the host with the instance's main process).
    let Some(Recovered::Running(instance)) = t.runtime.instances.get(&id).unwrap() else {
        panic!("instance {id} is not running");
    };
    let mut session = t
        .runtime
        .instances
        .exec(
            &id,
            RuntimeExec {
                args: vec!["sleep".into(), "30".into()],
                env: vec![],
                cwd: None,
                tty: Some(WindowSize { rows: 10, cols: 10 }),
            },
        )
        .await
        .unwrap();
    let proc_file = |pid: i32, what: &str| {
        std::fs::read_link(format!("/proc/{pid}/{what}"))
            .map(|p| p.display().to_string())
            .or_else(|_| std::fs::read_to_string(format!("/proc/{pid}/{what}")))
            .unwrap_or_else(|e| panic!("/proc/{pid}/{what}: {e}"))
    };
    let init = instance.init_pid();
    assert_ne!(session.pid, init);
    assert_eq!(proc_file(session.pid, "ns/net"), proc_file(init, "ns/net"));
    assert_eq!(proc_file(session.pid, "ns/mnt"), proc_file(init, "ns/mnt"));
    assert_eq!(proc_file(session.pid, "ns/pid"), proc_file(init, "ns/pid"));
    assert_ne!(
        proc_file(session.pid, "ns/net"),
        proc_file(std::process::id() as i32, "ns/net")
    );
    let cgroup = proc_file(session.pid, "cgroup");
    assert_eq!(cgroup, proc_file(init, "cgroup"));
    assert!(cgroup.contains(&instance.cgroups_path), "{cgroup}");
    // SAFETY: kill sends a signal to the pid the runtime reported for this test's command.
    unsafe { libc::kill(session.pid, libc::SIGKILL) };
    let status = tokio::time::timeout(Duration::from_secs(10), session.wait())
        .await
        .expect("the killed command is reported")
        .unwrap();
    assert_eq!(status.signal, Some(libc::SIGKILL));
    drop(instance);

    // An instance that is not there.
    assert!(matches!(
        real.exec("shell-r1-000000", command(&["true"])).await,
        Err(HostError::NotFound { .. })
    ));

    real.stop(&id, Duration::from_secs(2)).await.unwrap();
    // A stopped instance runs nothing.
    assert!(real.exec(&id, command(&["true"])).await.is_err());
    real.remove(&id).await.unwrap();
    assert!(!t.runtime.config.instances_dir().join(&id).exists());
    assert!(
        !t.runtime.config.state_root().join(&id).exists(),
        "libcontainer state removed"
    );
}

//! Privileged: the daemon's real host (runtime + instance network + CPU gate) starts the
//! fixture app from the local registry, a second host (a restarted daemon) adopts it with its
//! service, revision and address, and removal leaves nothing behind. Preconditions: root, the
//! registry on 127.0.0.1:5000 with the fixture images.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lull_daemon::host::real::{RealHost, RealHostConfig};
use lull_daemon::host::{
    HostError, InstanceHost, InstanceLimits, StartRequest, VolumeMount, instance_id,
};
use lull_netns::network::InstanceNetwork;
use lull_tests::e2e::{FIXTURE_APP, HELLO, TestRuntime, reference, require_registry};
use lull_tests::host_net::Host;

const PORT: u16 = 8080;

/// GET `path` from `addr`, retried until it answers or `timeout` passes.
async fn get_until(addr: SocketAddr, path: &str, timeout: Duration) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    loop {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await?;
            Ok::<_, std::io::Error>(raw)
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(raw)) => {
                let r = lull_tests::http::parse(&raw).unwrap();
                return (r.status, r.body);
            }
            _ if started.elapsed() > timeout => panic!("{addr} did not answer within {timeout:?}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[test]
fn the_real_host_starts_adopts_and_removes_an_instance() {
    let host = Host::new();
    let zygote = Path::new(env!("CARGO_BIN_EXE_lull-test-zygote"));
    require_registry();
    let t = TestRuntime::new("lull-daemon-host", zygote);
    // Pulled on the real host's loopback, where the registry is; the test's host namespace
    // has a loopback of its own.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        t.runtime
            .store
            .pull(&reference(FIXTURE_APP), &Default::default())
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

async fn scenario(host: &Host, t: &TestRuntime) {
    let network: Arc<dyn InstanceNetwork> = Arc::new(host.start(host.config()));
    let config = RealHostConfig::under(&t.scratch.path().join("daemon"));
    let real = RealHost::new(t.runtime.clone(), network.clone(), config.clone()).unwrap();

    let info = real.ensure_image(FIXTURE_APP).await.unwrap();
    assert!(info.digest.starts_with("sha256:"), "{info:?}");

    let id = instance_id("web", 1);
    let started = real
        .start(StartRequest {
            service: "web".into(),
            revision: 1,
            id: id.clone(),
            image: FIXTURE_APP.into(),
            command: None,
            args: None,
            env: vec![("GREETING_FILE".into(), "/data/none".into())],
            port: PORT,
            limits: InstanceLimits {
                cpu: Some(0.5),
                memory_bytes: Some(64 << 20),
                pids: Some(64),
            },
            volumes: vec![VolumeMount {
                name: "data".into(),
                target: "/data".into(),
                read_only: false,
            }],
            secret_files: vec![],
        })
        .await
        .unwrap();
    assert_eq!(started.addr.port(), PORT);
    assert_eq!(
        get_until(started.addr, "/", Duration::from_secs(10)).await,
        (200, HELLO.into())
    );
    // The volume's host directory exists for the service.
    assert!(config.volumes_dir.join("web/data").is_dir());
    // The gate works on the instance's cgroup.
    started.cpu.throttle().unwrap();
    started.cpu.restore().unwrap();
    assert!(started.cpu.usage_ns().unwrap() > 0);
    let tail = real.log_tail(&id, 5).await.unwrap();
    assert!(
        tail.iter().any(|l| l.contains("listening on :8080")),
        "{tail:?}"
    );

    // A restarted daemon: a new host over the same runtime and network adopts the instance.
    drop(real);
    let again = RealHost::new(t.runtime.clone(), network.clone(), config.clone()).unwrap();
    let adopted = again.recover().await.unwrap();
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!(adopted[0].service, "web");
    assert_eq!(adopted[0].revision, 1);
    assert_eq!(adopted[0].instance.id, id);
    assert_eq!(adopted[0].instance.addr, started.addr);
    assert_eq!(
        get_until(started.addr, "/", Duration::from_secs(5)).await.0,
        200
    );

    let exit = again.stop(&id, Duration::from_secs(5)).await.unwrap();
    assert!(exit.code.is_some() || exit.signal.is_some(), "{exit:?}");
    again.remove(&id).await.unwrap();
    assert!(network.attachment(&id).is_none());
    assert!(!config.labels_dir.join(format!("{id}.json")).exists());
    assert!(!t.runtime.config.instances_dir().join(&id).exists());
    assert!(matches!(
        again.wait(&id).await,
        Err(HostError::NotFound { .. })
    ));

    // An image that is nowhere (this namespace's loopback has no registry) is an image error
    // naming the reference; nothing is left behind.
    let missing = "127.0.0.1:5000/lull/not-there:latest";
    let err = again
        .start(StartRequest {
            service: "web".into(),
            revision: 2,
            id: instance_id("web", 2),
            image: missing.into(),
            command: None,
            args: None,
            env: vec![],
            port: PORT,
            limits: InstanceLimits::default(),
            volumes: vec![],
            secret_files: vec![],
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains(missing), "{err}");
    assert_eq!(std::fs::read_dir(&config.labels_dir).unwrap().count(), 0);
}

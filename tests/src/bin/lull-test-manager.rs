//! A stand-in for the daemon in the manager-death test: launches instances running shell
//! scripts on a busybox layer, prints their ids, then waits to be killed with SIGKILL.
//!
//! Usage: lull-test-manager <instances> <layers> <state> <cgroup-parent> <zygote> <layer> (<id> <script>)...

use lull_runtime::instance::{
    ImageProcess, InstanceManager, InstanceRequest, InstancesConfig, ProcessOverrides,
};
use lull_runtime::logs::LogLimits;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    assert!(
        args.len() >= 8 && args.len().is_multiple_of(2),
        "usage: lull-test-manager <instances> <layers> <state> <cgroup-parent> <zygote> <layer> (<id> <script>)..."
    );
    let manager = InstanceManager::new(InstancesConfig {
        instances_dir: args[0].clone().into(),
        layers_dir: args[1].clone().into(),
        state_root: args[2].clone().into(),
        cgroup_parent: args[3].clone(),
        zygote_program: args[4].clone().into(),
        zygote_args: vec![],
    })
    .expect("instance manager");
    let mut instances = Vec::new();
    for pair in args[6..].chunks(2) {
        let inst = manager
            .launch(InstanceRequest {
                id: pair[0].clone(),
                layers: vec![args[5].clone()],
                image: ImageProcess {
                    cmd: vec!["sh".into(), "-c".into(), pair[1].clone()],
                    ..Default::default()
                },
                overrides: ProcessOverrides::default(),
                resources: Default::default(),
                netns: None,
                files: Vec::new(),
                log_limits: LogLimits::default(),
            })
            .await
            .expect("launch");
        println!("launched {} {}", inst.id, inst.init_pid());
        instances.push(inst);
    }
    println!("ready");
    std::future::pending::<()>().await;
}

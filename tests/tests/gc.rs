//! Privileged, end to end: garbage collection over real pulls. Removing an image's last
//! reference frees exactly its blobs and unpacked layers, never another image's, and never a
//! layer a running instance still uses (until that instance is deleted).
//!
//! Preconditions: root and the registry on 127.0.0.1:5000 with the fixture images
//! (`cargo xtask fixtures`).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use lull_runtime::digest::Digest;
use lull_runtime::host::Runtime;
use lull_runtime::instance::{InstanceRequest, ProcessOverrides};
use lull_runtime::logs::LogLimits;
use lull_runtime::pull::PullOptions;
use lull_runtime::store::ImageRecord;
use lull_tests::e2e::{
    BUSYBOX, FIXTURE_APP, InstanceGuard, NetNsGuard, TestRuntime, free_host_port, reference,
    require_registry,
};
use lull_tests::http;
use lull_tests::scratch::unique_name;

fn blobs_on_disk(t: &TestRuntime) -> BTreeSet<Digest> {
    std::fs::read_dir(t.runtime.store.blobs().sha256_dir())
        .unwrap()
        .flatten()
        .map(|e| Digest::from_hex(&e.file_name().to_string_lossy()).unwrap())
        .collect()
}

fn layers_on_disk(t: &TestRuntime) -> BTreeSet<Digest> {
    t.runtime.layers.list().into_iter().collect()
}

fn blobs_of(image: &ImageRecord) -> BTreeSet<Digest> {
    image.blobs().cloned().collect()
}

fn diff_ids_of(image: &ImageRecord) -> BTreeSet<Digest> {
    image.layers.iter().map(|l| l.diff_id.clone()).collect()
}

#[tokio::test]
async fn gc_frees_only_what_nothing_uses() {
    require_registry();
    let t = TestRuntime::new(
        "lull-e2e-gc",
        Path::new(env!("CARGO_BIN_EXE_lull-test-zygote")),
    );
    let options = PullOptions::default();
    let app = t
        .runtime
        .store
        .pull(&reference(FIXTURE_APP), &options)
        .await
        .expect("pull the fixture app");
    let busybox = t
        .runtime
        .store
        .pull(&reference(BUSYBOX), &options)
        .await
        .expect("pull busybox");
    let app_layers = t.runtime.prepare(&app).await.unwrap();
    t.runtime.prepare(&busybox).await.unwrap();

    let (app_blobs, busybox_blobs) = (blobs_of(&app), blobs_of(&busybox));
    let (app_diffs, busybox_diffs) = (diff_ids_of(&app), diff_ids_of(&busybox));
    assert!(
        app_blobs.is_disjoint(&busybox_blobs) && app_diffs.is_disjoint(&busybox_diffs),
        "the test needs two images sharing nothing"
    );
    // The manifest, config and layer blobs of both, nothing else.
    let all_blobs: BTreeSet<Digest> = app_blobs.union(&busybox_blobs).cloned().collect();
    assert_eq!(blobs_on_disk(&t), all_blobs);
    let all_layers: BTreeSet<Digest> = app_diffs.union(&busybox_diffs).cloned().collect();
    assert_eq!(layers_on_disk(&t), all_layers);

    // Nothing is garbage while both images are referenced.
    let report = t.runtime.collect_garbage().await.unwrap();
    assert!(report.store.removed_blobs.is_empty(), "{report:?}");
    assert!(
        report.layers.is_empty() && report.layers_in_use == 0,
        "{report:?}"
    );

    // A second reference keeps the image when the first goes.
    let alias = reference("127.0.0.1:5000/lull/fixture-app:alias");
    t.runtime.store.tag(&app.manifest_digest, &alias).unwrap();
    let removed = t.runtime.store.remove(&reference(FIXTURE_APP)).unwrap();
    assert!(!removed.record_removed);
    let report = t.runtime.collect_garbage().await.unwrap();
    assert!(report.store.removed_blobs.is_empty(), "{report:?}");
    assert_eq!(blobs_on_disk(&t), all_blobs);

    // An instance of the app runs; then the app's last reference goes.
    let id = unique_name("gc");
    let netns = NetNsGuard::create(&t.runtime.config.netns_dir(), &id);
    let port = free_host_port();
    let instance = t
        .runtime
        .instances
        .launch(InstanceRequest {
            id: id.clone(),
            layers: app_layers,
            image: Runtime::image_process(&app),
            overrides: ProcessOverrides {
                port: Some(port),
                ..Default::default()
            },
            resources: Default::default(),
            netns: Some(netns.netns().path().to_owned()),
            files: Vec::new(),
            log_limits: LogLimits::default(),
        })
        .await
        .expect("launch the app");
    let instance = InstanceGuard::new(&t.runtime.instances, instance);
    let removed = t.runtime.store.remove(&alias).unwrap();
    assert!(removed.record_removed);
    assert_eq!(removed.manifest_digest, app.manifest_digest);

    let report = t.runtime.collect_garbage().await.unwrap();
    let removed_blobs: BTreeSet<Digest> = report.store.removed_blobs.iter().cloned().collect();
    assert_eq!(removed_blobs, app_blobs, "exactly the app's blobs go");
    let freed: u64 = app.layers.iter().map(|l| l.size).sum();
    assert!(report.store.freed_bytes >= freed, "{report:?}");
    assert_eq!(blobs_on_disk(&t), busybox_blobs);
    assert!(
        report.layers.is_empty(),
        "a layer in use was removed: {report:?}"
    );
    assert_eq!(report.layers_in_use, app_diffs.len());
    assert_eq!(layers_on_disk(&t), all_layers);
    // The instance is unaffected.
    let root = http::wait_for(netns.netns(), port, "/", Duration::from_secs(20)).unwrap();
    assert_eq!(root.status, 200);
    assert!(t.runtime.store.get(&reference(BUSYBOX)).unwrap().is_some());

    // Once the instance is gone, its layer is garbage too; busybox stays whole.
    instance.delete().await.unwrap();
    netns.destroy().unwrap();
    let report = t.runtime.collect_garbage().await.unwrap();
    assert!(report.store.removed_blobs.is_empty(), "{report:?}");
    assert_eq!(
        report.layers.iter().cloned().collect::<BTreeSet<_>>(),
        app_diffs
    );
    assert_eq!(report.layers_in_use, 0);
    assert_eq!(layers_on_disk(&t), busybox_diffs);
    assert_eq!(blobs_on_disk(&t), busybox_blobs);
    for diff_id in &app_diffs {
        assert!(
            !t.runtime.config.layers_dir().join(diff_id.hex()).exists(),
            "layer dir {diff_id} still on disk"
        );
    }

    // Busybox is still usable after the collections.
    let record = t.runtime.store.get(&reference(BUSYBOX)).unwrap().unwrap();
    assert_eq!(
        t.runtime.prepare(&record).await.unwrap().len(),
        record.layers.len()
    );
    // And a further collection finds nothing.
    let report = t.runtime.collect_garbage().await.unwrap();
    assert!(
        report.store.removed_blobs.is_empty() && report.layers.is_empty(),
        "{report:?}"
    );
}

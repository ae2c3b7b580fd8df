//! Pulling from a real docker-registry (started per test on a loopback port), with anonymous,
//! basic and bearer-token authentication.

mod store_support;

use std::sync::atomic::Ordering;

use lull_runtime::digest::Digest;
use lull_runtime::pull::{Credentials, PullError, PullOptions};
use lull_runtime::reference::Reference;
use lull_runtime::store::{ImageRecord, ImageStore, Platform};
use store_support::*;

fn options() -> PullOptions {
    PullOptions {
        search_default_docker_config: false,
        ..PullOptions::default()
    }
}

fn reference(text: &str) -> Reference {
    text.parse().unwrap()
}

/// Checks the record against the image built in the test, and every stored blob's bytes.
fn assert_matches_image(store: &ImageStore, record: &ImageRecord, image: &TestImage) {
    assert_eq!(record.config_digest, image.config_digest);
    assert_eq!(
        std::fs::read(store.blob_path(&record.config_digest)).unwrap(),
        image.config
    );
    let manifest = std::fs::read(store.blob_path(&record.manifest_digest)).unwrap();
    assert_eq!(Digest::of_bytes(&manifest), record.manifest_digest);
    assert_eq!(record.layers.len(), image.layers.len());
    for (got, want) in record.layers.iter().zip(&image.layers) {
        assert_eq!(got.digest, want.digest);
        assert_eq!(got.diff_id, want.diff_id);
        assert_eq!(got.media_type, want.media_type);
        assert_eq!(got.size, want.blob.len() as u64);
        assert_eq!(
            std::fs::read(store.blob_path(&got.digest)).unwrap(),
            want.blob
        );
    }
    assert_eq!(record.config.architecture, image.architecture);
    assert_eq!(record.config.os, "linux");
    assert_eq!(record.config.entrypoint, vec!["/bin/app"]);
    assert_eq!(record.config.cmd, vec!["--serve"]);
    assert_eq!(record.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(record.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(record.config.exposed_ports, vec!["8080/tcp"]);
    assert!(
        record
            .config
            .env
            .contains(&format!("ARCH={}", image.architecture))
    );
    // Nothing half-written is left behind.
    let tmp = store.data_dir().join("blobs/tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_single_platform_image_and_collects_garbage() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = two_layer_image(&layout, "amd64");
    layout.tag_image("v1", &image);
    let registry = Registry::start();
    push(&layout.dir, "v1", &registry.host(), "team/app:v1", &[]);

    let store = ImageStore::open(work.path().join("data")).unwrap();
    let tag = reference(&format!("{}/team/app:v1", registry.host()));
    let record = store.pull(&tag, &options()).await.unwrap();
    assert_matches_image(&store, &record, &image);
    assert_eq!(record.references, vec![tag.clone()]);
    assert_eq!(record.index_digest, None);
    assert_eq!(
        record.layers[0].compression(),
        lull_runtime::store::Compression::Gzip
    );
    assert_eq!(
        record.layers[1].compression(),
        lull_runtime::store::Compression::Zstd
    );
    assert_eq!(store.get(&tag).unwrap().unwrap(), record);

    // A second pull finds every blob present and does not rewrite it.
    let layer_path = store.blob_path(&record.layers[0].digest);
    let before = std::fs::metadata(&layer_path).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = store.pull(&tag, &options()).await.unwrap();
    assert_eq!(again, record);
    assert_eq!(
        std::fs::metadata(&layer_path).unwrap().modified().unwrap(),
        before
    );

    // Pull by digest: verified, recorded under the digest reference too.
    let pinned = tag.with_digest(record.manifest_digest.clone());
    let by_digest = store.pull(&pinned, &options()).await.unwrap();
    assert_eq!(by_digest.manifest_digest, record.manifest_digest);
    assert_eq!(by_digest.references.len(), 2);

    // A digest the registry does not have is an error, and records nothing.
    let missing = tag.with_digest(Digest::of_bytes(b"no such manifest"));
    let err = store.pull(&missing, &options()).await.unwrap_err();
    assert!(matches!(err, PullError::Registry { .. }), "{err}");
    assert!(store.get(&missing).unwrap().is_none());

    // A tag the registry does not have names the reference.
    let unknown = reference(&format!("{}/team/app:nope", registry.host()));
    let err = store.pull(&unknown, &options()).await.unwrap_err();
    assert!(err.to_string().contains("team/app:nope"), "{err}");

    // Plain HTTP is refused for a loopback registry when loopback is not insecure-allowed.
    let strict = PullOptions {
        allow_insecure_loopback: false,
        ..options()
    };
    assert!(store.pull(&tag, &strict).await.is_err());

    // gc keeps everything while referenced, then removes every blob.
    assert!(store.gc().await.unwrap().removed_blobs.is_empty());
    assert!(!store.remove(&tag).unwrap().record_removed);
    let removed = store.remove(&pinned).unwrap();
    assert!(removed.record_removed);
    assert!(store.referenced_diff_ids().unwrap().is_empty());
    let report = store.gc().await.unwrap();
    assert_eq!(report.removed_blobs.len(), 4, "{report:?}");
    assert_eq!(
        std::fs::read_dir(store.data_dir().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolves_multi_platform_index_to_linux_amd64() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let arm = two_layer_image(&layout, "arm64");
    let amd = two_layer_image(&layout, "amd64");
    let index_digest = layout.tag_index("multi", &[&arm, &amd]);
    let registry = Registry::start();
    push(
        &layout.dir,
        "multi",
        &registry.host(),
        "multi/app:v2",
        &["--all"],
    );

    let store = ImageStore::open(work.path().join("data")).unwrap();
    let tag = reference(&format!("{}/multi/app:v2", registry.host()));
    let record = store.pull(&tag, &options()).await.unwrap();
    assert_eq!(record.manifest_digest, amd.manifest_digest);
    assert_eq!(record.index_digest.as_ref(), Some(&index_digest));
    assert!(store.has_blob(&index_digest));
    assert_matches_image(&store, &record, &amd);
    // The arm64 layers were not downloaded.
    for layer in &arm.layers {
        assert!(!store.has_blob(&layer.digest));
    }
    assert_eq!(
        store
            .get_by_digest(&index_digest)
            .unwrap()
            .unwrap()
            .manifest_digest,
        amd.manifest_digest
    );

    // No s390x image: the error lists what is there.
    let s390x = PullOptions {
        platform: Platform {
            os: "linux".into(),
            architecture: "s390x".into(),
            variant: None,
        },
        ..options()
    };
    let err = store.pull(&tag, &s390x).await.unwrap_err();
    assert!(matches!(err, PullError::NoMatchingPlatform { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("linux/arm64") && text.contains("linux/amd64") && text.contains("s390x"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = two_layer_image(&layout, "amd64");
    layout.tag_image("v1", &image);
    let registry = Registry::start_with_htpasswd();
    let creds = format!("{BASIC_USER}:{BASIC_PASSWORD}");
    push(
        &layout.dir,
        "v1",
        &registry.host(),
        "private/app:v1",
        &["--dest-creds", &creds],
    );
    let store = ImageStore::open(work.path().join("data")).unwrap();
    let tag = reference(&format!("{}/private/app:v1", registry.host()));

    // Anonymous: refused, clearly.
    let err = store.pull(&tag, &options()).await.unwrap_err();
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("refused access"), "{err}");

    // Wrong password: refused.
    let wrong = PullOptions {
        credentials: Some(Credentials::new(BASIC_USER, "wrong")),
        ..options()
    };
    let err = store.pull(&tag, &wrong).await.unwrap_err();
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err}");
    assert!(store.get(&tag).unwrap().is_none());

    // Explicit credentials.
    let right = PullOptions {
        credentials: Some(Credentials::new(BASIC_USER, BASIC_PASSWORD)),
        ..options()
    };
    let record = store.pull(&tag, &right).await.unwrap();
    assert_matches_image(&store, &record, &image);

    // Credentials from a docker config.json (auth field), into a fresh store.
    use base64::Engine as _;
    let config_path = work.path().join("docker-config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(&creds);
    std::fs::write(
        &config_path,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let store2 = ImageStore::open(work.path().join("data2")).unwrap();
    let from_config = PullOptions {
        docker_config: Some(config_path.clone()),
        ..options()
    };
    let record2 = store2.pull(&tag, &from_config).await.unwrap();
    assert_eq!(record2.manifest_digest, record.manifest_digest);

    // A credential helper in the config is a clear error naming it.
    std::fs::write(
        &config_path,
        format!(
            r#"{{"credHelpers":{{"{}":"secretservice"}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let err = store2.pull(&tag, &from_config).await.unwrap_err();
    assert!(matches!(err, PullError::Auth(_)), "{err}");
    assert!(err.to_string().contains("secretservice"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_through_front_proxy() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let image = two_layer_image(&layout, "amd64");
    layout.tag_image("v1", &image);
    let registry = Registry::start();
    push(&layout.dir, "v1", &registry.host(), "app:v1", &[]);
    let proxy = TokenProxy::start(registry.port, "bob", "token-pass").await;
    let store = ImageStore::open(work.path().join("data")).unwrap();
    // Single-component repository on a non-hub registry: no library/ prefix.
    let tag = reference(&format!("{}/app:v1", proxy.host()));
    assert_eq!(tag.repository(), "app");

    let wrong = PullOptions {
        credentials: Some(Credentials::new("bob", "nope")),
        ..options()
    };
    let err = store.pull(&tag, &wrong).await.unwrap_err();
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err}");
    assert!(
        err.to_string().contains("invalid username or password"),
        "{err}"
    );
    assert_eq!(proxy.stats.tokens_issued.load(Ordering::SeqCst), 0);
    assert!(proxy.stats.tokens_refused.load(Ordering::SeqCst) >= 1);
    assert_eq!(proxy.stats.forwarded.load(Ordering::SeqCst), 0);

    let err = store.pull(&tag, &options()).await.unwrap_err();
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err}");

    let right = PullOptions {
        credentials: Some(Credentials::new("bob", "token-pass")),
        ..options()
    };
    let record = store.pull(&tag, &right).await.unwrap();
    assert_matches_image(&store, &record, &image);
    assert!(proxy.stats.tokens_issued.load(Ordering::SeqCst) >= 1);
    // Manifest, config and two layers went through with a token.
    assert!(proxy.stats.forwarded.load(Ordering::SeqCst) >= 4);
}

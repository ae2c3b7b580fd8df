//! Importing OCI image layouts and docker-archive tarballs (made by skopeo, and by hand).

mod store_support;

use lull_runtime::digest::Digest;
use lull_runtime::import::ImportError;
use lull_runtime::reference::Reference;
use lull_runtime::store::{Compression, ImageStore, media_types};
use serde_json::json;
use store_support::*;

fn reference(text: &str) -> Reference {
    text.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_oci_layout_by_name_and_through_nested_index() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let single = two_layer_image(&layout, "amd64");
    layout.tag_image("v1", &single);
    let store = ImageStore::open(work.path().join("data")).unwrap();

    // Only one image: no name needed.
    let tag = reference("local/app:v1");
    let record = store
        .import_oci_layout(&layout.dir, None, &tag)
        .await
        .unwrap();
    assert_eq!(record.manifest_digest, single.manifest_digest);
    assert_eq!(record.config_digest, single.config_digest);
    assert_eq!(record.references, vec![tag.clone()]);
    for (got, want) in record.layers.iter().zip(&single.layers) {
        assert_eq!(got.digest, want.digest);
        assert_eq!(got.diff_id, want.diff_id);
        assert_eq!(got.media_type, want.media_type);
        assert_eq!(
            std::fs::read(store.blob_path(&got.digest)).unwrap(),
            want.blob
        );
    }
    assert_eq!(record.config.entrypoint, vec!["/bin/app"]);

    // A multi-platform index next to it: picked by name, resolved to amd64.
    let arm = two_layer_image(&layout, "arm64");
    let amd = layout.add_image(
        "amd64",
        vec![layer_gzip(&[("multi.txt", b"amd64 of multi\n")])],
    );
    let index_digest = layout.tag_index("multi", &[&arm, &amd]);
    let multi_tag = reference("local/multi:v1");
    let record = store
        .import_oci_layout(&layout.dir, Some("multi"), &multi_tag)
        .await
        .unwrap();
    assert_eq!(record.manifest_digest, amd.manifest_digest);
    assert_eq!(record.index_digest, Some(index_digest));
    assert!(!store.has_blob(&arm.layers[0].digest));

    // Now two names: no name is ambiguous; an unknown name lists those present.
    let err = store
        .import_oci_layout(&layout.dir, None, &tag)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImportError::Ambiguous { count: 2, .. }),
        "{err}"
    );
    let err = store
        .import_oci_layout(&layout.dir, Some("v9"), &tag)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ImportError::NoSuchName { .. }), "{err}");
    assert!(
        text.contains("\"v1\"") && text.contains("\"multi\""),
        "{text}"
    );

    // A corrupted layer blob is refused and nothing is recorded for the new tag.
    let victim = &single.layers[1];
    let blob_path = layout.dir.join("blobs/sha256").join(victim.digest.hex());
    let mut corrupt = victim.blob.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    std::fs::write(&blob_path, &corrupt).unwrap();
    let fresh = ImageStore::open(work.path().join("data-fresh")).unwrap();
    let err = fresh
        .import_oci_layout(&layout.dir, Some("v1"), &tag)
        .await
        .unwrap_err();
    assert!(matches!(err, ImportError::Blob { .. }), "{err}");
    assert!(!fresh.has_blob(&victim.digest));
    assert!(fresh.get(&tag).unwrap().is_none());
    assert_eq!(
        std::fs::read_dir(fresh.data_dir().join("blobs/tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_skopeo_docker_archive() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    // skopeo cannot write zstd layers into a docker archive: gzip and plain here.
    let image = layout.add_image(
        "amd64",
        vec![
            layer_gzip(&[("srv/hello.txt", b"hello\n")]),
            layer_plain(&[("bin/app", b"#!/bin/sh\n")]),
        ],
    );
    layout.tag_image("v1", &image);
    let archive = work.path().join("app.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:v1", layout.dir.display()),
        &format!("docker-archive:{}:lull-test/app:v1", archive.display()),
    ]);

    let store = ImageStore::open(work.path().join("data")).unwrap();
    // Tagged from the archive's RepoTags.
    let record = store.import_docker_archive(&archive, None).await.unwrap();
    assert_eq!(record.references, vec![reference("lull-test/app:v1")]);
    assert_eq!(record.config_digest, image.config_digest);
    assert_eq!(record.config.cmd, vec!["--serve"]);
    assert_eq!(record.layers.len(), 2);
    for (got, want) in record.layers.iter().zip(&image.layers) {
        assert_eq!(got.diff_id, want.diff_id);
        let blob = std::fs::read(store.blob_path(&got.digest)).unwrap();
        assert_eq!(Digest::of_bytes(&blob), got.digest);
        assert_eq!(blob.len() as u64, got.size);
        match got.compression() {
            // Uncompressed layers are the tar itself: digest == diff_id.
            Compression::None => {
                assert_eq!(got.digest, got.diff_id);
                assert_eq!(blob, want.tar);
            }
            Compression::Gzip | Compression::Zstd => assert_eq!(blob, want.blob),
        }
    }
    // The synthesised manifest is stored and describes the record.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.blob_path(&record.manifest_digest)).unwrap())
            .unwrap();
    assert_eq!(manifest["mediaType"], media_types::OCI_MANIFEST);
    assert_eq!(
        manifest["config"]["digest"],
        image.config_digest.to_string()
    );
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);

    // Explicit tag.
    let tag = reference("127.0.0.1:5000/other:v2");
    let retagged = store
        .import_docker_archive(&archive, Some(&tag))
        .await
        .unwrap();
    assert_eq!(retagged.manifest_digest, record.manifest_digest);
    assert_eq!(retagged.references.len(), 2);
}

/// Writes a docker-archive by hand: manifest.json, `<config hex>.json`, layers.
fn write_archive(path: &std::path::Path, config: &[u8], layers: &[(&str, Vec<u8>)], tags: &[&str]) {
    let config_name = format!("{}.json", Digest::of_bytes(config).hex());
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": tags,
        "Layers": layers.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
    }]);
    let mut files: Vec<(String, Vec<u8>)> = vec![(config_name, config.to_vec())];
    for (name, data) in layers {
        files.push(((*name).to_owned(), data.clone()));
    }
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_path(name).unwrap();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, &data[..]).unwrap();
    }
    builder.finish().unwrap();
}

fn config_with(diff_ids: &[&Digest]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>()},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_archive_with_gzip_layer_and_wrong_diff_id() {
    let work = tempfile::tempdir().unwrap();
    let plain = make_tar(&[("a.txt", b"plain layer\n")]);
    let gz = layer_gzip(&[("b.txt", b"gzip layer\n")]);
    let plain_id = Digest::of_bytes(&plain);

    // Good archive: one plain and one gzip layer, docker-save style names.
    let good = work.path().join("good.tar");
    let config = config_with(&[&plain_id, &gz.diff_id]);
    write_archive(
        &good,
        &config,
        &[
            ("l1/layer.tar", plain.clone()),
            ("l2/layer.tar", gz.blob.clone()),
        ],
        &["example.org/app:1"],
    );
    let store = ImageStore::open(work.path().join("data")).unwrap();
    let record = store.import_docker_archive(&good, None).await.unwrap();
    assert_eq!(record.references, vec![reference("example.org/app:1")]);
    assert_eq!(record.config_digest, Digest::of_bytes(&config));
    assert_eq!(record.layers[0].digest, plain_id);
    assert_eq!(record.layers[0].diff_id, plain_id);
    assert_eq!(record.layers[0].media_type, media_types::OCI_LAYER);
    assert_eq!(record.layers[1].digest, gz.digest);
    assert_eq!(record.layers[1].diff_id, gz.diff_id);
    assert_eq!(record.layers[1].media_type, media_types::OCI_LAYER_GZIP);

    // The config claims another diff_id for the gzip layer: refused, naming the entry.
    let bad = work.path().join("bad.tar");
    let wrong = Digest::of_bytes(b"not the layer");
    write_archive(
        &bad,
        &config_with(&[&plain_id, &wrong]),
        &[
            ("l1/layer.tar", plain.clone()),
            ("l2/layer.tar", gz.blob.clone()),
        ],
        &["example.org/bad:1"],
    );
    let err = store.import_docker_archive(&bad, None).await.unwrap_err();
    assert!(
        matches!(err, ImportError::DiffId { ref entry, ref expected, .. }
            if entry == "l2/layer.tar" && *expected == wrong),
        "{err}"
    );
    assert!(
        store
            .get(&reference("example.org/bad:1"))
            .unwrap()
            .is_none()
    );

    // A layer listed in manifest.json but missing from the tar.
    let missing = work.path().join("missing.tar");
    let config = config_with(&[&plain_id]);
    let config_name = format!("{}.json", Digest::of_bytes(&config).hex());
    let manifest =
        json!([{"Config": config_name, "RepoTags": ["x:1"], "Layers": ["gone/layer.tar"]}]);
    let mut builder = tar::Builder::new(std::fs::File::create(&missing).unwrap());
    for (name, data) in [
        (config_name.as_str(), config.clone()),
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_path(name).unwrap();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, &data[..]).unwrap();
    }
    builder.finish().unwrap();
    drop(builder);
    let err = store
        .import_docker_archive(&missing, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImportError::MissingEntry { ref entry, .. } if entry == "gone/layer.tar"),
        "{err}"
    );

    // No RepoTags and no tag given.
    let untagged = work.path().join("untagged.tar");
    write_archive(
        &untagged,
        &config_with(&[&plain_id]),
        &[("l1/layer.tar", plain)],
        &[],
    );
    let err = store
        .import_docker_archive(&untagged, None)
        .await
        .unwrap_err();
    assert!(matches!(err, ImportError::NoTag { .. }), "{err}");
}

//! Rebase: a built image moved onto a newer version of its base image without running the
//! build again: the base's layers are swapped, the app's layers (manifests, dependencies,
//! source, build outputs) kept as they are.
//!
//! That is only sound when the app's layers cannot depend on what changed. lull allows it when
//! both bases were made from the same recipe (their `lull.base.recipe` labels are equal: the
//! same Debian suite, the same packages, only newer package versions, such as a security
//! update within a release, whose libraries keep their ABI). A base whose recipe changed (another
//! suite, interpreter or package set), or a base without that label (lull cannot tell what
//! changed), needs a rebuild: the dependency layer may hold wheels or native modules built
//! against the old one.

use lull_runtime::digest::Digest;
use lull_runtime::reference::Reference;
use lull_runtime::store::{BuiltLayer, ImageRecord, ImageStore, IngestGuard};
use serde_json::Value;

/// The label naming the base image a build used (its reference).
pub const BASE_NAME_LABEL: &str = "org.opencontainers.image.base.name";
/// The label holding that base's manifest digest.
pub const BASE_DIGEST_LABEL: &str = "org.opencontainers.image.base.digest";
/// The label `cargo xtask base-images` puts on its images: a hash of what went into them.
pub const RECIPE_LABEL: &str = "lull.base.recipe";

/// Why an image is not rebased.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RebaseRefusal {
    #[error("the image does not record its base (it was not built by lull)")]
    NotBuilt,
    #[error("the old base {0} is no longer in the image store")]
    OldBaseMissing(String),
    #[error(
        "the new base was made from another recipe than the old one (label {RECIPE_LABEL}): the app's dependency layers may depend on what changed; build again to use it"
    )]
    RecipeChanged,
    #[error(
        "the bases carry no {RECIPE_LABEL} label, so lull cannot tell what changed between them; build again to use the new one"
    )]
    NoRecipe,
    #[error("the image's layers do not start with its old base's layers")]
    LayersMismatch,
    #[error("{0}")]
    Store(String),
}

/// Keeps `base` in the store under a name of its own (`lull.local/base:<hex>`) while images
/// built on it exist, even after its own tag moves to a newer image: a rebase needs it.
pub fn keep_base(store: &ImageStore, base: &ImageRecord) -> Result<(), String> {
    let keep: Reference = format!("lull.local/base:{}", base.manifest_digest.hex())
        .parse()
        .map_err(|e| format!("base tag: {e}"))?;
    store
        .tag(&base.manifest_digest, &keep)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The base an image was built on, from its labels.
pub fn recorded_base(image: &ImageRecord) -> Option<(Reference, Digest)> {
    let name = image.config.labels.get(BASE_NAME_LABEL)?.parse().ok()?;
    let digest = image.config.labels.get(BASE_DIGEST_LABEL)?.parse().ok()?;
    Some((name, digest))
}

/// Whether `image` (built on `old_base`) may move onto `new_base`.
pub fn check(
    image: &ImageRecord,
    old_base: &ImageRecord,
    new_base: &ImageRecord,
) -> Result<(), RebaseRefusal> {
    let recipe = |i: &ImageRecord| i.config.labels.get(RECIPE_LABEL).cloned();
    match (recipe(old_base), recipe(new_base)) {
        (Some(old), Some(new)) if old == new => {}
        (Some(_), Some(_)) => return Err(RebaseRefusal::RecipeChanged),
        _ => return Err(RebaseRefusal::NoRecipe),
    }
    let n = old_base.layers.len();
    if image.layers.len() < n
        || image.layers[..n]
            .iter()
            .zip(&old_base.layers)
            .any(|(a, b)| a.diff_id != b.diff_id)
    {
        return Err(RebaseRefusal::LayersMismatch);
    }
    Ok(())
}

/// The new base's environment with what the build added or changed over the old base's
/// (`NAME=value` entries; the app's value wins).
pub fn merged_env(image: &[String], old_base: &[String], new_base: &[String]) -> Vec<String> {
    let name = |kv: &str| kv.split_once('=').map_or(kv, |(n, _)| n).to_owned();
    let mut env: Vec<String> = new_base.to_vec();
    for kv in image.iter().filter(|kv| !old_base.contains(kv)) {
        match env.iter_mut().find(|e| name(e) == name(kv)) {
            Some(slot) => *slot = kv.clone(),
            None => env.push(kv.clone()),
        }
    }
    env
}

/// Commits `image` moved from `old_base` onto `new_base` (checked with [`check`] first), tagged
/// `tag`: its config with the base's part of `rootfs.diff_ids` swapped, the env merged (see
/// [`merged_env`]) and the base digest label updated; the rest (command, ports, history) kept.
pub fn rebase(
    store: &ImageStore,
    guard: &IngestGuard<'_>,
    image: &ImageRecord,
    old_base: &ImageRecord,
    new_base: &ImageRecord,
    tag: &Reference,
) -> Result<ImageRecord, RebaseRefusal> {
    check(image, old_base, new_base)?;
    keep_base(store, new_base).map_err(RebaseRefusal::Store)?;
    let store_err = |e: String| RebaseRefusal::Store(e);
    let raw = store
        .read_config(image)
        .map_err(|e| store_err(e.to_string()))?;
    let mut config: Value =
        serde_json::from_slice(&raw).map_err(|e| store_err(format!("image config: {e}")))?;
    let app_layers = &image.layers[old_base.layers.len()..];
    let diff_ids: Vec<Value> = new_base
        .layers
        .iter()
        .chain(app_layers)
        .map(|l| Value::String(l.diff_id.to_string()))
        .collect();
    config["rootfs"]["diff_ids"] = Value::Array(diff_ids);
    if let Some(run) = config.get_mut("config").and_then(Value::as_object_mut) {
        let env = merged_env(
            &image.config.env,
            &old_base.config.env,
            &new_base.config.env,
        );
        run.insert(
            "Env".into(),
            Value::Array(env.into_iter().map(Value::String).collect()),
        );
    }
    let labels = config
        .get_mut("config")
        .and_then(|c| c.get_mut("Labels"))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| store_err("image config has no labels".into()))?;
    labels.insert(
        BASE_DIGEST_LABEL.into(),
        Value::String(new_base.manifest_digest.to_string()),
    );
    let bytes = serde_json::to_vec(&config).map_err(|e| store_err(e.to_string()))?;
    let layers: Vec<BuiltLayer> = new_base
        .layers
        .iter()
        .chain(app_layers)
        .map(BuiltLayer::from)
        .collect();
    store
        .commit_built(guard, &bytes, &layers, std::slice::from_ref(tag))
        .map_err(|e| store_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_new_bases_env_takes_what_the_build_added() {
        let old_base = strings(&["PATH=/usr/bin", "LANG=C.UTF-8"]);
        let new_base = strings(&["PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8", "NEW=1"]);
        let image = strings(&["PATH=/usr/bin", "LANG=C.UTF-8", "PORT=8080", "LANG2=x"]);
        assert_eq!(
            merged_env(&image, &old_base, &new_base),
            strings(&[
                "PATH=/usr/local/bin:/usr/bin",
                "LANG=C.UTF-8",
                "NEW=1",
                "PORT=8080",
                "LANG2=x"
            ])
        );
        // A variable the build changed keeps the build's value.
        let image = strings(&["PATH=/app/bin", "LANG=C.UTF-8"]);
        assert_eq!(
            merged_env(&image, &old_base, &new_base),
            strings(&["PATH=/app/bin", "LANG=C.UTF-8", "NEW=1"])
        );
    }
}

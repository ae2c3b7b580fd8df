//! `cargo xtask base-images`: builds lull's managed-runtime base images (python 3.11, node 18,
//! node 20) from Debian packages with mmdebstrap, writes each as a one-layer OCI image layout
//! under `target/base-images/<name>/` and pushes it to the local registry.
//!
//! Each image is keyed by a hash of its recipe (suite, packages, mmdebstrap options, hooks,
//! image config, [`RECIPE_VERSION`]): a layout already written for that key is not rebuilt, and
//! a registry already holding the layout's manifest under the tag is not pushed to again. The
//! mirror is not part of the key: it says where the packages come from, not what they are.
//!
//! Reproducible: with `SOURCE_DATE_EPOCH` fixed, mmdebstrap writes the same tar for the same
//! package set; the layer is that tar re-emitted entry by entry (device nodes under /dev
//! dropped, mtimes clamped to the epoch, modes, owners, xattrs and hard links kept) through a
//! fixed gzip, so the same package set gives the same layer and manifest digests (checked:
//! mmdebstrap's tar was byte-identical over two runs, and `--rebuild` reproduced all three
//! manifest digests). The package set itself moves with Debian's updates: a new package version
//! gives a new digest, which the recipe hash does not see; `--rebuild` picks it up.
//!
//! The images trust Debian's CA bundle only. Where HTTPS goes through an intercepting proxy,
//! adding its CA is the build sandbox's job, not the base image's.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use flate2::Compression;
use sha2::{Digest, Sha256};

use crate::fixtures::workspace_root;
use crate::oci::{Content, Entry, LayoutWriter, RunConfig, dir_size, manifest_of};
use crate::registry::{Push, find_in_path, registry_address, registry_reachable};

/// Bump when this module changes what it builds in a way the recipe text cannot see.
const RECIPE_VERSION: &str = "base-images-v1";

/// 2025-01-01T00:00:00Z: every mtime in the images is clamped to it, and mmdebstrap, dpkg and
/// shadow stamp it wherever they would write the current time.
const SOURCE_DATE_EPOCH: u64 = 1_735_689_600;

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `org.opencontainers.image.source`: lull has no public repository URL yet, so the label names
/// the recipe's place in the source tree.
const SOURCE_LABEL: &str = "lull:xtask/src/base_images.rs";

/// The mmdebstrap options every image shares. `apt` variant: Essential packages plus apt (so a
/// build's pre-build commands can `apt-get update && apt-get install`), nothing of priority
/// required/important. `maybe-merged-usr`: merged /usr set up by mmdebstrap itself, not by the
/// usrmerge package, which would pull in perl (about 60 MB).
const MMDEBSTRAP_OPTIONS: &[&str] = &[
    "--variant=apt",
    "--format=tar",
    "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr",
    "--aptopt=APT::Install-Recommends \"false\"",
];

/// dpkg path filters, written by mmdebstrap to /etc/dpkg/dpkg.cfg.d/ inside the image, so that
/// packages installed later by a build stay without docs, man pages and translations too. The
/// copyright files stay (licences).
const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
];

/// Customize hooks every image runs (`$1` is the root): the working directory, and no package
/// lists, caches, logs or backup files, which only record when the image was built.
const COMMON_HOOKS: &[&str] = &[
    "mkdir -p \"$1/app\"",
    "rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/* \"$1\"/var/cache/debconf/*-old \
     \"$1\"/var/lib/dpkg/*-old \"$1\"/var/cache/ldconfig/aux-cache",
    "find \"$1/var/log\" -type f -delete",
];

/// One base image: what goes in and what it is called.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The layout's directory under target/base-images.
    pub name: &'static str,
    /// `repository:tag` in the registry.
    pub reference: &'static str,
    /// apprunner.yaml `runtime` values this image serves (documentation only).
    pub runtimes: &'static [&'static str],
    pub suite: &'static str,
    pub packages: &'static [&'static str],
    /// Customize hooks after [`COMMON_HOOKS`] (`$1` is the root).
    pub hooks: &'static [&'static str],
    /// Environment beyond PATH and LANG.
    pub env: &'static [&'static str],
}

pub const RECIPES: &[Recipe] = &[
    Recipe {
        name: "python-3.11",
        reference: "lull/base/python:3.11",
        runtimes: &["python3", "python311"],
        suite: "bookworm",
        // python-is-python3: `python` as well as `python3` (two symlinks), as App Runner's
        // python image answers to both. No build-essential or python3-dev: wheels cover the
        // common packages; a build that compiles C extensions installs them itself.
        packages: &[
            "python3",
            "python3-pip",
            "python3-venv",
            "python-is-python3",
            "ca-certificates",
        ],
        // Debian marks its python as externally managed (PEP 668), so `pip install -r
        // requirements.txt` would refuse to install outside a venv. In a single-app image
        // there is no distribution python to protect, and App Runner's python runtime installs
        // into the system interpreter: remove the marker so builds behave the same here.
        hooks: &["rm -f \"$1/usr/lib/python3.11/EXTERNALLY-MANAGED\""],
        // Unbuffered stdout/stderr: an app's log lines reach lull's log capture when printed,
        // not when a block buffer fills or never, if the instance is stopped.
        env: &["PYTHONUNBUFFERED=1"],
    },
    Recipe {
        name: "node-18",
        reference: "lull/base/node:18",
        runtimes: &["nodejs18"],
        suite: "bookworm",
        packages: &["nodejs", "npm", "ca-certificates"],
        hooks: &[],
        env: &[],
    },
    Recipe {
        name: "node-20",
        reference: "lull/base/node:20",
        runtimes: &["nodejs20"],
        suite: "trixie",
        packages: &["nodejs", "npm", "ca-certificates"],
        hooks: &[],
        env: &[],
    },
];

#[derive(Debug, clap::Args)]
pub struct BaseImagesArgs {
    /// Build only these images (comma separated layout names, e.g. python-3.11,node-18)
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Rebuild even when a layout for the recipe exists (e.g. to check reproducibility)
    #[arg(long)]
    pub rebuild: bool,
}

impl Recipe {
    /// Everything that decides the image's content and config, one item a line. Package order
    /// does not matter to apt, so packages are sorted; hook order does, so hooks are not.
    pub fn text(&self) -> String {
        let mut packages = self.packages.to_vec();
        packages.sort_unstable();
        let mut lines = vec![
            format!("version {RECIPE_VERSION}"),
            format!("source-date-epoch {SOURCE_DATE_EPOCH}"),
            format!("name {}", self.name),
            format!("reference {}", self.reference),
            format!("suite {}", self.suite),
            format!("components {}", sources_components()),
            format!("packages {}", packages.join(" ")),
        ];
        lines.extend(MMDEBSTRAP_OPTIONS.iter().map(|o| format!("option {o}")));
        lines.extend(DPKG_OPTIONS.iter().map(|o| format!("dpkg {o}")));
        lines.extend(
            COMMON_HOOKS
                .iter()
                .chain(self.hooks)
                .map(|h| format!("hook {h}")),
        );
        lines.extend(self.run_env().iter().map(|e| format!("env {e}")));
        lines.push(format!(
            "label org.opencontainers.image.source {SOURCE_LABEL}"
        ));
        lines.push("workdir /app".into());
        lines.join("\n") + "\n"
    }

    /// The recipe hash (hex SHA-256 of [`Recipe::text`]).
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.text().as_bytes()))
    }

    fn run_env(&self) -> Vec<String> {
        let mut env = vec![PATH_ENV.to_string(), "LANG=C.UTF-8".to_string()];
        env.extend(self.env.iter().map(|e| e.to_string()));
        env
    }

    /// The image config: no entrypoint or command (the build's run command supplies it).
    fn run_config(&self, hash: &str) -> RunConfig {
        RunConfig {
            env: self.run_env(),
            working_dir: "/app".into(),
            labels: vec![
                (
                    "org.opencontainers.image.source".into(),
                    SOURCE_LABEL.into(),
                ),
                ("lull.base.recipe".into(), hash.into()),
            ],
            ..RunConfig::default()
        }
    }
}

/// What the `deb` lines carry; part of the recipe text.
fn sources_components() -> &'static str {
    "main"
}

/// The Debian archive and security mirrors the images are built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrors {
    pub archive: String,
    pub security: String,
}

impl Default for Mirrors {
    fn default() -> Self {
        Mirrors {
            archive: "http://deb.debian.org/debian".into(),
            security: "http://deb.debian.org/debian-security".into(),
        }
    }
}

impl Mirrors {
    /// The mirrors the host's apt uses (its egress may allow only those), overridden by
    /// `$LULL_DEBIAN_MIRROR` / `$LULL_DEBIAN_SECURITY_MIRROR`, else deb.debian.org.
    pub fn for_host(apt_dir: &Path) -> Mirrors {
        let mut files = Vec::new();
        if let Ok(text) = fs::read_to_string(apt_dir.join("sources.list")) {
            files.push(("sources.list".to_string(), text));
        }
        if let Ok(dir) = fs::read_dir(apt_dir.join("sources.list.d")) {
            let mut names: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
            names.sort();
            for path in names {
                if let Ok(text) = fs::read_to_string(&path) {
                    files.push((path.display().to_string(), text));
                }
            }
        }
        let mut mirrors = Mirrors::from_sources(&files);
        if let Ok(url) = std::env::var("LULL_DEBIAN_MIRROR") {
            mirrors.archive = url;
        }
        if let Ok(url) = std::env::var("LULL_DEBIAN_SECURITY_MIRROR") {
            mirrors.security = url;
        }
        mirrors
    }

    /// The first enabled `deb` URI ending in `/debian` and in `/debian-security` in apt source
    /// files (`*.list` one-line style, `*.sources` deb822 style; other files are ignored).
    pub fn from_sources(files: &[(String, String)]) -> Mirrors {
        let mut uris = Vec::new();
        for (name, text) in files {
            if name.ends_with(".sources") {
                for stanza in text.split("\n\n") {
                    let field = |key: &str| {
                        stanza.lines().find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.trim().eq_ignore_ascii_case(key).then(|| v.trim())
                        })
                    };
                    let deb =
                        field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
                    let enabled = field("Enabled").is_none_or(|e| !e.eq_ignore_ascii_case("no"));
                    if deb
                        && enabled
                        && let Some(list) = field("URIs")
                    {
                        uris.extend(list.split_whitespace().map(str::to_string));
                    }
                }
            } else if name.ends_with(".list") {
                for line in text.lines() {
                    let mut words = line.split_whitespace();
                    if words.next() != Some("deb") {
                        continue;
                    }
                    let mut uri = words.next();
                    // Options: `[arch=amd64 signed-by=...]`, possibly spanning several words.
                    if uri.is_some_and(|u| u.starts_with('[')) {
                        let mut word = uri;
                        while let Some(w) = word
                            && !w.ends_with(']')
                        {
                            word = words.next();
                        }
                        uri = words.next();
                    }
                    if let Some(uri) = uri {
                        uris.push(uri.to_string());
                    }
                }
            }
        }
        let mut mirrors = Mirrors::default();
        let trimmed = |u: &String| u.trim_end_matches('/').to_string();
        if let Some(u) = uris.iter().map(trimmed).find(|u| u.ends_with("/debian")) {
            mirrors.archive = u;
        }
        if let Some(u) = uris
            .iter()
            .map(trimmed)
            .find(|u| u.ends_with("/debian-security"))
        {
            mirrors.security = u;
        }
        mirrors
    }

    pub fn sources(&self, suite: &str) -> Vec<String> {
        let components = sources_components();
        vec![
            format!("deb {} {suite} {components}", self.archive),
            format!("deb {} {suite}-updates {components}", self.archive),
            format!("deb {} {suite}-security {components}", self.security),
        ]
    }
}

/// One image as built (or found) and pushed (or found in the registry).
struct Outcome {
    recipe: &'static Recipe,
    hash: String,
    manifest: String,
    layer_bytes: u64,
    built: bool,
    pushed: Option<bool>,
    seconds: f64,
}

pub fn run(args: &BaseImagesArgs) -> Result<()> {
    for name in &args.only {
        if !RECIPES.iter().any(|r| r.name == name) {
            bail!(
                "unknown image {name:?} in --only (images: {})",
                RECIPES
                    .iter()
                    .map(|r| r.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let (mmdebstrap, skopeo) = check_tools()?;
    let root = workspace_root();
    let out = root.join("target/base-images");
    let stamps = out.join(".stamps");
    fs::create_dir_all(&stamps).with_context(|| format!("create {}", stamps.display()))?;
    let mirrors = Mirrors::for_host(Path::new("/etc/apt"));
    let registry = registry_address();
    let reachable = registry_reachable(&registry);
    if let Err(why) = &reachable {
        println!("registry {registry} not reachable ({why:#}): images not pushed");
    }
    println!(
        "mirrors: {} (security: {})",
        mirrors.archive, mirrors.security
    );

    // The images build in parallel: each run is mostly downloads and dpkg, waiting on the
    // network and the disk. Measured here (two cores, cold): 4 min 10 s for the three at once,
    // 8 min 30 s one after another.
    let context = Shared {
        mmdebstrap: &mmdebstrap,
        skopeo: &skopeo,
        mirrors: &mirrors,
        out: &out,
        stamps: &stamps,
        registry: reachable.is_ok().then_some(registry.as_str()),
        rebuild: args.rebuild,
    };
    let selected: Vec<&'static Recipe> = RECIPES
        .iter()
        .filter(|r| args.only.is_empty() || args.only.iter().any(|o| o == r.name))
        .collect();
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = selected
            .iter()
            .map(|recipe| {
                let context = &context;
                scope.spawn(move || {
                    produce(context, recipe).with_context(|| recipe.reference.to_string())
                })
            })
            .collect();
        // Join every thread before reporting the first error: none is left running.
        let results: Vec<Result<Outcome>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("build thread panicked")))
            })
            .collect();
        results.into_iter().collect::<Result<Vec<_>>>()
    })?;

    println!(
        "{:<38} {:<12} {:<71} {:>8}  {:<6}  {:<7}  {:>6}  runtimes",
        "image", "recipe", "digest", "size", "layout", "push", "secs"
    );
    for o in &outcomes {
        println!(
            "{:<38} {:<12} {:<71} {:>5.1} MB  {:<6}  {:<7}  {:>6.1}  {}",
            format!("{registry}/{}", o.recipe.reference),
            &o.hash[..12],
            o.manifest,
            o.layer_bytes as f64 / 1e6,
            if o.built { "built" } else { "cached" },
            match o.pushed {
                Some(true) => "pushed",
                Some(false) => "present",
                None => "-",
            },
            o.seconds,
            o.recipe.runtimes.join(",")
        );
    }
    Ok(())
}

/// What every image's build and push share.
struct Shared<'a> {
    mmdebstrap: &'a Path,
    skopeo: &'a Path,
    mirrors: &'a Mirrors,
    out: &'a Path,
    stamps: &'a Path,
    /// The registry to push to; `None` when it does not answer.
    registry: Option<&'a str>,
    rebuild: bool,
}

/// Builds `recipe`'s layout unless one for its hash exists, then pushes it unless the registry
/// holds it already.
fn produce(context: &Shared, recipe: &'static Recipe) -> Result<Outcome> {
    let started = Instant::now();
    let hash = recipe.hash();
    let dir = context.out.join(recipe.name);
    let stamp = context.stamps.join(recipe.name);
    let cached = !context.rebuild
        && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == hash)
        && manifest_of(&dir).is_ok();
    if !cached {
        eprintln!(
            "building {} ({} from {}; log {})",
            recipe.reference,
            recipe.suite,
            context.mirrors.archive,
            log_path(context.out, recipe).display()
        );
        build(
            context.mmdebstrap,
            recipe,
            &hash,
            context.mirrors,
            context.out,
        )?;
        fs::write(&stamp, &hash).with_context(|| format!("write {}", stamp.display()))?;
    }
    let manifest = manifest_of(&dir)?;
    let pushed = match context.registry {
        Some(registry) => {
            let push = Push {
                dir: &dir,
                manifest: &manifest,
                reference: recipe.reference.to_string(),
                compression: "gzip",
                preserve_digests: true,
            };
            Some(push.run(context.skopeo, registry, context.stamps)?.pushed)
        }
        None => None,
    };
    Ok(Outcome {
        recipe,
        hash,
        manifest,
        layer_bytes: dir_size(&dir.join("blobs/sha256"))?,
        built: !cached,
        pushed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn log_path(out: &Path, recipe: &Recipe) -> PathBuf {
    out.join(format!("{}.mmdebstrap.log", recipe.name))
}

/// Checks every external tool before doing any work; returns the mmdebstrap and skopeo paths.
fn check_tools() -> Result<(PathBuf, PathBuf)> {
    let mmdebstrap = find_in_path("mmdebstrap");
    let skopeo = find_in_path("skopeo");
    let mut missing = Vec::new();
    if mmdebstrap.is_none() {
        missing.push("mmdebstrap not found in PATH: install the Debian package mmdebstrap");
    }
    if skopeo.is_none() {
        missing.push("skopeo not found in PATH: install the Debian package skopeo");
    }
    match (mmdebstrap, skopeo) {
        (Some(m), Some(s)) => Ok((m, s)),
        _ => bail!("missing tools:\n  {}", missing.join("\n  ")),
    }
}

/// Runs mmdebstrap for `recipe` into a tar, turns the tar into the layout
/// `out/<name>` (written aside, then renamed into place) and removes the tar.
fn build(
    mmdebstrap: &Path,
    recipe: &Recipe,
    hash: &str,
    mirrors: &Mirrors,
    out: &Path,
) -> Result<()> {
    let tarball = out.join(format!(".{}.rootfs.tar", recipe.name));
    let log_path = log_path(out, recipe);
    let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let mut command = Command::new(mmdebstrap);
    command
        .args(MMDEBSTRAP_OPTIONS)
        .args(DPKG_OPTIONS.iter().map(|o| format!("--dpkgopt={o}")))
        .arg(format!("--include={}", recipe.packages.join(",")))
        .args(
            COMMON_HOOKS
                .iter()
                .chain(recipe.hooks)
                .map(|h| format!("--customize-hook={h}")),
        )
        .arg(recipe.suite)
        .arg(&tarball)
        .args(mirrors.sources(recipe.suite))
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let status = command.status().context("run mmdebstrap")?;
    if !status.success() {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let _ = fs::remove_file(&tarball);
        bail!(
            "mmdebstrap {status} (log {}):\n{}",
            log_path.display(),
            tail.join("\n")
        );
    }

    let dir = out.join(recipe.name);
    let temp = out.join(format!(".{}.tmp", recipe.name));
    if temp.exists() {
        fs::remove_dir_all(&temp).with_context(|| format!("remove {}", temp.display()))?;
    }
    let layout = LayoutWriter::create(&temp)?;
    let file = File::open(&tarball).with_context(|| format!("open {}", tarball.display()))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let entries = archive
        .entries()
        .with_context(|| format!("read {}", tarball.display()))?
        .filter_map(|entry| {
            entry
                .context("read rootfs tar entry")
                .and_then(|e| rootfs_entry(e, SOURCE_DATE_EPOCH))
                .transpose()
        });
    let created_by = format!(
        "mmdebstrap {} {}: {}",
        MMDEBSTRAP_OPTIONS[0],
        recipe.suite,
        recipe.packages.join(" ")
    );
    let layer = layout.add_layer_in_order(entries, Compression::default(), &created_by)?;
    let manifest = layout.add_image(&recipe.run_config(hash), &[layer])?;
    layout.write_index(&[(manifest, "latest")])?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    fs::rename(&temp, &dir).with_context(|| format!("rename layout to {}", dir.display()))?;
    fs::remove_file(&tarball).with_context(|| format!("remove {}", tarball.display()))?;
    Ok(())
}

/// A tar path as a layer path: relative, no `./`, no trailing `/`, no `..`. Empty for the root.
fn layer_path(raw: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(raw)
        .with_context(|| format!("non-UTF-8 path {}", String::from_utf8_lossy(raw)))?;
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => bail!("path {text} leaves the root"),
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// One entry of mmdebstrap's tar as a layer entry, or `None` for what the layer leaves out: the
/// root itself and what lies under /dev (device nodes the runtime provides; lull's unpacker
/// refuses them). Mtimes are clamped to `clamp`; mode, owner, xattrs and link targets are kept.
fn rootfs_entry<R: Read>(mut entry: tar::Entry<'_, R>, clamp: u64) -> Result<Option<Entry>> {
    let path = layer_path(&entry.path_bytes())?;
    if path.is_empty() || path.starts_with("dev/") {
        return Ok(None);
    }
    let header = entry.header();
    let kind = header.entry_type();
    let mode = header.mode().with_context(|| format!("{path}: mode"))? & 0o7777;
    let uid = header.uid().with_context(|| format!("{path}: uid"))?;
    let gid = header.gid().with_context(|| format!("{path}: gid"))?;
    let mtime = header
        .mtime()
        .with_context(|| format!("{path}: mtime"))?
        .min(clamp);
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry
        .pax_extensions()
        .with_context(|| format!("{path}: pax headers"))?
    {
        for extension in extensions {
            let extension = extension.with_context(|| format!("{path}: pax header"))?;
            let key = extension
                .key()
                .with_context(|| format!("{path}: pax key"))?;
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((name.to_string(), extension.value_bytes().to_vec()));
            }
        }
    }
    let link = || -> Result<String> {
        let target = entry
            .link_name_bytes()
            .with_context(|| format!("{path}: link without a target"))?;
        String::from_utf8(target.to_vec()).with_context(|| format!("{path}: non-UTF-8 link target"))
    };
    let content = match kind {
        tar::EntryType::Directory => Content::Dir,
        tar::EntryType::Symlink => Content::Symlink(link()?),
        tar::EntryType::Link => Content::Hardlink(layer_path(link()?.as_bytes())?),
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let mut data = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut data)
                .with_context(|| format!("{path}: read"))?;
            Content::Bytes(data)
        }
        other => bail!("{path}: unexpected {other:?} entry outside /dev"),
    };
    Ok(Some(Entry {
        path,
        mode,
        uid,
        gid,
        mtime,
        xattrs,
        content,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python() -> Recipe {
        RECIPES[0].clone()
    }

    #[test]
    fn recipe_hash_changes_with_the_recipe() {
        let base = python().hash();
        assert_eq!(base, python().hash(), "hash is stable");
        assert_eq!(base.len(), 64);

        let mut more = python();
        more.packages = &[
            "python3",
            "python3-pip",
            "python3-venv",
            "python-is-python3",
            "ca-certificates",
            "build-essential",
        ];
        let mut suite = python();
        suite.suite = "trixie";
        let mut hooks = python();
        hooks.hooks = &[];
        let mut env = python();
        env.env = &[];
        let mut reference = python();
        reference.reference = "lull/base/python:3";
        let hashes = [
            more.hash(),
            suite.hash(),
            hooks.hash(),
            env.hash(),
            reference.hash(),
        ];
        for (i, h) in hashes.iter().enumerate() {
            assert_ne!(*h, base, "change {i} left the hash alone");
        }
        // Every recipe has its own hash.
        let mut all: Vec<String> = RECIPES.iter().map(Recipe::hash).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), RECIPES.len());
    }

    #[test]
    fn recipe_hash_ignores_package_order_but_not_hook_order() {
        let mut reordered = python();
        reordered.packages = &[
            "ca-certificates",
            "python-is-python3",
            "python3-venv",
            "python3-pip",
            "python3",
        ];
        assert_eq!(reordered.hash(), python().hash());
        let text = python().text();
        assert!(text.contains(RECIPE_VERSION));
        assert!(text.contains("EXTERNALLY-MANAGED"));
        let first = text.find("mkdir -p").unwrap();
        let last = text.find("EXTERNALLY-MANAGED").unwrap();
        assert!(first < last, "common hooks run before the image's own");
    }

    #[test]
    fn run_config_has_no_command_and_carries_the_hash() {
        let config = python().run_config("abc");
        assert!(config.cmd.is_empty() && config.entrypoint.is_empty());
        assert_eq!(config.working_dir, "/app");
        assert!(config.env.contains(&PATH_ENV.to_string()));
        assert!(config.env.contains(&"LANG=C.UTF-8".to_string()));
        assert!(config.env.contains(&"PYTHONUNBUFFERED=1".to_string()));
        assert!(
            config
                .labels
                .contains(&("lull.base.recipe".to_string(), "abc".to_string()))
        );
    }

    #[test]
    fn mirrors_from_host_sources() {
        let files = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect()
        };
        // deb822, as on this machine; a disabled third-party file is ignored.
        let m = Mirrors::from_sources(&files(&[
            (
                "sources.list.d/debian.sources",
                "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n\n\
                 Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n",
            ),
            (
                "sources.list.d/node.list.disabled",
                "deb http://other.example/debian bookworm main\n",
            ),
        ]));
        assert_eq!(m.archive, "http://mirror.example/debian");
        assert_eq!(m.security, "http://mirror.example/debian-security");

        // One-line style with options; deb-src and comments skipped; security falls back.
        let m = Mirrors::from_sources(&files(&[(
            "sources.list",
            "# deb http://commented.example/debian bookworm main\n\
             deb-src http://src.example/debian bookworm main\n\
             deb [arch=amd64 signed-by=/k.gpg] https://mirror.example/debian bookworm main\n",
        )]));
        assert_eq!(m.archive, "https://mirror.example/debian");
        assert_eq!(m.security, Mirrors::default().security);

        // A disabled deb822 stanza does not count; nothing found means deb.debian.org.
        let m = Mirrors::from_sources(&files(&[(
            "x.sources",
            "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\n",
        )]));
        assert_eq!(m, Mirrors::default());
        assert_eq!(
            Mirrors::default().sources("trixie")[2],
            "deb http://deb.debian.org/debian-security trixie-security main"
        );
    }

    #[test]
    fn layer_paths() {
        assert_eq!(layer_path(b"./").unwrap(), "");
        assert_eq!(layer_path(b"./usr/bin/").unwrap(), "usr/bin");
        assert_eq!(layer_path(b"usr//lib").unwrap(), "usr/lib");
        assert!(layer_path(b"./usr/../../etc").is_err());
    }

    /// A tar like mmdebstrap's: `./` paths, a device node under /dev, a hard link, an xattr,
    /// an mtime after the epoch.
    fn sample_rootfs_tar() -> Vec<u8> {
        use tar::EntryType::{Char, Directory, Link, Regular, Symlink};
        type Spec<'a> = (&'a str, tar::EntryType, u32, u64, &'a [u8], Option<&'a str>);
        let specs: [Spec; 10] = [
            ("./", Directory, 0o755, 1, b"", None),
            ("./dev/", Directory, 0o755, 1, b"", None),
            ("./dev/null", Char, 0o666, 1, b"", None),
            (
                "./etc/",
                Directory,
                0o755,
                SOURCE_DATE_EPOCH + 99,
                b"",
                None,
            ),
            ("./etc/shadow", Regular, 0o640, 5, b"root:*:", None),
            ("./usr/", Directory, 0o755, 1, b"", None),
            ("./usr/bin/", Directory, 0o755, 1, b"", None),
            ("./usr/bin/perl", Regular, 0o4755, 1, b"ELF", None),
            (
                "./usr/bin/perl5",
                Link,
                0o755,
                1,
                b"",
                Some("./usr/bin/perl"),
            ),
            ("./usr/bin/sh", Symlink, 0o777, 1, b"", Some("dash")),
        ];
        let mut tar = tar::Builder::new(Vec::new());
        for (path, kind, mode, mtime, data, link) in specs {
            if path == "./usr/bin/perl" {
                tar.append_pax_extensions([("SCHILY.xattr.security.capability", &b"\x01\x02"[..])])
                    .unwrap();
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(if path.contains("shadow") { 42 } else { 0 });
            h.set_mtime(mtime);
            h.set_size(data.len() as u64);
            match link {
                Some(target) => tar.append_link(&mut h, path, target).unwrap(),
                None => tar.append_data(&mut h, path, data).unwrap(),
            }
        }
        tar.into_inner().unwrap()
    }

    #[test]
    fn rootfs_tar_becomes_layer_entries() {
        let bytes = sample_rootfs_tar();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let entries: Vec<Entry> = archive
            .entries()
            .unwrap()
            .filter_map(|e| rootfs_entry(e.unwrap(), SOURCE_DATE_EPOCH).transpose())
            .collect::<Result<_>>()
            .unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "dev",
                "etc",
                "etc/shadow",
                "usr",
                "usr/bin",
                "usr/bin/perl",
                "usr/bin/perl5",
                "usr/bin/sh"
            ]
        );
        let by = |p: &str| entries.iter().find(|e| e.path == p).unwrap();
        assert_eq!(by("etc").mtime, SOURCE_DATE_EPOCH, "clamped");
        assert_eq!(by("etc/shadow").mtime, 5, "older mtimes kept");
        assert_eq!((by("etc/shadow").gid, by("etc/shadow").mode), (42, 0o640));
        assert_eq!(by("usr/bin/perl").mode, 0o4755, "setuid kept");
        assert_eq!(
            by("usr/bin/perl").xattrs,
            [("security.capability".to_string(), vec![1u8, 2])]
        );
        assert!(
            matches!(&by("usr/bin/perl5").content, Content::Hardlink(t) if t == "usr/bin/perl")
        );
        assert!(matches!(&by("usr/bin/sh").content, Content::Symlink(t) if t == "dash"));
        assert!(matches!(&by("etc/shadow").content, Content::Bytes(b) if b == b"root:*:"));
    }

    #[test]
    fn a_device_outside_dev_is_refused() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Block);
        h.set_mode(0o600);
        h.set_size(0);
        tar.append_data(&mut h, "./etc/sda", std::io::empty())
            .unwrap();
        let bytes = tar.into_inner().unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let entry = archive.entries().unwrap().next().unwrap().unwrap();
        let err = rootfs_entry(entry, SOURCE_DATE_EPOCH).unwrap_err();
        assert!(err.to_string().contains("etc/sda"), "{err}");
    }

    #[test]
    fn same_rootfs_tar_gives_the_same_layer() {
        let dir = std::env::temp_dir().join(format!("xtask-base-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let layer = |n: u32| {
            let layout = LayoutWriter::create(&dir.join(n.to_string())).unwrap();
            let bytes = sample_rootfs_tar();
            let mut archive = tar::Archive::new(bytes.as_slice());
            let entries = archive
                .entries()
                .unwrap()
                .filter_map(|e| rootfs_entry(e.unwrap(), SOURCE_DATE_EPOCH).transpose());
            layout
                .add_layer_in_order(entries, Compression::default(), "t")
                .unwrap()
        };
        let (a, b) = (layer(1), layer(2));
        assert_eq!(a, b);

        // What the layer holds: the xattr, the setuid bit and the hard link survive.
        let blob = dir
            .join("1/blobs/sha256")
            .join(a.digest.trim_start_matches("sha256:"));
        let gz = flate2::read::GzDecoder::new(File::open(blob).unwrap());
        let mut archive = tar::Archive::new(gz);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            if path == "usr/bin/perl" {
                assert_eq!(entry.header().mode().unwrap(), 0o4755);
                let xattr = entry
                    .pax_extensions()
                    .unwrap()
                    .unwrap()
                    .map(|e| e.unwrap())
                    .find(|e| e.key() == Ok("SCHILY.xattr.security.capability"))
                    .map(|e| e.value_bytes().to_vec());
                assert_eq!(xattr, Some(vec![1, 2]));
            }
            if path == "usr/bin/perl5" {
                assert_eq!(entry.header().entry_type(), tar::EntryType::Link);
                assert_eq!(
                    entry.link_name().unwrap().unwrap().display().to_string(),
                    "usr/bin/perl"
                );
            }
            seen.push(path);
        }
        let _ = fs::remove_dir_all(&dir);
        assert!(!seen.iter().any(|p| p == "dev/null"), "{seen:?}");
        assert_eq!(seen.len(), 8);
    }
}

//! `lull image …`: the image store on this host.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use lull_runtime::pull::{Credentials, PullOptions};
use lull_runtime::reference::Reference;
use lull_runtime::store::{ImageRecord, ImageStore};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image from an OCI registry.
    Pull(PullArgs),
    /// Import an OCI image layout directory or a docker-archive tarball.
    Import(ImportArgs),
    /// List images.
    Ls,
    /// Remove an image reference (the image goes when no reference is left).
    Rm { reference: String },
    /// Delete blobs and unpacked layers that no image and no instance uses.
    Gc,
    /// Write a service revision's image as an OCI image layout (the daemon names the image;
    /// it is read from the image store here, with your permissions).
    Export(crate::client::image::ExportArgs),
    /// Push a service revision's image to a registry (through the daemon).
    Push(crate::client::image::PushArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args, Clone, Default)]
pub struct RegistryArgs {
    /// A docker `config.json` to read registry credentials from.
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
    /// Registry user name (the password is read from stdin).
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password from stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// A registry (`host:port`) to reach over plain HTTP; loopback registries always may be.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
}

impl RegistryArgs {
    pub fn options(&self) -> Result<PullOptions> {
        let mut options = PullOptions {
            docker_config: self.docker_config.clone(),
            insecure_registries: self.insecure_registries.clone(),
            ..Default::default()
        };
        if let Some(username) = &self.username {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("read the password from stdin")?;
            options.credentials = Some(Credentials::new(
                username.clone(),
                password.trim_end_matches(['\r', '\n']),
            ));
        }
        Ok(options)
    }
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// An OCI image layout directory or a docker-archive tarball.
    pub path: PathBuf,
    /// Reference to give the image (required for an OCI layout).
    #[arg(long)]
    pub tag: Option<String>,
    /// In an OCI layout holding several images, the one whose ref.name annotation is this.
    #[arg(long)]
    pub name: Option<String>,
}

pub fn parse_reference(text: &str) -> Result<Reference> {
    // The error names the reference and the bad part already.
    Ok(text.parse::<Reference>()?)
}

pub async fn run(data_dir: &Path, cmd: &ImageCommand) -> Result<ExitCode> {
    let store = ImageStore::open(data_dir)
        .with_context(|| format!("open the image store in {}", data_dir.display()))?;
    match cmd {
        ImageCommand::Pull(args) => {
            let reference = parse_reference(&args.reference)?;
            let record = store.pull(&reference, &args.registry.options()?).await?;
            println!("pulled {reference} ({})", record.manifest_digest);
        }
        ImageCommand::Import(args) => {
            let record = import(&store, args).await?;
            println!(
                "imported {} ({})",
                record
                    .references
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                record.manifest_digest
            );
        }
        ImageCommand::Ls => {
            println!(
                "{:<60} {:<20} {:>10} {:>6}",
                "REFERENCE", "DIGEST", "SIZE", "LAYERS"
            );
            for record in store.list()? {
                let size: u64 = record.layers.iter().map(|l| l.size).sum();
                let short = &record.manifest_digest.hex()[..12];
                let refs = if record.references.is_empty() {
                    vec!["<none>".to_owned()]
                } else {
                    record.references.iter().map(ToString::to_string).collect()
                };
                for r in refs {
                    println!(
                        "{r:<60} sha256:{short:<13} {:>10} {:>6}",
                        crate::size::human(size),
                        record.layers.len()
                    );
                }
            }
        }
        ImageCommand::Rm { reference } => {
            let reference = parse_reference(reference)?;
            let removed = store.remove(&reference)?;
            if removed.record_removed {
                println!(
                    "removed {reference} and image {} (run `lull image gc` to free its blobs)",
                    removed.manifest_digest
                );
            } else {
                println!(
                    "removed {reference} (image {} is still referenced)",
                    removed.manifest_digest
                );
            }
        }
        ImageCommand::Gc | ImageCommand::Export(_) | ImageCommand::Push(_) => {
            unreachable!("dispatched with the runtime or the daemon")
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn import(store: &ImageStore, args: &ImportArgs) -> Result<ImageRecord> {
    let meta = std::fs::metadata(&args.path).with_context(|| format!("{}", args.path.display()))?;
    let tag = args.tag.as_deref().map(parse_reference).transpose()?;
    if meta.is_dir() {
        let Some(tag) = tag else {
            bail!(
                "importing the OCI layout {} needs --tag <reference>",
                args.path.display()
            )
        };
        Ok(store
            .import_oci_layout(&args.path, args.name.as_deref(), &tag)
            .await?)
    } else {
        if args.name.is_some() {
            bail!(
                "--name applies to OCI layouts; {} is a file (a docker-archive)",
                args.path.display()
            );
        }
        Ok(store
            .import_docker_archive(&args.path, tag.as_ref())
            .await?)
    }
}

pub async fn gc(runtime: &lull_runtime::host::Runtime) -> Result<ExitCode> {
    let report = runtime.collect_garbage().await?;
    println!(
        "removed {} blobs ({}), {} unpacked layers; kept {} layers still used by instances",
        report.store.removed_blobs.len(),
        crate::size::human(report.store.freed_bytes),
        report.layers.len(),
        report.layers_in_use
    );
    Ok(ExitCode::SUCCESS)
}

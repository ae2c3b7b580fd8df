//! From a source tree on disk and its apprunner.yaml to what [`crate::build`] runs: the file
//! listing the plan reads, the plan ([`crate::plan`]), and the recipe with what the image
//! carries (its env, `PORT`, the run command's words, labels).

use std::path::{Path, PathBuf};

use crate::apprunner::AppRunnerConfig;
use crate::build::{DependencyPlan, Recipe};
use crate::plan::{self, PlanError};
use crate::words::split_words;

/// The names apprunner.yaml goes by at a source's root, in the order they are looked for.
pub const CONFIG_FILES: [&str; 2] = ["apprunner.yaml", "apprunner.yml"];

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("run.command: {0}")]
    Command(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The recipe for building `root` (the source tree) on a base image with manifest digest
/// `base_digest`, and the plan's note on a dependency command it could not hoist.
pub fn recipe(
    config: &AppRunnerConfig,
    root: &Path,
    base_digest: &str,
) -> Result<(Recipe, Option<String>), PrepareError> {
    let files = list_files(root)?;
    let read = |rel: &str| std::fs::read(root.join(rel));
    let plan = plan::plan(config, &files, &read, base_digest)?;
    let port = config
        .run
        .network
        .port
        .unwrap_or(crate::apprunner::DEFAULT_PORT);
    let run_command = match &config.run.command {
        Some(line) => Some(split_words(line).map_err(|e| PrepareError::Command(e.to_string()))?),
        None => None,
    };
    let mut run_env = plan.image_env.clone();
    run_env.push(("PORT".into(), port.to_string()));
    let lines = |step: &plan::Step| -> Vec<String> {
        step.commands.iter().map(|c| c.line.clone()).collect()
    };
    let mut caches: Vec<PathBuf> = plan.runtime.caches.iter().map(|c| c.path.into()).collect();
    caches.sort();
    caches.dedup();
    let recipe = Recipe {
        dependencies: plan.dependency_step.as_ref().map(|d| DependencyPlan {
            commands: d.commands.iter().map(|c| c.line.clone()).collect(),
            manifests: d.manifests.iter().map(|m| PathBuf::from(&m.path)).collect(),
            cache_key: d
                .cache_key
                .strip_prefix("sha256:")
                .unwrap_or(&d.cache_key)
                .to_owned(),
        }),
        build: lines(&plan.full_step),
        pre_run: lines(&plan.pre_run),
        build_env: plan.build_env.clone(),
        run_env,
        run_command,
        port,
        labels: vec![
            ("lull.runtime".into(), plan.runtime.name.into()),
            (
                "org.opencontainers.image.base.digest".into(),
                base_digest.to_owned(),
            ),
        ],
        caches,
    };
    Ok((recipe, plan.not_hoisted))
}

/// Every regular file under `root`, relative and `/`-separated, sorted.
pub fn list_files(root: &Path) -> Result<Vec<String>, PrepareError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(|source| PrepareError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| PrepareError::Io {
                path: dir.clone(),
                source,
            })?;
            let kind = entry.file_type().map_err(|source| PrepareError::Io {
                path: entry.path(),
                source,
            })?;
            let child = rel.join(entry.file_name());
            if kind.is_dir() {
                stack.push(child);
            } else if kind.is_file() {
                out.push(child.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flask_source_gives_a_cached_dependency_step_and_the_image_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("requirements.txt"), "flask==3.0.3\n").expect("write");
        std::fs::create_dir(dir.path().join("app")).expect("mkdir");
        std::fs::write(dir.path().join("app/main.py"), "print(1)\n").expect("write");
        let config = AppRunnerConfig::parse(
            "version: 1.0\nruntime: python3\nbuild:\n  commands:\n    build:\n      - pip install -r requirements.txt\n      - python -c 'print(2)'\nrun:\n  command: python app/main.py --port 8000\n  network:\n    port: 8000\n",
        )
        .expect("parses");
        let (recipe, note) = recipe(&config, dir.path(), "sha256:00").expect("a recipe");
        assert_eq!(note, None);
        let deps = recipe.dependencies.expect("a dependency step");
        assert_eq!(deps.commands, ["pip install -r requirements.txt"]);
        assert_eq!(deps.manifests, [PathBuf::from("requirements.txt")]);
        assert_eq!(recipe.build, ["python -c 'print(2)'"]);
        assert_eq!(recipe.port, 8000);
        assert!(recipe.run_env.contains(&("PORT".into(), "8000".into())));
        assert_eq!(
            recipe.run_command,
            Some(vec![
                "python".into(),
                "app/main.py".into(),
                "--port".into(),
                "8000".into()
            ])
        );
        assert!(recipe.caches.contains(&PathBuf::from("/root/.cache/pip")));
        assert_eq!(
            list_files(dir.path()).expect("listing"),
            ["app/main.py", "requirements.txt"]
        );
    }
}

//! The instance's main process from the image's config and the operator's overrides, with
//! Docker's rules (an overridden entrypoint drops the image's cmd).

use serde::{Deserialize, Serialize};

use super::config::ProcessConfig;

/// PATH given when the image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The parts of an image config that shape the process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageProcess {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// What the operator changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessOverrides {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// Set or replace variables (applied in order).
    pub env: Vec<(String, String)>,
    /// Sets `PORT`, which lull always gives the app.
    pub port: Option<u16>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProcessError {
    #[error("no command to run: the image has no entrypoint or cmd and none was given")]
    NoCommand,
    #[error("environment variable name {0:?} is empty or contains '=' or a NUL byte")]
    BadEnvName(String),
    #[error("working dir {0:?} is not an absolute path")]
    RelativeWorkingDir(String),
}

pub fn resolve_process(
    image: &ImageProcess,
    overrides: &ProcessOverrides,
) -> Result<ProcessConfig, ProcessError> {
    let (entrypoint, cmd) = match &overrides.entrypoint {
        Some(ep) => (ep.clone(), overrides.cmd.clone().unwrap_or_default()),
        None => (
            image.entrypoint.clone(),
            overrides.cmd.clone().unwrap_or_else(|| image.cmd.clone()),
        ),
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() || args[0].is_empty() {
        return Err(ProcessError::NoCommand);
    }

    let mut env: Vec<String> = image.env.clone();
    let mut set = |key: &str, value: &str| -> Result<(), ProcessError> {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(ProcessError::BadEnvName(key.to_owned()));
        }
        let entry = format!("{key}={value}");
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map(|(k, _)| k) == Some(key))
        {
            Some(existing) => *existing = entry,
            None => env.push(entry),
        }
        Ok(())
    };
    for (k, v) in &overrides.env {
        set(k, v)?;
    }
    if let Some(port) = overrides.port {
        set("PORT", &port.to_string())?;
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }

    let cwd = overrides
        .working_dir
        .clone()
        .unwrap_or_else(|| image.working_dir.clone());
    let cwd = if cwd.is_empty() { "/".to_owned() } else { cwd };
    if !cwd.starts_with('/') {
        return Err(ProcessError::RelativeWorkingDir(cwd));
    }
    let user = overrides.user.clone().unwrap_or_else(|| image.user.clone());
    Ok(ProcessConfig {
        args,
        env,
        cwd,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageProcess {
        ImageProcess {
            entrypoint: vec!["/app/server".into()],
            cmd: vec!["--fast".into()],
            env: vec!["PATH=/bin".into(), "MODE=prod".into()],
            working_dir: "/app".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn image_defaults_apply() {
        let p = resolve_process(&image(), &ProcessOverrides::default()).unwrap();
        assert_eq!(p.args, vec!["/app/server", "--fast"]);
        assert_eq!(p.env, vec!["PATH=/bin", "MODE=prod"]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/app", "app"));
    }

    #[test]
    fn overrides_follow_docker_rules() {
        let o = ProcessOverrides {
            cmd: Some(vec!["--slow".into()]),
            ..Default::default()
        };
        assert_eq!(
            resolve_process(&image(), &o).unwrap().args,
            vec!["/app/server", "--slow"]
        );
        let o = ProcessOverrides {
            entrypoint: Some(vec!["/bin/sh".into()]),
            ..Default::default()
        };
        assert_eq!(resolve_process(&image(), &o).unwrap().args, vec!["/bin/sh"]);
        let o = ProcessOverrides {
            env: vec![("MODE".into(), "dev".into()), ("NEW".into(), "1".into())],
            port: Some(9000),
            user: Some("0".into()),
            working_dir: Some("/srv".into()),
            ..Default::default()
        };
        let p = resolve_process(&image(), &o).unwrap();
        assert_eq!(p.env, vec!["PATH=/bin", "MODE=dev", "NEW=1", "PORT=9000"]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/srv", "0"));
    }

    #[test]
    fn bad_input_is_refused() {
        let empty = ImageProcess::default();
        assert_eq!(
            resolve_process(&empty, &ProcessOverrides::default()),
            Err(ProcessError::NoCommand)
        );
        let o = ProcessOverrides {
            env: vec![("A=B".into(), "x".into())],
            ..Default::default()
        };
        assert_eq!(
            resolve_process(&image(), &o),
            Err(ProcessError::BadEnvName("A=B".into()))
        );
        let o = ProcessOverrides {
            working_dir: Some("app".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve_process(&image(), &o),
            Err(ProcessError::RelativeWorkingDir("app".into()))
        );
        let p = resolve_process(
            &ImageProcess {
                cmd: vec!["x".into()],
                ..Default::default()
            },
            &ProcessOverrides::default(),
        )
        .unwrap();
        assert_eq!(p.env[0], format!("PATH={DEFAULT_PATH}"));
        assert_eq!(p.cwd, "/");
    }
}

//! Host pressure (PSI): the share of time tasks stalled on CPU or memory, as the kernel reports
//! it in `/proc/pressure/{cpu,memory}`. A metric, and a brake on scale-out: starting more
//! instances on a host that already stalls makes every one of them slower.

use std::path::{Path, PathBuf};

/// The ten-second averages lull acts on, in percent; `None` where the kernel has no PSI
/// (older than 4.20, or booted with `psi=0`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pressure {
    pub cpu_some_avg10: Option<f64>,
    pub memory_some_avg10: Option<f64>,
    pub memory_full_avg10: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PressureError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Where pressure comes from: the kernel, or a test.
pub trait PressureSource: Send + Sync {
    fn read(&self) -> Result<Pressure, PressureError>;
}

/// The kernel's pressure files under a `/proc/pressure`-like directory.
#[derive(Debug, Clone)]
pub struct ProcPressure {
    dir: PathBuf,
}

impl ProcPressure {
    pub fn new(dir: impl Into<PathBuf>) -> ProcPressure {
        ProcPressure { dir: dir.into() }
    }

    /// `/proc/pressure`.
    pub fn host() -> ProcPressure {
        ProcPressure::new("/proc/pressure")
    }

    fn file(&self, name: &str) -> Result<Option<(f64, Option<f64>)>, PressureError> {
        let path = self.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_pressure(&path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            // PSI compiled in but disabled at boot: the files exist and refuse reads.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
            Err(source) => Err(PressureError::Read { path, source }),
        }
    }
}

impl PressureSource for ProcPressure {
    fn read(&self) -> Result<Pressure, PressureError> {
        let cpu = self.file("cpu")?;
        let memory = self.file("memory")?;
        Ok(Pressure {
            cpu_some_avg10: cpu.map(|(some, _)| some),
            memory_some_avg10: memory.map(|(some, _)| some),
            memory_full_avg10: memory.and_then(|(_, full)| full),
        })
    }
}

/// Parses a pressure file: the `avg10` of its `some` line and of its `full` line (absent from
/// `cpu` on kernels before 5.13).
pub fn parse_pressure(path: &Path, text: &str) -> Result<(f64, Option<f64>), PressureError> {
    let mut some = None;
    let mut full = None;
    for (n, line) in text.lines().enumerate() {
        let err = |message: String| PressureError::Parse {
            path: path.to_owned(),
            line: n + 1,
            message,
        };
        let mut words = line.split_whitespace();
        let kind = match words.next() {
            Some(k @ ("some" | "full")) => k,
            Some(other) => return Err(err(format!("unknown line kind {other:?}"))),
            None => continue,
        };
        let avg10 = words
            .find_map(|w| w.strip_prefix("avg10="))
            .ok_or_else(|| err("no avg10= field".into()))?;
        let value: f64 = avg10
            .parse()
            .map_err(|_| err(format!("avg10={avg10:?} is not a number")))?;
        match kind {
            "some" => some = Some(value),
            _ => full = Some(value),
        }
    }
    let some = some.ok_or_else(|| PressureError::Parse {
        path: path.to_owned(),
        line: 1,
        message: "no `some` line".into(),
    })?;
    Ok((some, full))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_format() {
        let text = "some avg10=5.69 avg60=2.78 avg300=5.14 total=9781619714\n\
                    full avg10=0.25 avg60=0.00 avg300=0.00 total=0\n";
        let (some, full) = parse_pressure(Path::new("cpu"), text).unwrap();
        assert_eq!(some, 5.69);
        assert_eq!(full, Some(0.25));
        let (some, full) =
            parse_pressure(Path::new("cpu"), "some avg10=1.00 avg60=0 total=1\n").unwrap();
        assert_eq!((some, full), (1.0, None));
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = parse_pressure(Path::new("memory"), "some avg10=x total=1\n").unwrap_err();
        assert_eq!(e.to_string(), "memory line 1: avg10=\"x\" is not a number");
        let e = parse_pressure(Path::new("memory"), "some avg10=1\nhalf avg10=2\n").unwrap_err();
        assert_eq!(e.to_string(), "memory line 2: unknown line kind \"half\"");
        assert!(parse_pressure(Path::new("memory"), "").is_err());
    }

    #[test]
    fn missing_files_mean_no_psi() {
        let dir = std::env::temp_dir().join(format!("lull-psi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("memory"),
            "some avg10=3.5 total=0\nfull avg10=1.5 total=0\n",
        )
        .unwrap();
        let p = ProcPressure::new(&dir).read().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(p.cpu_some_avg10, None);
        assert_eq!(p.memory_some_avg10, Some(3.5));
        assert_eq!(p.memory_full_avg10, Some(1.5));
    }

    #[test]
    fn the_hosts_files_parse_when_present() {
        // Every kernel CI runs on here has PSI; one without it reads as all None.
        let p = ProcPressure::host().read().unwrap();
        if Path::new("/proc/pressure/cpu").exists() {
            assert!(p.cpu_some_avg10.is_some_and(|v| (0.0..=100.0).contains(&v)));
        }
    }
}

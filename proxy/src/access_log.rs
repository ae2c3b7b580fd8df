//! One JSON line per request, appended to a per-service file and rotated by size.
//!
//! Each line goes out in a single `write` on a file opened for append, so a reader following
//! the file (the daemon streaming logs) never sees half a line, and lines from concurrent
//! requests never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("opening access log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing access log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rotating access log {path}")]
    Rotate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One request, as logged.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct AccessEntry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub request_id: String,
    pub service: String,
    pub revision: String,
    /// Empty when no instance was chosen (queue full, paused, bad request).
    pub instance: String,
    pub method: String,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub queued_ms: f64,
    pub woke: bool,
    pub client: String,
}

struct Sink {
    file: File,
    size: u64,
}

/// A service's access log file.
pub struct AccessLog {
    path: PathBuf,
    /// Rotate when the file would grow past this many bytes; `None`: never.
    max_bytes: Option<u64>,
    sink: Mutex<Sink>,
}

impl AccessLog {
    /// Opens (creating) `path` for append. With `max_bytes`, the file is renamed to
    /// `<path>.1` (replacing an older one) when it would grow past that size.
    pub fn open(path: &Path, max_bytes: Option<u64>) -> Result<AccessLog, AccessLogError> {
        let sink = open_sink(path)?;
        Ok(AccessLog {
            path: path.to_path_buf(),
            max_bytes,
            sink: Mutex::new(sink),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&self, entry: &AccessEntry) -> Result<(), AccessLogError> {
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(max) = self.max_bytes
            && sink.size > 0
            && sink.size + line.len() as u64 > max
        {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            std::fs::rename(&self.path, &rotated).map_err(|source| AccessLogError::Rotate {
                path: self.path.clone(),
                source,
            })?;
            *sink = open_sink(&self.path)?;
        }
        sink.file
            .write_all(&line)
            .map_err(|source| AccessLogError::Write {
                path: self.path.clone(),
                source,
            })?;
        sink.size += line.len() as u64;
        Ok(())
    }

    /// Writes, logging a failure instead of returning it (the request path never fails on
    /// its log).
    pub fn record(&self, entry: &AccessEntry) {
        if let Err(e) = self.write(entry) {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "access log entry lost");
        }
    }
}

fn open_sink(path: &Path) -> Result<Sink, AccessLogError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let size = file
        .metadata()
        .map_err(|source| AccessLogError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    Ok(Sink { file, size })
}

/// Now, as the log writes it.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u16) -> AccessEntry {
        AccessEntry {
            time: now_rfc3339(),
            request_id: "id".into(),
            service: "svc".into(),
            revision: "r1".into(),
            instance: "i1".into(),
            method: "GET".into(),
            host: "h".into(),
            path: "/".into(),
            status: n,
            bytes_in: 1,
            bytes_out: 2,
            duration_ms: 1.5,
            queued_ms: 0.0,
            woke: true,
            client: "127.0.0.1:1".into(),
        }
    }

    #[test]
    fn lines_are_json_and_rotate_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let log = AccessLog::open(&path, Some(600)).unwrap();
        for n in 0..5 {
            log.write(&entry(200 + n)).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.path().join("svc.log.1")).unwrap();
        assert!(text.len() <= 600, "{}", text.len());
        let all: Vec<AccessEntry> = old
            .lines()
            .chain(text.lines())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(all.len() >= 2);
        assert_eq!(all.last().unwrap().status, 204);
        let t = &all[0].time;
        assert!(
            t.ends_with('Z') && t.len() == "2026-01-01T00:00:00.000Z".len(),
            "{t}"
        );
    }
}

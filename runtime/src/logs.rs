//! Per-instance log store: every line the app writes to stdout or stderr, with an RFC 3339 UTC
//! timestamp and a stream tag, in size-capped rotated files readable while the app runs and
//! after it exits.
//!
//! Line format (that of the CRI log files): `<timestamp> <stdout|stderr> <F|P> <text>` where `P`
//! marks a chunk of a line longer than [`MAX_LINE`] and `F` its final part.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};

/// Longest line stored as one record; longer lines are split into `P` records.
pub const MAX_LINE: usize = 16 * 1024;
/// Name of the file being written.
pub const CURRENT: &str = "current.log";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("log file {path} line {line}: malformed record")]
    Malformed { path: PathBuf, line: usize },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Size caps of one instance's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogLimits {
    /// Bytes in the current file before it is rotated.
    pub max_file_bytes: u64,
    /// Rotated files kept besides the current one.
    pub max_rotated: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_file_bytes: 10 * 1024 * 1024,
            max_rotated: 4,
        }
    }
}

/// Appends records to an instance's log dir, rotating by size.
pub struct LogWriter {
    dir: PathBuf,
    file: File,
    written: u64,
    limits: LogLimits,
    buf: Vec<u8>,
}

impl LogWriter {
    pub fn open(dir: &Path, limits: LogLimits) -> Result<Self, LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(CURRENT);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let written = file.metadata().map_err(io_err(&path))?.len();
        Ok(LogWriter {
            dir: dir.to_owned(),
            file,
            written,
            limits,
            buf: Vec::with_capacity(MAX_LINE + 64),
        })
    }

    /// Writes one record (`text` without its newline) stamped now.
    pub fn record(&mut self, stream: Stream, partial: bool, text: &[u8]) -> Result<(), LogError> {
        self.record_at(Utc::now(), stream, partial, text)
    }

    pub fn record_at(
        &mut self,
        at: DateTime<Utc>,
        stream: Stream,
        partial: bool,
        text: &[u8],
    ) -> Result<(), LogError> {
        self.buf.clear();
        self.buf
            .extend_from_slice(at.to_rfc3339_opts(SecondsFormat::Nanos, true).as_bytes());
        self.buf.push(b' ');
        self.buf.extend_from_slice(stream.as_str().as_bytes());
        self.buf
            .extend_from_slice(if partial { b" P " } else { b" F " });
        self.buf.extend_from_slice(text);
        self.buf.push(b'\n');
        if self.written > 0 && self.written + self.buf.len() as u64 > self.limits.max_file_bytes {
            self.rotate()?;
        }
        let path = self.dir.join(CURRENT);
        self.file.write_all(&self.buf).map_err(io_err(&path))?;
        self.written += self.buf.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), LogError> {
        let name = |n: u32| self.dir.join(format!("{CURRENT}.{n}"));
        if self.limits.max_rotated == 0 {
            let current = self.dir.join(CURRENT);
            self.file.set_len(0).map_err(io_err(&current))?;
            self.written = 0;
            return Ok(());
        }
        let oldest = name(self.limits.max_rotated);
        if oldest.exists() {
            fs::remove_file(&oldest).map_err(io_err(&oldest))?;
        }
        for n in (1..self.limits.max_rotated).rev() {
            let from = name(n);
            if from.exists() {
                fs::rename(&from, name(n + 1)).map_err(io_err(&from))?;
            }
        }
        let current = self.dir.join(CURRENT);
        fs::rename(&current, name(1)).map_err(io_err(&current))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current)
            .map_err(io_err(&current))?;
        self.written = 0;
        Ok(())
    }
}

/// Splits a byte stream into lines for [`LogWriter`], keeping an unfinished line across reads.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; calls `emit(partial, text)` for each complete line or over-long chunk.
    pub fn feed<E>(
        &mut self,
        mut data: &[u8],
        mut emit: impl FnMut(bool, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            let (line, rest) = data.split_at(pos);
            self.pending.extend_from_slice(line);
            self.emit_chunks(&mut emit, true)?;
            data = &rest[1..];
        }
        self.pending.extend_from_slice(data);
        self.emit_chunks(&mut emit, false)
    }

    /// Flushes an unfinished last line (the stream ended without a newline).
    pub fn finish<E>(
        &mut self,
        mut emit: impl FnMut(bool, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if !self.pending.is_empty() {
            self.emit_chunks(&mut emit, true)?;
        }
        Ok(())
    }

    fn emit_chunks<E>(
        &mut self,
        emit: &mut impl FnMut(bool, &[u8]) -> Result<(), E>,
        complete: bool,
    ) -> Result<(), E> {
        let mut start = 0;
        while self.pending.len() - start > MAX_LINE {
            emit(true, &self.pending[start..start + MAX_LINE])?;
            start += MAX_LINE;
        }
        if complete {
            emit(false, &self.pending[start..])?;
            self.pending.clear();
        } else {
            self.pending.drain(..start);
        }
        Ok(())
    }
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogRecord {
    pub time: String,
    pub stream: Stream,
    pub partial: bool,
    pub text: String,
}

fn parse_record(line: &str) -> Option<LogRecord> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let stream = match parts.next()? {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        "P" => true,
        "F" => false,
        _ => return None,
    };
    let text = parts.next().unwrap_or("");
    DateTime::parse_from_rfc3339(time).ok()?;
    Some(LogRecord {
        time: time.to_owned(),
        stream,
        partial,
        text: text.to_owned(),
    })
}

/// The log files of a dir, oldest first.
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u32, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name
                .strip_prefix(CURRENT)?
                .strip_prefix('.')?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let current = dir.join(CURRENT);
    if current.exists() {
        files.push(current);
    }
    files
}

/// The bytes of the log files of a dir.
pub fn dir_bytes(dir: &Path) -> u64 {
    log_files(dir)
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Keeps the logs of several instance dirs, given oldest instance first, under `max_bytes`
/// together: whole files are removed, the oldest first (an older instance's before a newer
/// one's, a rotated file before its current one), and a dir left without a log file is removed
/// too. Returns the files removed.
pub fn trim_to(dirs: &[PathBuf], max_bytes: u64) -> Result<Vec<PathBuf>, LogError> {
    let mut files: Vec<(PathBuf, u64)> = Vec::new();
    for dir in dirs {
        for path in log_files(dir) {
            match fs::metadata(&path) {
                Ok(meta) => files.push((path, meta.len())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::Io { path, source: e }),
            }
        }
    }
    let mut total: u64 = files.iter().map(|(_, len)| len).sum();
    let mut removed = Vec::new();
    for (path, len) in files {
        if total <= max_bytes {
            break;
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::Io { path, source: e }),
        }
        total -= len;
        removed.push(path);
    }
    for dir in dirs {
        if dir.is_dir() && log_files(dir).is_empty() {
            fs::remove_dir_all(dir).map_err(io_err(dir))?;
        }
    }
    Ok(removed)
}

/// Reads every record kept for an instance, oldest first.
pub fn read_all(dir: &Path) -> Result<Vec<LogRecord>, LogError> {
    let mut out = Vec::new();
    for path in log_files(dir) {
        let file = match File::open(&path) {
            Ok(f) => f,
            // Rotated away between listing and opening.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(LogError::Io { path, source: e }),
        };
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut n = 0;
        loop {
            line.clear();
            let read = reader.read_until(b'\n', &mut line).map_err(io_err(&path))?;
            // End of file, or a last line still being written: not a record yet.
            if read == 0 || !line.ends_with(b"\n") {
                break;
            }
            n += 1;
            line.pop();
            let text = String::from_utf8_lossy(&line);
            let record = parse_record(&text).ok_or(LogError::Malformed {
                path: path.clone(),
                line: n,
            })?;
            out.push(record);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(splitter: &mut LineSplitter, data: &[u8]) -> Vec<(bool, Vec<u8>)> {
        let mut out = Vec::new();
        splitter
            .feed::<()>(data, |p, t| {
                out.push((p, t.to_vec()));
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut s = LineSplitter::default();
        assert_eq!(collect(&mut s, b"one\ntw"), vec![(false, b"one".to_vec())]);
        assert_eq!(
            collect(&mut s, b"o\n\nthree"),
            vec![(false, b"two".to_vec()), (false, b"".to_vec())]
        );
        let mut last = Vec::new();
        s.finish::<()>(|p, t| {
            last.push((p, t.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(last, vec![(false, b"three".to_vec())]);
    }

    #[test]
    fn long_lines_become_partial_records() {
        let mut s = LineSplitter::default();
        let mut data = vec![b'x'; MAX_LINE * 2 + 10];
        data.push(b'\n');
        let out = collect(&mut s, &data);
        assert_eq!(out.len(), 3);
        assert!(out[0].0 && out[1].0 && !out[2].0);
        assert_eq!(out[2].1.len(), 10);
    }

    #[test]
    fn rotates_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_file_bytes: 200,
            max_rotated: 2,
        };
        let mut w = LogWriter::open(dir.path(), limits).unwrap();
        for i in 0..20 {
            w.record(Stream::Stdout, false, format!("line {i}").as_bytes())
                .unwrap();
        }
        w.record(Stream::Stderr, false, b"oops").unwrap();
        let files = log_files(dir.path());
        assert_eq!(files.len(), 3, "{files:?}");
        let records = read_all(dir.path()).unwrap();
        // Old lines were rotated out; the kept ones are the newest, in order, with no gap.
        let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(*texts.last().unwrap(), "oops");
        assert_eq!(records.last().unwrap().stream, Stream::Stderr);
        let numbers: Vec<u32> = texts[..texts.len() - 1]
            .iter()
            .map(|t| t[5..].parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        assert_eq!(*numbers.last().unwrap(), 19);
        assert!(records[0].time.ends_with('Z'));
        for f in &files {
            assert!(fs::metadata(f).unwrap().len() <= 200);
        }
    }

    #[test]
    fn a_line_still_being_written_is_not_a_record_yet() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(CURRENT),
            "2026-01-01T00:00:00Z stdout F one\n2026-01-01T00:0",
        )
        .unwrap();
        let records = read_all(dir.path()).unwrap();
        assert_eq!(
            records.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(),
            vec!["one"]
        );
    }

    #[test]
    fn malformed_files_are_reported_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(CURRENT),
            "2026-01-01T00:00:00Z stdout F ok\ngarbage\n",
        )
        .unwrap();
        match read_all(dir.path()) {
            Err(LogError::Malformed { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected malformed, got {other:?}"),
        }
    }
}

/// Follows an instance's log as it grows, across rotations (`tail -F`).
pub struct Follower {
    dir: PathBuf,
    reader: Option<(BufReader<File>, u64)>,
    partial: Vec<u8>,
    /// Rotated files still to print before the current one.
    backlog: Vec<PathBuf>,
}

impl Follower {
    /// Starts with the oldest record kept (rotated files first), then follows.
    pub fn from_start(dir: &Path) -> Follower {
        Follower {
            dir: dir.to_owned(),
            reader: None,
            partial: Vec::new(),
            backlog: log_files(dir)
                .into_iter()
                .filter(|p| !p.ends_with(CURRENT))
                .collect(),
        }
    }

    /// Starts at the end of what is already written.
    pub fn from_end(dir: &Path) -> Follower {
        let mut f = Follower {
            dir: dir.to_owned(),
            reader: None,
            partial: Vec::new(),
            backlog: Vec::new(),
        };
        if let Some((mut reader, inode)) = f.open_current() {
            use std::io::Seek;
            let _ = reader.seek(io::SeekFrom::End(0));
            f.reader = Some((reader, inode));
        }
        f
    }

    fn open_current(&self) -> Option<(BufReader<File>, u64)> {
        use std::os::unix::fs::MetadataExt;
        let file = File::open(self.dir.join(CURRENT)).ok()?;
        let inode = file.metadata().ok()?.ino();
        Some((BufReader::new(file), inode))
    }

    /// Records written since the last call.
    pub fn poll(&mut self) -> Vec<LogRecord> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        for path in std::mem::take(&mut self.backlog) {
            if let Ok(file) = File::open(&path) {
                for line in BufReader::new(file).split(b'\n').map_while(Result::ok) {
                    if let Some(r) = parse_record(&String::from_utf8_lossy(&line)) {
                        out.push(r);
                    }
                }
            }
        }
        loop {
            if self.reader.is_none() {
                self.reader = self.open_current();
                if self.reader.is_none() {
                    return out;
                }
            }
            let Some((reader, inode)) = self.reader.as_mut() else {
                return out;
            };
            loop {
                match reader.read_until(b'\n', &mut self.partial) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if self.partial.ends_with(b"\n") => {
                        let line = String::from_utf8_lossy(&self.partial[..self.partial.len() - 1])
                            .into_owned();
                        if let Some(r) = parse_record(&line) {
                            out.push(r);
                        }
                        self.partial.clear();
                    }
                    Ok(_) => break,
                }
            }
            // At the end of our file: if it was rotated away, continue with the new one.
            let current = fs::metadata(self.dir.join(CURRENT)).map(|m| m.ino()).ok();
            if current.is_some() && current != Some(*inode) {
                self.reader = None;
                self.partial.clear();
                continue;
            }
            return out;
        }
    }
}

#[cfg(test)]
mod follower_tests {
    use super::*;

    #[test]
    fn follows_across_rotation_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(
            dir.path(),
            LogLimits {
                max_file_bytes: 300,
                max_rotated: 3,
            },
        )
        .unwrap();
        w.record(Stream::Stdout, false, b"before").unwrap();
        let mut f = Follower::from_end(dir.path());
        let mut seen = Vec::new();
        for i in 0..30 {
            w.record(Stream::Stdout, false, format!("n{i}").as_bytes())
                .unwrap();
            if i % 4 == 0 {
                seen.extend(f.poll().into_iter().map(|r| r.text));
            }
        }
        seen.extend(f.poll().into_iter().map(|r| r.text));
        let want: Vec<String> = (0..30).map(|i| format!("n{i}")).collect();
        assert_eq!(seen, want);
    }
}

#[cfg(test)]
mod trim_tests {
    use super::*;

    fn write_lines(dir: &Path, limits: LogLimits, lines: usize) {
        let mut w = LogWriter::open(dir, limits).unwrap();
        for i in 0..lines {
            w.record(Stream::Stdout, false, format!("line {i:04}").as_bytes())
                .unwrap();
        }
    }

    #[test]
    fn trimming_removes_the_oldest_files_first_and_empty_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_file_bytes: 1000,
            max_rotated: 10,
        };
        let old = tmp.path().join("old");
        let new = tmp.path().join("new");
        write_lines(&old, limits, 20);
        write_lines(&new, limits, 60);
        let (old_bytes, new_bytes) = (dir_bytes(&old), dir_bytes(&new));
        assert!(old_bytes > 0 && new_bytes > 2000, "{old_bytes} {new_bytes}");
        let newest_before = read_all(&new).unwrap();

        // Room for everything: nothing goes.
        let dirs = vec![old.clone(), new.clone()];
        assert!(trim_to(&dirs, old_bytes + new_bytes).unwrap().is_empty());

        // Room for the newer dir less some: the older dir goes whole, then the newer's oldest
        // rotated file; what is left is the newest lines, in order.
        let removed = trim_to(&dirs, new_bytes - 1).unwrap();
        assert!(!old.exists(), "the older instance's dir is removed");
        assert!(removed.iter().any(|p| p.starts_with(&old)));
        assert!(removed.iter().any(|p| p.starts_with(&new)));
        assert!(dir_bytes(&new) < new_bytes);
        let kept = read_all(&new).unwrap();
        assert!(!kept.is_empty() && kept.len() < newest_before.len());
        assert_eq!(kept.last(), newest_before.last());
        assert_eq!(kept[..], newest_before[newest_before.len() - kept.len()..]);

        // A cap of zero removes everything.
        trim_to(&dirs, 0).unwrap();
        assert!(!new.exists());
    }
}

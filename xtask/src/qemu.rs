//! Running qemu with its console read line by line: what `vm-check` and `vm-test` share.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A running qemu, killed when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Starts `qemu` (a `qemu-system-*` command line, its stdio left to this function) and hands
/// each line it prints to `on_line`: the console on stdout, qemu's own messages on stderr
/// prefixed `qemu: `; every line also goes to `log_path`. Ends when qemu exits, when `timeout`
/// passes, or when `on_line` returns an ending; qemu is killed on every exit path. Returns how
/// it ended, for messages.
pub fn run(
    qemu: &mut Command,
    timeout: Duration,
    log_path: &Path,
    mut on_line: impl FnMut(&str) -> Result<Option<String>>,
) -> Result<String> {
    let child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start qemu-system-x86_64 (apt-get install -y qemu-system-x86)")?;
    let mut qemu = Qemu(child);
    let (sender, lines) = mpsc::channel::<String>();
    let streams: [(Option<Box<dyn Read + Send>>, &'static str); 2] = [
        (
            qemu.0
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            "",
        ),
        (
            qemu.0
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            "qemu: ",
        ),
    ];
    for (stream, prefix) in streams {
        let Some(stream) = stream else { continue };
        let sender = sender.clone();
        std::thread::spawn(move || {
            // Bytes, not `lines()`: a console line that is not UTF-8 must not end the reading.
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buf);
                if sender.send(format!("{prefix}{}", line.trim_end())).is_err() {
                    break;
                }
                buf.clear();
            }
        });
    }
    drop(sender);
    let mut log = std::fs::File::create(log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let deadline = Instant::now() + timeout;
    let ending = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let _ = writeln!(log, "{line}");
                if let Some(ending) = on_line(&line)? {
                    break ending;
                }
            }
            // Both pipes closed: qemu has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break match qemu.0.wait() {
                    Ok(status) => format!("qemu exited: {status}"),
                    Err(e) => format!("qemu: {e}"),
                };
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break format!("killed after {} s", timeout.as_secs());
            }
        }
    };
    drop(qemu);
    Ok(ending)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_callback_and_the_log_and_an_ending_stops_the_run() {
        let dir = std::env::temp_dir().join(format!("lull-qemu-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        // A stand-in for qemu: the runner only needs a process printing lines.
        let mut seen = Vec::new();
        let ending = run(
            Command::new("sh").args(["-c", "echo one; echo two >&2; echo three; sleep 30"]),
            Duration::from_secs(20),
            &log,
            |line| {
                seen.push(line.to_owned());
                // stdout and stderr are read apart: their order is not kept.
                Ok((seen.len() == 3).then(|| "saw three lines".to_owned()))
            },
        )
        .unwrap();
        assert_eq!(ending, "saw three lines");
        seen.sort();
        assert_eq!(seen, ["one", "qemu: two", "three"]);
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.contains("one") && logged.contains("three"),
            "{logged}"
        );

        let ending = run(
            Command::new("sh").args(["-c", "echo done"]),
            Duration::from_secs(20),
            &log,
            |_| Ok(None),
        )
        .unwrap();
        assert!(ending.starts_with("qemu exited"), "{ending}");
        let ending = run(
            Command::new("sleep").arg("30"),
            Duration::from_millis(200),
            &log,
            |_| Ok(None),
        )
        .unwrap();
        assert_eq!(ending, "killed after 0 s");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

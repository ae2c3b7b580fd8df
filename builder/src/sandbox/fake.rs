//! A [`SandboxRunner`] that runs nothing, for tests without root (this crate's and the
//! daemon's): each command of a step's script is looked up in a table the test gives and has
//! the effect written there (files written under the step's upper dir, lines printed, an exit
//! code). Every step is recorded with what its lower layers held, so a test can assert on what
//! a step saw.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{LogSink, SandboxError, SandboxFuture, SandboxRun, SandboxRunner, SandboxStep};

/// The lines a failed step keeps for its error, as the real runner does.
const LAST_LINES: usize = 20;

/// What one command does when the fake "runs" it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effect {
    /// Files written (path inside the sandbox, absolute or relative to `/`; contents).
    pub writes: Vec<(PathBuf, Vec<u8>)>,
    /// Lines printed.
    pub lines: Vec<String>,
    /// The command's exit code: non-zero ends the step.
    pub exit_code: i32,
    /// The step is killed at its deadline (its writes and lines happen first).
    pub timed_out: bool,
}

impl Effect {
    /// A command that succeeds and does nothing.
    pub fn ok() -> Effect {
        Effect::default()
    }

    /// Also writes `contents` at `path` inside the sandbox.
    pub fn write(mut self, path: impl Into<PathBuf>, contents: impl AsRef<[u8]>) -> Effect {
        self.writes.push((path.into(), contents.as_ref().to_vec()));
        self
    }

    /// Also prints `line`.
    pub fn print(mut self, line: impl Into<String>) -> Effect {
        self.lines.push(line.into());
        self
    }

    /// Exits with `code`.
    pub fn exit(mut self, code: i32) -> Effect {
        self.exit_code = code;
        self
    }

    /// Runs past the step's deadline.
    pub fn time_out(mut self) -> Effect {
        self.timed_out = true;
        self
    }
}

/// One step the fake ran.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeRun {
    pub step: SandboxStep,
    /// The commands found in the step's script, in order.
    pub commands: Vec<String>,
    /// Every regular file and symlink in the step's lower layers (merged, relative to `/`).
    pub lower_files: BTreeSet<String>,
    /// The contents of the bound files (not dirs) as the step started, by destination.
    pub bound_files: BTreeMap<PathBuf, Vec<u8>>,
    pub upper: PathBuf,
}

/// A [`SandboxRunner`] driven by a table of command effects.
pub struct FakeSandbox {
    /// Where steps' upper dirs go (`<scratch>/<id>/upper`).
    scratch: PathBuf,
    /// The layer cache's root: the step's layer names are dirs under it.
    layer_root: PathBuf,
    effects: Mutex<BTreeMap<String, Effect>>,
    runs: Mutex<Vec<FakeRun>>,
    removed: Mutex<Vec<String>>,
}

impl FakeSandbox {
    pub fn new(scratch: impl Into<PathBuf>, layer_root: impl Into<PathBuf>) -> FakeSandbox {
        FakeSandbox {
            scratch: scratch.into(),
            layer_root: layer_root.into(),
            effects: Mutex::new(BTreeMap::new()),
            runs: Mutex::new(Vec::new()),
            removed: Mutex::new(Vec::new()),
        }
    }

    /// Sets what `command` (the exact command line) does; a command without an entry fails as
    /// a shell would (`not found`, exit code 127).
    pub fn on(&self, command: &str, effect: Effect) {
        lock(&self.effects).insert(command.to_owned(), effect);
    }

    /// The steps run so far, oldest first.
    pub fn runs(&self) -> Vec<FakeRun> {
        lock(&self.runs).clone()
    }

    /// The names of the steps run so far, oldest first.
    pub fn step_names(&self) -> Vec<String> {
        lock(&self.runs)
            .iter()
            .map(|r| r.step.name.clone())
            .collect()
    }

    /// The ids given to [`SandboxRunner::remove`], in order.
    pub fn removed(&self) -> Vec<String> {
        lock(&self.removed).clone()
    }

    /// Forgets the steps run and removed (the effects stay).
    pub fn clear(&self) {
        lock(&self.runs).clear();
        lock(&self.removed).clear();
    }

    /// The scratch dir of the step with this id.
    pub fn step_dir(&self, id: &str) -> PathBuf {
        self.scratch.join(id)
    }

    fn run_now(&self, step: &SandboxStep, log: &LogSink) -> Result<SandboxRun, SandboxError> {
        let err = |reason: String| SandboxError {
            step: step.name.clone(),
            reason,
        };
        let commands = commands_of(&step.script)
            .ok_or_else(|| err("the script is not one `script()` wrote".into()))?;
        let dir = self.step_dir(&step.id);
        if dir.exists() {
            return Err(err(format!("instance {} exists already", step.id)));
        }
        let upper = dir.join("upper");
        fs::create_dir_all(&upper).map_err(|e| err(format!("{}: {e}", upper.display())))?;
        let mut lower_files = BTreeSet::new();
        for layer in &step.layers {
            let layer_dir = self.layer_root.join(layer);
            if !layer_dir.is_dir() {
                return Err(err(format!(
                    "layer {} is not unpacked",
                    layer_dir.display()
                )));
            }
            list_files(&layer_dir, Path::new(""), &mut lower_files)
                .map_err(|e| err(format!("{}: {e}", layer_dir.display())))?;
        }
        let bound_files = step
            .binds
            .iter()
            .filter(|b| b.source.is_file())
            .map(|b| {
                fs::read(&b.source)
                    .map(|bytes| (b.destination.clone(), bytes))
                    .map_err(|e| err(format!("{}: {e}", b.source.display())))
            })
            .collect::<Result<_, _>>()?;
        lock(&self.runs).push(FakeRun {
            step: step.clone(),
            commands: commands.clone(),
            lower_files,
            bound_files,
            upper: upper.clone(),
        });

        let mut output: Vec<String> = Vec::new();
        let mut say = |line: String| {
            log(&line);
            output.push(line);
        };
        let mut exit_code = 0;
        let mut timed_out = false;
        for (i, command) in commands.iter().enumerate() {
            say(format!("+ {command}"));
            let effect = lock(&self.effects).get(command).cloned();
            let effect = effect.unwrap_or_else(|| {
                Effect::ok()
                    .print(format!("sh: {command}: not found"))
                    .exit(127)
            });
            for (path, contents) in &effect.writes {
                let path = upper.join(path.strip_prefix("/").unwrap_or(path));
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)
                        .map_err(|e| err(format!("{}: {e}", parent.display())))?;
                }
                fs::write(&path, contents).map_err(|e| err(format!("{}: {e}", path.display())))?;
            }
            for line in &effect.lines {
                say(line.clone());
            }
            if effect.timed_out {
                timed_out = true;
                exit_code = 137;
                break;
            }
            if effect.exit_code != 0 {
                exit_code = effect.exit_code;
                say(format!(
                    "lull: command {} ({}) exited with {}",
                    i + 1,
                    super::single_quote(command),
                    effect.exit_code
                ));
                break;
            }
        }
        let skip = output.len().saturating_sub(LAST_LINES);
        Ok(SandboxRun {
            exit_code,
            timed_out,
            upper,
            last_lines: output.split_off(skip),
        })
    }
}

impl SandboxRunner for FakeSandbox {
    fn run<'a>(
        &'a self,
        step: &'a SandboxStep,
        log: LogSink,
    ) -> SandboxFuture<'a, Result<SandboxRun, SandboxError>> {
        Box::pin(async move { self.run_now(step, &log) })
    }

    fn remove<'a>(&'a self, id: &'a str) -> SandboxFuture<'a, ()> {
        Box::pin(async move {
            lock(&self.removed).push(id.to_owned());
            let _ = fs::remove_dir_all(self.step_dir(id));
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The commands of a script [`super::script`] wrote, in order; `None` for any other text.
pub fn commands_of(script: &str) -> Option<Vec<String>> {
    const ECHO: &str = "printf '+ %s\\n' ";
    const STATUS: &str = "\nlull_rc=$?\n";
    let mut rest = script.strip_prefix("cd /app || exit 1\n")?;
    let mut commands = Vec::new();
    while !rest.is_empty() {
        let after_echo = rest.strip_prefix(ECHO)?;
        // `QUOTED\nCOMMAND\nlull_rc=$?\n`, QUOTED being COMMAND single-quoted (both may
        // span lines): the split where the quoting matches.
        let end = after_echo.find(STATUS)?;
        let both = &after_echo[..end];
        let command = both
            .match_indices('\n')
            .map(|(at, _)| (&both[..at], &both[at + 1..]))
            .find(|(quoted, command)| super::single_quote(command) == *quoted)
            .map(|(_, command)| command)?;
        let after_status = &after_echo[end + STATUS.len()..];
        // The failure check, which quotes the command again.
        let check = format!(
            "if [ \"$lull_rc\" -ne 0 ]; then printf 'lull: command %d (%s) exited with %d\\n' {} {} \"$lull_rc\" >&2; exit \"$lull_rc\"; fi\n",
            commands.len() + 1,
            super::single_quote(command)
        );
        commands.push(command.to_owned());
        rest = after_status.strip_prefix(&check)?;
    }
    Some(commands)
}

fn list_files(root: &Path, rel: &Path, out: &mut BTreeSet<String>) -> std::io::Result<()> {
    for entry in fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            list_files(root, &child, out)?;
        } else {
            out.insert(child.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commands_of_a_script_come_back_as_given() {
        let commands = vec![
            "pip install -r requirements.txt".to_owned(),
            "echo 'it''s' \"$HOME\"".to_owned(),
            "for f in a b; do\n  echo $f\ndone".to_owned(),
        ];
        assert_eq!(
            commands_of(&super::super::script(&commands)),
            Some(commands)
        );
        assert_eq!(commands_of(&super::super::script(&[])), Some(Vec::new()));
        assert_eq!(commands_of("echo hi\n"), None);
    }
}

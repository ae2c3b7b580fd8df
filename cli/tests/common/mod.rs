//! What the client tests share: the built `lull` run against an admin socket.

use std::path::Path;

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(self.code, code, "exit code of {self:#?}");
        self
    }
}

/// Runs the built `lull` against `socket` (stdin closed, so nothing asks for confirmation).
pub async fn lull_at(socket: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lull"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("LULL_SOCKET")
        .env("LULL_LOG", "error")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run lull");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

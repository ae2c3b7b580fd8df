//! `lull secret set|list|rm` and `lull registry login|logout|list`: clients of the daemon's
//! secrets and registry credentials. Values come from stdin or a file, never from the command
//! line (where `ps` and shell history would show them).
//!
//! Exit codes: 0 ok, 2 invalid input, 3 not found, 4 conflict, 5 daemon not running, 1 else.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use crate::client::ClientArgs;
use std::process::ExitCode;

use clap::Subcommand;
use http::Method;
use lull_daemon::api::{Client, ClientError, ErrorCode};
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Create or replace a secret; services using it are redeployed. The value is read from
    /// stdin (one trailing newline removed) or from --from-file (as is).
    Set {
        name: String,
        /// Read the value from this file instead of stdin.
        #[arg(long, value_name = "PATH")]
        from_file: Option<PathBuf>,
    },
    /// List secrets: names, times and the services using each (never values).
    #[command(alias = "ls")]
    List,
    /// Delete a secret (refused while a service uses it).
    #[command(alias = "delete")]
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Store credentials for pulling from a private registry (HOST or HOST:PORT).
    Login {
        host: String,
        #[arg(long, short = 'u')]
        username: String,
        /// Read the password (or token) from stdin; without it, it is asked for on a terminal
        /// (not echoed) and read from stdin otherwise.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Forget a registry's credentials.
    Logout { host: String },
    /// List registries with stored credentials (hosts and usernames).
    #[command(alias = "ls")]
    List,
}

/// An error and the exit code it means.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let code = match &e {
            ClientError::NotRunning { .. } => 5,
            ClientError::Api(api) => match api.code {
                ErrorCode::InvalidRequest | ErrorCode::InvalidJson => 2,
                ErrorCode::NotFound => 3,
                ErrorCode::Conflict | ErrorCode::AlreadyExists | ErrorCode::Busy => 4,
                _ => 1,
            },
            _ => 1,
        };
        let message = match &e {
            ClientError::Api(api) if !api.fields.is_empty() => {
                let fields: Vec<String> = api
                    .fields
                    .iter()
                    .map(|f| format!("  {}: {}", f.field, f.message))
                    .collect();
                format!("{}\n{}", api.message, fields.join("\n"))
            }
            _ => e.to_string(),
        };
        Failure { code, message }
    }
}

fn finish(what: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("lull {what}: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

pub async fn run_secret(args: &ClientArgs, cmd: &SecretCommand) -> ExitCode {
    let client = Client::new(&args.socket);
    match cmd {
        SecretCommand::Set { name, from_file } => {
            finish("secret set", set(&client, name, from_file.as_deref()).await)
        }
        SecretCommand::List => finish("secret list", list(&client, args.json).await),
        SecretCommand::Rm { name } => finish("secret rm", rm(&client, name).await),
    }
}

pub async fn run_registry(args: &ClientArgs, cmd: &RegistryCommand) -> ExitCode {
    let client = Client::new(&args.socket);
    match cmd {
        RegistryCommand::Login {
            host,
            username,
            password_stdin,
        } => finish(
            "registry login",
            login(&client, host, username, *password_stdin).await,
        ),
        RegistryCommand::Logout { host } => finish("registry logout", logout(&client, host).await),
        RegistryCommand::List => finish("registry list", registries(&client).await),
    }
}

/// `text` without one trailing newline (`\n` or `\r\n`), as `echo` or a heredoc adds.
pub fn strip_one_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

/// Reads all of stdin as UTF-8.
fn read_stdin(what: &str) -> Result<String, Failure> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::invalid(format!("read the {what} from stdin: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|_| Failure::invalid(format!("the {what} on stdin is not UTF-8 text")))
}

/// Resolves `path` in a request path (names and hosts are checked by the daemon, but a `/`
/// or `?` must not change which route is called).
fn segment(what: &str, value: &str) -> Result<String, Failure> {
    if value.is_empty()
        || value.contains(['/', '?', '#', '%', ' '])
        || value.chars().any(char::is_control)
    {
        return Err(Failure::invalid(format!(
            "{what} {value:?}: not allowed ('/', '?', '#', '%', spaces and control characters cannot appear)"
        )));
    }
    Ok(value.to_owned())
}

async fn set(client: &Client, name: &str, from_file: Option<&Path>) -> Result<(), Failure> {
    let name = segment("secret name", name)?;
    let value = match from_file {
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| Failure::invalid(format!("read {}: {e}", path.display())))?;
            String::from_utf8(bytes).map_err(|_| {
                Failure::invalid(format!(
                    "{}: not UTF-8 text (secrets are given as environment variables)",
                    path.display()
                ))
            })?
        }
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("reading the value of {name} from stdin (end with Ctrl-D)");
            }
            strip_one_newline(read_stdin("value")?)
        }
    };
    let answer: Value = client
        .call(
            Method::PUT,
            &format!("/v1/secrets/{name}"),
            Some(&json!({ "value": value })),
        )
        .await?;
    drop(value);
    let verb = match (answer["created"].as_bool(), answer["unchanged"].as_bool()) {
        (Some(true), _) => "created",
        (_, Some(true)) => "unchanged",
        _ => "updated",
    };
    println!("secret {name} {verb}");
    for deploy in answer["deploys"].as_array().into_iter().flatten() {
        let service = deploy["service"].as_str().unwrap_or("?");
        let mut line = format!("  {service}:");
        if let Some(revision) = deploy["revision"].as_u64() {
            line.push_str(&format!(" revision {revision}"));
        }
        if let Some(op) = deploy["operation"].as_str() {
            line.push_str(&format!(" deploying (operation {op})"));
        }
        if let Some(note) = deploy["note"].as_str() {
            line.push_str(&format!(" {note}"));
        }
        println!("{line}");
    }
    Ok(())
}

async fn list(client: &Client, as_json: bool) -> Result<(), Failure> {
    let secrets: Vec<Value> = client.get("/v1/secrets").await?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&secrets).unwrap_or_default()
        );
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{:<32} {:<25} USED BY", "NAME", "UPDATED");
    for s in &secrets {
        let users: Vec<&str> = s["used_by"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            out,
            "{:<32} {:<25} {}",
            s["name"].as_str().unwrap_or(""),
            s["updated_at"].as_str().unwrap_or(""),
            if users.is_empty() {
                "-".to_owned()
            } else {
                users.join(",")
            }
        );
    }
    Ok(())
}

async fn rm(client: &Client, name: &str) -> Result<(), Failure> {
    let name = segment("secret name", name)?;
    let _: Value = client
        .call(Method::DELETE, &format!("/v1/secrets/{name}"), None::<&()>)
        .await?;
    println!("secret {name} deleted");
    Ok(())
}

/// Reads a line from the terminal with echo off.
fn prompt_hidden(prompt: &str) -> Result<String, Failure> {
    let stdin = std::io::stdin();
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr fills it or fails, and we use it only on success.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is stdin, a terminal (checked by the caller); saved is a valid termios.
    let have_terminal = unsafe { libc::tcgetattr(fd, &mut saved) } == 0;
    if have_terminal {
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: fd is stdin; quiet is a valid termios derived from the current one.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    if have_terminal {
        // SAFETY: restores the settings read above on the same fd.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
    read.map_err(|e| Failure::invalid(format!("read the password: {e}")))?;
    Ok(strip_one_newline(line))
}

async fn login(
    client: &Client,
    host: &str,
    username: &str,
    password_stdin: bool,
) -> Result<(), Failure> {
    let host = segment("registry host", host)?;
    let password = if !password_stdin && std::io::stdin().is_terminal() {
        prompt_hidden(&format!("password for {username} at {host}: "))?
    } else {
        strip_one_newline(read_stdin("password")?)
    };
    if password.is_empty() {
        return Err(Failure::invalid("the password is empty"));
    }
    let answer: Value = client
        .call(
            Method::PUT,
            &format!("/v1/registries/{host}"),
            Some(&json!({ "username": username, "password": password })),
        )
        .await?;
    drop(password);
    println!(
        "logged in to {} as {}",
        answer["host"].as_str().unwrap_or(&host),
        answer["username"].as_str().unwrap_or(username)
    );
    Ok(())
}

async fn logout(client: &Client, host: &str) -> Result<(), Failure> {
    let host = segment("registry host", host)?;
    let answer: Value = client
        .call(
            Method::DELETE,
            &format!("/v1/registries/{host}"),
            None::<&()>,
        )
        .await?;
    println!(
        "logged out of {}",
        answer["deleted"].as_str().unwrap_or(&host)
    );
    Ok(())
}

async fn registries(client: &Client) -> Result<(), Failure> {
    let list: Vec<Value> = client.get("/v1/registries").await?;
    println!("{:<40} USERNAME", "REGISTRY");
    for r in &list {
        println!(
            "{:<40} {}",
            r["host"].as_str().unwrap_or(""),
            r["username"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_stripped() {
        assert_eq!(strip_one_newline("pw\n".into()), "pw");
        assert_eq!(strip_one_newline("pw\r\n".into()), "pw");
        assert_eq!(strip_one_newline("pw\n\n".into()), "pw\n");
        assert_eq!(strip_one_newline("pw".into()), "pw");
        assert_eq!(strip_one_newline(String::new()), "");
    }

    #[test]
    fn path_segments_cannot_change_the_route() {
        assert!(segment("secret name", "DB_PASSWORD").is_ok());
        assert!(segment("registry host", "127.0.0.1:5000").is_ok());
        for bad in ["a/b", "a?b", "", "a b", "..%2f"] {
            assert_eq!(segment("x", bad).err().map(|f| f.code), Some(2), "{bad}");
        }
    }
}

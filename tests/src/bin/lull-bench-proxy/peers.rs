//! The peers: nginx and haproxy as keep-alive reverse proxies to the same instances, their
//! configs written into the scratch dir, run in the foreground as children and stopped with
//! them.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lull_tests::forwarding;

use crate::HOST;
use crate::conn::wait_until_answering;

/// nginx and haproxy, killed when dropped.
#[derive(Default)]
pub(crate) struct Peers {
    children: Vec<(&'static str, Child)>,
}

impl Peers {
    /// Returns the HTTP/1.1 and the h2c address.
    pub(crate) fn start_nginx(
        &mut self,
        scratch: &Path,
        upstreams: &[SocketAddr],
    ) -> Result<(SocketAddr, SocketAddr)> {
        let dir = scratch.join("nginx");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (h1, h2) = (
            lull_tests::bench_util::free_port()?,
            lull_tests::bench_util::free_port()?,
        );
        let servers: String = upstreams
            .iter()
            .map(|a| format!("    server {a};\n"))
            .collect();
        let d = dir.display();
        let config = format!(
            "worker_processes 2;\n\
             user root;\n\
             daemon off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             {forwarding_http}\
             \x20 access_log off;\n\
             \x20 client_body_temp_path {d}/body;\n\
             \x20 proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n\
             \x20 keepalive_requests 1000000;\n\
             \x20 upstream app {{\n\
             \x20   least_conn;\n\
             {servers}\
             \x20   keepalive 64;\n\
             \x20   keepalive_requests 1000000;\n\
             \x20 }}\n\
             \x20 server {{\n\
             \x20   listen 127.0.0.1:{h1};\n\
             \x20   listen 127.0.0.1:{h2} http2;\n\
             \x20   location / {{\n\
             \x20     proxy_pass http://app;\n\
             \x20     proxy_http_version 1.1;\n\
             {forwarding_location}\
             \x20   }}\n\
             \x20 }}\n\
             }}\n",
            forwarding_http = forwarding::NGINX_HTTP,
            forwarding_location = forwarding::NGINX_LOCATION,
        );
        let path = dir.join("nginx.conf");
        fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
        let log = fs::File::create(dir.join("stderr.log"))?;
        let mut command = Command::new("nginx");
        let child = lull_tests::bench_util::die_with_parent(&mut command)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start nginx")?;
        self.children.push(("nginx", child));
        let (h1, h2) = (
            SocketAddr::from((Ipv4Addr::LOCALHOST, h1)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, h2)),
        );
        wait_until_answering(h1, HOST).with_context(|| {
            format!(
                "nginx did not answer (see {})",
                dir.join("error.log").display()
            )
        })?;
        Ok((h1, h2))
    }

    /// Returns the HTTP/1.1 and the h2c address.
    pub(crate) fn start_haproxy(
        &mut self,
        scratch: &Path,
        upstreams: &[SocketAddr],
    ) -> Result<(SocketAddr, SocketAddr)> {
        let dir = scratch.join("haproxy");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (h1, h2) = (
            lull_tests::bench_util::free_port()?,
            lull_tests::bench_util::free_port()?,
        );
        let servers: String = upstreams
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  server app{i} {a}\n"))
            .collect();
        let config = format!(
            "global\n\
             \x20 nbthread 2\n\
             \x20 maxconn 4096\n\
             \x20 pidfile {pid}\n\
             defaults\n\
             \x20 mode http\n\
             \x20 timeout connect 5s\n\
             \x20 timeout client 60s\n\
             \x20 timeout server 60s\n\
             \x20 http-reuse always\n\
             frontend bench\n\
             \x20 bind 127.0.0.1:{h1}\n\
             \x20 bind 127.0.0.1:{h2} proto h2\n\
             {forwarding_frontend}\
             \x20 default_backend app\n\
             backend app\n\
             \x20 balance leastconn\n\
             {servers}",
            pid = dir.join("haproxy.pid").display(),
            forwarding_frontend = forwarding::HAPROXY_FRONTEND,
        );
        let path = dir.join("haproxy.cfg");
        fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
        let log = fs::File::create(dir.join("stderr.log"))?;
        let mut command = Command::new("haproxy");
        let child = lull_tests::bench_util::die_with_parent(&mut command)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start haproxy")?;
        self.children.push(("haproxy", child));
        let (h1, h2) = (
            SocketAddr::from((Ipv4Addr::LOCALHOST, h1)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, h2)),
        );
        wait_until_answering(h1, HOST).with_context(|| {
            format!(
                "haproxy did not answer (see {})",
                dir.join("stderr.log").display()
            )
        })?;
        Ok((h1, h2))
    }

    /// The pid of the peer started as `name` (0, which no process has, if none was).
    pub(crate) fn pid(&self, name: &str) -> u32 {
        self.children
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, child)| child.id())
    }

    /// An error if a peer died during the run (its numbers would be wrong).
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited during the run: {status}");
            }
        }
        Ok(())
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for (name, child) in &mut self.children {
            stop_gracefully(name, child);
        }
    }
}

/// SIGTERM, then SIGKILL if it has not exited in 5 s. Not SIGKILL at once: nginx's workers
/// outlive a killed master (they would keep running, children of init); on SIGTERM the master
/// stops them and exits.
fn stop_gracefully(name: &str, child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill with a pid we spawned and have not yet reaped (so it cannot have been
        // reused) and a valid signal number; it touches no memory.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("lull-bench-proxy: {name} did not stop on SIGTERM in 5 s, killing it");
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) fn nginx_version() -> String {
    // nginx prints its version on stderr.
    Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .replace("nginx version: ", "")
        })
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(|v| format!("HAProxy {v}"))
        })
        .unwrap_or_else(|| "unknown".into())
}

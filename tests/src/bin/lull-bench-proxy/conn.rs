//! The driver's own HTTP/1.1 client: one keep-alive connection sending `GET /` (what the
//! fixed-rate client and the gate's measurements send), and the one-shot probes that wait for
//! an app or a proxy to answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::START_DEADLINE;

/// Longest a request of the fixed-rate client may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Retries `GET /` until it answers 200 or the start deadline passes.
pub(crate) fn wait_until_answering(addr: SocketAddr, host: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        match get_once(addr, host) {
            Ok((200, _)) => return Ok(()),
            Ok((status, _)) if started.elapsed() > START_DEADLINE => {
                bail!("{addr} answered {status} to GET /")
            }
            Err(e) if started.elapsed() > START_DEADLINE => {
                return Err(e.context(format!("{addr} did not answer in {START_DEADLINE:?}")));
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One `GET /` on a new connection: the status and the body's length.
pub(crate) fn get_once(addr: SocketAddr, host: &str) -> Result<(u16, usize)> {
    let mut conn = Conn::connect(addr, host)?;
    conn.get()
}

/// One keep-alive HTTP/1.1 connection sending `GET /` and reading `Content-Length` bodies.
pub(crate) struct Conn {
    stream: TcpStream,
    pub(crate) addr: SocketAddr,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Conn {
    pub(crate) fn connect(addr: SocketAddr, host: &str) -> Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        Ok(Conn {
            stream,
            addr,
            request: format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads its response; the status and the body's length.
    pub(crate) fn get(&mut self) -> Result<(u16, usize)> {
        let addr = self.addr;
        self.stream
            .write_all(&self.request)
            .with_context(|| format!("send to {addr}"))?;
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = self
                .stream
                .read(&mut chunk)
                .with_context(|| format!("read a response head from {addr}"))?;
            if n == 0 {
                bail!("{addr} closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{addr} sent no status line: {head:?}"))?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .with_context(|| format!("{addr} sent no Content-Length: {head:?}"))?;
        while self.buf.len() < head_end + length {
            let n = self
                .stream
                .read(&mut chunk)
                .with_context(|| format!("read a response body from {addr}"))?;
            if n == 0 {
                bail!("{addr} closed the connection inside a body");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.buf.drain(..head_end + length);
        Ok((status, length))
    }
}

//! Waiting until a booted guest is of use: a line on its console, then a
//! service answering on a forwarded port. Every wait is bounded, and a
//! guest that stops while being waited for fails the wait at once.
//!
//! Watch the console before probing a port: under QEMU user networking a
//! connection made before the guest's network is up is accepted on the host
//! side and then stalls until the client's timeout.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::hypervisor::{DomainState, Hypervisor};

/// The line the fixture guest's init prints when its services are started.
pub const GUEST_READY_LINE: &str = "xenod-guest: ready";

const POLL: Duration = Duration::from_millis(50);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits until the console log of `name` has a line starting with
/// `prefix`; returns how long that took.
pub fn wait_console(hv: &(impl Hypervisor + ?Sized), name: &str, prefix: &str, timeout: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    let log = hv.console_log(name)?;
    loop {
        // The log is small (a boot's console); re-reading it whole is simpler
        // than following it and fine at this polling rate.
        let text = std::fs::read(&log).unwrap_or_default();
        if String::from_utf8_lossy(&text).lines().any(|l| l.starts_with(prefix)) {
            return Ok(t0.elapsed());
        }
        check_alive(hv, name, &log)?;
        if t0.elapsed() >= timeout {
            return Err(Error::Timeout { name: name.into(), what: "console ready line", secs: timeout.as_secs() });
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until an HTTP GET of `path` on 127.0.0.1:`port` gets any answer
/// (so a 404 for a probe path counts); returns the status code.
pub fn wait_http(hv: &(impl Hypervisor + ?Sized), name: &str, port: u16, path: &str, timeout: Duration) -> Result<u16> {
    let t0 = Instant::now();
    loop {
        if let Ok((code, _)) = http_get(port, path, PROBE_TIMEOUT) {
            return Ok(code);
        }
        if let Ok(log) = hv.console_log(name) {
            check_alive(hv, name, &log)?;
        }
        if t0.elapsed() >= timeout {
            return Err(Error::Timeout { name: name.into(), what: "HTTP answer", secs: timeout.as_secs() });
        }
        std::thread::sleep(POLL * 2);
    }
}

fn check_alive(hv: &(impl Hypervisor + ?Sized), name: &str, log: &Path) -> Result<()> {
    match hv.state(name)? {
        DomainState::Running | DomainState::ShuttingDown => Ok(()),
        state => Err(Error::GuestStopped { name: name.into(), state, console_tail: console_tail(log, 20) }),
    }
}

/// The last `n` lines of a console log (empty if unreadable).
pub fn console_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A bare HTTP/1.0 GET on 127.0.0.1: (status, body). Each socket operation
/// is bounded by `timeout`.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // One write: the request goes out in one segment.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    let code =
        resp.strip_prefix("HTTP/").and_then(|r| r.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).ok_or_else(
            || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {resp:.80?}")),
        )?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn http_get_parses_status_and_body() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            // Read the whole request head, however TCP splits it.
            let mut req = Vec::new();
            let mut buf = [0; 256];
            while !req.ends_with(b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "request ended early: {:?}", String::from_utf8_lossy(&req));
                req.extend_from_slice(&buf[..n]);
            }
            assert!(req.starts_with(b"GET /x HTTP/1.0\r\n"));
            c.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope\n").unwrap();
        });
        assert_eq!(http_get(port, "/x", Duration::from_secs(5)).unwrap(), (404, "nope\n".to_string()));
        server.join().unwrap();
    }

    #[test]
    fn console_tail_keeps_the_last_lines() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("c");
        std::fs::write(&f, "a\nb\nc\n").unwrap();
        assert_eq!(console_tail(&f, 2), "b\nc");
        assert_eq!(console_tail(&t.path().join("none"), 2), "");
    }
}

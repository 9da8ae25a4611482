//! Network bytes per guest, counted by the kernel: an nftables table of
//! this daemon's (`inet xenod_acct_TAG`) with one counting rule per
//! forwarded host port and direction. A guest on user-mode networking
//! (`restrict=on`) talks only through its forwards, so what enters its
//! host ports is what it received and what leaves them is what it sent.
//!
//! ```text
//! table inet xenod_acct_TAG
//!   chain input  (hook input)   tcp dport PORT counter comment "NAME PORT in"
//!   chain output (hook output)  tcp sport PORT counter comment "NAME PORT out"
//! ```
//!
//! The table is the daemon's own: made when a first port is to be counted
//! and removed when the last one goes and when the daemon stops (and at
//! its start: a crashed daemon's is replaced). A daemon with no forwarded
//! guest has no table, so daemons killed without a stop (tests, crashes)
//! do not leave hooks that every packet of the host then walks through. The counts include the
//! packets' TCP/IP headers (about 0.2% of a bulk transfer on loopback).
//! Rules of an instance that is gone are deleted; those of a live one are
//! never rewritten, so its counters only grow.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::error::{Error, Result};

/// Bytes in and out of one instance's forwarded ports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetBytes {
    pub rx: u64,
    pub tx: u64,
}

/// The name of an empty chain in each counting table that holds its
/// daemon's process id (after this prefix), so a later daemon can tell a
/// table whose daemon was killed without a stop.
const OWNER: &str = "owner_";

/// Deletes the counting tables of daemons that are gone: those whose owner
/// chain names a process that no longer exists, and those without one
/// (made by an older xenod, which made its table at start).
fn remove_orphans() {
    let Ok(out) = nft(&["-j", "list", "chains", "inet"], None) else { return };
    let Ok(v) = serde_json::from_str::<Value>(&out) else { return };
    let mut owner: BTreeMap<String, Option<u32>> = BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(c) = item.get("chain") else { continue };
        let (Some(table), Some(name)) = (c["table"].as_str(), c["name"].as_str()) else { continue };
        if !table.starts_with("xenod_acct_") {
            continue;
        }
        let pid = name.strip_prefix(OWNER).and_then(|p| p.parse().ok());
        let e = owner.entry(table.to_owned()).or_default();
        *e = e.or(pid);
    }
    for (table, pid) in owner {
        if pid.is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            tracing::info!("removing the counting table {table} of a daemon that is gone");
            let _ = nft(&["delete", "table", "inet", &table], None);
        }
    }
}

/// This daemon's counting table.
#[derive(Debug)]
pub struct NetCounters {
    table: String,
    /// Whether the table is there now.
    made: std::sync::Mutex<bool>,
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut c = Command::new("nft");
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = c.spawn().map_err(|e| Error::msg(format!("running nft (package nftables): {e}")))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes()).map_err(|e| Error::msg(format!("writing to nft: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| Error::msg(format!("running nft: {e}")))?;
    if !out.status.success() {
        return Err(Error::msg(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetCounters {
    /// The table for daemon `tag` (letters and digits): a crashed run's is
    /// removed, and the new one is made once a port is to be counted.
    /// Fails when nftables cannot be used here.
    pub fn start(tag: &str) -> Result<Self> {
        let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).take(16).collect();
        nft(&["list", "tables"], None)?;
        let n = NetCounters { table: format!("xenod_acct_{tag}"), made: std::sync::Mutex::new(true) };
        n.remove();
        remove_orphans();
        Ok(n)
    }

    fn make(&self) -> Result<()> {
        let t = &self.table;
        nft(
            &["-f", "-"],
            Some(&format!(
                "table inet {t} {{\n\
                   chain input {{ type filter hook input priority -150; policy accept; }}\n\
                   chain output {{ type filter hook output priority -150; policy accept; }}\n\
                   chain {OWNER}{pid} {{ }}\n\
                 }}\n",
                pid = std::process::id()
            )),
        )?;
        Ok(())
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Deletes the table (nothing if it is not there).
    pub fn remove(&self) {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut *made) {
            let _ = nft(&["delete", "table", "inet", &self.table], None);
        }
    }

    /// Makes the rules count exactly `want`'s ports (instance -> host
    /// ports) and returns each instance's bytes.
    pub fn sync(&self, want: &BTreeMap<String, Vec<u16>>) -> Result<BTreeMap<String, NetBytes>> {
        if want.values().all(Vec::is_empty) {
            self.remove();
            return Ok(BTreeMap::new());
        }
        {
            let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
            if !*made {
                self.make()?;
                *made = true;
            }
        }
        let (rules, mut bytes) = self.read()?;
        let mut script = String::new();
        let t = &self.table;
        for (inst, port, dir, handle) in &rules {
            if !want.get(inst).is_some_and(|ps| ps.contains(port)) {
                let chain = if dir == "in" { "input" } else { "output" };
                script += &format!("delete rule inet {t} {chain} handle {handle}\n");
                bytes.remove(inst);
            }
        }
        for (inst, ports) in want {
            for p in ports {
                for (dir, chain, m) in [("in", "input", "dport"), ("out", "output", "sport")] {
                    if !rules.iter().any(|(i, q, d, _)| i == inst && q == p && d == dir) {
                        script +=
                            &format!("add rule inet {t} {chain} tcp {m} {p} counter comment \"{inst} {p} {dir}\"\n");
                    }
                }
            }
        }
        if !script.is_empty() {
            nft(&["-f", "-"], Some(&script))?;
        }
        Ok(bytes)
    }

    /// The rules (instance, port, direction, handle) and bytes by instance.
    #[allow(clippy::type_complexity)]
    fn read(&self) -> Result<(Vec<(String, u16, String, u64)>, BTreeMap<String, NetBytes>)> {
        let out = nft(&["-j", "list", "table", "inet", &self.table], None)?;
        let v: Value = serde_json::from_str(&out).map_err(|e| Error::msg(format!("nft's JSON: {e}")))?;
        let mut rules = Vec::new();
        let mut bytes: BTreeMap<String, NetBytes> = BTreeMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(r) = item.get("rule") else { continue };
            let Some(comment) = r["comment"].as_str() else { continue };
            let mut parts = comment.split(' ');
            let (Some(inst), Some(port), Some(dir)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let Ok(port) = port.parse::<u16>() else { continue };
            let n = r["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|e| e.get("counter").and_then(|c| c["bytes"].as_u64()))
                .unwrap_or(0);
            let b = bytes.entry(inst.to_owned()).or_default();
            if dir == "in" {
                b.rx += n;
            } else {
                b.tx += n;
            }
            rules.push((inst.to_owned(), port, dir.to_owned(), r["handle"].as_u64().unwrap_or(0)));
        }
        Ok((rules, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn counts_bytes_through_a_forwarded_port() {
        let n = match NetCounters::start(&format!("t{}", std::process::id())) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("SKIPPED: nftables cannot be used here ({e})");
                return;
            }
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let want: BTreeMap<String, Vec<u16>> = [("web".to_string(), vec![port])].into();
        assert_eq!(n.sync(&want).unwrap().get("web").copied().unwrap_or_default(), NetBytes::default());
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = vec![0u8; 10_000];
            s.read_exact(&mut got).unwrap();
            s.write_all(&vec![7u8; 300_000]).unwrap();
        });
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(&[1u8; 10_000]).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        server.join().unwrap();
        assert_eq!(back.len(), 300_000);
        let b = n.sync(&want).unwrap()["web"];
        assert!((10_000..11_000).contains(&b.rx), "{b:?}");
        assert!((300_000..303_000).contains(&b.tx), "{b:?}");
        // An instance that is gone loses its rules, and with no port left
        // the table goes; a new port brings it back, counting from zero.
        assert!(n.sync(&BTreeMap::new()).unwrap().is_empty());
        assert!(nft(&["list", "table", "inet", n.table()], None).is_err(), "the table is gone");
        assert_eq!(n.sync(&want).unwrap().get("web").copied().unwrap_or_default(), NetBytes::default());
        // The closed connection's last segments may still arrive (a FIN's
        // ACK, about 52 bytes): a fresh count, not the old one.
        let again = n.sync(&want).unwrap()["web"];
        assert!(again.rx < 1_000 && again.tx < 1_000, "{again:?}");
        n.remove();
        assert!(nft(&["list", "table", "inet", n.table()], None).is_err(), "the table is gone");
    }

    #[test]
    fn a_killed_daemons_table_is_removed_by_the_next_start() {
        let tag = format!("k{}", std::process::id());
        let dead = match NetCounters::start(&tag) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("SKIPPED: nftables cannot be used here ({e})");
                return;
            }
        };
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        dead.sync(&[("web".to_string(), vec![port])].into()).unwrap();
        // Its owner chain now names a process that has exited, as when a
        // daemon is killed.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let t = dead.table().to_owned();
        nft(
            &["rename", "chain", "inet", &t, &format!("{OWNER}{}", std::process::id()), &format!("{OWNER}{gone_pid}")],
            None,
        )
        .unwrap();
        // A live daemon's table stays.
        let live = NetCounters::start(&format!("l{}", std::process::id())).unwrap();
        live.sync(&[("db".to_string(), vec![port])].into()).unwrap();
        let other = NetCounters::start(&format!("o{}", std::process::id())).unwrap();
        assert!(nft(&["list", "table", "inet", &t], None).is_err(), "the dead daemon's table is left");
        assert!(nft(&["list", "table", "inet", live.table()], None).is_ok(), "a live daemon's table went");
        live.remove();
        other.remove();
    }
}

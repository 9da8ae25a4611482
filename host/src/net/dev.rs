//! The host's devices of a segment, made and removed with iproute2 (see
//! the module above for why not rtnetlink). Every call is idempotent:
//! what exists already is left as it is.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

use serde_json::Value;

use crate::error::{Error, Result};

/// Runs `prog args`; its stdout, or an error naming the command and what
/// it said.
fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out =
        Command::new(prog).args(args).output().map_err(|e| Error::msg(format!("running {prog} (iproute2): {e}")))?;
    if !out.status.success() {
        return Err(Error::msg(format!("{prog} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// The names of every link whose name starts with one of `prefixes`,
/// with its master (bridge), if any.
pub fn links(prefixes: &[String]) -> Result<Vec<(String, Option<String>)>> {
    let v: Value = serde_json::from_str(&ip(&["-j", "link", "show"])?)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let name = l["ifname"].as_str()?.to_owned();
            prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()))
                .then(|| (name, l["master"].as_str().map(str::to_owned)))
        })
        .collect())
}

pub fn exists(name: &str) -> bool {
    Command::new("ip").args(["link", "show", "dev", name]).output().is_ok_and(|o| o.status.success())
}

/// Bridge `bridge` with VXLAN `vxlan` (VNI `vni`, from `local`, UDP
/// `port`, no learning) as a port, both up, neither with an address.
pub fn ensure_segment(bridge: &str, vxlan: &str, vni: u32, local: Ipv4Addr, port: u16, mtu: u32) -> Result<()> {
    let mtu = mtu.to_string();
    if !exists(bridge) {
        ip(&["link", "add", bridge, "mtu", &mtu, "type", "bridge"])?;
    }
    // No IPv6 link-local address either: the host has no address here.
    ip(&["link", "set", "dev", bridge, "addrgenmode", "none"])?;
    if !exists(vxlan) {
        let (vni, local, port) = (vni.to_string(), local.to_string(), port.to_string());
        ip(&[
            "link",
            "add",
            vxlan,
            "mtu",
            &mtu,
            "type",
            "vxlan",
            "id",
            &vni,
            "dstport",
            &port,
            "local",
            &local,
            "nolearning",
        ])?;
    }
    ip(&["link", "set", "dev", vxlan, "addrgenmode", "none"])?;
    ip(&["link", "set", "dev", vxlan, "master", bridge])?;
    ip(&["link", "set", "dev", vxlan, "up"])?;
    ip(&["link", "set", "dev", bridge, "up"])?;
    Ok(())
}

/// The flood destinations of `vxlan` (its all-zero FDB entries).
pub fn floods(vxlan: &str) -> Result<BTreeSet<SocketAddr>> {
    let v: Value = serde_json::from_str(&run("bridge", &["-j", "fdb", "show", "dev", vxlan])?)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["mac"] == "00:00:00:00:00:00")
        .filter_map(|e| {
            let ip: std::net::IpAddr = e["dst"].as_str()?.parse().ok()?;
            Some(SocketAddr::new(ip, e["port"].as_u64().unwrap_or(0) as u16))
        })
        .collect())
}

/// Makes `vxlan` flood to exactly `want`.
pub fn set_floods(vxlan: &str, want: &BTreeSet<SocketAddr>) -> Result<()> {
    let have = floods(vxlan)?;
    for d in want.difference(&have) {
        let (ip, port) = (d.ip().to_string(), d.port().to_string());
        run("bridge", &["fdb", "append", "00:00:00:00:00:00", "dev", vxlan, "dst", &ip, "port", &port])?;
    }
    for d in have.difference(want) {
        let (ip, port) = (d.ip().to_string(), d.port().to_string());
        run("bridge", &["fdb", "del", "00:00:00:00:00:00", "dev", vxlan, "dst", &ip, "port", &port])?;
    }
    Ok(())
}

/// Removes link `name` if it exists.
pub fn remove(name: &str) -> Result<()> {
    if exists(name) {
        ip(&["link", "del", "dev", name])?;
    }
    Ok(())
}

/// The links enslaved to `bridge` but `but` (its guests' taps).
pub fn ports(bridge: &str, but: &str) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(&ip(&["-j", "link", "show", "master", bridge])?)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .filter(|n| n != but)
        .collect())
}

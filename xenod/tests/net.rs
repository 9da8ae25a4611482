//! Environments (`xenod net`): records spread over gossip, addresses
//! without collisions across hosts, each daemon's devices named after it
//! and removed when it stops or after a crash; and with real guests on
//! two daemons, a private network across hosts that isolates
//! environments and follows a migrating guest. Two daemons share this
//! machine's network namespace: each gets its own loopback underlay
//! address and VXLAN port. Needs root (devices); the guest test also
//! /dev/fuse and QEMU.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

/// Underlay addresses and VXLAN ports of this test process's daemons,
/// apart from other test processes'.
fn underlay(i: u32) -> (String, u16) {
    let pid = std::process::id();
    (format!("127.{}.{}.{}", 100 + pid % 100, (pid / 100) % 250, i + 1), 42000 + (pid % 5000) as u16 * 4 + i as u16)
}

fn net_config(i: u32, extra: &str) -> String {
    let (ip, port) = underlay(i);
    format!("net_underlay = \"{ip}\"\nnet_vxlan_port = {port}\n{extra}")
}

/// One request on the daemon's socket; its result (or the error).
fn api(data: &Path, req: &str) -> Result<Value, String> {
    let mut s = UnixStream::connect(data.join("xenod.sock")).unwrap();
    writeln!(s, "{req}").unwrap();
    for line in BufReader::new(s).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v.get("ok").is_some() {
            return if v["ok"] == true { Ok(v["result"].clone()) } else { Err(v["error"].to_string()) };
        }
    }
    Err("no answer".into())
}

fn attach(data: &Path, env: &str, instance: &str) -> Value {
    api(data, &format!(r#"{{"v":1,"op":"net","net":{{"do":"attach","env":"{env}","instance":"{instance}"}}}}"#))
        .unwrap_or_else(|e| panic!("attach {instance} to {env}: {e}"))
}

/// The names of the links whose name starts with `prefix`.
fn links(prefix: &str) -> BTreeSet<String> {
    let out = Command::new("ip").args(["-j", "link", "show"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// The daemon's devices: those carrying its short id.
fn own_links(node: &str) -> BTreeSet<String> {
    let s = &node[..6];
    ["xb", "xv", "xt"].iter().flat_map(|p| links(&format!("{p}{s}"))).collect()
}

fn floods(vxlan: &str) -> BTreeSet<String> {
    let out = Command::new("bridge").args(["-j", "fdb", "show", "dev", vxlan]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["mac"] == "00:00:00:00:00:00")
        .map(|e| format!("{}:{}", e["dst"].as_str().unwrap_or(""), e["port"]))
        .collect()
}

fn env_of<'a>(ls: &'a Value, name: &str) -> Option<&'a Value> {
    ls["envs"].as_array()?.iter().find(|e| e["name"] == name)
}

fn root_or_skip(what: &str) -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: {what}: not root");
        return false;
    }
    true
}

#[test]
fn environments_spread_and_addresses_do_not_collide() {
    if !root_or_skip("environments test") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mut ds = federation(t.path(), &[net_config(0, ""), net_config(1, "")]);
    let (a, b) = (ds[0].data.clone(), ds[1].data.clone());
    let (na, nb) = (ds[0].node.clone(), ds[1].node.clone());

    let red = ok(&a, &["net", "create", "red"]);
    let (vni, subnet) = (red["vni"].as_u64().unwrap(), red["subnet"].as_str().unwrap().to_owned());
    assert!(vni > 0 && vni < 1 << 24, "{red}");
    ok(&b, &["net", "create", "blue", "--subnet", "10.99.7.9/24"]);
    within(10, "each host knows the other's environment", || {
        let (la, lb) = (ok(&a, &["net", "ls"]), ok(&b, &["net", "ls"]));
        env_of(&lb, "red").is_some_and(|e| e["vni"] == vni && e["subnet"] == subnet.as_str())
            && env_of(&la, "blue").is_some_and(|e| e["subnet"] == "10.99.7.0/24")
    });
    // One name, one environment; removal only where it was created.
    let out = run(&b, &["net", "create", "red"]);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&b, &["net", "rm", "red"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("remove it there"), "{out:?}");

    // Addresses: three guests on two hosts, all different, all in the subnet.
    let ga = attach(&a, "red", "g1");
    let gb = attach(&b, "red", "g1");
    let gc = attach(&a, "red", "g2");
    let ips: BTreeSet<&str> = [&ga, &gb, &gc].iter().map(|g| g["ip"].as_str().unwrap()).collect();
    let macs: BTreeSet<&str> = [&ga, &gb, &gc].iter().map(|g| g["mac"].as_str().unwrap()).collect();
    assert_eq!((ips.len(), macs.len()), (3, 3), "{ga} {gb} {gc}");
    let prefix = subnet.rsplit_once('.').unwrap().0;
    assert!(ips.iter().all(|ip| ip.starts_with(prefix)), "{ips:?} in {subnet}");
    assert_eq!(attach(&a, "red", "g1")["ip"], ga["ip"], "an instance keeps its address");
    within(10, "every host sees every address", || {
        [&a, &b].iter().all(|d| {
            let l = ok(d, &["net", "ls"]);
            let seen: BTreeSet<String> = env_of(&l, "red").unwrap()["addresses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["ip"].as_str().unwrap().to_owned())
                .collect();
            ips.iter().all(|ip| seen.contains(*ip)) && env_of(&l, "red").unwrap()["conflicts"] == serde_json::json!([])
        })
    });

    // Devices: named after each daemon, no address, tunnels to each other.
    let (br_a, vx_a) = (ga["bridge"].as_str().unwrap(), ga["bridge"].as_str().unwrap().replacen("xb", "xv", 1));
    let vx_b = gb["bridge"].as_str().unwrap().replacen("xb", "xv", 1);
    assert!(br_a.starts_with(&format!("xb{}", &na[..6])) && br_a.len() <= 15, "{br_a}");
    assert_eq!(own_links(&na), BTreeSet::from([br_a.to_owned(), vx_a.clone()]));
    let addrs = Command::new("ip").args(["-j", "addr", "show", "dev", br_a]).output().unwrap();
    let addrs: Value = serde_json::from_slice(&addrs.stdout).unwrap();
    assert_eq!(addrs[0]["addr_info"], serde_json::json!([]), "the bridge has no address: {addrs}");
    let (ua, pa) = underlay(0);
    let (ub, pb) = underlay(1);
    within(10, "each tunnel floods to the other host", || {
        floods(&vx_a) == BTreeSet::from([format!("{ub}:{pb}")])
            && floods(&vx_b) == BTreeSet::from([format!("{ua}:{pa}")])
    });
    let out = run(&a, &["net", "rm", "red"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by"), "{out:?}");

    // A crash leaves B's devices; its next start removes them (nothing
    // there needs them), and A's tunnel stops flooding to it.
    ds[1].kill();
    assert!(!own_links(&nb).is_empty());
    let db = Daemon::start(&b, &[("XENOD_ANNOUNCE_MS", "300")]);
    within(10, "B removed what its crash left", || own_links(&nb).is_empty());
    within(20, "A stops flooding to B", || floods(&vx_a).is_empty());
    ok(&b, &["net", "rm", "blue"]);
    within(10, "blue is gone on A too", || env_of(&ok(&a, &["net", "ls"]), "blue").is_none());
    // A stopped cleanly removes its own.
    db.stop();
    let da = ds.remove(0);
    da.stop();
    assert!(own_links(&na).is_empty(), "{:?}", own_links(&na));
}

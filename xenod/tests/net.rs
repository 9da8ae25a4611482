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
/// xenod's kinds of links: bridges, tunnels, taps.
fn xlinks() -> BTreeSet<String> {
    ["xb", "xv", "xt"].iter().flat_map(|p| links(p)).collect()
}

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

/// What a guest's net.cgi answers to `query` (through its forwarded port).
fn guest(port: u64, query: &str, secs: u64) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", &secs.to_string()])
        .arg(format!("http://127.0.0.1:{port}/cgi-bin/net.cgi?{query}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the guest behind `port` fetches the web page of `ip`, and
/// which instance answered.
fn fetch_from(port: u64, ip: &str) -> Option<String> {
    let body = guest(port, &format!("get=http://{ip}/"), 15);
    body.lines().find_map(|l| l.strip_prefix("instance=")).map(str::to_owned)
}

/// The longest run of pings lost in a `pingrun`'s output, in pings, and
/// how many were answered.
fn outage(out: &str) -> (u64, u64) {
    let seqs: Vec<u64> =
        out.lines().filter_map(|l| l.split("seq=").nth(1)?.split_whitespace().next()?.parse().ok()).collect();
    let gap = seqs.windows(2).map(|w| w[1] - w[0] - 1).max().unwrap_or(u64::MAX);
    (gap, seqs.len() as u64)
}

/// A host address the guests must not reach, and whether anything came.
struct Listener {
    port: u16,
    hits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn listener() -> Listener {
    let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits: std::sync::Arc<std::sync::atomic::AtomicU64> = Default::default();
    let h = hits.clone();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost\n");
        }
    });
    Listener { port, hits }
}

/// This host's own IPv4 addresses (but loopback's).
fn host_addrs() -> Vec<String> {
    let out = Command::new("ip").args(["-j", "-4", "addr", "show"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_owned))
        .filter(|a| !a.starts_with("127."))
        .collect()
}

fn address(data: &Path, env: &str, instance: &str) -> String {
    let l = ok(data, &["net", "ls"]);
    env_of(&l, env).unwrap()["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["instance"] == instance)
        .unwrap_or_else(|| panic!("no address of {instance} in {l}"))["ip"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn guests_share_an_environment_across_hosts_and_keep_it_when_they_migrate() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: real-guest network test: {why}");
        return;
    }
    let fix = fixture();
    let links_before = xlinks();
    let t = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let ds = federation(
        t.path(),
        &[
            net_config(2, &format!("domain_prefix = \"na{pid}-\"\n")),
            net_config(3, &format!("domain_prefix = \"nb{pid}-\"\n")),
        ],
    );
    let (a, b) = (ds[0].data.clone(), ds[1].data.clone());
    let (na, nb) = (ds[0].node.clone(), ds[1].node.clone());
    for (d, w) in [(&a, "wa"), (&b, "wb")] {
        publish_disk_fixture(&fix, &t.path().join(w), d);
    }
    ok(&a, &["allow", &nb]);
    ok(&b, &["allow", &na]);
    let red = ok(&a, &["net", "create", "red"]);
    let subnet = red["subnet"].as_str().unwrap().to_owned();
    // Blue on the same subnet: only the segments keep them apart.
    ok(&b, &["net", "create", "blue", "--subnet", &subnet]);
    within(10, "both hosts know both environments", || {
        [&a, &b].iter().all(|d| {
            let l = ok(d, &["net", "ls"]);
            env_of(&l, "red").is_some() && env_of(&l, "blue").is_some()
        })
    });

    let (r1, r2, b1) = (format!("r1-{pid}"), format!("r2-{pid}"), format!("b1-{pid}"));
    let _ga = Instances(&a, vec![r1.clone(), b1.clone()]);
    let _gb = Instances(&b, vec![r1.clone(), r2.clone()]);
    let deploy = |d: &Path, name: &str, env: &str| {
        let v = ok(d, &["deploy", "template://t/disk/1", "--name", name, "--net", env]);
        v["instances"][0]["port"].as_u64().unwrap()
    };
    let p_r1 = deploy(&a, &r1, "red");
    let p_r2 = deploy(&b, &r2, "red");
    let p_b1 = deploy(&a, &b1, "blue");
    let (ip_r1, ip_r2, ip_b1) = (address(&a, "red", &r1), address(&a, "red", &r2), address(&a, "blue", &b1));
    eprintln!("red: {r1} {ip_r1} on A, {r2} {ip_r2} on B; blue: {b1} {ip_b1} on A");
    assert!(ip_r1 != ip_r2, "{ip_r1} {ip_r2}");

    // Red reaches red across the hosts, both ways.
    assert_eq!(fetch_from(p_r1, &ip_r2).as_deref(), Some(r2.as_str()), "r1 on A fetches r2's page on B");
    assert_eq!(fetch_from(p_r2, &ip_r1).as_deref(), Some(r1.as_str()), "r2 on B fetches r1's page on A");
    eprintln!("r1 -> r2 ping: {}", guest(p_r1, &format!("ping={ip_r2}"), 20).trim());
    // Blue reaches neither (same subnet, other segment), and red not blue.
    for ip in [&ip_r1, &ip_r2] {
        let body = guest(p_b1, &format!("get=http://{ip}/"), 15);
        assert!(!body.contains("instance=") && !body.contains("exit=0"), "blue reached {ip}: {body}");
    }
    let body = guest(p_r1, &format!("get=http://{ip_b1}/"), 15);
    assert!(!body.contains("instance=") && !body.contains("exit=0"), "red reached blue: {body}");
    // No guest reaches a host address: the slirp gateway (restrict=on) or
    // any of this host's own.
    let host = listener();
    let mut targets = vec!["10.0.2.2".to_owned()];
    targets.extend(host_addrs());
    for port in [p_r1, p_b1] {
        for ip in &targets {
            let body = guest(port, &format!("get=http://{ip}:{}/", host.port), 15);
            assert!(!body.contains("exit=0"), "a guest reached host address {ip}: {body}");
        }
    }
    assert_eq!(host.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "a guest connected to the host");

    // r1 moves to B and back; r2 pings it all along (0.1 s apart).
    for (from, to, to_data) in [(&a, &ds[1].addr, &b), (&b, &ds[0].addr, &a)] {
        let q = format!("pingrun={ip_r1}&n=400");
        let pinger = std::thread::spawn(move || guest(p_r2, &q, 120));
        std::thread::sleep(std::time::Duration::from_secs(3));
        let t0 = std::time::Instant::now();
        let m = ok(from, &["migrate", &r1, "--to", to]);
        let took = t0.elapsed().as_secs_f64();
        let port = m["port"].as_u64().unwrap();
        // Reachable again from its peer, at the same address.
        let t1 = std::time::Instant::now();
        within(30, "r2 reaches r1 after the migration", || fetch_from(p_r2, &ip_r1).as_deref() == Some(r1.as_str()));
        let again = t1.elapsed().as_secs_f64();
        assert_eq!(address(to_data, "red", &r1), ip_r1, "r1 keeps its address");
        assert_eq!(fetch_from(port, &ip_r2).as_deref(), Some(r2.as_str()), "r1 reaches r2 from its new host");
        let pings = pinger.join().unwrap();
        let (lost, got) = outage(&pings);
        eprintln!(
            "migrate {r1}: {took:.2} s, downtime {} s; r2's pings to it: longest gap {lost} pings ({:.1} s), {got} answered; \
             first page after the command: {again:.2} s",
            m["downtime_seconds"],
            lost as f64 * 0.1
        );
        assert!(got > 100, "r2's pings were answered around the migration: {pings}");
    }

    // Everything gone: guests, environments, then the daemons' devices.
    for (d, n) in [(&a, &r1), (&a, &b1), (&b, &r2)] {
        ok(d, &["destroy", n]);
    }
    within(30, "no address is claimed any more", || {
        let l = ok(&a, &["net", "ls"]);
        ["red", "blue"].iter().all(|e| env_of(&l, e).is_some_and(|e| e["addresses"] == serde_json::json!([])))
    });
    eprintln!("links while the daemons run: {:?}", xlinks());
    for (d, e) in [(&a, "red"), (&b, "blue")] {
        ok(d, &["net", "rm", e]);
    }
    for d in ds {
        d.stop();
    }
    let after = xlinks();
    eprintln!("links before: {links_before:?}; after: {after:?}");
    assert!(own_links(&na).is_empty() && own_links(&nb).is_empty(), "{after:?}");
    // (Other tests' daemons may come and go meanwhile: nothing new is left.)
    assert!(after.is_subset(&links_before), "no bridge, tunnel or tap left behind: {after:?}");
}

//! Host advertisements over gossip, six daemons as separate processes on
//! loopback with different labels: `hosts --where` returns exactly the
//! matching ones, a killed daemon disappears from every other daemon's
//! list once it expires, and a cleanly stopped one at once.

mod common;

use std::collections::BTreeSet;

use common::{Daemon, federation, ok_json, output as run, within, xenod};

const EXPIRY_SECS: u64 = 10;

fn hosts(d: &Daemon, filter: Option<&str>) -> BTreeSet<String> {
    let mut c = xenod(&d.data);
    c.arg("hosts");
    if let Some(f) = filter {
        c.args(["--where", f]);
    }
    let v = ok_json(&mut c);
    v["hosts"].as_array().unwrap().iter().map(|h| h["node"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn hosts_are_found_by_attributes_and_disappear_when_they_die() {
    let t = tempfile::tempdir().unwrap();
    let labels = [("eu", "a"), ("eu", "b"), ("eu", "c"), ("us", "a"), ("us", "b"), ("eu", "a")];
    let configs: Vec<String> = labels
        .iter()
        .enumerate()
        .map(|(i, (region, zone))| {
            format!("host_expiry_secs = {EXPIRY_SECS}\n[labels]\nregion = \"{region}\"\nzone = \"{zone}\"\nrack = \"r{i}\"\n")
        })
        .collect();
    let mut daemons = federation(t.path(), &configs);
    // Exactly the matching ones, from any daemon.
    let expect = |f: &dyn Fn(&str, &str) -> bool| -> BTreeSet<String> {
        labels.iter().zip(&daemons).filter(|((r, z), _)| f(r, z)).map(|(_, d)| d.node.clone()).collect()
    };
    let eu_not_c = expect(&|r, z| r == "eu" && z != "c");
    assert_eq!(hosts(&daemons[3], Some("label.region=eu && label.zone!=c")), eu_not_c);
    let a_or_us = expect(&|r, z| z == "a" || r == "us");
    assert_eq!(hosts(&daemons[1], Some("label.zone = a || (label.region == \"us\")")), a_or_us);
    let v = ok_json(xenod(&daemons[0].data).args(["hosts", "--where", "vcpus>=1 && mem_total>1M && hv!=nothing"]));
    assert_eq!(v["hosts"].as_array().unwrap().len(), 6, "{v}");
    assert_eq!(v["hosts"][0]["this_host"], true);
    assert!(v["hosts"][0]["attrs"]["mem_free"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(hosts(&daemons[2], Some("label.rack=r4")), expect(&|r, z| r == "us" && z == "b"));
    assert!(hosts(&daemons[2], Some("label.nothing=x")).is_empty());

    // A syntax fault names its column; a usage error.
    let out = run(xenod(&daemons[0].data).args(["hosts", "--where", "mem_free>= && hv=kvm"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at column 12") && err.contains("expected a value"), "{err}");

    // Killed: gone from every other daemon's list once it expires.
    let mut dead = daemons.remove(4);
    dead.kill();
    let left: BTreeSet<String> = daemons.iter().map(|d| d.node.clone()).collect();
    for d in &daemons {
        within(EXPIRY_SECS * 3, "the killed host expires", || hosts(d, None) == left);
    }
    // Stopped cleanly: gone at once, well before the expiry.
    let stopped = daemons.remove(4); // h5
    let node = stopped.node.clone();
    stopped.stop();
    for d in &daemons {
        within(EXPIRY_SECS / 2, "a cleanly stopped host is gone at once", || !hosts(d, None).contains(&node));
    }
}

//! The federation, six daemons as separate processes on loopback with
//! different zones and capacities: placement sends a stack to the host
//! that holds it, filters say which host they removed and why, replicas
//! spread over zones; a real guest deployed by placement answers, is
//! listed by `services` on a third host, and moves there after `migrate`;
//! `events --follow` on another host sees the deploy, migrate and stop,
//! in order per host.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::{Daemon, federation, fixture, ok, page, publish_disk_fixture, run, skip_reason, within, xenod};
use serde_json::Value;

fn nodes(v: &Value, key: &str) -> Vec<String> {
    v[key].as_array().unwrap().iter().map(|h| h["node"].as_str().unwrap().to_owned()).collect()
}

/// The hosts placement chose, in replica order.
fn chosen(v: &Value) -> Vec<String> {
    let p = &v["placement"];
    p["chosen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| p["ranked"][i.as_u64().unwrap() as usize]["node"].as_str().unwrap().to_owned())
        .collect()
}

/// `services NAME` from `d`: (host, state) of each instance.
fn services(d: &Daemon, name: &str) -> Vec<(String, String)> {
    let v = ok(&d.data, &["services", name]);
    v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["host"].as_str().unwrap().to_owned(), i["state"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn guests_go_where_their_chunks_are_and_the_federation_sees_them() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: federation test with a real guest: {why}");
        return;
    }
    let fix = fixture();
    let t = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    // zone, memory offered (MiB)
    let hosts = [("a", 4096), ("a", 2048), ("b", 4096), ("b", 4096), ("c", 512), ("c", 8192)];
    let configs: Vec<String> = hosts
        .iter()
        .enumerate()
        .map(|(i, (zone, mem))| {
            format!("domain_prefix = \"f{pid}h{i}-\"\n[labels]\nzone = \"{zone}\"\n[capacity]\nmemory_mib = {mem}\nvcpus = 2\n")
        })
        .collect();
    let daemons = federation(t.path(), &configs);
    // Every host takes guests from A (the requester) and D from C (a migration).
    let (a, c, d) = (&daemons[0], &daemons[2], &daemons[3]);
    for h in &daemons[1..] {
        ok(&h.data, &["allow", &a.node]);
    }
    ok(&d.data, &["allow", &c.node]);

    // Events on B, from the start.
    let mut follow = xenod(&daemons[1].data)
        .args(["--json", "events", "--follow", "--type", "instance"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    {
        let (out, seen) = (follow.stdout.take().unwrap(), seen.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                seen.lock().unwrap().push(serde_json::from_str(&l).unwrap());
            }
        });
    }

    // The stack is on C alone.
    publish_disk_fixture(&fix, t.path(), &c.data);
    let ticket = ok(&c.data, &["share", "template://t/disk/1"])["ticket"].as_str().unwrap().to_owned();
    let holds = format!("layers>=1 && node={}", c.node);
    within(10, "A hears that C holds the stack", || {
        !nodes(&ok(&a.data, &["hosts", "--where", &holds]), "hosts").is_empty()
    });

    // Placement from A: C holds the stack, so C; E offers too little memory.
    let v = ok(&a.data, &["deploy", &ticket, "--place", "auto", "--memory", "768", "--dry-run"]);
    assert_eq!(chosen(&v), std::slice::from_ref(&c.node), "{v}");
    let removed = &v["placement"]["removed"];
    assert_eq!(removed.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        (removed[0]["node"].as_str(), removed[0]["filter"].as_str()),
        (Some(daemons[4].node.as_str()), Some("memory")),
        "{v}"
    );
    assert_eq!(v["placement"]["ranked"][0]["missing_bytes"], 0, "{v}");
    assert!(v["placement"]["ranked"][1]["missing_bytes"].as_u64().unwrap() > 0, "{v}");
    // An expression can leave no host: the error names the filter.
    let out = run(&a.data, &["deploy", &ticket, "--place", "label.zone=c", "--memory", "16384", "--dry-run"]);
    assert_eq!(out.status.code(), Some(8), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("filter memory removed the last 2") && err.contains("expr removed 4"), "{err}");

    // Hosts that refuse the requester: each is tried in turn, and the
    // command says who refused and why.
    let f = &daemons[5];
    let out = run(&f.data, &["deploy", &ticket, "--place", "label.zone=b", "--uri", "test:///default", "--no-wait"]);
    assert_eq!(out.status.code(), Some(8), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let err = stderr.lines().last().unwrap_or("");
    assert!(
        err.contains("0 of 1 replicas deployed") && err.matches("does not take guests from").count() == 2,
        "{stderr}"
    );
    assert!(stderr.contains("; trying "), "the next host is tried, and said: {stderr}");

    // A real guest, placed: on C, and it answers.
    let v = ok(&a.data, &["deploy", &ticket, "--place", "auto", "--name", "web"]);
    assert_eq!(v["instances"][0]["host"], c.node.as_str(), "{v}");
    let port = v["instances"][0]["instance"]["port"].as_u64().unwrap();
    assert_eq!(page(port).1, 1, "the placed guest answers");
    within(15, "services on F lists web on C", || services(f, "web") == [(c.node.clone(), "running".into())]);

    // Migrated to D: listed there.
    let m = ok(&c.data, &["migrate", "web", "--to", &d.addr]);
    assert!(page(m["port"].as_u64().unwrap()).1 >= 2, "{m}");
    within(15, "services on F lists web on D", || services(f, "web") == [(d.node.clone(), "running".into())]);
    ok(&d.data, &["stop", "web"]);
    within(15, "a stopped instance is no service", || services(f, "web").is_empty());

    // B saw it all, in order per host.
    let of = |host: &str, seen: &[Value]| -> Vec<String> {
        seen.iter()
            .filter(|e| e["host"] == host && e["instance"] == "web")
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    };
    within(10, "B's stream has D's stop", || of(&d.node, &seen.lock().unwrap()).contains(&"instance_stopped".into()));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(of(&c.node, &seen), ["instance_deployed", "instance_migrated"], "{seen:?}");
    assert_eq!(of(&d.node, &seen), ["instance_started", "instance_stopped"], "{seen:?}");
    let migrated = seen.iter().find(|e| e["type"] == "instance_migrated").unwrap();
    assert_eq!(migrated["to"], d.node.as_str());
    // Three replicas in three zones, deployed (the test driver boots nothing).
    let v = ok(
        &a.data,
        &[
            "deploy",
            &ticket,
            "--place",
            "auto",
            "--replicas",
            "3",
            "--spread",
            "zone",
            "--name",
            "sp",
            "--uri",
            "test:///default",
            "--no-wait",
        ],
    );
    let spread = chosen(&v);
    let zone = |n: &str| hosts[daemons.iter().position(|d| d.node == n).unwrap()].0;
    let zones: BTreeSet<&str> = spread.iter().map(|n| zone(n)).collect();
    assert_eq!(zones.len(), 3, "{v}");
    assert_eq!(zone(&spread[0]), "b", "the first replica where the stack is (C, or D since the migration): {v}");
    assert_eq!(v["instances"].as_array().unwrap().len(), 3, "{v}");
    for (i, n) in spread.iter().enumerate() {
        let h = daemons.iter().find(|d| &d.node == n).unwrap();
        let name = format!("sp-{}", i + 1);
        assert!(h.data.join("instances").join(&name).exists(), "{name} on its host: {v}");
        ok(&h.data, &["destroy", &name]);
    }

    let _ = follow.kill();
    let _ = follow.wait();
    ok(&d.data, &["destroy", "web"]);
}

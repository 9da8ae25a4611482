//! The fault soak's short version: `benches/soak.sh` (see its header) for
//! a minute with three hosts, each a daemon in its own network namespace,
//! while daemons are killed, links cut, a disk filled and pack bytes
//! flipped. Every invariant must hold (the long run is the benchmark's).

mod common;

use std::process::Command;

use serde_json::Value;

#[test]
fn a_short_fault_soak_keeps_every_invariant() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: fault soak: not root (network namespaces, tmpfs, FUSE)");
        return;
    }
    if Command::new("ip").args(["netns", "list"]).output().map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!("SKIPPED: fault soak: `ip netns` does not work here");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let report = t.path().join("soak.json");
    let out = Command::new("bash")
        .arg(common::repo().join("benches/soak.sh"))
        .arg("--out")
        .arg(&report)
        .env("XENOD", env!("CARGO_BIN_EXE_xenod"))
        .env("SOAK_SECONDS", "45")
        .env("HOSTS", "3")
        .env("FAULT_EVERY", "8")
        .env("FAULTS", "kill partition diskfull flip")
        .env("SEED", "7")
        // No link delay: it would cost a release build of netdelay and
        // slow the few operations a short soak has; the long run has it.
        .env("LINK_DELAY", "none")
        .env("TMPDIR", t.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no report ({e}); stdout:\n{text}\nstderr:\n{stderr}"));
    let sum = |k: &str| v[k].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum::<u64>());
    assert_eq!(v["violations"], serde_json::json!([]), "{text}\n{stderr}");
    assert!(out.status.success(), "{text}\n{stderr}");
    assert!(sum("faults") >= 1, "a fault was injected: {v}");
    assert!(sum("ops_ok") >= 5, "work was done: {v}");
    assert!(v["invariant_checks"].as_u64() >= Some(2), "{v}");
}

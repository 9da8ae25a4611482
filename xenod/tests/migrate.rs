//! Migration between two daemons (separate processes, loopback, one
//! libvirt shared through per-daemon domain prefixes) with a real
//! disk-root guest: A -> B -> A with its counter intact and the way back
//! sending only what changed; a target killed during pre-copy and during
//! stop-and-copy leaves the guest running on the source and nothing
//! defined on the target; an untrusted source and a second migration of a
//! busy instance are refused; checkpoint and restore. Needs root, /dev/fuse
//! and QEMU; skips loudly when one is truly absent.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::*;

fn counter(port: u64) -> u64 {
    page(port).1
}

/// libvirt's id of a running domain: a restore gives it a new one.
fn domid(name: &str) -> String {
    let out = Command::new("virsh").args(["-c", "qemu:///system", "domid", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether libvirt keeps `name` defined when it stops.
fn persistent(name: &str) -> bool {
    let out = Command::new("virsh").args(["-c", "qemu:///system", "dominfo", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("Persistent:") && l.ends_with("yes"))
}

/// The target staged the guest (its QEMU started before the stop, the
/// state loaded into it after).
fn staged(m: &serde_json::Value) -> bool {
    m["phases"][1]["stage"]["target"]["domain"].is_string() && m["phases"][3]["target_steps"]["write_seconds"].is_f64()
}

fn domains() -> String {
    let out = Command::new("virsh").args(["-c", "qemu:///system", "list", "--all", "--name"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two hosts: data dirs with their own domain prefix, allowed to move
/// guests onto each other; the disk-root fixture published on A.
struct Hosts {
    _t: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    prefix_a: String,
    prefix_b: String,
    name: String,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for d in [&self.a, &self.b] {
            let _ = xenod(d).args(["destroy", &self.name]).output();
        }
    }
}

fn hosts(tag: &str) -> Option<Hosts> {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: real-guest migration test: {why}");
        return None;
    }
    let fix = fixture();
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let pid = std::process::id();
    let (prefix_a, prefix_b) = (format!("a{pid}{tag}-"), format!("b{pid}{tag}-"));
    for (d, p) in [(&a, prefix_a.clone()), (&b, prefix_b.clone())] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("config.toml"), format!("domain_prefix = \"{p}\"\n")).unwrap();
    }
    publish_disk_fixture(&fix, t.path(), &a);
    Some(Hosts { _t: t, a, b, prefix_a, prefix_b, name: format!("m{pid}{tag}") })
}

fn allow(h: &Hosts, da: &Daemon, db: &Daemon) {
    ok(&h.a, &["allow", &db.node]);
    ok(&h.b, &["allow", &da.node]);
}

#[test]
fn guest_moves_there_and_back_with_its_counter() {
    let Some(h) = hosts("mv") else { return };
    let (da, db) = (Daemon::start(&h.a, &[]), Daemon::start(&h.b, &[]));
    allow(&h, &da, &db);
    let d = ok(&h.a, &["deploy", "template://t/disk/1", "--name", &h.name]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!((counter(port), counter(port)), (1, 2));

    // There as by default, its memory saved while it runs; back with a
    // plain save.
    let there = ok(&h.a, &["migrate", &h.name, "--to", &db.addr]);
    assert_eq!(there["live"], true);
    let sc = &there["phases"][2];
    eprintln!(
        "live save: {} s, guest stopped {} s of it; down {} s; clean-up {} s",
        sc["save_seconds"], sc["save_downtime_seconds"], there["downtime_seconds"], there["phases"][4]["seconds"]
    );
    assert!(sc["save_downtime_seconds"].as_f64().unwrap() < sc["save_seconds"].as_f64().unwrap());
    // The source's paused QEMU holds its port until clean-up, so on this one
    // machine the target forwards another (the spec left it to chance).
    let (port_a, port) = (port, there["port"].as_u64().unwrap());
    assert_ne!(port, port_a, "{there}");
    assert_eq!(counter(port), 3, "the counter continues on B: {there}");
    let phases: Vec<&str> = there["phases"].as_array().unwrap().iter().map(|p| p["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["prepare", "pre-copy", "stop-and-copy", "resume", "clean-up"]);
    assert!(there["downtime_seconds"].as_f64().unwrap() > 0.0);
    // Guest pages equal to pages of its kernel, initrd or disk travel as
    // references (the kernel comes from the stack, so some always do).
    // Saved live, the state was encoded as QEMU wrote it (against the last
    // pre-copy round's files), while the guest ran.
    assert_eq!(there["phases"][2]["upper"]["state_encoded_live"], true, "{there}");
    let pages = &there["phases"][2]["upper"]["state_pages"];
    let (refd, all) = (pages["pages_referenced"].as_u64().unwrap(), pages["pages"].as_u64().unwrap());
    eprintln!("state pages: {refd} of {all} sent as references: {pages}");
    assert!(refd > 0 && refd < all, "{pages}");
    // The kernel patched its text as it booted: those pages go as patches
    // of vmlinux's.
    assert!(pages["pages_patched"].as_u64().unwrap() > 0, "{pages}");
    assert!(!h.a.join("instances").join(&h.name).exists(), "the source cleaned up");
    assert!(staged(&there), "the target staged the guest before the stop: {there}");
    // It read ahead the blocks the guest wrote (the counter's), which its
    // page cache holds.
    assert!(there["phases"][1]["stage"]["target"]["read_ahead_bytes"].as_u64() > Some(0), "{there}");
    assert!(persistent(&format!("{}{}", h.prefix_b, h.name)), "defined on B, as a deployed guest is");
    assert!(!h.b.join("instances").join(&h.name).join("staged").exists());
    assert_eq!(ok(&h.b, &["ps"])["instances"][0]["state"], "running");

    // The guest writes on B; the way back sends only what changed there.
    assert_eq!(counter(port), 4);
    // (At another pre-copy level: the target compresses what it asks for
    // at the level the source names.)
    let back = ok(&h.b, &["migrate", &h.name, "--to", &da.addr, "--level", "9", "--save"]);
    assert_eq!((there["precopy_level"].as_str(), back["precopy_level"].as_u64()), (Some("ppmd"), Some(9)));
    assert_eq!(back["live"], false, "{back}");
    assert!(staged(&back), "a stopped save loads into a staged QEMU too: {back}");
    let stop = &back["phases"][2];
    assert!(stop["save_downtime_seconds"].is_f64(), "saved paused through QEMU's migration: {back}");
    assert_eq!(stop["upper"]["state_encoded_live"], true, "and encoded as QEMU wrote it: {back}");
    let port = back["port"].as_u64().unwrap();
    assert_eq!(counter(port), 5, "the counter continues on A again");
    let (w1, w2) = (there["wire_bytes"].as_u64().unwrap(), back["wire_bytes"].as_u64().unwrap());
    eprintln!(
        "A->B {w1} bytes, B->A {w2} bytes; downtime {} s, {} s",
        there["downtime_seconds"], back["downtime_seconds"]
    );
    assert!(w2 * 4 < w1, "the move back sends only what changed: {w2} bytes against {w1}");
    assert!(!h.b.join("instances").join(&h.name).exists());
    assert!(!domains().contains(&format!("{}{}", h.prefix_b, h.name)), "nothing left defined on B");

    // A checkpoint, restored on B under another name: it carries the state.
    // Saved live: the guest stopped only for QEMU's last round and the
    // commit of its upper layer, and ran on in the same QEMU.
    let cp = ok(&h.a, &["checkpoint", &h.name]);
    assert_eq!(cp["live"], true, "{cp}");
    eprintln!("checkpoint: guest paused {} s of {} s", cp["paused_seconds"], cp["seconds"]);
    assert!(cp["paused_seconds"].as_f64().unwrap() < cp["seconds"].as_f64().unwrap(), "{cp}");
    assert_eq!(counter(port), 6, "the guest runs on after a checkpoint");
    // A second one stores only the memory that changed since.
    let cp2 = ok(&h.a, &["checkpoint", &h.name]);
    let (new, all) = (cp2["new_chunks"].as_u64().unwrap(), cp2["state_chunks"].as_u64().unwrap());
    eprintln!("checkpoints: first {} new chunks, second {new} new of {all} state chunks", cp["new_chunks"]);
    assert!(all > 0 && new * 3 < all, "a second checkpoint shares most of its state: {new} new of {all}");
    assert_eq!(counter(port), 7);
    ok(&h.a, &["destroy", &h.name]);
    let copy = format!("{}c", h.name);
    let r = ok(&h.a, &["restore", cp["checkpoint"].as_str().unwrap(), "--on", &db.addr, "--as", &copy]);
    assert_eq!(counter(r["restored"]["port"].as_u64().unwrap()), 6, "the copy goes on from the first checkpoint: {r}");
    assert_eq!(r["restored"]["staged"], true, "its state went into a waiting QEMU, not through a file: {r}");
    assert!(persistent(&format!("{}{copy}", h.prefix_b)), "defined on B, as a deployed guest is");
    ok(&h.b, &["destroy", &copy]);
}

#[test]
fn target_killed_mid_migration_leaves_the_guest_on_the_source() {
    let Some(h) = hosts("kill") else { return };
    let da = Daemon::start(&h.a, &[]);
    let d = ok(&h.a, &["deploy", "template://t/disk/1", "--name", &h.name]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!(counter(port), 1);
    let mut expect = 1;
    // (Saved live, the source's QEMU is only paused when the target dies:
    // it is unpaused.)
    for (phase, live) in [("pre-copy", false), ("stop-and-copy", false), ("stop-and-copy", true)] {
        let mut db = Daemon::start(&h.b, &[("XENOD_TEST_MIGRATE_DIE", phase)]);
        allow(&h, &da, &db);
        let id = domid(&format!("{}{}", h.prefix_a, h.name));
        assert!(!id.is_empty(), "the guest runs on A");
        let flags = if live { ["--live"] } else { ["--save"] };
        let out = run(&h.a, &[&["migrate", &h.name, "--to", &db.addr][..], &flags].concat());
        assert!(!out.status.success(), "migration with a dying target succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("failed in {phase}")), "the error names the phase: {err}");
        db.wait_dead();
        expect += 1;
        assert_eq!(counter(port), expect, "the guest still answers on the source after a death in {phase}: {err}");
        assert_eq!(ok(&h.a, &["ps"])["instances"][0]["state"], "running");
        if live {
            assert_eq!(domid(&format!("{}{}", h.prefix_a, h.name)), id, "unpaused in the same QEMU, not restored");
        }
        // Dead in stop-and-copy, the target had staged the guest: its QEMU
        // ended with the daemon's socket, and the target's next start
        // removes the mount and directory.
        let staged = h.b.join("instances").join(&h.name).join("staged");
        assert_eq!(staged.exists(), phase == "stop-and-copy", "staged on the target only after pre-copy");
        let _db = Daemon::start(&h.b, &[]);
        assert!(!h.b.join("instances").join(&h.name).exists(), "nothing half-made on the target");
        assert!(!domains().contains(&format!("{}{}", h.prefix_b, h.name)), "nothing defined on the target");
    }
    // A target whose restore fails once under way undoes it and answers
    // so: the guest runs on here, unpaused, rather than waiting for
    // someone to look on the target.
    {
        let db = Daemon::start(&h.b, &[("XENOD_TEST_MIGRATE_FAIL", "restore")]);
        allow(&h, &da, &db);
        let id = domid(&format!("{}{}", h.prefix_a, h.name));
        let out = run(&h.a, &["migrate", &h.name, "--to", &db.addr, "--live"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "migration onto a failing target succeeded");
        assert!(err.contains("failed in resume") && err.contains("XENOD_TEST_MIGRATE_FAIL=restore"), "{err}");
        expect += 1;
        assert_eq!(counter(port), expect, "the guest answers on the source: {err}");
        assert_eq!(domid(&format!("{}{}", h.prefix_a, h.name)), id, "unpaused in the same QEMU");
        assert!(!h.b.join("instances").join(&h.name).exists(), "nothing half-made on the target");
        assert!(!domains().contains(&format!("{}{}", h.prefix_b, h.name)), "nothing defined on the target");
    }
    // Refused: an untrusted source, and a second migration of a busy instance.
    let db = Daemon::start(&h.b, &[]);
    ok(&h.b, &["allow", &da.node, "--revoke"]);
    let out = run(&h.a, &["migrate", &h.name, "--to", &db.addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("failed in prepare") && err.contains("xenod allow"), "{err}");
    assert_eq!(counter(port), expect + 1);
    // A migration under way holds an exclusive lock on the instance's
    // marker, which names its process (here this test holds both): a
    // second one is refused at once, naming it.
    ok(&h.b, &["allow", &da.node]);
    let marker = h.a.join("instances").join(&h.name).join("migrating");
    let held = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&marker).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
    fs::write(&marker, std::process::id().to_string()).unwrap();
    let out = run(&h.a, &["migrate", &h.name, "--to", &db.addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    let me = format!("process {}", std::process::id());
    assert!(!out.status.success() && err.contains("already migrating") && err.contains(&me), "{err}");
    // Once its holder is gone (and the lock with it), the marker left
    // behind does not hold: the move goes on.
    drop(held);
    let m = ok(&h.a, &["migrate", &h.name, "--to", &db.addr]);
    assert_eq!(counter(m["port"].as_u64().unwrap()), expect + 2, "{m}");
    assert!(!h.a.join("instances").join(&h.name).exists(), "the source cleaned up");
    ok(&h.b, &["destroy", &h.name]);
}

#[test]
fn shared_fs_guest_moves_cold() {
    let Some(h) = hosts("cold") else { return };
    let fix = fixture();
    let tree = h._t.path().join("fs-tree");
    cp(&fix.join("template"), &tree);
    cp(&fix.join("web"), &tree);
    add_boot(&fix, &tree);
    let spec = repo().join("fixtures/guest/web.spec.json");
    ok(&h.a, &["publish", tree.to_str().unwrap(), "--name", "template://t/fs/1", "--spec", spec.to_str().unwrap()]);
    let (da, db) = (Daemon::start(&h.a, &[]), Daemon::start(&h.b, &[]));
    allow(&h, &da, &db);
    let d = ok(&h.a, &["deploy", "template://t/fs/1", "--name", &h.name]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!(counter(port), 1);
    // Its running state cannot be saved: the command says so and what to do.
    let out = run(&h.a, &["migrate", &h.name, "--to", &db.addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("--cold"), "{err}");
    assert_eq!(counter(port), 2, "still running here");
    let m = ok(&h.a, &["migrate", &h.name, "--to", &db.addr, "--cold"]);
    assert_eq!(m["cold"], true);
    // Booted afresh on B from its committed files: the counter on disk goes on.
    assert_eq!(counter(m["port"].as_u64().unwrap()), 3, "{m}");
    assert!(!h.a.join("instances").join(&h.name).exists());
}

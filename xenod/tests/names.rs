//! Names a host can trust, with daemons as separate processes on loopback:
//! a key trusted for one publisher cannot take over another's names, a
//! trust change reaches a running daemon at once, and `tag`, `name rm` and
//! key rotation travel over gossip, where a replayed older record does not
//! bring a removed name back.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, ok_json, output as run, xenod};
use serde_json::Value;

const FAST: [(&str, &str); 1] = [("XENOD_ANNOUNCE_MS", "200")];

fn tree(root: &Path, seed: &str) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/hostname"), format!("{seed}\n")).unwrap();
    fs::write(root.join("data"), seed.repeat(5000)).unwrap();
}

fn publish(data: &Path, src: &Path, name: &str) -> String {
    ok_json(xenod(data).arg("publish").arg(src).args(["--name", name]))["id"].as_str().unwrap().to_owned()
}

fn key(data: &Path) -> String {
    ok_json(xenod(data).args(["key", "generate"]))["public_key"].as_str().unwrap().to_owned()
}

/// What `resolve` says: the id, or the error text.
fn resolves(data: &Path, name: &str) -> Result<String, String> {
    let out = run(xenod(data).args(["--json", "resolve", name]));
    if out.status.success() {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        Ok(v["id"].as_str().unwrap().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn refused(data: &Path) -> u64 {
    ok_json(xenod(data).arg("status"))["counters"]["names_refused"].as_u64().unwrap_or(0)
}

/// Polls `f` every 100 ms until it holds, for at most 60 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn config(data: &Path, peer: &str, trust: &[(&str, &str)]) {
    fs::create_dir_all(data).unwrap();
    let mut s = format!("peers = [\"{peer}\"]\n");
    for (k, p) in trust {
        s += &format!("[[trust]]\nkey = \"{k}\"\npublishers = [\"{p}\"]\n");
    }
    fs::write(data.join("config.toml"), s).unwrap();
}

#[test]
fn a_key_trusted_for_one_publisher_cannot_take_over_another() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    let (src_a, src_b, src_b2) = (t.path().join("src-a"), t.path().join("src-b"), t.path().join("src-b2"));
    tree(&src_a, "a");
    tree(&src_b, "b");
    tree(&src_b2, "b2");
    let kb = key(&b);
    key(&a);
    // A names its own template; A trusts B for publisher `b` only.
    let mine = publish(&a, &src_a, "template://me/x/1");
    fs::write(a.join("config.toml"), format!("[[trust]]\nkey = \"{kb}\"\npublishers = [\"b\"]\n")).unwrap();
    let da = Daemon::start(&a, &FAST);
    // B and C join through A; C trusts nobody yet.
    config(&b, &da.addr, &[]);
    config(&c, &da.addr, &[]);
    // B signs A's name with a higher sequence (the hijack), and its own.
    let evil = publish(&b, &src_b2, "template://me/x/1");
    for _ in 0..3 {
        ok_json(xenod(&b).args(["tag", &evil, "template://me/x/1"]));
    }
    let theirs = publish(&b, &src_b, "template://b/os/1");
    let db = Daemon::start(&b, &FAST);
    let dc = Daemon::start(&c, &FAST);

    // B's own publisher's names arrive on A; the hijack is refused and counted.
    eventually("A resolves B's own name", || resolves(&a, "template://b/os/1").as_deref() == Ok(theirs.as_str()));
    eventually("A counted the refusal", || refused(&a) > 0);
    assert_eq!(resolves(&a, "template://me/x/1"), Ok(mine.clone()), "A's own name stays A's");
    let names = ok_json(xenod(&a).arg("names"));
    let rec = names["names"].as_array().unwrap().iter().find(|r| r["name"] == "template://me/x/1").unwrap().clone();
    assert_eq!((rec["own"].as_bool(), rec["seq"].as_u64()), (Some(true), Some(1)), "{rec}");
    // Counted once per record, not once per gossip round.
    let n = refused(&a);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(refused(&a), n, "a refused record heard again is not counted again");

    // C heard B's records and refused them; trusting B for `b` on the
    // running daemon accepts the held record at once, no restart.
    eventually("C refused B's records", || refused(&c) >= 2);
    assert!(resolves(&c, "template://b/os/1").is_err());
    let v = ok_json(xenod(&c).args(["key", "trust", &kb, "--for", "b"]));
    let accepted: Vec<&str> = v["daemon"]["accepted"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(accepted, ["template://b/os/1"], "{v}");
    assert_eq!(resolves(&c, "template://b/os/1"), Ok(theirs.clone()));
    assert!(resolves(&c, "template://me/x/1").is_err(), "trust for `b` does not cover `me`");
    drop((da, db, dc));
}

#[test]
fn tag_remove_and_rotation_travel_and_a_replay_does_not_revive() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, e) = (t.path().join("a"), t.path().join("b"), t.path().join("e"));
    let (src1, src2) = (t.path().join("src1"), t.path().join("src2"));
    tree(&src1, "one");
    tree(&src2, "two");
    let kb = key(&b);
    let l1 = publish(&b, &src1, "template://b/os/1");
    let l2 = ok_json(xenod(&b).arg("publish").arg(&src2))["id"].as_str().unwrap().to_owned();
    let db = Daemon::start(&b, &FAST);
    for x in [&a, &e] {
        config(x, &db.addr, &[(&kb, "b")]);
    }
    let da = Daemon::start(&a, &FAST);
    let mut de = Daemon::start(&e, &FAST);
    for x in [&a, &e] {
        eventually("the name arrives", || resolves(x, "template://b/os/1").as_deref() == Ok(l1.as_str()));
    }
    // E goes away holding sequence 1.
    de.kill();

    // tag moves the name everywhere; name rm removes it everywhere.
    ok_json(xenod(&b).args(["tag", &l2, "template://b/os/1"]));
    eventually("A follows the tag", || resolves(&a, "template://b/os/1").as_deref() == Ok(l2.as_str()));
    ok_json(xenod(&b).args(["name", "rm", "template://b/os/1"]));
    eventually("A hears the removal", || resolves(&a, "template://b/os/1").is_err_and(|e| e.contains("removed")));

    // E comes back no longer trusting B, so it keeps its sequence-1 record
    // and announces it every round: a replay. A refuses it, once.
    ok_json(xenod(&e).args(["key", "untrust", &kb]));
    let before = refused(&a);
    let de = Daemon::start(&e, &FAST);
    eventually("A refused E's stale record", || refused(&a) > before);
    assert_eq!(resolves(&e, "template://b/os/1"), Ok(l1.clone()), "E still holds the old record");
    assert!(resolves(&a, "template://b/os/1").is_err_and(|e| e.contains("removed (sequence 3)")));

    // B rotates its key: names signed with the new key are trusted for `b`
    // wherever the old key was, once the succession arrives; not for others.
    let rot = ok_json(xenod(&b).args(["key", "rotate"]));
    let new_key = rot["public_key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, kb);
    ok_json(xenod(&b).args(["tag", &l1, "template://b/os/2"]));
    eventually("A takes a record signed by the successor", || {
        resolves(&a, "template://b/os/2").as_deref() == Ok(l1.as_str())
    });
    let names = ok_json(xenod(&a).arg("names"));
    let rec = names["names"].as_array().unwrap().iter().find(|r| r["name"] == "template://b/os/2").unwrap().clone();
    assert_eq!(rec["key"], new_key.as_str());
    ok_json(xenod(&b).args(["tag", &l1, "template://other/os/1"]));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(resolves(&a, "template://other/os/1").is_err(), "the successor inherits `b` only");

    // A config edit and SIGHUP: the running daemon takes the new trust and
    // accepts the record it refused, without hearing it again.
    let cfg = fs::read_to_string(a.join("config.toml")).unwrap();
    fs::write(a.join("config.toml"), cfg.replace("publishers = [\"b\"]", "publishers = [\"b\", \"other\"]")).unwrap();
    db.stop();
    let hup = std::process::Command::new("kill").args(["-HUP", &da.child.id().to_string()]).status().unwrap();
    assert!(hup.success());
    eventually("A takes the new trust on SIGHUP", || {
        resolves(&a, "template://other/os/1").as_deref() == Ok(l1.as_str())
    });
    drop((da, de));
}

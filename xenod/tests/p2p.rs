//! Daemons as separate processes on loopback, each with its own data dir:
//! publish, share, fetch from several providers at once, a provider killed
//! mid-transfer, a corrupting provider, forged and untrusted names, and a
//! restarted daemon that keeps its identity, port, peers and counters.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Daemon, ok_json, output as run, xenod};
use serde_json::Value;

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Compressible, like an OS tree: chunks travel as zstd.
        out.extend_from_slice(&(x & 0x3f3f_3f3f_3f3f_3f3f).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A template tree of about `mib` MiB in a few files.
fn tree(root: &Path, mib: usize, seed: u64) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), format!("host{seed}\n")).unwrap();
    for i in 0..mib.div_ceil(4) {
        std::fs::write(root.join(format!("file{i}")), noise(4 << 20, seed * 100 + i as u64)).unwrap();
    }
}

fn publish(data: &Path, src: &Path, name: &str) -> String {
    ok_json(xenod(data).arg("publish").arg(src).args(["--name", name]))["id"].as_str().unwrap().to_owned()
}

fn share(data: &Path, r: &str) -> String {
    let out = run(xenod(data).args(["share", r]));
    assert!(out.status.success(), "share: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let last = text.lines().last().unwrap().to_owned();
    assert!(last.starts_with("xenod1"), "ticket is the last line: {text}");
    last
}

fn digest_of(data: &Path, r: &str, dest: &Path) -> String {
    let out = run(xenod(data).arg("export").arg(r).arg(dest));
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    xenod_store::tree_digest(dest).unwrap()
}

fn status(data: &Path) -> Value {
    ok_json(xenod(data).arg("status"))
}

#[test]
fn fetch_from_two_providers_one_killed_midway() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    let src = t.path().join("src");
    tree(&src, 24, 1);
    let id = publish(&a, &src, "template://test/os/1");
    assert_eq!(publish(&b, &src, "template://test/os/1"), id);
    // Slow enough that the transfer is still running when B dies.
    let slow = [("XENOD_TEST_DELAY_MS", "15")];
    let da = Daemon::start(&a, &slow);
    let mut db = Daemon::start(&b, &slow);
    let ticket_a = share(&a, "template://test/os/1");

    let started = Instant::now();
    let mut fetch = xenod(&c)
        .args(["--json", "fetch", &ticket_a, "--from", &db.addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(fetch.try_wait().unwrap().is_none(), "fetch finished before B was killed; make it slower");
    db.kill();
    let out = fetch.wait_with_output().unwrap();
    assert!(out.status.success(), "fetch failed: {}", String::from_utf8_lossy(&out.stderr));
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("fetch with B killed: {:?}", started.elapsed());
    let provs = rep["providers"].as_array().unwrap();
    let by = |node: &str| provs.iter().find(|p| p["node"] == node).unwrap().clone();
    assert!(by(&db.node)["chunks"].as_u64().unwrap() > 0, "B took part before dying: {rep}");
    assert!(by(&da.node)["chunks"].as_u64().unwrap() > 0, "{rep}");
    assert!(rep["wire_bytes"].as_u64().unwrap() < rep["bytes"].as_u64().unwrap(), "travels compressed: {rep}");
    assert_eq!(digest_of(&c, &id, &t.path().join("out")), xenod_store::tree_digest(&src).unwrap());

    // Resumable: asking again transfers nothing.
    let again = ok_json(xenod(&c).args(["fetch", &ticket_a]));
    assert_eq!(again["chunks_fetched"], 0, "{again}");
    drop(da);
}

#[test]
fn corrupting_provider_is_detected_and_the_chunk_comes_from_another() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    let src = t.path().join("src");
    tree(&src, 8, 2);
    let id = publish(&a, &src, "template://test/os/1");
    publish(&b, &src, "template://test/os/1");
    let da = Daemon::start(&a, &[("XENOD_TEST_CORRUPT", "1")]);
    let db = Daemon::start(&b, &[]);
    let rep = ok_json(xenod(&c).args(["fetch", &id, "--from", &da.addr, "--from", &db.addr]));
    let provs = rep["providers"].as_array().unwrap();
    let bad = provs.iter().find(|p| p["node"] == da.node.as_str()).unwrap();
    assert_eq!(bad["bad_chunks"], 1, "{rep}");
    assert!(bad["dropped"].as_str().unwrap().contains("does not verify"), "{rep}");
    assert_eq!(digest_of(&c, &id, &t.path().join("out")), xenod_store::tree_digest(&src).unwrap());
    let s = status(&c);
    assert_eq!(s["counters"]["bad_chunks"], 1, "{s}");
    assert_eq!(s["peers"][&da.node]["bad_chunks"], 1, "{s}");
    let text = String::from_utf8(run(xenod(&c).arg("status")).stdout).unwrap();
    assert!(text.contains("refused bad chunks   1"), "{text}");
    ok_json(xenod(&c).arg("verify"));
    drop((da, db));
}

#[test]
fn forged_and_untrusted_names_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let (a, f, c) = (t.path().join("a"), t.path().join("f"), t.path().join("c"));
    let src = t.path().join("src");
    tree(&src, 1, 3);
    let id = publish(&a, &src, "template://test/os/1");
    publish(&f, &src, "template://test/os/1");
    let da = Daemon::start(&a, &[]);
    let df = Daemon::start(&f, &[("XENOD_TEST_FORGE_NAMES", "1")]);
    let key = |d: &Path| ok_json(xenod(d).args(["key", "show"]))["public_key"].as_str().unwrap().to_owned();
    let (ka, kf) = (key(&a), key(&f));

    // Untrusted: C does not trust A's key yet.
    let out = run(xenod(&c).args(["fetch", "template://test/os/1", "--from", &da.addr]));
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not trusted"));

    // Forged: C trusts F's key, but F serves records with a broken signature.
    ok_json(xenod(&c).args(["key", "trust", &kf, "--for", "test"]));
    let out = run(xenod(&c).args(["fetch", "template://test/os/1", "--from", &df.addr]));
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad signature"));
    // Every record offered was refused: exit 5. (C runs no daemon: each
    // command's embedded engine counts what it refused, so the forged
    // record counts again here; a daemon counts a record once.)
    let out = run(xenod(&c).args(["--json", "names", "--from", &df.addr]));
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    let n: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(n["peers"][0]["accepted"].as_array().unwrap().is_empty(), "{n}");
    assert_eq!(status(&c)["counters"]["names_refused"], 3);
    assert!(!run(xenod(&c).args(["resolve", "template://test/os/1"])).status.success(), "nothing was stored");

    // Trusted and genuine: the name resolves and the stack arrives.
    ok_json(xenod(&c).args(["key", "trust", &ka, "--for", "test"]));
    let rep = ok_json(xenod(&c).args(["fetch", "template://test/os/1", "--from", &da.addr]));
    assert_eq!(rep["layer"], id.as_str());
    assert_eq!(ok_json(xenod(&c).args(["resolve", "template://test/os/1"]))["id"], id.as_str());
    drop((da, df));
}

#[test]
fn restarted_daemon_keeps_identity_port_peers_and_counters() {
    let t = tempfile::tempdir().unwrap();
    let (a, c) = (t.path().join("a"), t.path().join("c"));
    let src = t.path().join("src");
    tree(&src, 1, 4);
    let id = publish(&a, &src, "template://test/os/1");
    let da = Daemon::start(&a, &[]);
    let dc = Daemon::start(&c, &[]);
    assert_ne!(dc.addr, da.addr, "two daemons side by side, each its own port");
    ok_json(xenod(&c).args(["fetch", &id, "--from", &da.addr]));
    let before = status(&c);
    assert_eq!(before["daemon"], true);
    let (node, addr) = (dc.node.clone(), dc.addr.clone());
    dc.stop();
    assert!(!c.join("xenod.sock").exists(), "socket removed on stop");
    let offline = status(&c);
    assert_eq!(offline["daemon"], false);
    assert_eq!(offline["counters"], before["counters"], "{offline}");

    let dc = Daemon::start(&c, &[]);
    assert_eq!((dc.node.as_str(), dc.addr.as_str()), (node.as_str(), addr.as_str()), "same id and port");
    let mut after = status(&c);
    // Gossip may already have brought A's name record, which C (not
    // trusting A's key) refuses and counts: the one counter that may move.
    let refused = after["counters"]["names_refused"].take();
    let mut kept = before["counters"].clone();
    assert!(refused.as_u64() >= kept["names_refused"].take().as_u64(), "{after}");
    assert_eq!(after["counters"], kept);
    assert!(after["known_peers"][&da.node]["layers"].as_array().unwrap().iter().any(|l| l == id.as_str()));

    // A new layer on A is found through the remembered peer, with no --from.
    let src2 = t.path().join("src2");
    tree(&src2, 1, 5);
    let id2 = publish(&a, &src2, "template://test/os/2");
    let rep = ok_json(xenod(&c).args(["fetch", &id2]));
    assert_eq!(rep["layer"], id2.as_str());
    // A second daemon on the same data dir is refused.
    let out = run(xenod(&c).args(["serve", "--listen", "127.0.0.1:0"]));
    assert!(!out.status.success());
    drop((da, dc));
}

/// Whether FUSE mounts can be made here (root and /dev/fuse); says so when not.
fn can_mount() -> bool {
    let ok = rustix::process::geteuid().is_root() && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("SKIPPED: FUSE part of the test: needs root and /dev/fuse");
    }
    ok
}

fn is_mounted(p: &Path) -> bool {
    let p = p.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

/// The layer ids and the chunk count of the store of `data`.
fn held(data: &Path) -> (Vec<String>, u64) {
    let v = ok_json(xenod(data).arg("ls"));
    let ids = v["layers"].as_array().unwrap().iter().map(|l| l["id"].as_str().unwrap().to_owned()).collect();
    (ids, v["chunks"].as_u64().unwrap())
}

#[test]
fn mount_by_ticket_on_a_host_that_never_saw_the_layer() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (a, c) = (t.path().join("a"), t.path().join("c"));
    let src = t.path().join("src");
    tree(&src, 8, 6);
    let id = publish(&a, &src, "template://test/os/1");
    let da = Daemon::start(&a, &[]);
    let ticket = share(&a, "template://test/os/1");
    assert_eq!(held(&c), (vec![], 0));

    // No daemon on C: the mount command fetches with an embedded engine.
    let mp = t.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let out = run(xenod(&c).arg("mount").arg(&ticket).arg(&mp));
    assert!(out.status.success(), "mount by ticket: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fetching") && err.contains(&da.node), "progress on stderr: {err}");
    assert!(is_mounted(&mp));
    let read = std::fs::read_to_string(mp.join("etc/hostname"));
    let digest = xenod_store::tree_digest(&mp);
    let um = run(xenod(&c).arg("umount").arg(&mp));
    assert!(um.status.success(), "umount: {}", String::from_utf8_lossy(&um.stderr));
    assert_eq!(read.unwrap(), "host6\n");
    assert_eq!(digest.unwrap(), xenod_store::tree_digest(&src).unwrap(), "the union shows the published tree");
    // The stack is local now: a second mount by the same ticket needs no provider.
    drop(da);
    let out = run(xenod(&c).arg("mount").arg(&ticket).arg(&mp));
    assert!(out.status.success(), "remount with the provider gone: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("fetching"), "nothing fetched the second time");
    assert!(run(xenod(&c).arg("umount").arg(&mp)).status.success());
    assert!(held(&c).0.contains(&id), "{:?}", held(&c));
}

#[test]
fn deploy_by_ticket_through_the_daemon_on_the_test_driver() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (a, c) = (t.path().join("a"), t.path().join("c"));
    let src = t.path().join("src");
    tree(&src, 4, 7);
    std::fs::create_dir_all(src.join("boot")).unwrap();
    // The test driver boots nothing: any file serves as the kernel.
    std::fs::write(src.join("boot/vmlinux"), b"not a kernel").unwrap();
    let spec = t.path().join("spec.json");
    std::fs::write(&spec, r#"{"kernel": "stack:boot/vmlinux", "instance": "tk"}"#).unwrap();
    let id = ok_json(xenod(&a).arg("publish").arg(&src).args(["--name", "template://test/os/1", "--spec"]).arg(&spec))
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let da = Daemon::start(&a, &[]);
    let ticket = share(&a, &id);
    // A daemon on C: the deploy command fetches through it.
    let dc = Daemon::start(&c, &[]);
    let out = run(xenod(&c).args(["--json", "deploy", &ticket, "--uri", "test:///default", "--no-wait"]));
    assert!(out.status.success(), "deploy by ticket: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = c.join("instances/tk/root");
    let hostname = std::fs::read_to_string(root.join("etc/hostname"));
    let destroyed = run(xenod(&c).args(["destroy", "tk"]));
    assert!(destroyed.status.success(), "destroy: {}", String::from_utf8_lossy(&destroyed.stderr));
    assert_eq!(v["instances"][0]["top"], id.as_str(), "{v}");
    assert_eq!(hostname.unwrap(), "host7\n");
    let s = status(&c);
    assert!(s["counters"]["chunks_received"].as_u64().unwrap() > 0, "C's daemon did the fetch: {s}");
    drop((da, dc));
}

#[test]
fn dead_or_wrong_ticket_is_refused_and_stores_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (a, c) = (t.path().join("a"), t.path().join("c"));
    let src = t.path().join("src");
    tree(&src, 1, 8);
    publish(&a, &src, "template://test/os/1");
    let da = Daemon::start(&a, &[]);
    let ticket = share(&a, "template://test/os/1");
    let addr = da.addr.clone();
    da.stop();

    let mp = t.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    for args in [vec!["mount", &ticket, mp.to_str().unwrap()], vec!["deploy", &ticket, "--uri", "test:///default"]] {
        let out = run(xenod(&c).args(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "{args:?}: {err}");
        assert!(err.contains("no provider") && err.contains(&addr), "{args:?} names what and where: {err}");
    }
    assert!(!is_mounted(&mp));
    assert_eq!(held(&c), (vec![], 0), "nothing stored");
    assert!(!c.join("instances/tk").exists());

    let out = run(xenod(&c).args(["mount", "xenod1notaticket"]).arg(&mp));
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a xenod ticket"));
}

/// Lets `node` ask the host of `data` to pull stacks.
fn allow_pulls(data: &Path, node: &str) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join("config.toml"), format!("pull_from = [\"{node}\"]\n")).unwrap();
}

#[test]
fn replicate_to_three_peers_that_serve_each_other() {
    let t = tempfile::tempdir().unwrap();
    let [a, b, c, d, e] = ["a", "b", "c", "d", "e"].map(|n| t.path().join(n));
    let src = t.path().join("src");
    tree(&src, 24, 9);
    let id = publish(&a, &src, "template://test/os/1");
    // A slow source, so the targets' exchange among themselves shows.
    let da = Daemon::start(&a, &[("XENOD_TEST_DELAY_MS", "20")]);
    for x in [&b, &c, &d] {
        allow_pulls(x, &da.node);
    }
    let targets = [&b, &c, &d].map(|x| Daemon::start(x, &[]));
    let de = Daemon::start(&e, &[]);

    let mut args = vec!["replicate".to_owned(), "template://test/os/1".to_owned()];
    for tg in &targets {
        args.extend(["--to".to_owned(), tg.addr.clone()]);
    }
    let rep = ok_json(xenod(&a).args(&args));
    let outs = rep["targets"].as_array().unwrap();
    assert_eq!(outs.len(), 3, "{rep}");
    let mut from_members = 0;
    let mut fetched = 0;
    for (tg, o) in targets.iter().zip(outs) {
        assert_eq!(o["node"], tg.node.as_str(), "{rep}");
        let r = &o["report"];
        assert_eq!(r["layer"], id.as_str(), "{rep}");
        fetched += r["chunks_fetched"].as_u64().unwrap();
        for p in r["providers"].as_array().unwrap() {
            if p["node"] != da.node.as_str() {
                assert!(targets.iter().any(|x| p["node"] == x.node.as_str()), "{p}");
                from_members += p["chunks"].as_u64().unwrap();
            }
        }
        assert_eq!(status(&tg.data)["counters"]["pulls"], 1);
    }
    let served = status(&a)["counters"]["chunks_served"].as_u64().unwrap();
    eprintln!("fan-out to 3: {fetched} chunks stored, {served} served by the source, {from_members} by targets");
    assert!(from_members > 0, "targets served each other: {rep}");
    assert!(served < fetched, "the source sent less than one copy per target ({served} of {fetched}): {rep}");
    let want = xenod_store::tree_digest(&src).unwrap();
    for (i, tg) in targets.iter().enumerate() {
        assert_eq!(digest_of(&tg.data, &id, &t.path().join(format!("out{i}"))), want);
        let pins = ok_json(xenod(&tg.data).arg("ls"))["pins"].clone();
        assert!(pins.as_array().unwrap().iter().any(|p| p["id"] == id.as_str()), "pinned: {pins}");
    }

    // E does not allow A: refused, named, counted, nothing stored.
    let out = run(xenod(&a).args(["replicate", &id, "--to", &de.addr]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&de.node) && err.contains("may not ask"), "{err}");
    assert_eq!(status(&e)["counters"]["pulls_refused"], 1);
    assert_eq!(held(&e), (vec![], 0));
    drop((da, targets, de));
}

/// Polls `f` every 100 ms until it holds, for at most 60 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn resolves(data: &Path, name: &str) -> Option<String> {
    let out = run(xenod(data).args(["--json", "resolve", name]));
    out.status
        .success()
        .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"].as_str().unwrap().to_owned())
}

#[test]
fn names_and_presence_travel_over_gossip() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    let key = |d: &Path| ok_json(xenod(d).args(["key", "generate"]))["public_key"].as_str().unwrap().to_owned();
    let (ka, _kb) = (key(&a), key(&b));
    let fast = [("XENOD_ANNOUNCE_MS", "200")];
    let da = Daemon::start(&a, &fast);
    // B and C know only A (to join the topic) and trust only A's key.
    for x in [&b, &c] {
        std::fs::create_dir_all(x).unwrap();
        std::fs::write(
            x.join("config.toml"),
            format!("peers = [\"{}\"]\n[[trust]]\nkey = \"{ka}\"\npublishers = [\"test\"]\n", da.addr),
        )
        .unwrap();
    }
    let db = Daemon::start(&b, &fast);
    // F announces its names with broken signatures; C trusts F's key.
    let f = t.path().join("f");
    let kf = key(&f);
    std::fs::write(f.join("config.toml"), format!("peers = [\"{}\"]\n", da.addr)).unwrap();
    ok_json(xenod(&c).args(["key", "trust", &kf, "--for", "test"]));
    let srcf = t.path().join("srcf");
    tree(&srcf, 1, 12);
    publish(&f, &srcf, "template://test/f/1");
    let df = Daemon::start(&f, &[("XENOD_ANNOUNCE_MS", "200"), ("XENOD_TEST_FORGE_NAMES", "1")]);
    let dc = Daemon::start(&c, &fast);

    // B publishes under its own key, which C does not trust.
    let srcb = t.path().join("srcb");
    tree(&srcb, 1, 11);
    let idb = publish(&b, &srcb, "template://test/b/1");
    // A publishes after every daemon is up; no one pulls names.
    let src = t.path().join("src");
    tree(&src, 4, 10);
    let id = publish(&a, &src, "template://test/os/1");
    eventually("C resolves A's name", || resolves(&c, "template://test/os/1").as_deref() == Some(id.as_str()));
    eventually("B resolves A's name", || resolves(&b, "template://test/os/1").as_deref() == Some(id.as_str()));
    let holds = |d: &Path, node: &str, layer: &str| {
        status(d)["known_peers"][node]["layers"].as_array().is_some_and(|l| l.iter().any(|x| x == layer))
    };
    eventually("C heard B's presence with B's layer", || holds(&c, &db.node, &idb));
    assert_eq!(resolves(&c, "template://test/b/1"), None, "a name under an untrusted key is not kept");

    // B fetches by name with no --from; then announces that it holds it.
    let rep = ok_json(xenod(&b).args(["fetch", "template://test/os/1"]));
    assert_eq!(rep["layer"], id.as_str());
    eventually("C heard that B holds the layer", || holds(&c, &db.node, &id));

    // A is gone; C never talked to B, yet finds it as a provider.
    drop(da);
    let rep = ok_json(xenod(&c).args(["fetch", "template://test/os/1"]));
    let from_b = rep["providers"].as_array().unwrap().iter().find(|p| p["node"] == db.node.as_str()).cloned();
    assert!(from_b.is_some_and(|p| p["chunks"].as_u64().unwrap() > 0), "{rep}");
    assert_eq!(digest_of(&c, &id, &t.path().join("out")), xenod_store::tree_digest(&src).unwrap());
    let s = status(&c);
    assert_eq!(s["gossip"]["joined"], true, "{s}");
    // F's forged records are refused and counted (B's, under a key C does
    // not trust, are refused too).
    eventually("C refused records", || status(&c)["counters"]["names_refused"].as_u64() > Some(0));
    assert_eq!(resolves(&c, "template://test/f/1"), None, "a forged record is not kept");
    drop((db, dc, df));
}

/// The binary chunk stream a lazy mount reads through: a chunk the store
/// holds comes back whole; one nobody has gets an answer naming it, and
/// the stream goes on serving after it.
#[test]
fn a_chunk_stream_answers_each_id_and_names_what_no_provider_has() {
    use xenod_host::api::{ChunkClient, ChunkFault};
    use xenod_store::{ChunkId, Extent, Kind, Store};
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let src = t.path().join("src");
    tree(&src, 4, 3);
    let id = publish(&a, &src, "template://test/os/1");
    // A chunk of the tree, and the bytes it holds, from the store itself.
    let store = Store::open(&a).unwrap();
    let layer = store.resolve(&id).unwrap();
    let chunk = store
        .read_layer(&layer)
        .unwrap()
        .find_map(|e| match e.unwrap().kind {
            Kind::File { extents, .. } => extents.into_iter().find_map(|x| match x {
                Extent::Data { id, .. } => Some(id),
                _ => None,
            }),
            _ => None,
        })
        .expect("the tree has a chunk");
    let bytes = store.get(&chunk).unwrap();
    drop(store);

    let da = Daemon::start(&a, &[]);
    let mut c = ChunkClient::connect(&a).unwrap();
    assert!(c.get(&chunk).unwrap() == bytes, "chunk {chunk} came back with other bytes");
    let nowhere = ChunkId::of(b"a chunk no store holds");
    match c.get(&nowhere) {
        Err(ChunkFault::Answer(why)) => {
            assert!(why.contains(&nowhere.to_string()) && why.contains("no provider"), "{why}")
        }
        Err(ChunkFault::Stream(why)) => panic!("the stream broke instead of answering: {why}"),
        Ok(_) => panic!("bytes for a chunk nobody has"),
    }
    assert!(c.get(&chunk).unwrap() == bytes, "the stream serves on after an error answer");
    drop(da);
}

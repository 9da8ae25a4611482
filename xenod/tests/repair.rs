//! Repair from peers and gc that sees `.mount` references, end to end: the
//! real binary on real stores, a healthy peer as a daemon on loopback.
//!
//! - a flipped byte in a pack, `verify --repair` against a healthy peer:
//!   `verify` is clean and the layer exports identical;
//! - with no healthy peer: exit 4, the report names the chunks it could not
//!   repair, and the store serves everything else; a later `fetch` from a
//!   healthy peer rechecks the chunks it would have skipped and mends them;
//! - gc keeps a layer named only by a `.mount` file; the stack still mounts
//!   and exports as the mount shows it.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{Daemon, ok_json, output as run, xenod};
use serde_json::Value;
use xenod_store::{ChunkId, Extent, Kind, Store};

/// A compressible tree of `files` 1 MiB files plus a small one.
fn tree(root: &Path, files: u64, seed: u64) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/hostname"), format!("host{seed}\n")).unwrap();
    for i in 0..files {
        let data: Vec<u8> = xenod_store::testing::noise(1 << 20, seed * 100 + i).iter().map(|b| b & 0x3f).collect();
        fs::write(root.join(format!("file{i}")), data).unwrap();
    }
}

fn publish(data: &Path, src: &Path, name: &str) -> String {
    ok_json(xenod(data).arg("publish").arg(src).args(["--name", name]))["id"].as_str().unwrap().to_owned()
}

fn digest_of(data: &Path, r: &str, dest: &Path) -> String {
    let out = run(xenod(data).arg("export").arg(r).arg(dest));
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    xenod_store::tree_digest(dest).unwrap()
}

/// Flips a byte in the middle of the stored record of the first data chunk
/// of `path` in layer `layer` of the store in `data`.
fn flip_byte(data: &Path, layer: &str, path: &[u8]) {
    let store = Store::open(data).unwrap();
    let id: ChunkId = layer.parse().unwrap();
    let chunk = store
        .read_layer(&id)
        .unwrap()
        .map(Result::unwrap)
        .find_map(|e| match e.kind {
            Kind::File { extents, .. } if e.path == path => extents.iter().find_map(|x| match x {
                Extent::Data { id, .. } => Some(*id),
                Extent::Hole { .. } => None,
            }),
            _ => None,
        })
        .expect("a data chunk");
    let loc = store.locate(&chunk).unwrap().unwrap();
    let pack = data.join("packs").join(format!("{:016x}.pack", loc.pack));
    let f = fs::OpenOptions::new().read(true).write(true).open(pack).unwrap();
    let at = loc.offset + loc.stored_len as u64 / 2;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

/// `xenod --json verify [ARGS]`: its exit code and JSON answer.
fn verify(data: &Path, args: &[&str]) -> (Option<i32>, Value) {
    let out = run(xenod(data).args(["--json", "verify"]).args(args));
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify {args:?}: {e}: {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

fn damaged_chunks(v: &Value) -> Vec<String> {
    let mut c: Vec<String> =
        v["damage"].as_array().unwrap().iter().map(|d| d["chunk"].as_str().unwrap().into()).collect();
    c.sort();
    c
}

#[test]
fn verify_repair_from_a_healthy_peer_mends_the_store() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let src = t.path().join("src");
    tree(&src, 3, 1);
    let id = publish(&a, &src, "template://test/os/1");
    assert_eq!(publish(&b, &src, "template://test/os/1"), id);
    flip_byte(&a, &id, b"file1");

    let (code, before) = verify(&a, &[]);
    assert_eq!(code, Some(4), "{before}");
    let bad = damaged_chunks(&before);
    assert!(!bad.is_empty());

    let db = Daemon::start(&b, &[]);
    let (code, rep) = verify(&a, &["--repair", "--from", &db.addr]);
    assert_eq!(code, Some(0), "{rep}");
    assert_eq!(rep["clean"], true, "{rep}");
    assert_eq!(rep["found"], bad.len(), "{rep}");
    let mut repaired: Vec<String> =
        rep["repaired"].as_array().unwrap().iter().map(|r| r["chunk"].as_str().unwrap().into()).collect();
    repaired.sort();
    assert_eq!(repaired, bad, "every damaged chunk, once: {rep}");
    assert!(rep["repaired"].as_array().unwrap().iter().all(|r| r["from"] == db.node.as_str()), "{rep}");
    assert!(rep["unrepaired"].as_array().unwrap().is_empty(), "{rep}");
    assert_eq!(rep["packs_rewritten"].as_array().unwrap().len(), 1, "the damaged pack: {rep}");
    assert!(rep["packs_kept"].as_array().unwrap().is_empty(), "{rep}");

    let (code, after) = verify(&a, &[]);
    assert_eq!(code, Some(0), "{after}");
    assert_eq!(after["clean"], true);
    assert_eq!(digest_of(&a, &id, &t.path().join("out")), xenod_store::tree_digest(&src).unwrap());
    // The text report says from whom.
    flip_byte(&a, &id, b"file2");
    let out = run(xenod(&a).args(["verify", "--repair", "--from", &db.addr]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("from {}", db.node)) && text.trim_end().ends_with("clean"), "{text}");
    drop(db);
}

#[test]
fn without_a_healthy_peer_the_report_names_what_remains_and_the_rest_stays_usable() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, e) = (t.path().join("a"), t.path().join("b"), t.path().join("empty"));
    let (src, other) = (t.path().join("src"), t.path().join("other"));
    tree(&src, 2, 2);
    tree(&other, 1, 3);
    let id = publish(&a, &src, "template://test/os/1");
    let oid = publish(&a, &other, "template://test/other/1");
    publish(&b, &src, "template://test/os/1");
    flip_byte(&a, &id, b"file0");
    let (_, before) = verify(&a, &[]);
    let bad = damaged_chunks(&before);
    assert!(!bad.is_empty());

    // No provider at all, then one that lacks every chunk.
    let (code, rep) = verify(&a, &["--repair"]);
    assert_eq!(code, Some(4), "{rep}");
    let de = Daemon::start(&e, &[]);
    let (code, rep) = verify(&a, &["--repair", "--from", &de.addr]);
    assert_eq!(code, Some(4), "Damaged: {rep}");
    assert_eq!(rep["clean"], false);
    assert!(rep["repaired"].as_array().unwrap().is_empty(), "{rep}");
    let mut left: Vec<String> =
        rep["unrepaired"].as_array().unwrap().iter().map(|u| u["chunk"].as_str().unwrap().into()).collect();
    left.sort();
    assert_eq!(left, bad, "{rep}");
    for u in rep["unrepaired"].as_array().unwrap() {
        assert_eq!(u["layers"][0][0], id.as_str(), "names the layer that needs it: {u}");
    }
    let p = &rep["providers"][0];
    assert_eq!(p["node"], de.node.as_str(), "{rep}");
    assert_eq!(p["absent"], bad.len(), "{rep}");
    assert_eq!(rep["packs_kept"].as_array().unwrap().len(), 1, "the only copies stay: {rep}");
    let text =
        String::from_utf8_lossy(&run(xenod(&a).args(["verify", "--repair", "--from", &de.addr])).stdout).into_owned();
    assert!(text.contains("could not repair") && bad.iter().all(|c| text.contains(c.as_str())), "{text}");
    drop(de);

    // Everything else still works: the other layer exports, a publish goes in.
    assert_eq!(digest_of(&a, &oid, &t.path().join("out-other")), xenod_store::tree_digest(&other).unwrap());
    let more = t.path().join("more");
    tree(&more, 1, 4);
    let mid = publish(&a, &more, "template://test/more/1");
    assert_eq!(digest_of(&a, &mid, &t.path().join("out-more")), xenod_store::tree_digest(&more).unwrap());
    let (_, again) = verify(&a, &[]);
    assert_eq!(damaged_chunks(&again), bad, "only the damaged chunks: {again}");

    // The store is marked damaged, so a fetch of the layer rechecks the
    // chunks it would have skipped and takes them from the healthy peer.
    let db = Daemon::start(&b, &[]);
    let rep = ok_json(xenod(&a).args(["fetch", &id, "--from", &db.addr]));
    assert!(rep["chunks_fetched"].as_u64().unwrap() >= bad.len() as u64, "{rep}");
    let (code, v) = verify(&a, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(digest_of(&a, &id, &t.path().join("out")), xenod_store::tree_digest(&src).unwrap());
    drop(db);
}

#[test]
fn gc_keeps_a_layer_named_only_by_a_mount_file_and_the_stack_still_mounts() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let (app, tpl) = (t.path().join("app"), t.path().join("tpl"));
    fs::create_dir_all(app.join("bin")).unwrap();
    let body = xenod_store::testing::noise(300_000, 9);
    fs::write(app.join("bin/app"), &body).unwrap();
    let app_id = ok_json(xenod(&data).arg("publish").arg(&app))["id"].as_str().unwrap().to_string();
    fs::create_dir_all(tpl.join("srv")).unwrap();
    fs::write(tpl.join("etc"), b"template\n").unwrap();
    fs::write(tpl.join("srv/.mount"), format!("{app_id}\n")).unwrap();
    publish(&data, &tpl, "template://test/tpl/1");
    ok_json(xenod(&data).args(["unpin", &app_id]));

    let dry = ok_json(xenod(&data).args(["gc", "--dry-run"]));
    assert!(dry["dead_layers"].as_array().unwrap().is_empty(), "{dry}");
    let g = ok_json(xenod(&data).arg("gc"));
    assert_eq!(g["removed_chunks"], 0, "{g}");
    let v = ok_json(xenod(&data).arg("verify"));
    assert_eq!(v["clean"], true, "{v}");

    // Export shows the stack as mount does: the app under /srv.
    let out = t.path().join("out");
    let e = ok_json(xenod(&data).args(["export", "template://test/tpl/1"]).arg(&out));
    assert_eq!(e["mounted"][0]["id"], app_id.as_str(), "{e}");
    assert_eq!(fs::read(out.join("srv/bin/app")).unwrap(), body);
    let bare = t.path().join("bare");
    ok_json(xenod(&data).args(["export", "template://test/tpl/1", "--no-mounts"]).arg(&bare));
    assert!(!bare.join("srv/bin").exists() && bare.join("srv/.mount").exists());

    if !Path::new("/dev/fuse").exists() || !rustix::process::geteuid().is_root() {
        eprintln!("\n*** SKIPPING the mount part: needs root and /dev/fuse ***\n");
    } else {
        let mnt = t.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let m = run(xenod(&data).args(["mount", "template://test/tpl/1"]).arg(&mnt));
        assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
        let read = fs::read(mnt.join("srv/bin/app"));
        assert!(run(xenod(&data).arg("umount").arg(&mnt)).status.success());
        assert_eq!(read.unwrap(), body, "the mounted layer shows through the mount");
    }

    // Once the layer is really gone, verify says so instead of `clean`.
    let other = t.path().join("other");
    fs::create_dir_all(other.join("srv")).unwrap();
    fs::write(other.join("srv/.mount"), "template://nobody/missing/1\n").unwrap();
    publish(&data, &other, "template://test/other/1");
    let out = run(xenod(&data).args(["--json", "verify"]));
    assert_eq!(out.status.code(), Some(4));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["clean"], false);
    assert_eq!(v["broken_mounts"][0]["reference"], "template://nobody/missing/1", "{v}");
    let out = run(xenod(&data).args(["export", "template://test/other/1"]).arg(t.path().join("x")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--no-mounts") && err.contains("/srv/.mount"), "{err}");
}

/// A read that meets a damaged chunk marks it; the daemon fetches it anew
/// from a peer it knows, on its own.
#[test]
fn the_daemon_repairs_a_chunk_a_read_found_damaged() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let src = t.path().join("src");
    tree(&src, 2, 5);
    let id = publish(&b, &src, "template://test/os/1");
    let db = Daemon::start(&b, &[]);
    let da = Daemon::start(&a, &[("XENOD_REPAIR_MS", "200")]);
    // The fetch makes B a peer A knows.
    ok_json(xenod(&a).args(["fetch", &id, "--from", &db.addr]));
    let received = |v: &Value| v["peers"][&db.node]["chunks_received"].as_u64().unwrap();
    let before = received(&ok_json(xenod(&a).arg("status")));
    flip_byte(&a, &id, b"file1");
    let out = run(xenod(&a).arg("export").arg(&id).arg(t.path().join("broken")));
    assert!(!out.status.success(), "the export meets the damaged chunk");
    // Repair is asynchronous: poll, with a bound far above what it takes.
    let dest = t.path().join("out");
    let started = std::time::Instant::now();
    loop {
        let _ = fs::remove_dir_all(&dest);
        if run(xenod(&a).arg("export").arg(&id).arg(&dest)).status.success() {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the daemon did not repair the chunk");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(xenod_store::tree_digest(&dest).unwrap(), xenod_store::tree_digest(&src).unwrap());
    let (code, v) = verify(&a, &[]);
    assert_eq!(code, Some(0), "{v}");
    let s = ok_json(xenod(&a).arg("status"));
    assert!(received(&s) > before, "the chunk came from B again: {s}");
    drop((da, db));
}

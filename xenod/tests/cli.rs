//! The real `xenod` binary, end to end on a real on-disk store.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn xenod(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xenod"));
    c.arg("--data-dir").arg(data).env_remove("XENOD_DATA_DIR");
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("spawning xenod")
}

fn ok_json(c: &mut Command) -> serde_json::Value {
    let out = run(c.arg("--json"));
    assert!(out.status.success(), "xenod failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad json {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n / 8 + 1)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .take(n)
        .collect()
}

fn tree(root: &Path) {
    fs::create_dir_all(root.join("etc/app")).unwrap();
    fs::write(root.join("etc/app/conf"), b"port = 80\n").unwrap();
    fs::write(root.join("blob"), noise(700_000, 3)).unwrap();
    std::os::unix::fs::symlink("etc/app/conf", root.join("conf")).unwrap();
}

fn digest(p: &Path) -> String {
    xenod_store::tree_digest(p).unwrap()
}

#[test]
fn publish_overlay_export_resolve_verify() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = t.path().join("src");
    tree(&src);
    let p = ok_json(xenod(&data).args(["publish"]).arg(&src).args(["--name", "template://test/base/1"]));
    let id = p["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64);
    assert_eq!(p["bytes_in"], 700_000 + 10);
    assert!(p["bytes_stored"].as_u64().unwrap() > 600_000, "noise does not compress: {p}");

    let r = ok_json(xenod(&data).args(["resolve", "template://test/base/1"]));
    assert_eq!(r["id"], id.as_str());
    let r = ok_json(xenod(&data).args(["resolve", &id[..12]]));
    assert_eq!(r["id"], id.as_str());

    // Overlay: one changed file; the unchanged 700 kB blob costs nothing.
    let new = t.path().join("new");
    assert!(Command::new("cp").arg("-a").arg(&src).arg(&new).status().unwrap().success());
    fs::write(new.join("etc/app/conf"), b"port = 8080\n").unwrap();
    fs::remove_file(new.join("conf")).unwrap();
    let o = ok_json(
        xenod(&data)
            .args(["overlay", "create", "--base", "template://test/base/1"])
            .arg(&new)
            .args(["--name", "template://test/web/1"]),
    );
    assert_eq!(o["bytes_in"], 12, "{o}");
    assert!(o["bytes_stored"].as_u64().unwrap() < 2000, "overlay stored too much: {o}");

    let out = t.path().join("out");
    ok_json(xenod(&data).args(["export", "template://test/web/1"]).arg(&out));
    assert_eq!(digest(&out), digest(&new));

    // The same stack as a tar stream, published again, is the same tree.
    let tar = run(xenod(&data).args(["export", "template://test/web/1", "-"]));
    assert!(tar.status.success());
    let mut child =
        xenod(&data).args(["publish", "-", "--json"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    let pid: serde_json::Value = serde_json::from_slice(&piped.stdout).unwrap();
    let out2 = t.path().join("out2");
    ok_json(xenod(&data).args(["export", pid["id"].as_str().unwrap()]).arg(&out2));
    assert_eq!(digest(&out2), digest(&new));

    let v = ok_json(xenod(&data).arg("verify"));
    assert_eq!(v["clean"], true);
    let ls = ok_json(xenod(&data).arg("ls"));
    assert_eq!(ls["names"].as_array().unwrap().len(), 2);
}

#[test]
fn documented_exit_codes() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let code = |c: &mut Command| run(c).status.code();
    assert_eq!(code(xenod(&data).args(["resolve", "template://nobody/nothing"])), Some(3));
    assert_eq!(code(xenod(&data).args(["export", "deadbeefdeadbeef", "/tmp/x"])), Some(3));
    assert_eq!(code(xenod(&data).args(["publish", "/nonexistent/dir"])), Some(1));
    assert_eq!(code(xenod(&data).args(["publish", ".", "--name", "bad name"])), Some(2));
    assert_eq!(code(xenod(&data).args(["frobnicate"])), Some(2));

    // A tar member that climbs out of the tree.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    h.as_gnu_mut().unwrap().name[..7].copy_from_slice(b"../evil");
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let tarball = t.path().join("evil.tar");
    fs::write(&tarball, b.into_inner().unwrap()).unwrap();
    let out = run(xenod(&data).arg("publish").arg(&tarball));
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("../evil") && err.contains(".."), "{err}");

    // A flipped byte in a pack: verify names it and exits 4.
    let src = t.path().join("src");
    tree(&src);
    ok_json(xenod(&data).arg("publish").arg(&src));
    let pack = fs::read_dir(data.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&pack, bytes).unwrap();
    let out = run(xenod(&data).arg("verify"));
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("breaks layer"));
}

#[test]
fn keys_are_trusted_for_publishers_only() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let key_a = ok_json(xenod(&a).args(["key", "generate"]))["public_key"].as_str().unwrap().to_owned();
    // Without --for: refused with the reason, a usage error, nothing written.
    let out = run(xenod(&b).args(["key", "trust", &key_a]));
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--for PUBLISHER"));
    assert!(!b.join("config.toml").exists());
    for bad in ["a b", "a*b", "../x"] {
        let out = run(xenod(&b).args(["key", "trust", &key_a, "--for", bad]));
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v = ok_json(xenod(&b).args(["key", "trust", &key_a, "--for", "a", "--for", "corp-*"]));
    assert_eq!(v["publishers"], serde_json::json!(["a", "corp-*"]));
    let ls = ok_json(xenod(&b).args(["key", "ls"]));
    assert_eq!(ls["trust"][0]["key"], key_a.as_str(), "{ls}");
    assert_eq!(ls["trust"][0]["publishers"], serde_json::json!(["a", "corp-*"]));
    ok_json(xenod(&b).args(["key", "untrust", &key_a, "--for", "corp-*"]));
    let ls = ok_json(xenod(&b).args(["key", "ls"]));
    assert_eq!(ls["trust"][0]["publishers"], serde_json::json!(["a"]));
    // The older form, trusting a key for everything, is refused with what to write.
    fs::write(b.join("config.toml"), format!("trusted_keys = [\"{key_a}\"]\n")).unwrap();
    let out = run(xenod(&b).args(["names", "--pull"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("trusted_keys") && err.contains("[[trust]]"), "{err}");
    // Giving the key its publishers moves it out of the old list.
    ok_json(xenod(&b).args(["key", "trust", &key_a, "--for", "a"]));
    let cfg = fs::read_to_string(b.join("config.toml")).unwrap();
    assert!(!cfg.contains("trusted_keys") && cfg.contains("[[trust]]"), "{cfg}");
    ok_json(xenod(&b).args(["names", "--pull"]));
}

#[test]
fn a_layer_id_depends_on_content_only_and_names_move() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let (src, other) = (t.path().join("src"), t.path().join("other"));
    tree(&src);
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("f"), b"other").unwrap();
    let id = |v: serde_json::Value| v["id"].as_str().unwrap().to_owned();
    let one = id(ok_json(xenod(&data).arg("publish").arg(&src).args(["--name", "template://me/x/1"])));
    let five = id(ok_json(xenod(&data).arg("publish").arg(&src).args(["--name", "template://me/x/5"])));
    let bare = id(ok_json(xenod(&data).arg("publish").arg(&src)));
    assert_eq!((&one, &five), (&bare, &bare), "one tree, one id, whatever it is named");
    let o = id(ok_json(xenod(&data).arg("publish").arg(&other)));
    // tag: point a name at an existing layer; the pin NAME@ID follows it.
    let v = ok_json(xenod(&data).args(["tag", &o, "template://me/x/1"]));
    assert_eq!(v["seq"], 2);
    assert_eq!(id(ok_json(xenod(&data).args(["resolve", "template://me/x/1"]))), o);
    let pinned = format!("template://me/x/1@{one}");
    let out = run(xenod(&data).args(["resolve", &pinned]));
    assert_eq!(out.status.code(), Some(5), "NAME@ID no longer holds: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("points at"));
    assert_eq!(id(ok_json(xenod(&data).args(["resolve", &format!("template://me/x/1@{o}")]))), o);
    // A malformed reference is a usage error, not a refusal.
    let out = run(xenod(&data).args(["resolve", "template://me/x/1@4f8e6cbb"]));
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(xenod(&data).arg("publish").arg(&src).args(["--name", "bad-name"]));
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // Tagging a layer that is not here is refused.
    let out = run(xenod(&data).args(["tag", &"ab".repeat(32), "template://me/x/2"]));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    // name rm: the name is gone, a second removal says so, the layer stays.
    let v = ok_json(xenod(&data).args(["name", "rm", "template://me/x/1"]));
    assert_eq!((v["removed"].as_bool(), v["seq"].as_u64()), (Some(true), Some(3)));
    let out = run(xenod(&data).args(["resolve", "template://me/x/1"]));
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed (sequence 3)"));
    assert_eq!(run(xenod(&data).args(["name", "rm", "template://me/x/1"])).status.code(), Some(3));
    assert_eq!(run(xenod(&data).args(["name", "rm", "template://me/none/1"])).status.code(), Some(3));
    let names = ok_json(xenod(&data).arg("names"));
    let rec = names["names"].as_array().unwrap().iter().find(|r| r["name"] == "template://me/x/1").unwrap().clone();
    assert_eq!(
        (rec["removed"].as_bool(), rec["own"].as_bool(), rec["seq"].as_u64()),
        (Some(true), Some(true), Some(3))
    );
    ok_json(xenod(&data).args(["export", &o]).arg(t.path().join("out")));
    // And the name can be given again.
    ok_json(xenod(&data).args(["tag", &one, "template://me/x/1"]));
    assert_eq!(id(ok_json(xenod(&data).args(["resolve", "template://me/x/1"]))), one);
}

fn big_tree(root: &Path) -> PathBuf {
    fs::create_dir_all(root).unwrap();
    for i in 0..24 {
        fs::write(root.join(format!("f{i:02}")), noise(8 << 20, i)).unwrap();
    }
    root.to_path_buf()
}

#[test]
fn kill_9_during_publish_leaves_a_clean_store() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = big_tree(&t.path().join("src"));
    // Something already stored must survive the crash.
    let small = t.path().join("small");
    tree(&small);
    let first = ok_json(xenod(&data).arg("publish").arg(&small));
    for delay in [150, 400, 900] {
        let mut child =
            xenod(&data).arg("publish").arg(&src).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let v = ok_json(xenod(&data).arg("verify"));
        assert_eq!(v["clean"], true, "after kill at {delay} ms: {v}");
    }
    let p = ok_json(xenod(&data).arg("publish").arg(&src));
    let out = t.path().join("out");
    ok_json(xenod(&data).args(["export", p["id"].as_str().unwrap()]).arg(&out));
    assert_eq!(digest(&out), digest(&src));
    let out = t.path().join("out-first");
    ok_json(xenod(&data).args(["export", first["id"].as_str().unwrap()]).arg(&out));
    assert_eq!(digest(&out), digest(&small));
}

#[test]
fn gc_keeps_named_and_pinned_and_drops_the_rest() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let mk = |name: &str, seed: u64| {
        let d = t.path().join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("data"), noise(500_000, seed)).unwrap();
        d
    };
    let (a, b, c) = (mk("a", 10), mk("b", 20), mk("c", 30));
    ok_json(xenod(&data).arg("publish").arg(&a).args(["--name", "template://t/a/1"]));
    let pb = ok_json(xenod(&data).arg("publish").arg(&b));
    let pc = ok_json(xenod(&data).arg("publish").arg(&c));
    let cid = pc["id"].as_str().unwrap();
    ok_json(xenod(&data).args(["unpin", cid]));
    let g = ok_json(xenod(&data).arg("gc"));
    assert!(g["removed_chunks"].as_u64().unwrap() >= 2, "{g}");
    assert!(g["freed_bytes"].as_u64().unwrap() >= 400_000, "{g}");
    let v = ok_json(xenod(&data).arg("verify"));
    assert_eq!(v["clean"], true);
    for (i, (r, src)) in [("template://t/a/1", &a), (pb["id"].as_str().unwrap(), &b)].into_iter().enumerate() {
        let out = t.path().join(format!("out-{i}"));
        ok_json(xenod(&data).args(["export", r]).arg(&out));
        assert_eq!(digest(&out), digest(src));
    }
    assert_ne!(run(xenod(&data).args(["export", cid]).arg(t.path().join("gone"))).status.code(), Some(0));
}

#[test]
fn gc_waits_for_a_concurrent_publish() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = big_tree(&t.path().join("src"));
    // An unnamed, then unpinned layer shares no chunks with src: gc may drop it.
    let old = t.path().join("old");
    tree(&old);
    let o = ok_json(xenod(&data).arg("publish").arg(&old));
    ok_json(xenod(&data).args(["unpin", o["id"].as_str().unwrap()]));
    let publish = xenod(&data).arg("publish").arg(&src).arg("--json").stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let g = ok_json(xenod(&data).arg("gc"));
    let out = publish.wait_with_output().unwrap();
    assert!(out.status.success());
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(g["live_chunks"].as_u64().unwrap() > 0, "gc ran after the publish finished: {g}");
    let v = ok_json(xenod(&data).arg("verify"));
    assert_eq!(v["clean"], true);
    let dest = t.path().join("out");
    ok_json(xenod(&data).args(["export", p["id"].as_str().unwrap()]).arg(&dest));
    assert_eq!(digest(&dest), digest(&src));
}

/// Whether FUSE mounts can be made here; says loudly why not.
fn fuse_ok(test: &str) -> bool {
    if !Path::new("/dev/fuse").exists() || !rustix::process::geteuid().is_root() {
        eprintln!("\n*** SKIPPING {test}: needs root and /dev/fuse ***\n");
        return false;
    }
    true
}

#[test]
fn mount_with_host_lower_dirs_and_a_mount_file_naming_an_unknown_layer() {
    if !fuse_ok("mount_with_host_lower_dirs_and_a_mount_file_naming_an_unknown_layer") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = t.path().join("src");
    tree(&src);
    let id = ok_json(xenod(&data).arg("publish").arg(&src))["id"].as_str().unwrap().to_string();
    let (h1, h2) = (t.path().join("h1"), t.path().join("h2"));
    for (h, text) in [(&h1, "from h1\n"), (&h2, "from h2\n")] {
        fs::create_dir_all(h.join("etc/app")).unwrap();
        fs::write(h.join("etc/app/conf"), text).unwrap();
    }
    fs::write(h2.join("only-h2"), b"h2").unwrap();
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = run(xenod(&data).arg("mount").arg(&id).arg(&mnt).arg("--lower-dir").arg(&h1).arg("--lower-dir").arg(&h2));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conf = fs::read_to_string(mnt.join("etc/app/conf"));
    let only = fs::read(mnt.join("only-h2"));
    let blob = fs::read(mnt.join("blob"));
    assert!(run(xenod(&data).arg("umount").arg(&mnt)).status.success());
    assert_eq!(conf.unwrap(), "from h1\n", "the first --lower-dir is on top");
    assert_eq!(only.unwrap(), b"h2");
    assert_eq!(blob.unwrap(), noise(700_000, 3), "the stored layer is below");

    // A .mount file naming a layer the store does not have fails the mount.
    fs::create_dir_all(src.join("srv/app")).unwrap();
    fs::write(src.join("srv/app/.mount"), b"template://nobody/missing/1\n").unwrap();
    let bad = ok_json(xenod(&data).arg("publish").arg(&src))["id"].as_str().unwrap().to_string();
    let out = run(xenod(&data).arg("mount").arg(&bad).arg(&mnt));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/srv/app/.mount") && err.contains("template://nobody/missing/1"), "{err}");
    assert!(!xenod_cowfs::is_mounted(&mnt));
}

/// Bytes in a store's pack files.
fn packs_bytes(data: &Path) -> u64 {
    fs::read_dir(data.join("packs")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

/// Text files like those of a real tree: compressible, more so with effort.
fn text_tree(root: &Path, files: u64, seed: u64) {
    fs::create_dir_all(root).unwrap();
    for f in 0..files {
        let mut s = String::new();
        for i in 0..2_000u64 {
            let x = (seed + f * 2_000 + i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 44;
            s += &format!("{f}:{i} GET /shop/item/{x} 200 {} bytes in {}.{} ms\n", x % 9000, x % 97, x % 10);
        }
        fs::write(root.join(format!("log{f}")), s).unwrap();
    }
}

#[test]
fn level_writes_denser_blocks_for_publish_overlay_and_commit() {
    let t = tempfile::tempdir().unwrap();
    let (base, top) = (t.path().join("base"), t.path().join("top"));
    text_tree(&base, 8, 0);
    text_tree(&top, 16, 1 << 20);
    let mut sizes = Vec::new();
    for level in [None, Some("19")] {
        let data = t.path().join(format!("data-{}", level.unwrap_or("default")));
        let lv: Vec<&str> = level.map(|l| vec!["--level", l]).unwrap_or_default();
        let p = ok_json(xenod(&data).arg("publish").arg(&base).args(["--name", "template://t/base/1"]).args(&lv));
        let o = ok_json(xenod(&data).args(["overlay", "create", "--base", "template://t/base/1"]).arg(&top).args(&lv));
        let before = packs_bytes(&data);
        let upper = t.path().join(format!("upper-{}", level.unwrap_or("default")));
        text_tree(&upper.join("srv"), 4, 2 << 20);
        ok_json(xenod(&data).arg("commit").arg(&upper).args(["--base", "template://t/base/1"]).args(&lv));
        let committed = packs_bytes(&data) - before;
        sizes.push((p["bytes_stored"].as_u64().unwrap(), o["bytes_stored"].as_u64().unwrap(), committed));
        assert!(ok_json(xenod(&data).arg("verify"))["problems"].as_array().is_none_or(|p| p.is_empty()));
    }
    // (stored by publish, overlay create, commit) at the default level, then at 19.
    let (d, h) = (sizes[0], sizes[1]);
    let less = |a: u64, b: u64| a * 10 < b * 9;
    assert!(less(h.0, d.0) && less(h.1, d.1) && less(h.2, d.2), "level 19 stores 10% less or better: {sizes:?}");
    // Out of range is refused by the parser, naming the option.
    let out = run(xenod(&t.path().join("x")).arg("publish").arg(&base).args(["--level", "20"]));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--level"));
    // So is migrate's pre-copy level (its own range, checked again by the target).
    let out = run(xenod(&t.path().join("x")).args(["migrate", "web", "--to", "n@127.0.0.1:1", "--level", "0"]));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--level"));
}

/// One table of exit codes: `--help` prints every code of
/// `xenod_store::Exit` with its meaning, and the README's table is the same.
#[test]
fn exit_codes_are_one_table() {
    let t = tempfile::tempdir().unwrap();
    let help = run(xenod(t.path()).arg("--help"));
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    for e in xenod_store::Exit::ALL {
        let line = format!("  {}  {}", e.code(), e.meaning());
        assert!(help.contains(&line), "--help lacks {line:?}:\n{help}");
        let row = format!("| {} | {} |", e.code(), e.meaning());
        assert!(readme.contains(&row), "README's exit code table lacks {row:?}");
    }
    // And the codes are what a failure exits with: a reference to nothing is 3.
    let data = t.path().join("data");
    let out = run(xenod(&data).args(["resolve", "0123456789abcdef"]));
    assert_eq!(out.status.code(), Some(xenod_store::Exit::NotFound.code().into()));
}

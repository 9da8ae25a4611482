//! Exit codes and refusals, command by command, through the real binary:
//! what each failure exits with (the README's table), what `--json` prints
//! for it, and that text mode keeps stdout for the result alone.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::xenod;
use serde_json::Value;

/// Runs `xenod --data-dir DATA ARGS` in text mode.
fn text(data: &Path, args: &[&str]) -> Output {
    xenod(data).args(args).output().unwrap()
}

/// Runs `xenod --data-dir DATA ARGS` with `input` on stdin.
fn with_stdin(data: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child =
        xenod(data).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The command may refuse before reading it all.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The failure `o` must be: its exit code, and its message containing `says`.
fn fails(o: &Output, code: i32, says: &str) {
    assert_eq!(o.status.code(), Some(code), "stdout: {}\nstderr: {}", stdout(o), stderr(o));
    assert!(stderr(o).contains(says), "{says:?} not in: {}", stderr(o));
}

/// The one JSON object a failure under `--json` prints (on stderr), checked
/// against the exit code.
fn json_error(o: &Output) -> Value {
    let line = stderr(o).lines().last().unwrap_or_default().to_owned();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", stderr(o)));
    assert_eq!(v["code"].as_i64().map(|c| c as i32), o.status.code(), "{v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    v
}

/// The id a successful text-mode command printed: stdout is that one line.
fn only_id(o: &Output) -> String {
    assert!(o.status.success(), "{}", stderr(o));
    let out = stdout(o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is more than the id: {out:?}");
    assert!(lines[0].len() == 64 && lines[0].bytes().all(|b| b.is_ascii_hexdigit()), "{out:?}");
    lines[0].to_owned()
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    xenod_store::testing::noise(n, seed)
}

fn tree(root: &Path) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/conf"), b"port = 80\n").unwrap();
    fs::write(root.join("blob"), noise(700_000, 3)).unwrap();
}

/// A tar archive of `dir`, by GNU tar.
fn tar_of(dir: &Path) -> Vec<u8> {
    let out = Command::new("tar").arg("-C").arg(dir).args(["-cf", "-", "."]).output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Flips a byte in the middle of the store's pack (inside the 700 kB blob).
fn damage(data: &Path) {
    let pack = fs::read_dir(data.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(&pack).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

/// Names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    v.sort();
    v
}

#[test]
fn publish_refuses_empty_compressed_and_non_tar_input() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = t.path().join("src");
    tree(&src);
    let tar = tar_of(&src);

    // An empty stream: refused, nothing stored.
    fails(&with_stdin(&data, &["publish", "-"], b""), 6, "empty");
    let o = with_stdin(&data, &["--json", "publish", "-"], b"");
    assert!(json_error(&o)["error"].as_str().unwrap().contains("empty"));
    assert!(o.stdout.is_empty(), "stdout keeps only results");
    // A tar archive with no members.
    fails(&with_stdin(&data, &["publish", "-"], &[0; 1024]), 6, "no members");

    // gzip, on stdin and as a file: named for what it is.
    let plain_tar = t.path().join("site.tar");
    fs::write(&plain_tar, &tar).unwrap();
    let gz = Command::new("gzip").arg("-c").arg(&plain_tar).output().unwrap().stdout;
    assert_eq!(&gz[..2], b"\x1f\x8b");
    fails(&with_stdin(&data, &["publish", "-"], &gz), 6, "compressed tar: gzip");
    let site = t.path().join("site.tar.gz");
    fs::write(&site, &gz).unwrap();
    fails(&text(&data, &["publish", site.to_str().unwrap()]), 6, "compressed tar: gzip");
    // xz (its magic is enough to know it).
    fails(&with_stdin(&data, &["publish", "-"], b"\xfd7zXZ\0\0\x04\xe6\xd6\xb4\x46"), 6, "compressed tar: xz");
    assert!(!data.join("packs").exists() || xenod_json(&data, &["ls"])["layers"].as_array().unwrap().is_empty());

    // zstd is read: the same layer as the plain archive.
    let plain = only_id(&with_stdin(&data, &["publish", "-"], &tar));
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    assert_eq!(only_id(&with_stdin(&data, &["publish", "-"], &zst)), plain);
    let zst_file = t.path().join("site.tar.zst");
    fs::write(&zst_file, &zst).unwrap();
    assert_eq!(only_id(&text(&data, &["publish", zst_file.to_str().unwrap()])), plain);

    // A file that is no tar archive needs --image (or an image's name).
    let notes = t.path().join("notes.txt");
    fs::write(&notes, noise(10_000, 1)).unwrap();
    fails(&text(&data, &["publish", notes.to_str().unwrap()]), 6, "--image");
    only_id(&text(&data, &["publish", notes.to_str().unwrap(), "--image"]));
    let disk = t.path().join("disk.img");
    fs::write(&disk, noise(70_000, 2)).unwrap();
    only_id(&text(&data, &["publish", disk.to_str().unwrap()]));
    let empty = t.path().join("empty");
    fs::write(&empty, b"").unwrap();
    fails(&text(&data, &["publish", empty.to_str().unwrap()]), 6, "empty");
}

fn xenod_json(data: &Path, args: &[&str]) -> Value {
    common::ok(data, args)
}

/// `ID=$(xenod publish DIR)` captures the id alone; the summary is on stderr.
#[test]
fn text_mode_stdout_is_the_result_alone() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = t.path().join("src");
    tree(&src);
    let o = text(&data, &["publish", src.to_str().unwrap(), "--name", "template://t/base/1"]);
    let id = only_id(&o);
    assert!(stderr(&o).contains("entries") && stderr(&o).contains("named template://t/base/1"), "{}", stderr(&o));
    // Published again (nothing new): still the id alone.
    assert_eq!(only_id(&text(&data, &["publish", src.to_str().unwrap(), "--name", "template://t/base/2"])).len(), 64);

    let over = t.path().join("over");
    common::cp(&src, &over);
    fs::write(over.join("etc/conf"), b"port = 8080\n").unwrap();
    let o = text(&data, &["overlay", "create", "--base", "template://t/base/1", over.to_str().unwrap()]);
    let oid = only_id(&o);
    assert_ne!(oid, id);

    let upper = t.path().join("upper");
    fs::create_dir_all(upper.join("srv")).unwrap();
    fs::write(upper.join("srv/new"), b"new\n").unwrap();
    let o = text(&data, &["commit", upper.to_str().unwrap(), "--base", &id]);
    only_id(&o);
    assert!(stderr(&o).contains("committed"), "{}", stderr(&o));

    // export: the tree is the result; nothing on stdout, the summary on stderr.
    let o = text(&data, &["export", &oid, t.path().join("out").to_str().unwrap()]);
    // (t holds data, src, over, upper, out and, below, here.)
    assert!(o.status.success() && o.stdout.is_empty(), "{}", stdout(&o));
    assert!(stderr(&o).contains("exported"));
    assert_eq!(stdout(&text(&data, &["resolve", "template://t/base/1"])).trim(), id);
    // Into the (empty) current directory, which stays where it is.
    let here = t.path().join("here");
    fs::create_dir(&here).unwrap();
    let o = xenod(&data).current_dir(&here).args(["export", &oid, "."]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read(here.join("etc/conf")).unwrap(), b"port = 8080\n");
    assert_eq!(names(t.path()).len(), 6, "{:?}", names(t.path()));
}

#[test]
fn export_of_a_damaged_store_is_damage_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = t.path().join("src");
    tree(&src);
    let id = only_id(&text(&data, &["publish", src.to_str().unwrap()]));
    damage(&data);
    let outs = t.path().join("outs");
    fs::create_dir(&outs).unwrap();
    let dest = outs.join("tree");

    let o = text(&data, &["export", &id, dest.to_str().unwrap()]);
    fails(&o, 4, "corrupt");
    assert!(stderr(&o).contains("/blob"), "names the file: {}", stderr(&o));
    assert!(names(&outs).is_empty(), "a failed export left {:?}", names(&outs));

    let o = xenod(&data).args(["--json", "export", &id, dest.to_str().unwrap()]).output().unwrap();
    let v = json_error(&o);
    assert_eq!(v["code"], 4);
    assert_eq!(v["path"], dest.join("blob").to_str().unwrap(), "{v}");
    assert_eq!(v["chunk"].as_str().map(str::len), Some(64), "{v}");
    assert!(names(&outs).is_empty());
    // Into an empty directory: it stays empty.
    fs::create_dir(&dest).unwrap();
    fails(&text(&data, &["export", &id, dest.to_str().unwrap()]), 4, "corrupt");
    assert!(names(&dest).is_empty() && names(&outs) == ["tree"]);

    // As a tar stream: the same code (was 1).
    let o = text(&data, &["export", &id, "-"]);
    fails(&o, 4, "corrupt");
    let o = xenod(&data).args(["--json", "export", &id, "-"]).output().unwrap();
    let v = json_error(&o);
    assert_eq!((v["code"].as_i64(), v["path"].as_str()), (Some(4), Some("/blob")), "{v}");

    // verify says the same, under --json as one report on stdout and the error object on stderr.
    let o = xenod(&data).args(["--json", "verify"]).output().unwrap();
    assert_eq!(json_error(&o)["code"], 4);
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["clean"], false);
}

#[test]
fn json_errors_carry_code_and_path() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let o = xenod(&data).args(["--json", "resolve", "template://nobody/nothing"]).output().unwrap();
    assert_eq!(json_error(&o)["code"], 3);
    assert!(o.stdout.is_empty());
    let o = xenod(&data).args(["--json", "publish", "/nonexistent/dir"]).output().unwrap();
    let v = json_error(&o);
    assert_eq!((v["code"].as_i64(), v["path"].as_str()), (Some(1), Some("/nonexistent/dir")), "{v}");
    // Text mode: one line on stderr, nothing on stdout.
    let o = text(&data, &["resolve", "template://nobody/nothing"]);
    fails(&o, 3, "xenod: error: no layer matches");
    assert!(o.stdout.is_empty());
}

#[test]
fn tar_export_keeps_holes() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    // 5 MiB, of which 128 KiB are data: a sparse file is taken for an image.
    let f = fs::File::create(src.join("sparse")).unwrap();
    f.set_len(5 << 20).unwrap();
    f.write_all_at(&noise(65_536, 1), 0).unwrap();
    f.write_all_at(&noise(65_536, 2), 4 << 20).unwrap();
    drop(f);
    let id = only_id(&text(&data, &["publish", src.to_str().unwrap()]));
    let o = text(&data, &["export", &id, "-"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.len() < 1 << 20, "holes written as data: {} bytes of tar", o.stdout.len());
    let tarball = t.path().join("x.tar");
    fs::write(&tarball, &o.stdout).unwrap();
    let list = Command::new("tar").arg("-tvf").arg(&tarball).output().unwrap();
    assert!(list.status.success() && stdout(&list).contains("5242880"), "{}", stdout(&list));
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    assert!(Command::new("tar").arg("-xSf").arg(&tarball).arg("-C").arg(&out).status().unwrap().success());
    assert!(fs::read(out.join("sparse")).unwrap() == fs::read(src.join("sparse")).unwrap());
    let md = fs::metadata(out.join("sparse")).unwrap();
    assert!(md.blocks() * 512 < 1 << 20, "extracted without holes: {} blocks", md.blocks());
    // Published again from the tar stream: the same layer.
    assert_eq!(only_id(&with_stdin(&data, &["publish", "-"], &o.stdout)), id);
}

/// Whether FUSE mounts can be made here; says loudly why not.
fn fuse_ok(test: &str) -> bool {
    if !Path::new("/dev/fuse").exists() || !rustix::process::geteuid().is_root() {
        eprintln!("\n*** SKIPPING {test}: needs root and /dev/fuse ***\n");
        return false;
    }
    true
}

/// Unmounts when dropped, should a test fail with its mount up.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if xenod_cowfs::is_mounted(&self.0) {
            let _ = xenod_cowfs::unmount(&self.0, true);
        }
    }
}

#[test]
fn mount_exits_with_its_cause() {
    if !fuse_ok("mount_exits_with_its_cause") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = t.path().join("src");
    tree(&src);
    fs::create_dir_all(src.join("srv/app")).unwrap();
    fs::write(src.join("srv/app/.mount"), b"template://nobody/missing/1\n").unwrap();
    let bad = only_id(&text(&data, &["publish", src.to_str().unwrap()]));
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let _guard = Unmount(mnt.clone());
    // The serving process fails to load the stack: its code (3), not 1.
    let o = text(&data, &["mount", &bad, mnt.to_str().unwrap()]);
    fails(&o, 3, "template://nobody/missing/1");
    let o = xenod(&data).args(["--json", "mount", &bad, mnt.to_str().unwrap()]).output().unwrap();
    assert_eq!(json_error(&o)["code"], 3);
    // Refused before any process starts.
    fails(&text(&data, &["mount", &bad, t.path().join("nowhere").to_str().unwrap()]), 6, "not a directory");
    fails(&text(&data, &["mount", "template://nobody/x/1", mnt.to_str().unwrap()]), 3, "no layer matches");
    assert!(!xenod_cowfs::is_mounted(&mnt));
}

#[test]
fn commit_and_flatten_refuse_a_mounted_upper_and_another_base() {
    if !fuse_ok("commit_and_flatten_refuse_a_mounted_upper_and_another_base") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let src = t.path().join("src");
    tree(&src);
    let base = only_id(&text(&data, &["publish", src.to_str().unwrap()]));
    fs::write(src.join("other"), b"another base\n").unwrap();
    let other = only_id(&text(&data, &["publish", src.to_str().unwrap()]));
    let (mnt, upper) = (t.path().join("mnt"), t.path().join("upper"));
    fs::create_dir(&mnt).unwrap();
    let _guard = Unmount(mnt.clone());
    let (m, u) = (mnt.to_str().unwrap(), upper.to_str().unwrap());

    let o = text(&data, &["mount", &base, m, "--upper", u]);
    assert!(o.status.success(), "{}", stderr(&o));
    fs::write(mnt.join("written"), b"through the mount\n").unwrap();
    // Mounted read-write: commit and flatten refuse, naming the upper.
    for args in [["commit", u, "--base", &base], ["flatten", u, "--base", &base]] {
        let o = text(&data, &args);
        fails(&o, 6, "mounted read-write");
        assert!(stderr(&o).contains(u), "{}", stderr(&o));
        let o = xenod(&data).arg("--json").args(args).output().unwrap();
        assert_eq!(json_error(&o)["path"], u);
    }
    // A second writable mount of the same upper is refused too.
    let mnt2 = t.path().join("mnt2");
    fs::create_dir(&mnt2).unwrap();
    let _guard2 = Unmount(mnt2.clone());
    fails(&text(&data, &["mount", &base, mnt2.to_str().unwrap(), "--upper", u]), 6, "mounted read-write");
    assert!(!xenod_cowfs::is_mounted(&mnt2));
    let pid = xenod_cowfs::serving_pid(&mnt).expect("mountinfo names the serving process");
    assert!(xenod_cowfs::process_runs(pid), "process {pid} serves {m}");
    assert!(text(&data, &["umount", m]).status.success());
    // `umount` returns once the serving process has exited: the upper is free at once.
    assert!(!xenod_cowfs::process_runs(pid), "process {pid} still runs after umount");

    // Unmounted: another base is refused (the upper records its stack), its own is taken.
    let o = text(&data, &["commit", u, "--base", &other]);
    fails(&o, 6, &base);
    assert!(stderr(&o).contains(&other), "{}", stderr(&o));
    fails(&text(&data, &["flatten", u, "--base", &other]), 6, &base);
    fails(&text(&data, &["mount", &other, m, "--upper", u]), 6, &base);
    assert!(!xenod_cowfs::is_mounted(&mnt));
    let id = only_id(&text(&data, &["commit", u, "--base", &base]));
    let out = t.path().join("out");
    assert!(text(&data, &["export", &id, out.to_str().unwrap()]).status.success());
    assert_eq!(fs::read(out.join("written")).unwrap(), b"through the mount\n");
    let o = text(&data, &["flatten", u, "--base", &base]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!upper.join(".xenod").exists(), "flatten leaves no work area");
}

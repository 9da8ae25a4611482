//! A lazy deploy boots the fixture guest and answers before the whole
//! overlay is local. Host C holds the template (a host that ran it
//! before); the overlay on A carries the web service and 256 MiB the
//! guest never reads, served slowly (as over a thin link). C deploys it by
//! ticket with --lazy: the guest's first reads come through at once while
//! the background fetch is still far from done. Needs root, /dev/fuse and
//! QEMU; skips loudly when one is truly absent.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is absent".into());
    }
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        return Some("qemu-system-x86_64 is not installed".into());
    }
    None
}

fn xenod(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xenod"));
    c.arg("--data-dir").arg(data).env("XENOD_LOG", "error");
    c
}

fn ok(data: &Path, args: &[&str]) -> Value {
    let out = xenod(data).arg("--json").args(args).output().unwrap();
    assert!(out.status.success(), "xenod {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(data: &Path, env: &[(&str, &str)]) -> Self {
        let mut c = xenod(data);
        c.args(["--json", "serve", "--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).stderr(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve said {line:?}: {e}"));
        Self { child, addr: v["addr"].as_str().unwrap().into() }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Compressible, never repeating: many distinct chunks.
fn noise_file(p: &Path, mib: usize) {
    let mut f = std::io::BufWriter::new(fs::File::create(p).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&(x & 0x3f3f_3f3f_3f3f_3f3f).to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
}

fn cp(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    assert!(Command::new("cp").arg("-a").arg(format!("{}/.", from.display())).arg(to).status().unwrap().success());
}

#[test]
fn lazy_deploy_answers_before_the_overlay_is_local() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: lazy deploy test: {why}");
        return;
    }
    assert!(Command::new("bash").arg(repo().join("scripts/start-libvirtd.sh")).status().unwrap().success());
    let fix =
        PathBuf::from(std::env::var("XENOD_FIXTURES").unwrap_or("/var/cache/xenod-fixtures".into())).join("guest");
    assert!(Command::new("bash").arg(repo().join("fixtures/build-guest.sh")).arg(&fix).status().unwrap().success());
    let t = tempfile::tempdir().unwrap();
    let (a, c) = (t.path().join("a"), t.path().join("c"));
    let tree = t.path().join("template");
    cp(&fix.join("template"), &tree);
    fs::create_dir_all(tree.join("boot")).unwrap();
    for k in ["vmlinux", "initrd.img"] {
        fs::copy(fix.join("kernel").join(k), tree.join("boot").join(k)).unwrap();
    }
    let base = ok(&a, &["publish", tree.to_str().unwrap()])["id"].as_str().unwrap().to_owned();
    let web = t.path().join("web");
    cp(&tree, &web);
    cp(&fix.join("web"), &web);
    noise_file(&web.join("srv/unused.bin"), 256);
    let spec = repo().join("fixtures/guest/web.spec.json");
    let top = ok(&a, &["overlay", "create", "--base", &base, web.to_str().unwrap(), "--spec", spec.to_str().unwrap()])
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // C holds the template already.
    let da = Daemon::start(&a, &[]);
    let dc = Daemon::start(&c, &[]);
    ok(&c, &["fetch", &base, "--from", &da.addr]);
    drop(da);
    // A now serves slowly: 25 ms per chunk on every stream.
    let da = Daemon::start(&a, &[("XENOD_TEST_DELAY_MS", "25")]);
    let ticket = String::from_utf8(xenod(&a).args(["share", &top]).output().unwrap().stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let name = format!("lazy{}", std::process::id());
    let d = ok(&c, &["deploy", &ticket, "--lazy", "--name", &name]);
    let guard = scopeguard(&c, &name);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    // deploy returns once the service answered; the overlay is not all here.
    let st = ok(&c, &["status"]);
    assert!(st["lazy_fetches"].get(&top).is_some(), "the background fetch is still running: {st}");
    let out = Command::new("curl").args(["-sf", "--max-time", "10"]).arg(format!("http://127.0.0.1:{port}/")).output();
    let body = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    assert!(body.contains(&format!("instance={name}")), "{body}");
    assert!(xenod(&c).args(["verify"]).output().unwrap().status.code() == Some(4), "chunks are still missing");
    drop(guard);
    drop((da, dc));
}

struct Destroy<'a>(&'a Path, String);

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        let _ = xenod(self.0).args(["destroy", &self.1]).output();
    }
}

fn scopeguard<'a>(data: &'a Path, name: &str) -> Destroy<'a> {
    Destroy(data, name.to_owned())
}

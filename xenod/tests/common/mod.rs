//! Helpers shared by the end-to-end tests: the xenod binary, daemons as
//! child processes, the guest fixture and its web service.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Why a real guest cannot run here, if it cannot.
pub fn skip_reason() -> Option<String> {
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

/// `xenod --data-dir DATA`, quiet.
pub fn xenod(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xenod"));
    c.arg("--data-dir").arg(data).env_remove("XENOD_DATA_DIR").env("XENOD_LOG", "error");
    c
}

/// Runs a prepared command.
pub fn output(c: &mut Command) -> Output {
    c.output().expect("spawning xenod")
}

/// Runs a prepared command with `--json`, which must succeed; its answer.
pub fn ok_json(c: &mut Command) -> Value {
    let out = output(c.arg("--json"));
    assert!(out.status.success(), "xenod failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad json {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn run(data: &Path, args: &[&str]) -> Output {
    xenod(data).arg("--json").args(args).output().unwrap()
}

/// Runs `xenod --json ARGS`, which must succeed; its JSON answer.
pub fn ok(data: &Path, args: &[&str]) -> Value {
    let out = run(data, args);
    assert!(out.status.success(), "xenod {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A running `xenod serve` on loopback; killed when dropped.
pub struct Daemon {
    pub data: PathBuf,
    pub child: Child,
    pub node: String,
    pub addr: String,
}

impl Daemon {
    pub fn start(data: &Path, env: &[(&str, &str)]) -> Self {
        let mut c = xenod(data);
        c.args(["--json", "serve", "--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).stderr(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve said {line:?}: {e}"));
        Self {
            data: data.to_path_buf(),
            child,
            node: v["node"].as_str().unwrap().into(),
            addr: v["addr"].as_str().unwrap().into(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops through the API and waits (at most 10 s) for the process to exit.
    pub fn stop(mut self) {
        ok_json(xenod(&self.data).arg("shutdown"));
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(10), "daemon did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 10 s) for a daemon that is expected to die.
    pub fn wait_dead(&mut self) {
        for _ in 0..100 {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the daemon did not die");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts libvirt and builds (cached) the guest fixture; its directory.
pub fn fixture() -> PathBuf {
    let st = Command::new("bash").arg(repo().join("scripts/start-libvirtd.sh")).status().unwrap();
    assert!(st.success(), "libvirtd did not start");
    let dir =
        PathBuf::from(std::env::var("XENOD_FIXTURES").unwrap_or("/var/cache/xenod-fixtures".into())).join("guest");
    let st = Command::new("bash").arg(repo().join("fixtures/build-guest.sh")).arg(&dir).status().unwrap();
    assert!(st.success(), "fixture build failed");
    dir
}

/// `cp -a FROM/. TO`.
pub fn cp(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    assert!(Command::new("cp").arg("-a").arg(format!("{}/.", from.display())).arg(to).status().unwrap().success());
}

/// Copies the fixture's kernel and initrd into `tree/boot`.
pub fn add_boot(fix: &Path, tree: &Path) {
    fs::create_dir_all(tree.join("boot")).unwrap();
    for k in ["vmlinux", "initrd.img"] {
        fs::copy(fix.join("kernel").join(k), tree.join("boot").join(k)).unwrap();
    }
}

/// Publishes the fixture's disk-root guest (boot files and `disk/root.img`,
/// one forwarded port) as `template://t/disk/1` in `data`, staged under `work`.
pub fn publish_disk_fixture(fix: &Path, work: &Path, data: &Path) {
    let tree = work.join("tree");
    add_boot(fix, &tree);
    fs::create_dir_all(tree.join("disk")).unwrap();
    fs::copy(fix.join("disk/root.img"), tree.join("disk/root.img")).unwrap();
    let spec = work.join("disk.spec.json");
    fs::write(
        &spec,
        r#"{"kernel":"stack:boot/vmlinux","initrd":"stack:boot/initrd.img","root":"disk","disk_image":"disk/root.img","ports":["0:80"]}"#,
    )
    .unwrap();
    ok(data, &["publish", tree.to_str().unwrap(), "--name", "template://t/disk/1", "--spec", spec.to_str().unwrap()]);
}

/// The web service's page: (instance name, counter); ("", 0) if it does not answer.
pub fn page(port: u64) -> (String, u64) {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let counter =
        body.lines().find_map(|l| l.strip_prefix("counter=")).and_then(|c| c.trim().parse().ok()).unwrap_or(0);
    let name = body.lines().find_map(|l| l.strip_prefix("instance=")).unwrap_or("").trim().to_string();
    (name, counter)
}

/// Destroys the named instances when dropped.
pub struct Instances<'a>(pub &'a Path, pub Vec<String>);

impl Drop for Instances<'_> {
    fn drop(&mut self) {
        for n in &self.1 {
            let _ = xenod(self.0).args(["destroy", n]).output();
        }
    }
}

/// Polls `f` every 100 ms until it holds, for at most `secs`.
pub fn within(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Daemons on loopback under `root` (`h0`, `h1`, ...), one per entry of
/// `configs` (the rest of each one's config.toml), each joining through
/// the first and announcing every 300 ms; returns once each knows all.
pub fn federation(root: &Path, configs: &[String]) -> Vec<Daemon> {
    let mut daemons: Vec<Daemon> = Vec::new();
    for (i, extra) in configs.iter().enumerate() {
        let data = root.join(format!("h{i}"));
        fs::create_dir_all(&data).unwrap();
        let peers = daemons.first().map(|d| format!("peers = [\"{}\"]\n", d.addr)).unwrap_or_default();
        fs::write(data.join("config.toml"), format!("{peers}{extra}")).unwrap();
        daemons.push(Daemon::start(&data, &[("XENOD_ANNOUNCE_MS", "300")]));
    }
    let all: std::collections::BTreeSet<String> = daemons.iter().map(|d| d.node.clone()).collect();
    for d in &daemons {
        within(30, "every daemon knows all the others", || {
            let v = ok(&d.data, &["hosts"]);
            let known: std::collections::BTreeSet<String> =
                v["hosts"].as_array().unwrap().iter().map(|h| h["node"].as_str().unwrap().to_owned()).collect();
            known == all
        });
    }
    daemons
}

//! Real guests through libvirt (qemu:///system, TCG here) from the fixture
//! template: fs root over 9p from the cowfs union, replicas, commit, and a
//! disk-root guest suspended and resumed. Needs root, /dev/fuse and QEMU;
//! skips loudly when one is truly absent.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

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

fn xenod(data: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_xenod"))
        .arg("--data-dir")
        .arg(data)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "xenod {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The fixture (built and cached), libvirt started; `None` (said loudly)
/// when this machine cannot run a guest.
fn setup() -> Option<PathBuf> {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: real-guest deploy test: {why}");
        return None;
    }
    Some(fixture())
}

/// Copies the fixture's kernel and initrd into `tree/boot`.
fn add_boot(fix: &Path, tree: &Path) {
    fs::create_dir_all(tree.join("boot")).unwrap();
    for k in ["vmlinux", "initrd.img"] {
        fs::copy(fix.join("kernel").join(k), tree.join("boot").join(k)).unwrap();
    }
}

/// Builds (cached) the fixture and returns its directory.
fn fixture() -> PathBuf {
    let st = Command::new("bash").arg(repo().join("scripts/start-libvirtd.sh")).status().unwrap();
    assert!(st.success(), "libvirtd did not start");
    let dir =
        PathBuf::from(std::env::var("XENOD_FIXTURES").unwrap_or("/var/cache/xenod-fixtures".into())).join("guest");
    let st = Command::new("bash").arg(repo().join("fixtures/build-guest.sh")).arg(&dir).status().unwrap();
    assert!(st.success(), "fixture build failed");
    dir
}

fn cp(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    assert!(Command::new("cp").arg("-a").arg(format!("{}/.", from.display())).arg(to).status().unwrap().success());
}

fn page(port: u64) -> (String, u64) {
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

struct Instances<'a>(&'a Path, Vec<String>);

impl Drop for Instances<'_> {
    fn drop(&mut self) {
        for n in &self.1 {
            let _ =
                Command::new(env!("CARGO_BIN_EXE_xenod")).arg("--data-dir").arg(self.0).args(["destroy", n]).output();
        }
    }
}

#[test]
fn fs_root_guest_replicas_and_commit() {
    let Some(fix) = setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let tree = t.path().join("template");
    cp(&fix.join("template"), &tree);
    add_boot(&fix, &tree);
    xenod(&data, &["publish", tree.to_str().unwrap(), "--name", "template://t/os/1"]);
    let web = t.path().join("web");
    cp(&tree, &web);
    cp(&fix.join("web"), &web);
    let spec = repo().join("fixtures/guest/web.spec.json");
    xenod(
        &data,
        &[
            "overlay",
            "create",
            "--base",
            "template://t/os/1",
            web.to_str().unwrap(),
            "--spec",
            spec.to_str().unwrap(),
            "--name",
            "template://t/web/1",
        ],
    );

    let name = format!("fs{}", std::process::id());
    let mut guard = Instances(&data, vec![name.clone()]);
    let d = xenod(&data, &["deploy", "template://t/web/1", "--name", &name]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!(page(port), (name.clone(), 1));
    assert_eq!(page(port), (name.clone(), 2));
    // The guest's write is in the instance's private upper layer.
    let upper_counter = data.join("instances").join(&name).join("upper/var/lib/web/counter");
    assert_eq!(fs::read_to_string(&upper_counter).unwrap().trim(), "2");
    // Its upper becomes an overlay that a second deploy starts from.
    let c = xenod(&data, &["commit", &name, "--name", "template://t/web-state/1"]);
    assert!(c["entries"].as_u64().unwrap() >= 1);
    xenod(&data, &["destroy", &name]);
    assert!(!data.join("instances").join(&name).exists(), "destroy leaves nothing");

    let again = format!("again{}", std::process::id());
    guard.1.push(again.clone());
    let d = xenod(&data, &["deploy", "template://t/web-state/1", "--name", &again]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!(page(port), (again.clone(), 3), "the committed counter carries over");
    xenod(&data, &["destroy", &again]);

    // Three replicas at once, each with its own name and port.
    let rep = format!("rep{}", std::process::id());
    guard.1.extend((1..=3).map(|i| format!("{rep}-{i}")));
    let d = xenod(&data, &["deploy", "template://t/web/1", "--name", &rep, "--replicas", "3"]);
    let inst = d["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 3, "{d}");
    let mut seen = Vec::new();
    for i in inst {
        let (n, c) = page(i["port"].as_u64().unwrap());
        assert_eq!(c, 1);
        seen.push(n);
    }
    seen.sort();
    assert_eq!(seen, (1..=3).map(|i| format!("{rep}-{i}")).collect::<Vec<_>>());
    let ps = xenod(&data, &["ps"]);
    assert_eq!(ps["instances"].as_array().unwrap().len(), 3);
    for i in 1..=3 {
        xenod(&data, &["destroy", &format!("{rep}-{i}")]);
    }
}

#[test]
fn disk_root_guest_suspends_and_resumes() {
    let Some(fix) = setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let tree = t.path().join("tree");
    add_boot(&fix, &tree);
    fs::create_dir_all(tree.join("disk")).unwrap();
    fs::copy(fix.join("disk/root.img"), tree.join("disk/root.img")).unwrap();
    let spec = t.path().join("disk.spec.json");
    fs::write(
        &spec,
        r#"{"kernel":"stack:boot/vmlinux","initrd":"stack:boot/initrd.img","root":"disk","disk_image":"disk/root.img","ports":["0:80"]}"#,
    )
    .unwrap();
    xenod(
        &data,
        &["publish", tree.to_str().unwrap(), "--name", "template://t/disk/1", "--spec", spec.to_str().unwrap()],
    );
    let name = format!("disk{}", std::process::id());
    let _guard = Instances(&data, vec![name.clone()]);
    let d = xenod(&data, &["deploy", "template://t/disk/1", "--name", &name]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!(page(port).1, 1);
    assert_eq!(page(port).1, 2);
    xenod(&data, &["suspend", &name]);
    let ps = xenod(&data, &["ps"]);
    assert_eq!(ps["instances"][0]["state"], "suspended", "{ps}");
    xenod(&data, &["resume", &name]);
    assert_eq!(page(port).1, 3, "the counter continues after resume");
    // Only the blocks the guest wrote are in the upper layer.
    let upper = data.join("instances").join(&name).join("upper/disk/root.img");
    let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&upper).unwrap()) * 512;
    assert!(used < 16 << 20, "upper image uses {used} bytes");
    xenod(&data, &["destroy", &name]);
}

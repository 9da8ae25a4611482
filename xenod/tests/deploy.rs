//! Real guests through libvirt (qemu:///system, TCG here) from the fixture
//! template: fs root over 9p from the cowfs union, replicas, commit, and a
//! disk-root guest suspended and resumed. Needs root, /dev/fuse and QEMU;
//! skips loudly when one is truly absent.

mod common;

use std::fs;
use std::path::PathBuf;

use common::*;

/// The fixture (built and cached), libvirt started; `None` (said loudly)
/// when this machine cannot run a guest.
fn setup() -> Option<PathBuf> {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: real-guest deploy test: {why}");
        return None;
    }
    Some(fixture())
}

#[test]
fn fs_root_guest_replicas_and_commit() {
    let Some(fix) = setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let tree = t.path().join("template");
    cp(&fix.join("template"), &tree);
    add_boot(&fix, &tree);
    ok(&data, &["publish", tree.to_str().unwrap(), "--name", "template://t/os/1"]);
    let web = t.path().join("web");
    cp(&tree, &web);
    cp(&fix.join("web"), &web);
    let spec = repo().join("fixtures/guest/web.spec.json");
    ok(
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
    let d = ok(&data, &["deploy", "template://t/web/1", "--name", &name]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!(page(port), (name.clone(), 1));
    assert_eq!(page(port), (name.clone(), 2));
    // The guest's write is in the instance's private upper layer.
    let upper_counter = data.join("instances").join(&name).join("upper/var/lib/web/counter");
    assert_eq!(fs::read_to_string(&upper_counter).unwrap().trim(), "2");
    boot_files_not_copied_up(&data, &name);
    // Its upper becomes an overlay that a second deploy starts from.
    let c = ok(&data, &["commit", &name, "--name", "template://t/web-state/1"]);
    assert!(c["entries"].as_u64().unwrap() >= 1);
    ok(&data, &["destroy", &name]);
    assert!(!data.join("instances").join(&name).exists(), "destroy leaves nothing");

    let again = format!("again{}", std::process::id());
    guard.1.push(again.clone());
    let d = ok(&data, &["deploy", "template://t/web-state/1", "--name", &again]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!(page(port), (again.clone(), 3), "the committed counter carries over");
    ok(&data, &["destroy", &again]);

    // Three replicas at once, each with its own name and port.
    let rep = format!("rep{}", std::process::id());
    guard.1.extend((1..=3).map(|i| format!("{rep}-{i}")));
    let d = ok(&data, &["deploy", "template://t/web/1", "--name", &rep, "--replicas", "3"]);
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
    let ps = ok(&data, &["ps"]);
    assert_eq!(ps["instances"].as_array().unwrap().len(), 3);
    for i in 1..=3 {
        ok(&data, &["destroy", &format!("{rep}-{i}")]);
    }
}

#[test]
fn disk_root_guest_suspends_and_resumes() {
    let Some(fix) = setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    publish_disk_fixture(&fix, t.path(), &data);
    let name = format!("disk{}", std::process::id());
    let _guard = Instances(&data, vec![name.clone()]);
    let d = ok(&data, &["deploy", "template://t/disk/1", "--name", &name]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!(page(port).1, 1);
    assert_eq!(page(port).1, 2);
    ok(&data, &["suspend", &name]);
    let ps = ok(&data, &["ps"]);
    assert_eq!(ps["instances"][0]["state"], "suspended", "{ps}");
    ok(&data, &["resume", &name]);
    assert_eq!(page(port).1, 3, "the counter continues after resume");
    // Only the blocks the guest wrote are in the upper layer.
    let upper = data.join("instances").join(&name).join("upper/disk/root.img");
    let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&upper).unwrap()) * 512;
    assert!(used < 16 << 20, "upper image uses {used} bytes");
    boot_files_not_copied_up(&data, &name);
    ok(&data, &["destroy", &name]);
}

/// Booting, saving and restoring read the kernel and initrd from the union
/// without copying them up (libvirt relabels the files it hands to QEMU; it
/// must not leave xattrs on them).
fn boot_files_not_copied_up(data: &std::path::Path, name: &str) {
    for boot in ["boot/vmlinux", "boot/initrd.img"] {
        let copy = data.join("instances").join(name).join("upper").join(boot);
        assert!(!copy.exists(), "{} was copied into the instance's upper layer", copy.display());
    }
}

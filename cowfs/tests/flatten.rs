//! Handing an upper to the kernel: after `flatten`, the kernel's overlayfs
//! over the exported stack shows exactly what cowfs showed, partial files
//! included. Needs root, /dev/fuse and overlayfs.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::*;
use xenod_cowfs::{MountOptions, mount};
use xenod_store::{Store, tree_listing};

#[test]
fn flattened_upper_mounts_in_the_kernel_with_the_same_contents() {
    if !fuse_ok("flattened_upper_mounts_in_the_kernel_with_the_same_contents") {
        return;
    }
    if !fs::read_to_string("/proc/filesystems").unwrap_or_default().contains("overlay") {
        eprintln!("\n*** SKIPPING flatten test: the kernel has no overlayfs ***\n");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let src = t.path().join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    let f = fs::File::create(src.join("disk.img")).unwrap();
    f.set_len(96 << 20).unwrap();
    for (i, off) in [0u64, 40 << 20, (96 << 20) - (1 << 20)].into_iter().enumerate() {
        f.write_all_at(&noise(1 << 20, i as u64 + 1), off).unwrap();
    }
    drop(f);
    fs::write(src.join("etc/conf"), b"lower\n").unwrap();
    let id = publish_dir(&store, &src, None);
    let (upper, mnt) = (t.path().join("upper"), t.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    let m = mount(
        store.clone(),
        &[id],
        &mnt,
        &MountOptions { upper: Some(upper.clone()), threads: 2, ..Default::default() },
    )
    .unwrap();
    let img = fs::OpenOptions::new().write(true).open(mnt.join("disk.img")).unwrap();
    img.write_all_at(&[0x5a; 4096], (40 << 20) + 10_000).unwrap();
    img.write_all_at(&[0xa5; 100], 70 << 20).unwrap();
    drop(img);
    fs::write(mnt.join("etc/conf"), b"upper\n").unwrap();
    let want = t.path().join("want");
    assert!(std::process::Command::new("cp").arg("-a").arg(&mnt).arg(&want).status().unwrap().success());
    m.unmount().unwrap();
    assert!(upper.join(".xenod/maps").read_dir().unwrap().next().is_some(), "a partial file to flatten");

    let s = xenod_cowfs::flatten(store.clone(), &[id], &upper).unwrap();
    assert_eq!(s.files, 1);
    assert!(s.blocks >= 3 * 16 - 1, "clean data blocks filled from the lower file: {s:?}");
    assert!(!upper.join(".xenod").exists(), "xenod's work area is gone");
    // Run again (as after a crash): nothing left to do.
    assert_eq!(xenod_cowfs::flatten(store.clone(), &[id], &upper).unwrap(), Default::default());

    let lower = t.path().join("lower");
    export(&store, &[id], &lower);
    let (work, kmnt) = (t.path().join("work"), t.path().join("kmnt"));
    fs::create_dir(&work).unwrap();
    fs::create_dir(&kmnt).unwrap();
    kernel_overlay(&lower, &upper, &work, &kmnt).unwrap();
    // The merged root's mtime is the upper root's, which the kernel's own
    // mount bookkeeping touches; everything below must match exactly.
    let below = |l: Vec<String>| l.into_iter().filter(|e| !e.starts_with("/ dir ")).collect::<Vec<_>>();
    let (lw, lk) = (below(tree_listing(&want).unwrap()), below(tree_listing(&kmnt).unwrap()));
    let diff: Vec<String> = lw.iter().zip(&lk).filter(|(a, b)| a != b).map(|(a, b)| format!("{a}\n{b}")).collect();
    let same = lw.len() == lk.len() && diff.is_empty();
    eprintln!("{}", diff.join("\n\n"));
    let a = fs::read(want.join("disk.img")).unwrap();
    let b = fs::read(kmnt.join("disk.img")).unwrap();
    xenod_cowfs::unmount(&kmnt, false).unwrap();
    assert!(same, "the kernel's view of the flattened upper differs from cowfs's");
    assert!(a == b, "disk.img differs through the kernel");
}

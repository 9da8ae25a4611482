//! FUSE over io_uring: a mount serves its requests through the per-CPU
//! queues when the kernel offers them, the same bytes come back as through
//! /dev/fuse, and `uring: false` keeps a mount on /dev/fuse. Needs root,
//! /dev/fuse and a kernel with the transport (`fuse.enable_uring`; the test
//! turns it on as scripts/enable-fuse-uring.sh does). One test in its own
//! binary: the served-request counter is per process.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use common::*;
use xenod_cowfs::{MountOptions, mount, uring_requests_served};
use xenod_store::{Store, tree_listing};

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the kernel can serve FUSE over io_uring; turns it on if it is off.
fn uring_ok() -> bool {
    if !Path::new(PARAM).exists() {
        eprintln!("\n*** SKIPPING uring test: this kernel has no FUSE over io_uring ({PARAM} missing) ***\n");
        return false;
    }
    if fs::read_to_string(PARAM).unwrap().trim() != "Y"
        && let Err(e) = fs::write(PARAM, "Y")
    {
        eprintln!("\n*** SKIPPING uring test: FUSE over io_uring is off and {PARAM} cannot be set here: {e} ***\n");
        return false;
    }
    true
}

/// `root`'s listing (contents and metadata, read through the kernel)
/// without times or xenod's work directory.
fn listing(root: &Path) -> Vec<String> {
    normalize(tree_listing(root).unwrap())
}

/// Reads, writes into a lower file (block copy-up), creates, renames and
/// deletes through the mount; the tree afterwards.
fn workload(mnt: &Path) -> Vec<String> {
    let before = listing(mnt);
    assert!(before.len() > 10, "the tree is there: {before:?}");
    let big = mnt.join("disk.img");
    let mut f = fs::OpenOptions::new().read(true).write(true).open(&big).unwrap();
    f.seek(SeekFrom::Start(70_000)).unwrap();
    f.write_all(b"written over io_uring").unwrap();
    f.sync_all().unwrap();
    let mut back = vec![0u8; 21];
    f.seek(SeekFrom::Start(70_000)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"written over io_uring");
    drop(f);
    fs::create_dir(mnt.join("new")).unwrap();
    let payload: Vec<u8> = noise(3 << 20, 7);
    fs::write(mnt.join("new/three-mib"), &payload).unwrap();
    assert_eq!(fs::read(mnt.join("new/three-mib")).unwrap(), payload, "a 3 MiB file reads back");
    fs::rename(mnt.join("new/three-mib"), mnt.join("new/moved")).unwrap();
    fs::remove_file(mnt.join("dir/size-0")).unwrap();
    assert!(!mnt.join("dir/size-0").exists());
    listing(mnt)
}

#[test]
fn mounts_serve_over_io_uring_and_give_the_same_bytes() {
    if !fuse_ok("mounts_serve_over_io_uring_and_give_the_same_bytes") || !uring_ok() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src);
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let id = publish_dir(&store, &src, None);
    let run = |name: &str, uring: bool| {
        let (upper, mnt) = (t.path().join(format!("upper-{name}")), t.path().join(format!("mnt-{name}")));
        fs::create_dir_all(&upper).unwrap();
        fs::create_dir_all(&mnt).unwrap();
        let opts = MountOptions { upper: Some(upper.clone()), threads: 2, uring, ..Default::default() };
        let before = uring_requests_served();
        let m = mount(store.clone(), &[id], &mnt, &opts).unwrap();
        let tree = workload(&mnt);
        m.unmount().unwrap();
        (tree, uring_requests_served() - before, listing(&upper))
    };
    let (classic, classic_served, classic_upper) = run("classic", false);
    assert_eq!(classic_served, 0, "uring: false serves everything through /dev/fuse");
    let (ring, ring_served, ring_upper) = run("ring", true);
    // A walk of the tree alone is a lookup or getattr per entry.
    assert!(
        ring_served as usize >= classic.len(),
        "the io_uring mount served {ring_served} requests over its queues, fewer than the {} entries it walked",
        classic.len()
    );
    assert_same_listing(&classic, &ring, "trees through /dev/fuse and over io_uring");
    assert_same_listing(&classic_upper, &ring_upper, "upper directories through /dev/fuse and over io_uring");
}

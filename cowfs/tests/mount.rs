//! Mount-in-tempdir tests: read back through the kernel, write through the
//! union, commit, block copy-up space. Need root and /dev/fuse.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use xenod_cowfs::{MountOptions, mount};
use xenod_store::{Kind, Store, tree_listing};

fn opts(upper: Option<&Path>) -> MountOptions {
    MountOptions { upper: upper.map(Path::to_path_buf), threads: 2, ..Default::default() }
}

/// A two-layer stack: the generated tree, and an overlay that deletes,
/// replaces and adds.
fn two_layers(store: &Store, t: &Path) -> Vec<xenod_store::LayerId> {
    let base = t.join("base");
    build_tree(&base);
    let base_id = publish_dir(store, &base, None);
    let new = t.join("new");
    assert!(std::process::Command::new("cp").arg("-a").arg(&base).arg(&new).status().unwrap().success());
    fs::write(new.join("dir/added"), b"new file").unwrap();
    fs::write(new.join("dir/size-1"), b"X").unwrap();
    fs::remove_file(new.join("dir/size-0")).unwrap();
    fs::remove_dir_all(new.join("dir/sub/deeper")).unwrap();
    fs::write(new.join("dir/sub/deeper"), b"now a file").unwrap();
    fs::remove_file(new.join("fifo")).unwrap();
    fs::create_dir(new.join("fifo")).unwrap();
    fix_times(&new);
    let top = publish_overlay(store, base_id, &new);
    store.stack(&top).unwrap()
}

/// A store in `t` holding [`two_layers`], an upper directory and an empty
/// mountpoint: (store, stack, upper, mountpoint).
fn writable_two_layers(t: &Path) -> (Arc<Store>, Vec<xenod_store::LayerId>, PathBuf, PathBuf) {
    let store = Arc::new(Store::open(t.join("store")).unwrap());
    let stack = two_layers(&store, t);
    let (upper, mnt) = (t.join("upper"), t.join("mnt"));
    fs::create_dir(&mnt).unwrap();
    (store, stack, upper, mnt)
}

#[test]
fn reads_back_everything_through_the_kernel() {
    if !fuse_ok("reads_back_everything_through_the_kernel") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let stack = two_layers(&store, t.path());
    let out = t.path().join("export");
    export(&store, &stack, &out);
    let want = tree_listing(&out).unwrap();
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    // Both ways a read-only mount can serve: asked for every open, and with
    // the kernel opening files itself.
    for no_open in [false, true] {
        let m = mount(store.clone(), &stack, &mnt, &MountOptions { no_open, ..opts(None) }).unwrap();
        let got = tree_listing(&mnt).unwrap();
        assert_same_listing(&want, &got, &format!("export and mount (no_open {no_open})"));
        // A file held open: a handle here only when the kernel asked.
        let f = fs::File::open(mnt.join("z-data")).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(f.read_at(&mut buf, 1000).unwrap(), 4096);
        assert_eq!(buf, fs::read(out.join("z-data")).unwrap()[1000..5096]);
        // SEEK_HOLE finds the end of a file that is all data, also on a
        // file the kernel opened without a handle here.
        let len = f.metadata().unwrap().len();
        assert_eq!(rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0)).unwrap(), len);
        if no_open {
            assert_eq!(m.open_handles(), 0, "the kernel asked to open a file on a no-open mount");
        } else {
            assert!(m.open_handles() >= 1, "no handle for a file held open");
        }
        drop(f);
        // Read-only without an upper.
        let e = fs::write(mnt.join("dir/added"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::ROFS.raw_os_error()), "{e}");
        // Inode numbers are stable and hardlinks share one.
        let a = fs::metadata(mnt.join("a-link")).unwrap();
        let b = fs::metadata(mnt.join("dir/sub/b-link")).unwrap();
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 3));
        assert_eq!(fs::metadata(mnt.join("a-link")).unwrap().ino(), a.ino());
        m.unmount().unwrap();
    }
}

#[test]
fn corrupt_chunk_gives_eio_not_a_crash() {
    if !fuse_ok("corrupt_chunk_gives_eio_not_a_crash") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("good"), noise(200_000, 1)).unwrap();
    fs::write(src.join("bad"), noise(200_000, 2)).unwrap();
    let store_dir = t.path().join("store");
    let (stack, bad_chunks) = {
        let store = Store::open(&store_dir).unwrap();
        let id = publish_dir(&store, &src, None);
        let mut bad = vec![];
        for e in store.read_layer(&id).unwrap() {
            let e = e.unwrap();
            if e.path == b"bad"
                && let Kind::File { extents, .. } = e.kind
            {
                for x in extents {
                    if let xenod_store::Extent::Data { id, .. } = x {
                        bad.push(store.locate(&id).unwrap().unwrap());
                    }
                }
            }
        }
        (vec![id], bad)
    };
    // Flip bytes of the bad file's chunks inside their pack files.
    for loc in &bad_chunks {
        flip_chunk(&store_dir, loc);
    }
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store, &stack, &mnt, &opts(None)).unwrap();
    let e = fs::read(mnt.join("bad")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()), "{e}");
    assert_eq!(fs::read(mnt.join("good")).unwrap(), noise(200_000, 1), "the mount survives");
    m.unmount().unwrap();
}

#[test]
fn writes_copy_up_and_commit_round_trips() {
    if !fuse_ok("writes_copy_up_and_commit_round_trips") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (store, stack, upper, mnt) = writable_two_layers(t.path());
    let m = mount(store.clone(), &stack, &mnt, &opts(Some(&upper))).unwrap();
    // Append to a lower file; the other names of its hardlink set follow.
    let mut f = fs::OpenOptions::new().append(true).open(mnt.join("z-data")).unwrap();
    std::io::Write::write_all(&mut f, b"appended").unwrap();
    drop(f);
    let mut want = noise(100_000, 99);
    want.extend_from_slice(b"appended");
    assert_eq!(fs::read(mnt.join("a-link")).unwrap(), want, "hardlink set kept together");
    assert_eq!(fs::read(mnt.join("dir/sub/b-link")).unwrap(), want);
    // O_TRUNC, chmod, xattrs, delete, replace, rename of a lower directory.
    fs::write(mnt.join("dir/size-65536"), b"short").unwrap();
    fs::set_permissions(mnt.join("suid"), fs::Permissions::from_mode(0o700)).unwrap();
    rustix::fs::setxattr(mnt.join("rel-link"), "trusted.x", b"1", rustix::fs::XattrFlags::empty()).unwrap();
    fs::remove_file(mnt.join("zeros")).unwrap();
    fs::remove_dir_all(mnt.join("empty")).unwrap();
    fs::create_dir(mnt.join("empty")).unwrap();
    fs::write(mnt.join("empty/inside"), b"i").unwrap();
    fs::rename(mnt.join("dir/sub"), mnt.join("moved")).unwrap();
    assert_eq!(fs::read(mnt.join("moved/text")).unwrap(), b"hello\n".repeat(50_000));
    assert!(!mnt.join("dir/sub").exists());
    rustix::fs::mknodat(
        rustix::fs::CWD,
        mnt.join("newfifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    std::os::unix::fs::symlink("moved/text", mnt.join("newlink")).unwrap();
    fs::hard_link(mnt.join("dir/added"), mnt.join("added-too")).unwrap();
    // A file over 4 GiB (sparse) and SEEK_DATA/SEEK_HOLE on it.
    let big =
        fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o644).open(mnt.join("big")).unwrap();
    big.write_all_at(b"end", (5 << 30) - 3).unwrap();
    drop(big);
    let big = fs::File::open(mnt.join("big")).unwrap();
    assert_eq!(big.metadata().unwrap().len(), 5 << 30);
    let d = rustix::fs::seek(&big, rustix::fs::SeekFrom::Data(0)).unwrap();
    assert!(d >= 4 << 30, "SEEK_DATA found {d}");
    let mut tail = [0u8; 3];
    big.read_exact_at(&mut tail, (5 << 30) - 3).unwrap();
    assert_eq!(&tail, b"end");
    drop(big);
    // (Hashing 5 GiB of zeros through the listings below would take long.)
    fs::remove_file(mnt.join("big")).unwrap();
    let statfs = rustix::fs::statvfs(&mnt).unwrap();
    assert!(statfs.f_blocks > 0);
    let view = tree_listing(&mnt).unwrap();
    m.unmount().unwrap();

    // Remounting the same upper shows the same tree.
    let m = mount(store.clone(), &stack, &mnt, &opts(Some(&upper))).unwrap();
    assert_same_listing(&view, &tree_listing(&mnt).unwrap(), "first and second mount");
    m.unmount().unwrap();

    // Commit, export the new stack: the same tree again.
    let c = xenod_cowfs::commit(store.clone(), &stack, &upper, Default::default()).unwrap();
    let out = t.path().join("committed");
    export(&store, &store.stack(&c.id).unwrap(), &out);
    let got = tree_listing(&out).unwrap();
    let strip_root = |v: &[String]| v[1..].to_vec();
    assert_same_listing(&strip_root(&view), &strip_root(&got), "union and committed export");
}

#[test]
fn block_copy_up_writes_one_block() {
    if !fuse_ok("block_copy_up_writes_one_block") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    // A 1 GiB image: data at its start, middle and end, holes between.
    let f = fs::File::create(src.join("disk.img")).unwrap();
    f.set_len(1 << 30).unwrap();
    let chunk = noise(4 << 20, 7);
    for off in [0u64, 512 << 20, (1 << 30) - (4 << 20)] {
        f.write_all_at(&chunk, off).unwrap();
    }
    drop(f);
    let id = publish_dir(&store, &src, None);
    let upper = t.path().join("upper");
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store.clone(), &[id], &mnt, &opts(Some(&upper))).unwrap();
    let started = std::time::Instant::now();
    let f = fs::OpenOptions::new().write(true).open(mnt.join("disk.img")).unwrap();
    let off = (512 << 20) + 100_000;
    f.write_all_at(&[0xab; 4096], off).unwrap();
    drop(f);
    let took = started.elapsed();
    let mut buf = vec![0u8; 3 * 65536];
    let base = (512 << 20) + 65536;
    fs::File::open(mnt.join("disk.img")).unwrap().read_exact_at(&mut buf, base).unwrap();
    let mut want = chunk[65536..4 * 65536].to_vec();
    want[(off - base) as usize..(off - base) as usize + 4096].fill(0xab);
    assert!(buf == want, "union contents after a block write");
    m.unmount().unwrap();
    let used: u64 = walk_blocks(&upper);
    eprintln!("4 KiB into a 1 GiB lower file: {used} bytes of upper space, {took:?}");
    assert!(used <= 128 << 10, "upper uses {used} bytes");
    // Commit shares every clean block with the lower file.
    let c = xenod_cowfs::commit(store.clone(), &[id], &upper, Default::default()).unwrap();
    let before = store.chunk_count().unwrap();
    let _ = before;
    let mut shared = 0;
    let mut lower_ids = std::collections::HashSet::new();
    for e in store.read_layer(&id).unwrap() {
        if let Kind::File { extents, .. } = e.unwrap().kind {
            for x in extents {
                if let xenod_store::Extent::Data { id, .. } = x {
                    lower_ids.insert(id);
                }
            }
        }
    }
    let mut fresh = 0;
    for e in store.read_layer(&c.id).unwrap() {
        if let Kind::File { extents, .. } = e.unwrap().kind {
            for x in extents {
                if let xenod_store::Extent::Data { id, .. } = x {
                    if lower_ids.contains(&id) { shared += 1 } else { fresh += 1 }
                }
            }
        }
    }
    assert_eq!(fresh, 1, "one dirty block, one new chunk");
    assert_eq!(shared, 3 * 64 - 1);
    let out = t.path().join("out");
    export(&store, &store.stack(&c.id).unwrap(), &out);
    let mut buf2 = vec![0u8; 3 * 65536];
    fs::File::open(out.join("disk.img")).unwrap().read_exact_at(&mut buf2, base).unwrap();
    assert!(buf2 == want, "committed contents");
}

fn walk_blocks(p: &Path) -> u64 {
    let md = fs::symlink_metadata(p).unwrap();
    let mut n = if md.is_dir() { 0 } else { md.blocks() * 512 };
    if md.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            n += walk_blocks(&e.unwrap().path());
        }
    }
    n
}

#[test]
fn live_commits_read_only_what_the_tracker_reports() {
    if !fuse_ok("live_commits_read_only_what_the_tracker_reports") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let src = t.path().join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    let f = fs::File::create(src.join("disk.img")).unwrap();
    f.set_len(256 << 20).unwrap();
    f.write_all_at(&noise(8 << 20, 3), 64 << 20).unwrap();
    drop(f);
    fs::write(src.join("etc/a"), b"alpha").unwrap();
    fs::write(src.join("etc/b"), b"bravo").unwrap();
    let id = publish_dir(&store, &src, None);
    let (upper, mnt) = (t.path().join("upper"), t.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    let sock = t.path().join("ctl");
    let o = MountOptions { control: Some(sock.clone()), ..opts(Some(&upper)) };
    let m = mount(store.clone(), &[id], &mnt, &o).unwrap();
    let img = fs::OpenOptions::new().write(true).open(mnt.join("disk.img")).unwrap();
    img.write_all_at(&noise(1 << 20, 4), 10 << 20).unwrap();
    fs::write(mnt.join("etc/a"), b"alpha two").unwrap();

    // Round 0: everything in the upper is read, the cache filled.
    let mut cache = xenod_cowfs::CommitCache::default();
    let _ = xenod_cowfs::drain_dirty(&sock).unwrap();
    let r0 = xenod_cowfs::commit_live(store.clone(), &[id], &upper, Default::default(), &mut cache, None).unwrap();
    assert!(cache.last_read >= 1 << 20, "round 0 reads the written megabyte: {}", cache.last_read);

    // Round 1: two blocks of the image, a rename over a cached path, a delete.
    img.write_all_at(&[7u8; 100], (200 << 20) + 65530).unwrap();
    drop(img);
    fs::write(mnt.join("etc/new"), b"charlie").unwrap();
    fs::rename(mnt.join("etc/new"), mnt.join("etc/a")).unwrap();
    fs::remove_file(mnt.join("etc/b")).unwrap();
    let d = xenod_cowfs::drain_dirty(&sock).unwrap();
    assert_eq!(d.blocks.get(&b"disk.img"[..]).map(|b| b.len()), Some(2), "{d:?}");
    assert!(d.whole_changed(b"etc/a") && d.whole_changed(b"etc/b"), "{d:?}");
    let r1 = xenod_cowfs::commit_live(store.clone(), &[id], &upper, Default::default(), &mut cache, Some(&d)).unwrap();
    assert!(cache.last_read <= 2 * 65536 + 64, "round 1 reads only the written blocks: {}", cache.last_read);
    assert_ne!(r0.id, r1.id);
    // Nothing written: nothing read, the same layer.
    let d = xenod_cowfs::drain_dirty(&sock).unwrap();
    assert!(d.is_empty(), "{d:?}");
    let r2 = xenod_cowfs::commit_live(store.clone(), &[id], &upper, Default::default(), &mut cache, Some(&d)).unwrap();
    assert_eq!((r2.id, cache.last_read), (r1.id, 0));
    m.unmount().unwrap();
    // The incremental result is exactly what a full commit of the upper gives.
    let full = xenod_cowfs::commit(store.clone(), &[id], &upper, Default::default()).unwrap();
    assert_eq!(full.id, r1.id, "incremental and full commits agree");
}

/// Directories are listed once and the kernel keeps the listing (no OPENDIR
/// on kernels that allow it): every change made through the mount must
/// still show in the next listing, in lower, merged and upper directories.
#[test]
fn listings_follow_changes_made_through_the_mount() {
    if !fuse_ok("listings_follow_changes_made_through_the_mount") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (store, stack, upper, mnt) = writable_two_layers(t.path());
    let m = mount(store, &stack, &mnt, &opts(Some(&upper))).unwrap();
    let names = |d: &str| -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(mnt.join(d)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    for d in ["dir", "dir/sub", ""] {
        let before = names(d);
        let p = |n: &str| mnt.join(d).join(n);
        fs::write(p("new-one"), b"1").unwrap();
        let mut want = before.clone();
        want.push("new-one".into());
        want.sort();
        assert_eq!(names(d), want, "{d:?} after create");
        fs::rename(p("new-one"), p("renamed")).unwrap();
        let mut want = before.clone();
        want.push("renamed".into());
        want.sort();
        assert_eq!(names(d), want, "{d:?} after rename");
        fs::remove_file(p("renamed")).unwrap();
        assert_eq!(names(d), before, "{d:?} after unlink");
        if let Some(first) = before.iter().find(|n| fs::symlink_metadata(p(n)).unwrap().is_file()) {
            fs::remove_file(p(first)).unwrap();
            let want: Vec<String> = before.iter().filter(|n| *n != first).cloned().collect();
            assert_eq!(names(d), want, "{d:?} after removing lower {first}");
        }
    }
    m.unmount().unwrap();
}

#[test]
fn created_files_get_their_owner_and_mode_in_place_or_staged() {
    if !fuse_ok("created_files_get_their_owner_and_mode_in_place_or_staged") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (store, stack, upper, mnt) = writable_two_layers(t.path());
    let m = mount(store.clone(), &stack, &mnt, &opts(Some(&upper))).unwrap();
    let create = |p: &Path, mode: u32, body: &[u8]| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(p).unwrap();
        std::io::Write::write_all(&mut f, body).unwrap();
    };
    let owner_mode = |p: &Path| {
        let md = fs::symlink_metadata(p).unwrap();
        (md.uid(), md.gid(), md.mode() & 0o7777)
    };
    // Root, a mode the umask leaves whole: made in place.
    create(&mnt.join("plain"), 0o640, b"one");
    // A set-group-id directory gives its group, as the kernel would.
    fs::create_dir(mnt.join("shared")).unwrap();
    rustix::fs::chown(mnt.join("shared"), None, Some(rustix::fs::Gid::from_raw(4242))).unwrap();
    fs::set_permissions(mnt.join("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    create(&mnt.join("shared/f"), 0o600, b"two");
    // Over a whiteout (a lower file removed): staged and renamed over it.
    fs::remove_file(mnt.join("dir/added")).unwrap();
    create(&mnt.join("dir/added"), 0o604, b"three");
    for (rel, want, body) in [
        ("plain", (0, 0, 0o640), &b"one"[..]),
        ("shared/f", (0, 4242, 0o600), b"two"),
        ("dir/added", (0, 0, 0o604), b"three"),
    ] {
        assert_eq!(owner_mode(&mnt.join(rel)), want, "{rel} through the mount");
        assert_eq!(owner_mode(&upper.join(rel)), want, "{rel} in the upper");
        assert_eq!(fs::read(mnt.join(rel)).unwrap(), body);
    }
    // Nothing left in the staging area.
    assert_eq!(fs::read_dir(upper.join(".xenod/work")).map(|d| d.count()).unwrap_or(0), 0);
    m.unmount().unwrap();
}

#[test]
fn a_writable_mount_sees_every_open_even_when_asked_not_to() {
    if !fuse_ok("a_writable_mount_sees_every_open_even_when_asked_not_to") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (store, stack, upper, mnt) = writable_two_layers(t.path());
    let m = mount(store, &stack, &mnt, &MountOptions { no_open: true, ..opts(Some(&upper)) }).unwrap();
    // Opening a lower file for writing copies it up then, as in overlayfs,
    // before anything is written.
    let f = fs::OpenOptions::new().write(true).open(mnt.join("dir/size-1")).unwrap();
    assert!(upper.join("dir/size-1").exists(), "no copy-up at open for writing");
    assert!(m.open_handles() >= 1, "the open was not seen");
    drop(f);
    m.unmount().unwrap();
}

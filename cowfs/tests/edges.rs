//! POSIX at the edges, through a real mount: paths from the mount root near
//! PATH_MAX under an upper directory whose own host path is long, names
//! over NAME_MAX, and open files that lost their last name. Need root and
//! /dev/fuse; the errno checks also run on the kernel's overlayfs, when the
//! kernel has it, and must give the same answers there.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use xenod_cowfs::{MountOptions, mount};
use xenod_store::Store;

fn opts(upper: &Path, passthrough: bool) -> MountOptions {
    MountOptions { upper: Some(upper.to_path_buf()), threads: 2, passthrough, ..Default::default() }
}

/// A name of `len` bytes, all `c` but for a distinguishing first byte.
fn name(first: u8, c: u8, len: usize) -> String {
    let mut n = vec![c; len];
    n[0] = first;
    String::from_utf8(n).unwrap()
}

/// A directory under `base` whose path is at least `len` bytes long, made of
/// nested directories with 249-byte names.
fn long_host_dir(base: &Path, len: usize) -> PathBuf {
    let mut p = base.to_path_buf();
    let mut i = 0u8;
    while p.as_os_str().len() < len {
        p.push(name(b'a' + i, b'h', 249));
        i += 1;
    }
    fs::create_dir_all(&p).unwrap();
    p
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw_os_error(e.raw_os_error().unwrap_or_else(|| panic!("not an OS error: {e}")))
}

/// A stack with a lower directory chain `L0/L1/.../L5` of 200-byte names
/// holding a file, so that deep operations copy lower directories up.
fn deep_lower(t: &Path) -> (Arc<Store>, xenod_store::LayerId, Vec<String>) {
    let src = t.join("src");
    let lower: Vec<String> = (0..6).map(|i| name(b'L', b'0' + i as u8, 200)).collect();
    let mut d = src.clone();
    for n in &lower {
        d.push(n);
    }
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("lower-file"), b"from the lower layer\n").unwrap();
    fs::write(src.join("top"), b"top\n").unwrap();
    let store = Arc::new(Store::open(t.join("store")).unwrap());
    let id = publish_dir(&store, &src, None);
    (store, id, lower)
}

/// Everything that makes, changes or removes a name, at a path 4,000 bytes
/// long from the mount root, with the upper directory under a 3,000-byte
/// host path. Returns nothing; panics on the first failure.
fn deep_operations(mnt: &Path, lower: &[String]) {
    // 19 directories of 200-byte names (6 of them from the lower layer),
    // then a 181-byte file name: 19 * 201 + 181 = 4,000 bytes.
    let mut rel = PathBuf::new();
    for i in 0..19 {
        rel.push(if i < lower.len() { lower[i].clone() } else { name(b'D', b'a' + i as u8, 200) });
    }
    let dir = mnt.join(&rel);
    fs::create_dir_all(&dir).expect("mkdir along a 3,819-byte path");
    let file_a = rel.join(name(b'A', b'f', 181));
    let file_b = rel.join(name(b'B', b'f', 181));
    assert_eq!(file_a.as_os_str().len(), 4000);
    assert!(mnt.join(&file_a).as_os_str().len() < 4095, "the test's own paths must fit PATH_MAX");
    let (a, b) = (mnt.join(&file_a), mnt.join(&file_b));

    // create, write, read
    fs::write(&a, b"deep contents\n").expect("create at 4,000 bytes");
    assert_eq!(fs::read(&a).unwrap(), b"deep contents\n");
    // truncate, chmod, chown, utimes, xattrs
    fs::OpenOptions::new().write(true).open(&a).unwrap().set_len(4).expect("truncate");
    fs::set_permissions(&a, fs::Permissions::from_mode(0o640)).expect("chmod");
    rustix::fs::chown(&a, Some(rustix::fs::Uid::from_raw(4321)), Some(rustix::fs::Gid::from_raw(8765))).expect("chown");
    let t = rustix::fs::Timespec { tv_sec: 1_234_567_890, tv_nsec: 5 };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        &a,
        &rustix::fs::Timestamps { last_access: t, last_modification: t },
        AtFlags::empty(),
    )
    .expect("utimensat");
    rustix::fs::setxattr(&a, "user.deep", b"yes", rustix::fs::XattrFlags::empty()).expect("setxattr");
    let m = fs::symlink_metadata(&a).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid(), m.mtime(), m.len()), (0o640, 4321, 8765, 1_234_567_890, 4));
    let mut v = [0u8; 8];
    assert_eq!(rustix::fs::getxattr(&a, "user.deep", &mut v).expect("getxattr"), 3);
    // rename (within the directory and to a directory higher up), link
    fs::rename(&a, &b).expect("rename at 4,000 bytes");
    assert_eq!(errno_of(&fs::metadata(&a).unwrap_err()), Errno::NOENT);
    assert_eq!(fs::read(&b).unwrap(), b"deep");
    fs::hard_link(&b, &a).expect("link at 4,000 bytes");
    assert_eq!(fs::metadata(&b).unwrap().nlink(), 2);
    fs::remove_file(&a).unwrap();
    assert_eq!(fs::metadata(&b).unwrap().nlink(), 1);
    // symlink, fifo, device node, a directory and its removal
    let s = dir.join(name(b'S', b's', 181));
    std::os::unix::fs::symlink("target/of/a/deep/link", &s).expect("symlink");
    assert_eq!(fs::read_link(&s).unwrap(), Path::new("target/of/a/deep/link"));
    let fifo = dir.join(name(b'F', b'p', 181));
    rustix::fs::mknodat(rustix::fs::CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).expect("mkfifo");
    let dev = dir.join(name(b'N', b'n', 181));
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &dev,
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        rustix::fs::makedev(1, 3),
    )
    .expect("mknod");
    let sub = dir.join(name(b'R', b'r', 181));
    fs::create_dir(&sub).expect("mkdir");
    let mut listed: Vec<Vec<u8>> =
        fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().as_bytes()[..1].to_vec()).collect();
    listed.sort();
    assert_eq!(listed, [b"B", b"F", b"N", b"R", b"S"].map(|x| x.to_vec()));
    fs::remove_dir(&sub).expect("rmdir");
    for p in [&s, &fifo, &dev] {
        fs::remove_file(p).expect("unlink");
    }
    // A lower file deep enough that its copy-up path is over PATH_MAX on the host.
    let lf = mnt.join(lower.iter().collect::<PathBuf>()).join("lower-file");
    fs::OpenOptions::new().append(true).open(&lf).expect("copy-up of a deep lower file").write_all(b"+").unwrap();
    assert_eq!(fs::read(&lf).unwrap(), b"from the lower layer\n+");
    // Moving a deep directory up, and back (a redirect is recorded).
    let moved = mnt.join(name(b'M', b'm', 200));
    fs::rename(mnt.join(lower.iter().take(3).collect::<PathBuf>()), &moved).expect("rename a deep lower directory");
    let back = mnt.join(lower.iter().take(3).collect::<PathBuf>());
    fs::rename(&moved, &back).unwrap();
    assert_eq!(fs::read(&lf).unwrap(), b"from the lower layer\n+");
    // unlink at 4,000 bytes
    fs::remove_file(&b).expect("unlink at 4,000 bytes");
    assert_eq!(errno_of(&fs::metadata(&b).unwrap_err()), Errno::NOENT);
    fs::write(&a, b"stays\n").unwrap();
}

#[test]
fn paths_of_4000_bytes_under_an_upper_with_a_3000_byte_host_path() {
    if !fuse_ok("paths_of_4000_bytes_under_an_upper_with_a_3000_byte_host_path") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (store, id, lower) = deep_lower(t.path());
    let upper = long_host_dir(t.path(), 3000).join("upper");
    assert!(upper.as_os_str().len() > 3000);
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store.clone(), &[id], &mnt, &opts(&upper, true)).unwrap();
    deep_operations(&mnt, &lower);
    m.unmount().unwrap();
    // What was made is in the upper: a new mount shows it.
    let m = mount(store.clone(), &[id], &mnt, &opts(&upper, false)).unwrap();
    let mut rel = PathBuf::new();
    for i in 0..19 {
        rel.push(if i < lower.len() { lower[i].clone() } else { name(b'D', b'a' + i as u8, 200) });
    }
    assert_eq!(fs::read(mnt.join(rel.join(name(b'A', b'f', 181)))).unwrap(), b"stays\n");
    assert_eq!(errno_of(&fs::metadata(mnt.join(rel.join(name(b'B', b'f', 181)))).unwrap_err()), Errno::NOENT);
    let lf = mnt.join(lower.iter().collect::<PathBuf>()).join("lower-file");
    assert_eq!(fs::read(&lf).unwrap(), b"from the lower layer\n+");
    // Past PATH_MAX from the mount root, through a directory handle: the
    // kernel's overlayfs allows it, so does the union.
    let d = rustix::fs::open(mnt.join(&rel), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
    let further = name(b'X', b'x', 200);
    rustix::fs::mkdirat(&d, further.as_str(), Mode::from_raw_mode(0o755)).expect("mkdirat past PATH_MAX");
    let inner = format!("{further}/{}", name(b'Y', b'y', 200));
    let f = rustix::fs::openat(
        &d,
        inner.as_str(),
        OFlags::CREATE | OFlags::WRONLY | OFlags::EXCL,
        Mode::from_raw_mode(0o644),
    )
    .expect("create at 4,402 bytes from the mount root");
    rustix::io::write(&f, b"far").unwrap();
    drop(f);
    let st = rustix::fs::statat(&d, inner.as_str(), AtFlags::empty()).unwrap();
    assert_eq!(st.st_size, 3);
    rustix::fs::unlinkat(&d, inner.as_str(), AtFlags::empty()).expect("unlink past PATH_MAX");
    rustix::fs::unlinkat(&d, further.as_str(), AtFlags::REMOVEDIR).expect("rmdir past PATH_MAX");
    // A path of PATH_MAX bytes or more is the kernel's to refuse.
    let too_long = mnt.join("x/".repeat(2048));
    assert_eq!(errno_of(&fs::metadata(&too_long).unwrap_err()), Errno::NAMETOOLONG);
    drop(d);
    m.unmount().unwrap();
}

/// Files open while their last name goes: fstat gives nlink 0, and they
/// stay readable and writable. Lower file `a` and `b` hold "lower\n".
fn unlinked_while_open(mnt: &Path) {
    // A file made through the mount.
    let p = mnt.join("new-file");
    fs::write(&p, b"made here").unwrap();
    let mut f = fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    let m = f.metadata().unwrap();
    assert_eq!((m.nlink(), m.len()), (0, 9), "fstat of an open, unlinked new file");
    f.write_all_at(b"MADE", 0).unwrap();
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "MADE here");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    assert_eq!(errno_of(&fs::metadata(&p).unwrap_err()), Errno::NOENT);
    drop(f);

    // Opened without doing any I/O before the unlink, then written.
    fs::write(&p, b"second").unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    f.write_all_at(b"S", 0).unwrap();
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"Second");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    drop(f);

    // A lower file copied up by opening it for writing.
    let f = fs::OpenOptions::new().read(true).write(true).open(mnt.join("a")).unwrap();
    fs::remove_file(mnt.join("a")).unwrap();
    let m = f.metadata().unwrap();
    assert_eq!((m.nlink(), m.len()), (0, 6), "fstat of an open, unlinked copied-up file");
    drop(f);

    // A lower file open for reading only: its name is whited out.
    let f = fs::File::open(mnt.join("b")).unwrap();
    fs::remove_file(mnt.join("b")).unwrap();
    let m = f.metadata().unwrap();
    assert_eq!((m.nlink(), m.len()), (0, 6), "fstat of an open, unlinked lower file");
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"lower\n");
    drop(f);

    // One of two names removed: one left.
    fs::write(mnt.join("two"), b"2").unwrap();
    fs::hard_link(mnt.join("two"), mnt.join("names")).unwrap();
    let f = fs::File::open(mnt.join("two")).unwrap();
    fs::remove_file(mnt.join("two")).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 1);
    fs::remove_file(mnt.join("names")).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 0);
}

#[test]
fn fstat_of_an_open_unlinked_file_gives_nlink_0() {
    if !fuse_ok("fstat_of_an_open_unlinked_file_gives_nlink_0") {
        return;
    }
    for passthrough in [true, false] {
        let t = tempfile::tempdir().unwrap();
        let (dir, id) = store_with_files(t.path(), &[("a", b"lower\n"), ("b", b"lower\n")]);
        let store = Arc::new(Store::open(&dir).unwrap());
        let (upper, mnt) = (t.path().join("upper"), t.path().join("mnt"));
        fs::create_dir(&mnt).unwrap();
        let m = mount(store, &[id], &mnt, &opts(&upper, passthrough)).unwrap();
        unlinked_while_open(&mnt);
        m.unmount().unwrap();
        // Nothing of the unlinked files is left in the upper but whiteouts.
        let mut left: Vec<String> =
            fs::read_dir(&upper).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, [".xenod", "a", "b"], "passthrough {passthrough}");
        for w in ["a", "b"] {
            let m = fs::symlink_metadata(upper.join(w)).unwrap();
            assert!(
                FileType::from_raw_mode(m.mode()) == FileType::CharacterDevice && m.rdev() == 0,
                "{w} is not a whiteout"
            );
        }
    }
}

/// Every operation that takes a new name, with a name of `len` bytes, in
/// the mount at `mnt` (lower files `a255` and `a256`, lower directory `d`):
/// its errno, or None where it succeeded.
fn name_results(mnt: &Path, len: usize) -> Vec<(&'static str, Option<Errno>)> {
    let n = |c: u8| mnt.join(name(c, b'n', len));
    let n_in_d = |c: u8| mnt.join("d").join(name(c, b'n', len));
    let err = |r: std::io::Result<()>| r.err().map(|e| errno_of(&e));
    let rerr = |r: rustix::io::Result<()>| r.err();
    let lower = mnt.join(format!("a{len}"));
    fs::write(mnt.join("src"), b"s").unwrap();
    fs::create_dir_all(mnt.join("srcdir")).unwrap();
    vec![
        ("lookup", err(fs::symlink_metadata(n(b'l')).map(drop))),
        ("create", err(fs::write(n(b'c'), b"x"))),
        ("create in a lower directory", err(fs::write(n_in_d(b'c'), b"x"))),
        ("mkdir", err(fs::create_dir(n(b'm')))),
        ("mkdir in a lower directory", err(fs::create_dir(n_in_d(b'm')))),
        ("mkfifo", rerr(rustix::fs::mknodat(rustix::fs::CWD, n(b'f'), FileType::Fifo, Mode::from_raw_mode(0o600), 0))),
        ("symlink", err(std::os::unix::fs::symlink("t", n(b's')))),
        ("link", err(fs::hard_link(mnt.join("src"), n(b'h')))),
        ("link of a lower file", err(fs::hard_link(&lower, n(b'H')))),
        ("rename", err(fs::rename(mnt.join("src"), n(b'r')))),
        ("rename a directory", err(fs::rename(mnt.join("srcdir"), n(b'R')))),
        ("rename a lower file", err(fs::rename(&lower, n(b'A')))),
    ]
}

fn check_names(mnt: &Path, what: &str) -> Vec<(&'static str, Option<Errno>)> {
    let ok = name_results(mnt, 255);
    for (op, r) in &ok {
        assert_eq!(*r, if *op == "lookup" { Some(Errno::NOENT) } else { None }, "{what}: {op} of a 255-byte name");
    }
    let long = name_results(mnt, 256);
    for (op, r) in &long {
        assert_eq!(*r, Some(Errno::NAMETOOLONG), "{what}: {op} of a 256-byte name");
    }
    long
}

#[test]
fn names_over_255_bytes_give_enametoolong() {
    if !fuse_ok("names_over_255_bytes_give_enametoolong") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("a255"), b"lower\n").unwrap();
    fs::write(src.join("a256"), b"lower\n").unwrap();
    fs::write(src.join("d/in-d"), b"lower\n").unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let id = publish_dir(&store, &src, None);
    let (upper, mnt) = (t.path().join("upper"), t.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    let m = mount(store.clone(), &[id], &mnt, &opts(&upper, true)).unwrap();
    let ours = check_names(&mnt, "cowfs");
    m.unmount().unwrap();

    // The kernel's overlayfs on the same tree gives the same answers.
    let k = t.path().join("kernel");
    for d in ["upper", "work", "mnt"] {
        fs::create_dir_all(k.join(d)).unwrap();
    }
    if let Err(e) = kernel_overlay(&src, &k.join("upper"), &k.join("work"), &k.join("mnt")) {
        eprintln!("\n*** kernel overlayfs not mountable here ({e}): compared with the expected errnos only ***\n");
        return;
    }
    let theirs = std::panic::catch_unwind(|| check_names(&k.join("mnt"), "kernel overlayfs"));
    let _ = rustix::mount::unmount(
        CString::new(k.join("mnt").as_os_str().as_bytes()).unwrap().as_c_str(),
        rustix::mount::UnmountFlags::DETACH,
    );
    assert_eq!(ours, theirs.expect("the kernel's overlayfs disagrees with the expected errnos"));
}

/// Copy-up makes names in the parents' upper directories; the times the
/// union shows for those parents must not move (as on overlayfs), during
/// the mount or after it, or a commit records times the mount never showed.
#[test]
fn copy_up_keeps_the_parents_times() {
    if !fuse_ok("copy_up_keeps_the_parents_times") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("usr/lib")).unwrap();
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("usr/lib/f1"), b"one").unwrap();
    fs::write(src.join("etc/hostname"), b"h\n").unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let id = publish_dir(&store, &src, None);
    let (upper, mnt) = (t.path().join("upper"), t.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    let mtime = |p: &Path| {
        let m = fs::symlink_metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    let m = mount(store.clone(), &[id], &mnt, &opts(&upper, true)).unwrap();
    let (root, usr, etc) = (mtime(&mnt), mtime(&mnt.join("usr")), mtime(&mnt.join("etc")));
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::remove_file(mnt.join("usr/lib/f1")).unwrap(); // copies up usr and usr/lib
    fs::OpenOptions::new().append(true).open(mnt.join("etc/hostname")).unwrap().write_all(b"x\n").unwrap();
    assert_eq!((mtime(&mnt), mtime(&mnt.join("usr")), mtime(&mnt.join("etc"))), (root, usr, etc));
    m.unmount().unwrap();
    let m = mount(store, &[id], &mnt, &opts(&upper, true)).unwrap();
    assert_eq!((mtime(&mnt), mtime(&mnt.join("usr")), mtime(&mnt.join("etc"))), (root, usr, etc), "after a remount");
    assert_ne!(mtime(&mnt.join("usr/lib")), mtime(&src.join("usr/lib")), "an unlink in usr/lib moves its time");
    m.unmount().unwrap();
}

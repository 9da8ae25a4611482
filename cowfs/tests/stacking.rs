//! Per-subtree stacking (`.mount` files), read-only host directories as
//! lower layers, and passthrough-mode changes, through a real FUSE mount.
//! Need root and /dev/fuse.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use xenod_cowfs::{Error, MountOptions, commit, mount};
use xenod_store::{LayerId, Store};

fn opts(upper: Option<&Path>) -> MountOptions {
    MountOptions { upper: upper.map(Path::to_path_buf), threads: 2, ..Default::default() }
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn layer(store: &Store, dir: &Path, files: &[(&str, &[u8])]) -> LayerId {
    fs::create_dir_all(dir).unwrap();
    for (rel, data) in files {
        write(dir, rel, data);
    }
    fix_times(dir);
    publish_dir(store, dir, None)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

fn read(p: impl AsRef<Path>) -> String {
    let p = p.as_ref();
    String::from_utf8(fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))).unwrap()
}

#[test]
fn mount_files_overlay_layers_on_their_directory() {
    if !fuse_ok("mount_files_overlay_layers_on_their_directory") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    // C is mounted by a .mount file inside A: nesting.
    let c = layer(&store, &t.path().join("c"), &[("deep", b"C-deep")]);
    let a = layer(
        &store,
        &t.path().join("a"),
        &[("bin/app", b"A-app"), ("conf", b"A-conf"), ("only-a", b"a"), ("sub/.mount", format!("{c}\n").as_bytes())],
    );
    let b = layer(&store, &t.path().join("b"), &[("conf", b"B-conf"), ("only-b", b"b"), ("bin/tool", b"B-tool")]);
    // The first line is the highest priority.
    let mount_file = format!("# layers over /srv/app\n{a}\n\n  {b}  \n");
    let tdir = t.path().join("t");
    let base = layer(
        &store,
        &tdir,
        &[
            ("srv/app/.mount", mount_file.as_bytes()),
            ("srv/app/conf", b"T-conf"),
            ("srv/app/local", b"T-local"),
            ("etc/hostname", b"t"),
        ],
    );
    // An overlay above T changes a mounted file: layers above win.
    let odir = t.path().join("o");
    assert!(std::process::Command::new("cp").arg("-a").arg(&tdir).arg(&odir).status().unwrap().success());
    // (cp -a kept T's times, so only the new file and its directory differ.)
    write(&odir, "srv/app/only-b", b"O");
    let top = publish_overlay(&store, base, &odir);
    let stack = store.stack(&top).unwrap();

    let mnt = t.path().join("mnt");
    let upper = t.path().join("upper");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store.clone(), &stack, &mnt, &opts(Some(&upper))).unwrap();
    let app = mnt.join("srv/app");
    assert_eq!(read(app.join("conf")), "A-conf", "the first line's layer is on top");
    assert_eq!(read(app.join("only-b")), "O", "a layer above the .mount's layer overrides mounted ones");
    assert_eq!(read(app.join("only-a")), "a");
    assert_eq!(read(app.join("local")), "T-local", "the directory's own entries stay");
    assert_eq!(read(app.join("bin/app")), "A-app");
    assert_eq!(read(app.join("bin/tool")), "B-tool", "directories of mounted layers merge");
    assert_eq!(read(app.join("sub/deep")), "C-deep", "a mounted layer's own .mount is followed");
    assert_eq!(names(&app), [".mount", "bin", "conf", "local", "only-a", "only-b", "sub"]);
    assert_eq!(names(&app.join("bin")), ["app", "tool"]);
    assert_eq!(read(mnt.join("etc/hostname")), "t");
    // Writes copy up from the mounted layer.
    let mut f = fs::OpenOptions::new().append(true).open(app.join("conf")).unwrap();
    f.write_all(b"+local change").unwrap();
    drop(f);
    assert_eq!(read(app.join("conf")), "A-conf+local change");
    assert_eq!(read(upper.join("srv/app/conf")), "A-conf+local change");
    m.unmount().unwrap();

    // Committing records the change, not the mounted layers' content again.
    let stats = commit(store.clone(), &stack, &upper, Default::default()).unwrap();
    let paths: Vec<String> =
        store.read_layer(&stats.id).unwrap().map(|e| String::from_utf8(e.unwrap().path).unwrap()).collect();
    assert!(paths.contains(&"srv/app/conf".to_string()), "{paths:?}");
    assert!(!paths.iter().any(|p| p.ends_with("only-a") || p.ends_with("deep")), "{paths:?}");
    let stack2 = store.stack(&stats.id).unwrap();
    let m = mount(store.clone(), &stack2, &mnt, &opts(None)).unwrap();
    assert_eq!(read(mnt.join("srv/app/conf")), "A-conf+local change", "the committed change is above the mount");
    assert_eq!(read(mnt.join("srv/app/only-a")), "a");
    m.unmount().unwrap();
}

#[test]
fn unknown_mount_reference_fails_the_mount_naming_file_and_reference() {
    if !fuse_ok("unknown_mount_reference_fails_the_mount_naming_file_and_reference") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let good = layer(&store, &t.path().join("g"), &[("x", b"x")]);
    let base = layer(
        &store,
        &t.path().join("t"),
        &[("opt/data/.mount", format!("{good}\ntemplate://nobody/missing/1\n").as_bytes())],
    );
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let err = match mount(store.clone(), &[base], &mnt, &opts(None)) {
        Ok(_) => panic!("a .mount naming an unknown layer must fail the mount"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::MountRef { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("/opt/data/.mount") && msg.contains("template://nobody/missing/1"), "{msg}");
    assert!(!xenod_cowfs::is_mounted(&mnt), "nothing is mounted");
}

#[test]
fn host_directories_are_read_only_lowers_in_priority_order() {
    if !fuse_ok("host_directories_are_read_only_lowers_in_priority_order") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let base = layer(
        &store,
        &t.path().join("t"),
        &[("etc/conf", b"store"), ("etc/gone", b"hidden by a host whiteout"), ("usr/bin/tool", b"tool")],
    );
    let h1: PathBuf = t.path().join("h1");
    let h2: PathBuf = t.path().join("h2");
    write(&h1, "etc/conf", b"host one");
    write(&h1, "h1-only", b"one");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        h1.join("etc/gone"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .unwrap();
    write(&h2, "etc/conf", b"host two");
    write(&h2, "h2-only", b"two");
    write(&h2, "big", &noise(3 << 20, 7));
    fs::hard_link(h2.join("h2-only"), h2.join("h2-link")).unwrap();

    let mnt = t.path().join("mnt");
    let upper = t.path().join("upper");
    fs::create_dir(&mnt).unwrap();
    let o = MountOptions { lower_dirs: vec![h1.clone(), h2.clone()], ..opts(Some(&upper)) };
    let m = mount(store.clone(), &[base], &mnt, &o).unwrap();
    assert_eq!(read(mnt.join("etc/conf")), "host one", "the first host directory is the highest");
    assert_eq!(read(mnt.join("h1-only")), "one");
    assert_eq!(read(mnt.join("h2-only")), "two");
    assert_eq!(read(mnt.join("usr/bin/tool")), "tool", "the store stack is below");
    assert!(!mnt.join("etc/gone").exists(), "a host whiteout hides the store's file");
    assert_eq!(names(&mnt.join("etc")), ["conf"]);
    assert_eq!(fs::read(mnt.join("big")).unwrap(), noise(3 << 20, 7));
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (fs::metadata(mnt.join("h2-only")).unwrap(), fs::metadata(mnt.join("h2-link")).unwrap());
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "hardlinks of a host directory stay one file");
    // Writes copy up; the host directory is never written.
    let mut f = fs::OpenOptions::new().read(true).write(true).open(mnt.join("big")).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(b"changed").unwrap();
    drop(f);
    fs::remove_file(mnt.join("h1-only")).unwrap();
    let mut want = noise(3 << 20, 7);
    want[1 << 20..(1 << 20) + 7].copy_from_slice(b"changed");
    assert_eq!(fs::read(mnt.join("big")).unwrap(), want);
    assert_eq!(fs::read(upper.join("big")).unwrap(), want);
    assert!(!mnt.join("h1-only").exists());
    assert!(fs::symlink_metadata(upper.join("h1-only")).unwrap().file_type().is_char_device(), "a whiteout");
    assert_eq!(fs::read(h2.join("big")).unwrap(), noise(3 << 20, 7), "the host file is untouched");
    assert_eq!(read(h1.join("h1-only")), "one");
    m.unmount().unwrap();

    let missing = t.path().join("nope");
    let o = MountOptions { lower_dirs: vec![missing.clone()], ..opts(None) };
    let err = mount(store, &[base], &mnt, &o).err().expect("a missing lower directory fails the mount");
    assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
}

/// A file read through a handle served by this process, then opened for
/// writing (copy-up, where the kernel may pass through) and written while
/// the first handle is open, then reopened: every handle sees the bytes
/// written, whichever way the kernel does the I/O.
#[test]
fn handles_across_copy_up_and_passthrough_see_one_file() {
    if !fuse_ok("handles_across_copy_up_and_passthrough_see_one_file") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let base = layer(&store, &t.path().join("t"), &[("f", b"lower data"), ("g", b"gggg")]);
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store.clone(), &[base], &mnt, &opts(Some(&t.path().join("upper")))).unwrap();
    let mut r = fs::File::open(mnt.join("f")).unwrap();
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "lower data");
    let mut w = fs::OpenOptions::new().write(true).open(mnt.join("f")).unwrap();
    w.write_all(b"UPPER").unwrap();
    drop(w);
    drop(r);
    assert_eq!(read(mnt.join("f")), "UPPER data");
    // Now only upper handles: two at once, writes seen by the other.
    let mut a = fs::OpenOptions::new().read(true).write(true).open(mnt.join("f")).unwrap();
    let mut b = fs::File::open(mnt.join("f")).unwrap();
    a.seek(SeekFrom::End(0)).unwrap();
    a.write_all(b" and more").unwrap();
    let mut s = String::new();
    b.read_to_string(&mut s).unwrap();
    assert_eq!(s, "UPPER data and more");
    assert_eq!(fs::metadata(mnt.join("f")).unwrap().len(), 19);
    drop((a, b));
    // A created file (served here) reopened while still open.
    let mut c = fs::File::create(mnt.join("new")).unwrap();
    c.write_all(b"created").unwrap();
    assert_eq!(read(mnt.join("new")), "created");
    drop(c);
    let mut d = fs::OpenOptions::new().append(true).open(mnt.join("new")).unwrap();
    d.write_all(b"+appended").unwrap();
    drop(d);
    assert_eq!(read(mnt.join("new")), "created+appended");
    m.unmount().unwrap();
}

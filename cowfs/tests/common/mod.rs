//! Shared helpers: generated trees, publishing, and FUSE availability.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::path::Path;

use xenod_store::{ImportOptions, LayerId, LayerWriter, Store, import_dir};

pub use xenod_store::testing::noise;

/// Whether FUSE mounts can be made here; says loudly why not.
pub fn fuse_ok(test: &str) -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("\n*** SKIPPING {test}: /dev/fuse does not exist on this machine ***\n");
        return false;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("\n*** SKIPPING {test}: needs root (mounts, trusted.* xattrs, device nodes) ***\n");
        return false;
    }
    true
}

fn set_times(p: &Path, secs: i64, nanos: i64) {
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: secs, tv_nsec: nanos as _ },
        last_modification: rustix::fs::Timespec { tv_sec: secs, tv_nsec: nanos as _ },
    };
    rustix::fs::utimensat(rustix::fs::CWD, p, &t, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn collect(p: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            collect(&e.path(), out);
        }
    }
}

/// Fixes every time in a tree (deepest first, so children do not move them).
pub fn fix_times(root: &Path) {
    let mut all = Vec::new();
    collect(root, &mut all);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_times(p, 1_600_000_000 + i as i64, (i as i64 * 7919) % 1_000_000_000);
    }
    set_times(root, 1_500_000_000, 5);
}

/// A tree with every entry kind, boundary-sized files, hardlinks, xattrs.
pub fn build_tree(root: &Path) {
    use xenod_store::{CDC_AVG, CDC_MAX, CDC_MIN};
    fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    for (i, &n) in [0, 1, CDC_MIN - 1, CDC_MIN, CDC_AVG, CDC_MAX, CDC_MAX + 1, 3 * CDC_MAX + 17].iter().enumerate() {
        fs::write(root.join(format!("dir/size-{n}")), noise(n, i as u64)).unwrap();
    }
    fs::write(root.join("dir/sub/text"), b"hello\n".repeat(50_000)).unwrap();
    fs::write(root.join("zeros"), vec![0u8; 3 * CDC_MAX]).unwrap();
    fs::write(root.join("z-data"), noise(100_000, 99)).unwrap();
    fs::hard_link(root.join("z-data"), root.join("a-link")).unwrap();
    fs::hard_link(root.join("z-data"), root.join("dir/sub/b-link")).unwrap();
    symlink("dir/sub/text", root.join("rel-link")).unwrap();
    symlink("dangling/target", root.join("dangling")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    drop(std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap());
    fs::write(root.join("suid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(root.join("disk.img"), noise(5 * 65536 + 100, 5)).unwrap();
    rustix::fs::setxattr(root.join("dir/size-1"), "user.note", b"a value", rustix::fs::XattrFlags::empty()).unwrap();
    rustix::fs::setxattr(root.join("dir"), "user.dir", b"", rustix::fs::XattrFlags::empty()).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("loop9"),
        rustix::fs::FileType::BlockDevice,
        rustix::fs::Mode::from_raw_mode(0o660),
        rustix::fs::makedev(7, 300),
    )
    .unwrap();
    rustix::fs::chown(
        root.join("dir/size-0"),
        Some(rustix::fs::Uid::from_raw(1234)),
        Some(rustix::fs::Gid::from_raw(5678)),
    )
    .unwrap();
    fix_times(root);
}

pub fn publish_dir(store: &Store, dir: &Path, base: Option<LayerId>) -> LayerId {
    let mut w = LayerWriter::new(store);
    import_dir(store, dir, &ImportOptions::default(), &mut |e| w.push(&e)).unwrap();
    w.finish(base, Default::default()).unwrap()
}

/// An overlay of `new` over `base` (both complete trees).
/// A store in `t/store` holding one layer of `files` (name, contents),
/// published from `t/src`.
pub fn store_with_files(t: &Path, files: &[(&str, &[u8])]) -> (std::path::PathBuf, LayerId) {
    let src = t.join("src");
    fs::create_dir_all(&src).unwrap();
    for (n, d) in files {
        fs::write(src.join(n), d).unwrap();
    }
    let dir = t.join("store");
    let store = Store::open(&dir).unwrap();
    let id = publish_dir(&store, &src, None);
    (dir, id)
}

pub fn publish_overlay(store: &Store, base: LayerId, new: &Path) -> LayerId {
    let mut entries = Vec::new();
    import_dir(store, new, &ImportOptions::default(), &mut |e| {
        entries.push(Ok(e));
        Ok(())
    })
    .unwrap();
    let mut w = LayerWriter::new(store);
    for e in xenod_store::diff(xenod_store::Merged::of(store, &base).unwrap(), entries.into_iter()) {
        w.push(&e.unwrap()).unwrap();
    }
    w.finish(Some(base), Default::default()).unwrap()
}

pub fn export(store: &Store, stack: &[LayerId], dest: &Path) {
    xenod_store::export_dir(store, xenod_store::Merged::new(store, stack).unwrap(), dest, &|_| {}).unwrap();
}

/// Compares two trees line by line.
pub fn assert_same_listing(a: &[String], b: &[String], what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x, y, "{what} differ");
    }
    assert_eq!(a.len(), b.len(), "{what} differ in length:\n{a:#?}\n{b:#?}");
}

/// Mounts the kernel's overlayfs with the options the differential test
/// compares against (redirect_dir on, no index, metacopy or xino).
pub fn kernel_overlay(lower: &Path, upper: &Path, work: &Path, mnt: &Path) -> rustix::io::Result<()> {
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=on,index=off,metacopy=off,xino=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    rustix::mount::mount(
        c(Path::new("overlay")),
        c(mnt),
        c(Path::new("overlay")),
        rustix::mount::MountFlags::empty(),
        Some(std::ffi::CString::new(opts).unwrap().as_c_str()),
    )
}

/// Flips bytes of a chunk inside its pack file.
pub fn flip_chunk(store_dir: &Path, loc: &xenod_store::Location) {
    let pack = store_dir.join("packs").join(format!("{:016x}.pack", loc.pack));
    let f = fs::OpenOptions::new().read(true).write(true).open(&pack).unwrap();
    // In a solid block, the member's bytes sit after the member table at
    // about their place in the block (noise is stored uncompressed).
    let at = if loc.encoding == xenod_store::Encoding::Block {
        // The first word counts members in its low 24 bits (the top byte
        // is the block's zstd level).
        let mut n = [0u8; 4];
        f.read_exact_at(&mut n[..3], loc.offset).unwrap();
        loc.offset + 4 + 36 * u32::from_le_bytes(n) as u64 + (loc.inner + loc.plain_len / 2) as u64
    } else {
        loc.offset + 4
    };
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    for x in &mut b {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, at).unwrap();
}

/// A listing line without times, overlayfs's bookkeeping xattrs, and
/// either side's work directory.
pub fn normalize(lines: Vec<String>) -> Vec<String> {
    lines
        .into_iter()
        .filter(|l| !l.starts_with("/.xenod") && !l.starts_with("/work"))
        .map(|l| {
            let mut out = Vec::new();
            for part in l.split(' ') {
                if part.starts_with("mtime=") {
                    continue;
                }
                if let Some(x) = part.strip_prefix("xattrs=[") {
                    let x = x.trim_end_matches(']');
                    let kept: Vec<&str> = x
                        .split(',')
                        .filter(|a| {
                            !a.is_empty()
                                && !a.starts_with("trusted.overlay.origin=")
                                && !a.starts_with("trusted.overlay.impure=")
                                && !a.starts_with("trusted.overlay.uuid=")
                        })
                        .collect();
                    out.push(format!("xattrs=[{}]", kept.join(",")));
                    continue;
                }
                out.push(part.to_string());
            }
            out.join(" ")
        })
        .collect()
}

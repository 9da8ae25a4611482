//! Shared helpers: generated trees with every entry kind, and publish/export
//! through the library.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use xenod_store::{
    CDC_AVG, CDC_MAX, CDC_MIN, ChunkId, Extent, ImportOptions, Kind, LayerId, LayerWriter, Merged, Store, export_dir,
    import_dir,
};

pub use xenod_store::testing::noise;

/// Sizes around every chunking boundary.
pub const INTERESTING_SIZES: &[usize] =
    &[0, 1, CDC_MIN - 1, CDC_MIN, CDC_MIN + 1, CDC_AVG, CDC_MAX - 1, CDC_MAX, CDC_MAX + 1, 3 * CDC_MAX + 17];

fn set_times(p: &Path, secs: i64, nanos: i64) {
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: secs, tv_nsec: nanos as _ },
        last_modification: rustix::fs::Timespec { tv_sec: secs, tv_nsec: nanos as _ },
    };
    rustix::fs::utimensat(rustix::fs::CWD, p, &t, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn mknod(p: &Path, ft: rustix::fs::FileType, dev: u64) {
    rustix::fs::mknodat(rustix::fs::CWD, p, ft, rustix::fs::Mode::from_raw_mode(0o640), dev).unwrap();
}

/// Whether this process may create device nodes and chown (root).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A tree with every entry kind and boundary-sized files. `big_sparse`
/// adds a multi-GiB sparse image.
pub fn build_tree(root: &Path, big_sparse: bool) {
    fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    for (i, &n) in INTERESTING_SIZES.iter().enumerate() {
        fs::write(root.join(format!("dir/size-{n}")), noise(n, i as u64)).unwrap();
    }
    fs::write(root.join("dir/sub/text"), b"hello\n".repeat(50_000)).unwrap();
    fs::write(root.join("zeros"), vec![0u8; 3 * CDC_MAX]).unwrap();
    // Hardlink set whose first name in tree order is not the one written first.
    fs::write(root.join("z-data"), noise(100_000, 99)).unwrap();
    fs::hard_link(root.join("z-data"), root.join("a-link")).unwrap();
    fs::hard_link(root.join("z-data"), root.join("dir/sub/b-link")).unwrap();
    symlink("dir/sub/text", root.join("rel-link")).unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    symlink("dangling/target", root.join("dangling")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    drop(sock);
    fs::write(root.join("suid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(root.join("disk.img"), noise(5 * 65536 + 100, 5)).unwrap();
    rustix::fs::setxattr(root.join("dir/size-1"), "user.note", b"a value", rustix::fs::XattrFlags::empty()).unwrap();
    rustix::fs::setxattr(root.join("dir"), "user.dir", b"", rustix::fs::XattrFlags::empty()).unwrap();
    if is_root() {
        mknod(&root.join("null"), rustix::fs::FileType::CharacterDevice, rustix::fs::makedev(1, 3));
        mknod(&root.join("loop9"), rustix::fs::FileType::BlockDevice, rustix::fs::makedev(7, 9));
        rustix::fs::chown(
            root.join("dir/size-0"),
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(5678)),
        )
        .unwrap();
        rustix::fs::setxattr(root.join("suid"), "trusted.overlay.test", b"t", rustix::fs::XattrFlags::empty()).unwrap();
        rustix::fs::setxattr(
            root.join("dir/size-1"),
            "security.capability",
            &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    if big_sparse {
        let f = fs::File::create(root.join("huge.img")).unwrap();
        f.set_len(3 << 30).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&noise(70_000, 3), 1 << 30).unwrap();
        f.write_all_at(b"tail", (3 << 30) - 4).unwrap();
    }
    // Times last, deepest first, so creating children does not move them.
    let mut all = Vec::new();
    collect(root, &mut all);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_times(p, 1_600_000_000 + i as i64, (i as i64 * 7919) % 1_000_000_000);
    }
    set_times(root, 1_500_000_000, 5);
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

pub fn publish_dir(store: &Store, dir: &Path) -> LayerId {
    let mut w = LayerWriter::new(store);
    import_dir(store, dir, &ImportOptions::default(), &mut |e| w.push(&e)).unwrap();
    w.finish(None, Default::default()).unwrap()
}

pub fn export(store: &Store, id: &LayerId, dest: &Path) {
    export_dir(store, Merged::of(store, id).unwrap(), dest, &|_| {}).unwrap();
}

/// Compares two trees entry by entry (the root's own line included).
pub fn assert_same_tree(a: &Path, b: &Path) {
    let la = xenod_store::tree_listing(a).unwrap();
    let lb = xenod_store::tree_listing(b).unwrap();
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x, y, "trees differ");
    }
    assert_eq!(la.len(), lb.len(), "trees differ in length:\n{la:#?}\n{lb:#?}");
}

pub fn name(p: &str) -> &OsStr {
    OsStr::new(p)
}

/// The first data chunk of the file at `path` in `id`.
pub fn data_chunk(store: &Store, id: &LayerId, path: &[u8]) -> ChunkId {
    for e in store.read_layer(id).unwrap() {
        let e = e.unwrap();
        if e.path == path
            && let Kind::File { extents, .. } = e.kind
            && let Some(Extent::Data { id, .. }) = extents.first()
        {
            return *id;
        }
    }
    panic!("no data chunk at {}", String::from_utf8_lossy(path));
}

/// Flips one byte in the middle of `chunk`'s stored record; returns its pack.
pub fn flip_byte(store: &Store, chunk: &ChunkId) -> u64 {
    let loc = store.locate(chunk).unwrap().unwrap();
    let pack = store.root().join("packs").join(format!("{:016x}.pack", loc.pack));
    let f = fs::OpenOptions::new().read(true).write(true).open(pack).unwrap();
    let mut b = [0u8];
    let at = loc.offset + loc.stored_len as u64 / 2;
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0x40], at).unwrap();
    loc.pack
}

//! Golden data: any change to chunking or to the manifest encoding shows
//! up as a diff of a committed file. Regenerate deliberately with
//! `XENOD_UPDATE_GOLDEN=1 cargo test -p xenod-store --test golden` and
//! bump `FORMAT_VERSION` when ids change.

mod common;

use std::path::Path;

use xenod_store::{Cdc, ChunkId, Chunking, Entry, Extent, Kind, LayerWriter, Store, Timestamp, Xattr};

fn check_golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("XENOD_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    if want != actual {
        let first = want.lines().zip(actual.lines()).position(|(a, b)| a != b);
        panic!(
            "{name} changed (first differing line {:?}; {} lines golden, {} now). \
             If intended, regenerate and bump FORMAT_VERSION.",
            first.map(|i| i + 1),
            want.lines().count(),
            actual.lines().count()
        );
    }
}

#[test]
fn chunker_32mib_seeded() {
    let data = common::noise(32 << 20, 42);
    let mut out = String::new();
    let mut start = 0;
    for end in Cdc::default().cuts(&data) {
        out += &format!("{} {}\n", end - start, ChunkId::of(&data[start..end]));
        start = end;
    }
    check_golden("chunks-32mib.txt", &out);
}

#[test]
fn manifest_encoding_pins_layer_id() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let base = |path: &str, kind: Kind| Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o755,
        uid: 1,
        gid: 2,
        mtime: Timestamp { secs: 1_700_000_000, nanos: 123 },
        xattrs: vec![],
    };
    let mut w = LayerWriter::new(&store);
    let mut root = base("", Kind::Dir { opaque: false });
    root.xattrs = vec![Xattr { name: b"user.a".to_vec(), value: b"1".to_vec() }];
    for e in [
        root,
        base("bin", Kind::Dir { opaque: true }),
        base(
            "bin/sh",
            Kind::File {
                size: 70_000,
                chunking: Chunking::Cdc,
                extents: vec![Extent::Data { id: ChunkId::of(b"x"), len: 65_536 }, Extent::Hole { len: 4_464 }],
            },
        ),
        base("dev", Kind::Dir { opaque: false }),
        base("dev/null", Kind::CharDev { rdev: 0x103 }),
        base("gone", Kind::Whiteout),
        base("link", Kind::Symlink { target: b"bin/sh".to_vec() }),
    ] {
        w.push(&e).unwrap();
    }
    let id = w.finish(None, [("k".to_string(), "v".to_string())].into()).unwrap();
    check_golden("layer-id.txt", &format!("{id}\n"));
}

#[test]
fn fixed_chunking_is_aligned_blocks() {
    let data = common::noise(5 * 65536 + 3, 1);
    let mut b = xenod_store::Batcher::new(data.as_slice(), Chunking::Fixed);
    let mut lens = Vec::new();
    while let Some(batch) = b.next_batch().unwrap() {
        lens.extend(batch.chunks().map(<[u8]>::len));
    }
    assert_eq!(lens, [65536, 65536, 65536, 65536, 65536, 3]);
}

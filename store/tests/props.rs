//! Property tests: manifests round trip through the store, and an overlay
//! computed by `diff` applied on its base gives back the new tree.

use std::collections::BTreeSet;

use proptest::prelude::*;
use xenod_store::{
    ChunkId, Chunking, Entry, Extent, Kind, LayerWriter, Merged, Store, Timestamp, Xattr, cmp_paths, diff,
};

/// A tree: paths over a small alphabet (so trees overlap), ancestors added
/// as directories, each leaf a random kind.
fn tree() -> impl Strategy<Value = Vec<Entry>> {
    let path = prop::collection::vec(prop::sample::select(vec!["a", "b", "c.d", "e-f"]), 1..4);
    let leaf = (0u8..5, 0u32..0o7777, 0u32..3, any::<u16>(), prop::option::of(any::<u8>()));
    prop::collection::vec((path, leaf), 0..24).prop_map(|items| {
        let mut dirs = BTreeSet::new();
        let mut leaves = Vec::new();
        for (p, leaf) in items {
            for i in 1..p.len() {
                dirs.insert(p[..i].join("/"));
            }
            leaves.push((p.join("/"), leaf));
        }
        let mut out: Vec<Entry> = vec![entry("", Kind::Dir { opaque: false }, 0o755, 0, 0, None)];
        for d in &dirs {
            out.push(entry(d, Kind::Dir { opaque: false }, 0o755, 0, 0, None));
        }
        for (p, (k, mode, uid, seed, x)) in leaves {
            if dirs.contains(&p) || out.iter().any(|e| e.path == p.as_bytes()) {
                continue;
            }
            let kind = match k {
                0 => Kind::Dir { opaque: false },
                1 => Kind::Symlink { target: format!("t{seed}").into_bytes() },
                2 => Kind::Fifo,
                _ => {
                    let len = seed as u32 % 5000 + 1;
                    Kind::File {
                        size: len as u64 + 10,
                        chunking: Chunking::Cdc,
                        extents: vec![
                            Extent::Data { id: ChunkId::of(&seed.to_le_bytes()), len },
                            Extent::Hole { len: 10 },
                        ],
                    }
                }
            };
            out.push(entry(&p, kind, mode, uid, seed as i64, x));
        }
        out.sort_by(|a, b| cmp_paths(&a.path, &b.path));
        out
    })
}

fn entry(path: &str, kind: Kind, mode: u32, uid: u32, secs: i64, x: Option<u8>) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode,
        uid,
        gid: uid,
        mtime: Timestamp { secs, nanos: 0 },
        xattrs: x.map(|v| vec![Xattr { name: b"user.x".to_vec(), value: vec![v] }]).unwrap_or_default(),
    }
}

fn write(store: &Store, entries: &[Entry], base: Option<ChunkId>) -> ChunkId {
    let mut w = LayerWriter::new(store);
    for e in entries {
        w.push(e).unwrap();
    }
    w.finish(base, Default::default()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn manifest_round_trip(t in tree()) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = write(&store, &t, None);
        let back: Vec<Entry> = store.read_layer(&id).unwrap().map(Result::unwrap).collect();
        prop_assert_eq!(&back, &t);
        prop_assert_eq!(write(&store, &back, None), id, "same entries, same id");
    }

    #[test]
    fn diff_then_merge_gives_new_tree(base in tree(), new in tree()) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let base_id = write(&store, &base, None);
        let overlay: Vec<Entry> = diff(base.clone().into_iter().map(Ok), new.clone().into_iter().map(Ok))
            .map(Result::unwrap)
            .collect();
        let top = write(&store, &overlay, Some(base_id));
        let merged: Vec<Entry> = Merged::of(&store, &top).unwrap().map(Result::unwrap).collect();
        prop_assert_eq!(merged, new);
        // Nothing unchanged is recorded, apart from the root and parents.
        for e in &overlay {
            if let Some(b) = base.iter().find(|b| b.path == e.path) {
                prop_assert!(b != e || e.is_dir(), "unchanged {:?} recorded", e.display_path());
            }
        }
    }
}

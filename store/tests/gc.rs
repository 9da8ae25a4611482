//! gc sweeps what no root reaches and rewrites mostly dead packs, keeping
//! the live members of solid blocks readable.

mod common;

use std::fs;

use xenod_store::{Encoding, Store};

#[test]
fn gc_rewrites_a_mostly_dead_pack_and_keeps_live_block_members() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("keep")).unwrap();
    fs::create_dir_all(src.join("drop")).unwrap();
    for i in 0..20u64 {
        fs::write(src.join(format!("keep/f{i}")), common::noise(20_000, i)).unwrap();
    }
    fs::write(src.join("drop/big"), common::noise(3_000_000, 99)).unwrap();
    let store = Store::open(t.path().join("store")).unwrap();
    let whole = common::publish_dir(&store, &src);
    // Only the "keep" subtree is pinned: its chunks are all in the pack
    // written for the whole tree, next to three times as many dead bytes.
    let keep = common::publish_dir(&store, &src.join("keep"));
    store.pin("keep", &keep).unwrap();
    let packs_before = fs::read_dir(store.root().join("packs")).unwrap().count();
    let member = {
        let e = store.read_layer(&keep).unwrap().map(Result::unwrap).find(|e| e.path == b"f3").unwrap();
        match e.kind {
            xenod_store::Kind::File { extents, .. } => match extents[0] {
                xenod_store::Extent::Data { id, .. } => id,
                _ => panic!("hole"),
            },
            _ => panic!("not a file"),
        }
    };
    assert_eq!(store.locate(&member).unwrap().unwrap().encoding, Encoding::Block);

    let stats = store.gc().unwrap();
    assert_eq!(stats.rewritten_packs, 1, "{stats:?}");
    assert!(stats.removed_chunks > 0 && stats.freed_bytes > 2_000_000, "{stats:?}");
    assert_eq!(fs::read_dir(store.root().join("packs")).unwrap().count(), packs_before);
    assert!(!store.contains(&whole).unwrap(), "the unpinned layer is gone");

    let store = Store::open(store.root()).unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(store.locate(&member).unwrap().unwrap().encoding, Encoding::Block, "re-blocked, not unpacked");
    let out = t.path().join("out");
    common::export(&store, &keep, &out);
    for i in 0..20u64 {
        assert_eq!(fs::read(out.join(format!("f{i}"))).unwrap(), common::noise(20_000, i));
    }
}

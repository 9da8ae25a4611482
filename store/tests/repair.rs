//! Damage marks and pack rewrites: a chunk whose stored copy is damaged is
//! written anew when the same data comes again, and its pack is rewritten
//! without the bad record; a pack whose only copy of a chunk is damaged is
//! kept.

mod common;

use std::fs;
use std::path::Path;

use xenod_store::{ChunkId, Encoding, Extent, Kind, PackRewrite, Store};

fn tree(src: &Path) {
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/data"), common::noise(300_000, 7)).unwrap();
    fs::write(src.join("small"), b"small file").unwrap();
}

fn pack_exists(store: &Store, pack: u64) -> bool {
    store.root().join("packs").join(format!("{pack:016x}.pack")).exists()
}

#[test]
fn republishing_replaces_a_damaged_chunk_and_the_pack_is_rewritten_without_it() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    tree(&src);
    let store = Store::open(t.path().join("store")).unwrap();
    let id = common::publish_dir(&store, &src);
    store.pin("t", &id).unwrap();
    let bad = common::data_chunk(&store, &id, b"d/data");
    assert_eq!(store.locate(&bad).unwrap().unwrap().encoding, Encoding::Block);
    let pack = common::flip_byte(&store, &bad);

    let r = store.verify().unwrap();
    assert!(!r.is_clean());
    assert_eq!(r.damaged_packs, vec![pack], "{r:#?}");
    let damaged: Vec<ChunkId> = r.damage.iter().map(|d| d.chunk).collect();
    assert!(store.is_marked_damaged().unwrap());
    let marks: Vec<ChunkId> = store.damage_marks().unwrap().into_iter().map(|m| m.0).collect();
    for c in &damaged {
        assert!(marks.contains(c), "verify marks {c}");
        assert!(!store.holds_intact(c).unwrap(), "a fetch does not skip {c}");
    }
    // The pack cannot be rewritten yet: its damaged records are the only copies.
    assert!(matches!(store.rewrite_pack(pack).unwrap(), PackRewrite::Kept { .. }));
    assert!(pack_exists(&store, pack));

    // Publishing the same tree again writes the damaged chunks anew.
    let again = common::publish_dir(&store, &src);
    assert_eq!(again, id);
    assert!(!store.is_marked_damaged().unwrap(), "{:?}", store.damage_marks().unwrap());
    let r = store.verify().unwrap();
    assert!(r.is_clean(), "{r:#?}");
    assert_eq!(r.damaged_packs, vec![pack], "the dead damaged record is still in its pack");
    for c in &damaged {
        assert_ne!(store.locate(c).unwrap().unwrap().pack, pack, "{c} moved to a new pack");
    }

    // The pack is rewritten without the dead, damaged record.
    let PackRewrite::Rewritten { into, .. } = store.rewrite_pack(pack).unwrap() else { panic!("not rewritten") };
    assert!(!pack_exists(&store, pack));
    if let Some(new) = into {
        assert!(pack_exists(&store, new));
    }
    let store = Store::open(store.root()).unwrap();
    let r = store.verify().unwrap();
    assert!(r.is_clean() && r.damaged_packs.is_empty(), "{r:#?}");
    let out = t.path().join("out");
    common::export(&store, &id, &out);
    common::assert_same_tree(&src, &out);
}

#[test]
fn a_read_that_meets_damage_marks_it_and_other_layers_stay_usable() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    tree(&a);
    fs::create_dir_all(&b).unwrap();
    fs::write(b.join("other"), common::noise(200_000, 11)).unwrap();
    let store = Store::open(t.path().join("store")).unwrap();
    let la = common::publish_dir(&store, &a);
    store.flush().unwrap();
    let lb = common::publish_dir(&store, &b);
    let bad = common::data_chunk(&store, &la, b"d/data");
    common::flip_byte(&store, &bad);
    let store = Store::open(store.root()).unwrap();
    assert!(!store.is_marked_damaged().unwrap());
    // Which members of the block the flip damages depends on where it falls.
    let mut all = Vec::new();
    for e in store.read_layer(&la).unwrap() {
        if let Kind::File { extents, .. } = e.unwrap().kind {
            all.extend(extents.iter().filter_map(|x| match x {
                Extent::Data { id, .. } => Some(*id),
                Extent::Hole { .. } => None,
            }));
        }
    }
    assert!(all.contains(&bad));
    let failed: Vec<ChunkId> = all.into_iter().filter(|c| store.get(c).is_err()).collect();
    assert!(!failed.is_empty());
    let marks: Vec<ChunkId> = store.damage_marks().unwrap().into_iter().map(|m| m.0).collect();
    let mut failed = failed;
    failed.sort();
    assert_eq!(marks, failed, "a failed read marks the chunk");
    assert!(!store.holds_intact(&failed[0]).unwrap());
    // Everything else still reads.
    let out = t.path().join("out");
    common::export(&store, &lb, &out);
    common::assert_same_tree(&b, &out);
}

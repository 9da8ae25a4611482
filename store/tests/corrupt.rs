//! Damaged stores and hostile manifests: each case gives a clear error
//! naming what and where, and nothing is written outside the destination.

mod common;

use std::fs;
use std::path::Path;

use xenod_store::{
    ChunkId, ChunkRef, Entry, Error, Extent, FORMAT_VERSION, Kind, LayerRoot, Merged, Store, export_dir,
};

fn store_with_tree(dir: &Path) -> (Store, ChunkId) {
    let src = dir.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/data"), common::noise(300_000, 7)).unwrap();
    fs::write(src.join("small"), b"small file").unwrap();
    let store = Store::open(dir.join("store")).unwrap();
    let id = common::publish_dir(&store, &src);
    store.pin("t", &id).unwrap();
    (store, id)
}

#[test]
fn flipped_byte_is_named_by_verify_and_export() {
    let t = tempfile::tempdir().unwrap();
    let (store, id) = store_with_tree(t.path());
    assert!(store.verify().unwrap().is_clean());
    let bad = common::data_chunk(&store, &id, b"d/data");
    let small = common::data_chunk(&store, &id, b"small");
    let block = store.locate(&bad).unwrap().unwrap();
    assert_eq!(block.encoding, xenod_store::Encoding::Block, "file chunks are stored in solid blocks");
    common::flip_byte(&store, &bad);

    // Damage stays inside the block (how far depends on where the byte
    // falls in the zstd frame); every damaged member is named with its path.
    let r = store.verify().unwrap();
    assert!(!r.is_clean() && !r.damage.is_empty(), "{r:#?}");
    let damaged: Vec<ChunkId> = r.damage.iter().map(|d| d.chunk).collect();
    for d in &r.damage {
        let loc = store.locate(&d.chunk).unwrap().unwrap();
        assert_eq!((loc.pack, loc.offset), (block.pack, block.offset), "{} is not in the damaged block", d.chunk);
        assert_eq!(d.layers.len(), 1, "{d:#?}");
        assert!(["/d/data", "/small"].contains(&d.layers[0].1.as_str()), "{d:#?}");
        assert!(d.why.contains("corrupt") && d.why.contains(".pack"), "{}", d.why);
    }

    let err = export_dir(&store, Merged::of(&store, &id).unwrap(), &t.path().join("out"), &|_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(damaged.iter().any(|c| msg.contains(&c.to_string())), "{msg}");
    assert!(msg.contains("d/data") || msg.contains("small"), "{msg}");
    // A member the verify did not name still reads; a named one never does.
    for c in [bad, small] {
        assert_eq!(store.get(&c).is_ok(), !damaged.contains(&c), "{c}");
    }
    // The manifest, stored alone, still reads.
    assert_eq!(store.read_layer(&id).unwrap().count(), 4);
}

#[test]
fn missing_chunk_and_missing_pack() {
    let t = tempfile::tempdir().unwrap();
    let (store, id) = store_with_tree(t.path());
    // A layer that refers to a chunk never stored.
    let ghost = ChunkId::of(b"never stored");
    let layer = raw_layer(
        &store,
        &[
            dir(""),
            Entry {
                kind: Kind::File {
                    size: 5,
                    chunking: xenod_store::Chunking::Cdc,
                    extents: vec![Extent::Data { id: ghost, len: 5 }],
                },
                ..dir("f")
            },
        ],
        None,
    );
    store.pin("ghost", &layer).unwrap();
    let r = store.verify().unwrap();
    let d = r.damage.iter().find(|d| d.chunk == ghost).expect("ghost chunk reported");
    assert!(d.why.contains("missing"), "{}", d.why);
    assert_eq!(d.layers, vec![(layer, "/f".to_string())]);

    // Every pack gone: every chunk of the tree is damaged, named with its layer.
    for e in fs::read_dir(store.root().join("packs")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    let store = Store::open(store.root()).unwrap();
    let r = store.verify().unwrap();
    assert!(r.damage.iter().any(|d| d.chunk == id), "layer root reported: {r:#?}");
    assert!(matches!(
        store.layer_root(&id),
        Err(Error::Manifest { .. }) | Err(Error::ChunkMissing { .. }) | Err(Error::Io { .. })
    ));
}

fn dir(path: &str) -> Entry {
    Entry::dir(path.as_bytes().to_vec())
}

/// Writes entries as a layer without any of LayerWriter's checks.
fn raw_layer(store: &Store, entries: &[Entry], claimed: Option<u64>) -> ChunkId {
    let mut stream = b"XNDLYR01".to_vec();
    for e in entries {
        xenod_store::encode_entry(e, &mut stream);
    }
    raw_root(store, &stream, claimed.unwrap_or(entries.len() as u64))
}

fn raw_root(store: &Store, stream: &[u8], entries: u64) -> ChunkId {
    let (mid, _) = store.put(stream).unwrap();
    let root = LayerRoot {
        format: FORMAT_VERSION,
        base: None,
        entries,
        file_bytes: 0,
        manifest: vec![ChunkRef { id: mid, len: stream.len() as u32 }],
        meta: Default::default(),
    };
    let (id, _) = store.put(&root.encode()).unwrap();
    store.flush().unwrap();
    id
}

fn read_err(store: &Store, id: &ChunkId) -> String {
    match store.read_layer(id) {
        Err(e) => e.to_string(),
        Ok(r) => r.filter_map(Result::err).next().map(|e| e.to_string()).unwrap_or_else(|| "no error".into()),
    }
}

#[test]
fn hostile_manifests_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path().join("store")).unwrap();
    let file = |p: &str, size: u64, extents: Vec<Extent>| Entry {
        kind: Kind::File { size, chunking: xenod_store::Chunking::Cdc, extents },
        ..dir(p)
    };
    let cases: Vec<(&str, Vec<Entry>, Option<u64>, &str)> = vec![
        ("traversal", vec![dir(""), dir("../etc")], None, "path component \"..\""),
        ("absolute", vec![dir(""), dir("/etc")], None, "absolute"),
        ("nul", vec![dir(""), dir("a\0b")], None, "NUL"),
        ("duplicate", vec![dir(""), dir("a"), dir("a")], None, "duplicate"),
        ("order", vec![dir(""), dir("b"), dir("a")], None, "out of order"),
        ("no root", vec![dir("a")], None, "root"),
        (
            "through symlink",
            vec![dir(""), Entry { kind: Kind::Symlink { target: b"/tmp".to_vec() }, ..dir("a") }, dir("a/x")],
            None,
            "parent is not a directory",
        ),
        ("size", vec![dir(""), file("f", 10, vec![Extent::Hole { len: 4 }])], None, "disagrees"),
        ("count", vec![dir(""), dir("a")], Some(5), "its root says 5"),
    ];
    for (what, entries, claimed, want) in cases {
        let id = raw_layer(&store, &entries, claimed);
        let err = read_err(&store, &id);
        assert!(err.contains(want) && err.contains(&id.to_string()), "{what}: {err}");
    }

    // Truncated and garbage manifests.
    let mut stream = b"XNDLYR01".to_vec();
    stream.extend_from_slice(&[0x20, 1, 2, 3]);
    let id = raw_root(&store, &stream, 1);
    assert!(read_err(&store, &id).contains("truncated"), "{}", read_err(&store, &id));
    let id = raw_root(&store, b"garbage!garbage!", 1);
    assert!(read_err(&store, &id).contains("bad header"));
    let (junk, _) = store.put(b"not a root at all").unwrap();
    store.flush().unwrap();
    assert!(store.layer_root(&junk).unwrap_err().to_string().contains("not a layer root"));
    let huge = raw_root(&store, &[&b"XNDLYR01"[..], &[0xff, 0xff, 0xff, 0xff, 0x0f]].concat(), 1);
    assert!(read_err(&store, &huge).contains("exceeds"));
}

#[test]
fn export_never_writes_outside_dest() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path().join("store")).unwrap();
    let (data, _) = store.put(b"payload").unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"keep").unwrap();
    // A hardlink whose target goes through a symlink pointing outside.
    let id = raw_layer(
        &store,
        &[
            dir(""),
            Entry { kind: Kind::Symlink { target: outside.as_os_str().as_encoded_bytes().to_vec() }, ..dir("a") },
            Entry { kind: Kind::Hardlink { target: b"a/victim".to_vec() }, ..dir("b") },
            Entry {
                kind: Kind::File {
                    size: 7,
                    chunking: xenod_store::Chunking::Cdc,
                    extents: vec![Extent::Data { id: data, len: 7 }],
                },
                ..dir("c")
            },
        ],
        None,
    );
    let dest = t.path().join("dest");
    let err = export_dir(&store, store.read_layer(&id).unwrap(), &dest, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("/b") && err.contains("cannot be reached"), "{err}");
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert!(!dest.join("b").exists());

    // A non-empty destination is refused before anything is written.
    fs::create_dir_all(t.path().join("full")).unwrap();
    fs::write(t.path().join("full/x"), b"").unwrap();
    let err = export_dir(&store, store.read_layer(&id).unwrap(), &t.path().join("full"), &|_| {}).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
}

#[test]
fn publish_onto_a_full_disk_fails_clearly_and_keeps_what_was_stored() {
    if !common::is_root() {
        eprintln!("\n*** SKIPPING publish_onto_a_full_disk...: needs root to mount a small tmpfs ***\n");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let disk_dir = tempfile::tempdir().unwrap();
    let disk = xenod_store::testing::Tmpfs::mount(disk_dir.path(), "3m");
    let store = Store::open(disk_dir.path().join("store")).unwrap();
    let small = t.path().join("small");
    fs::create_dir_all(&small).unwrap();
    fs::write(small.join("a"), common::noise(200_000, 1)).unwrap();
    let kept = common::publish_dir(&store, &small);
    store.pin("kept", &kept).unwrap();
    // 16 MiB of noise into what is left of 3 MiB.
    let big = t.path().join("big");
    fs::create_dir_all(&big).unwrap();
    for i in 0..4 {
        fs::write(big.join(format!("f{i}")), common::noise(4 << 20, 10 + i)).unwrap();
    }
    let publish = |store: &Store| -> Result<xenod_store::LayerId, Error> {
        let mut w = xenod_store::LayerWriter::new(store);
        xenod_store::import_dir(store, &big, &Default::default(), &mut |e| w.push(&e))?;
        w.finish(None, Default::default())
    };
    let e = publish(&store).expect_err("16 MiB fit into 3 MiB");
    assert!(xenod_store::testing::says_disk_full(&e), "the error does not say the disk is full: {e:?}");
    // What was there before is whole, and nothing is damaged.
    let report = store.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    let out = t.path().join("out");
    common::export(&store, &kept, &out);
    common::assert_same_tree(&small, &out);
    // With room again, the same handle publishes it.
    disk.resize("64m");
    let id = publish(&store).unwrap();
    let out2 = t.path().join("out2");
    common::export(&store, &id, &out2);
    common::assert_same_tree(&big, &out2);
    drop(store);
    drop(disk);
}

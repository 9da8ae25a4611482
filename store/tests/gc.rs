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

/// `app` is pinned by nothing; only `srv/.mount` in the named template
/// names it. gc keeps it (and its base); a dry run says what would go
/// without removing it.
#[test]
fn gc_keeps_layers_named_by_mount_files_and_dry_run_removes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path().join("store")).unwrap();
    let app_src = t.path().join("app");
    fs::create_dir_all(app_src.join("bin")).unwrap();
    fs::write(app_src.join("bin/app"), common::noise(150_000, 5)).unwrap();
    let app = common::publish_dir(&store, &app_src);
    let junk_src = t.path().join("junk");
    fs::create_dir_all(&junk_src).unwrap();
    fs::write(junk_src.join("junk"), common::noise(400_000, 6)).unwrap();
    let junk = common::publish_dir(&store, &junk_src);
    let tpl_src = t.path().join("tpl");
    fs::create_dir_all(tpl_src.join("srv")).unwrap();
    fs::write(tpl_src.join("srv/.mount"), format!("# the app\n{app}\n")).unwrap();
    fs::write(tpl_src.join("etc"), b"x").unwrap();
    let tpl = common::publish_dir(&store, &tpl_src);
    store.pin("tpl", &tpl).unwrap();

    let plan = store.gc_plan().unwrap();
    assert_eq!(plan.dead_layers, vec![junk], "{plan:?}");
    assert!(plan.dead_bytes > 0 && plan.freed_bytes() > 0, "{plan:?}");
    assert!(store.contains(&junk).unwrap(), "a dry run removes nothing");

    let stats = store.gc().unwrap();
    assert!(stats.removed_chunks > 0, "{stats:?}");
    assert!(!store.contains(&junk).unwrap());
    let store = Store::open(store.root()).unwrap();
    assert!(store.verify().unwrap().is_clean());
    let out = t.path().join("out");
    common::export(&store, &app, &out);
    assert_eq!(fs::read(out.join("bin/app")).unwrap(), common::noise(150_000, 5));
    assert!(store.gc_plan().unwrap().dead_layers.is_empty());
}

/// A `.mount` file that names a layer the store does not have: verify is
/// not clean and names the file and the reference.
#[test]
fn verify_reports_a_mount_file_naming_a_missing_layer() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path().join("store")).unwrap();
    let src = t.path().join("tpl");
    fs::create_dir_all(src.join("srv")).unwrap();
    let ghost = xenod_store::ChunkId::of(b"no such layer");
    fs::write(src.join("srv/.mount"), format!("{ghost}\ntemplate://nobody/missing/1\n")).unwrap();
    let tpl = common::publish_dir(&store, &src);
    store.pin("tpl", &tpl).unwrap();
    let r = store.verify().unwrap();
    assert!(!r.is_clean(), "{r:#?}");
    assert_eq!(r.broken_mounts.len(), 2, "{r:#?}");
    for (layer, file, _, _) in &r.broken_mounts {
        assert_eq!((*layer, file.as_str()), (tpl, "/srv/.mount"));
    }
    assert!(r.broken_mounts.iter().any(|m| m.2 == ghost.to_string()));
    assert!(r.broken_mounts.iter().any(|m| m.2 == "template://nobody/missing/1"));
    // gc keeps going: a reference to nothing keeps nothing.
    store.gc().unwrap();
    assert!(store.contains(&tpl).unwrap());
}

/// The steps of one gc (or dry run): each phase with its total and the
/// sum of its parts, in order.
fn phases(run: impl FnOnce(xenod_store::GcProgress<'_>)) -> Vec<(xenod_store::GcPhase, u64, u64)> {
    use xenod_store::GcStep;
    let steps = std::sync::Mutex::new(Vec::new());
    run(&|s| steps.lock().unwrap().push(s));
    let mut out: Vec<(xenod_store::GcPhase, u64, u64)> = Vec::new();
    for s in steps.into_inner().unwrap() {
        match s {
            GcStep::Begin(p, total) => out.push((p, total, 0)),
            GcStep::Done(n) => out.last_mut().expect("a part before any phase").2 += n,
        }
    }
    out
}

#[test]
fn gc_phases_have_totals_their_parts_add_up_to() {
    use xenod_store::GcPhase::{Mark, Packs, Sweep};
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    // More entries than gc reports at once, and a layer to drop.
    fs::create_dir_all(src.join("keep")).unwrap();
    for i in 0..5000u64 {
        fs::write(src.join(format!("keep/f{i}")), i.to_le_bytes()).unwrap();
    }
    fs::write(src.join("big"), common::noise(2_000_000, 7)).unwrap();
    let store = Store::open(t.path().join("store")).unwrap();
    common::publish_dir(&store, &src);
    let keep = common::publish_dir(&store, &src.join("keep"));
    store.pin("keep", &keep).unwrap();
    let entries: u64 = store.layers().unwrap().iter().map(|(_, i)| i.entries).sum();
    let (_, pack_bytes) = store.pack_usage().unwrap();
    let chunks = store.chunk_count().unwrap();

    let plan = phases(|p| {
        store.gc_plan_with(p).unwrap();
    });
    let done = phases(|p| {
        store.gc_with(p).unwrap();
    });
    for got in [plan, done] {
        assert_eq!(got, vec![(Mark, entries, entries), (Sweep, chunks, chunks), (Packs, pack_bytes, pack_bytes)]);
    }
    // Nothing left to drop: the dead layer's entries are gone from the total.
    let again = phases(|p| {
        store.gc_with(p).unwrap();
    });
    assert_eq!(again[0].0, Mark);
    assert!(again[0].1 < entries && again[0].1 == again[0].2, "{again:?}");
}

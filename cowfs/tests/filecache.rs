//! The file cache: lower files materialised under DATA/cache/files and
//! read by the kernel directly (FUSE passthrough). Needs root and /dev/fuse.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xenod_cowfs::{MATERIALISE_MIN, MountOptions, cache_dir, mount};
use xenod_store::{Kind, LayerId, Location, Store};

fn opts(upper: Option<&Path>) -> MountOptions {
    MountOptions { upper: upper.map(Path::to_path_buf), threads: 2, ..Default::default() }
}

/// Whether the kernel can pass reads through to a backing file (6.9+).
fn kernel_passthrough() -> bool {
    let rel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (6, 9)
}

/// Where the chunks of lower file `name` live in the packs.
fn chunk_locations(store: &Store, id: &LayerId, name: &[u8]) -> Vec<Location> {
    let mut out = vec![];
    for e in store.read_layer(id).unwrap() {
        let e = e.unwrap();
        if e.path == name
            && let Kind::File { extents, .. } = e.kind
        {
            for x in extents {
                if let xenod_store::Extent::Data { id, .. } = x {
                    out.push(store.locate(&id).unwrap().unwrap());
                }
            }
        }
    }
    out
}

/// The cache's entries (not temporary files).
fn entries(store_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(cache_dir(store_dir)) else { return vec![] };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.len() == 64 && !n.starts_with('.')))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn temporaries(store_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(cache_dir(store_dir)) else { return vec![] };
    rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-")).map(|e| e.path()).collect()
}

/// Waits (generously; this is no timing check) for an entry holding `want`.
fn wait_for_entry(store_dir: &Path, want: &[u8]) -> PathBuf {
    let started = Instant::now();
    loop {
        for e in entries(store_dir) {
            if fs::metadata(&e).is_ok_and(|m| m.len() == want.len() as u64) && fs::read(&e).unwrap() == want {
                return e;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no cache entry appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Noise with a long run of zeros in the middle, stored as a hole.
fn with_hole(n: usize, seed: u64) -> Vec<u8> {
    let mut d = noise(n, seed);
    d[n / 3..n / 3 + (1 << 20)].fill(0);
    d
}

#[test]
fn materialised_lower_file_reads_back_through_passthrough() {
    if !fuse_ok("materialised_lower_file_reads_back_through_passthrough") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let big = with_hole(3 << 20, 1);
    let small = noise(MATERIALISE_MIN as usize - 1, 2);
    // Incompressible: its chunks can be corrupted in place below.
    let plain = noise(2 << 20, 6);
    let (store_dir, id) = store_with_files(t.path(), &[("big", &big), ("small", &small), ("plain", &plain)]);
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store.clone(), &[id], &mnt, &opts(None)).unwrap();
    assert_eq!(fs::read(mnt.join("small")).unwrap(), small);
    assert_eq!(fs::read(mnt.join("big")).unwrap(), big);
    let entry = wait_for_entry(&store_dir, &big);
    assert_eq!(entries(&store_dir), vec![entry.clone()], "only the big file is materialised");
    assert_eq!(fs::read(mnt.join("plain")).unwrap(), plain);
    wait_for_entry(&store_dir, &plain);
    assert!(fs::metadata(&entry).unwrap().permissions().readonly());
    // Read again, in pieces, through the now passed-through file.
    let f = fs::File::open(mnt.join("big")).unwrap();
    let mut got = vec![0u8; big.len()];
    for (i, piece) in got.chunks_mut(100_000).enumerate() {
        f.read_exact_at(piece, i as u64 * 100_000).unwrap();
    }
    assert_eq!(got, big);
    drop(f);
    m.unmount().unwrap();

    // The copy is what a fresh mount reads: with the file's chunks now
    // corrupt in the packs, its data still comes back whole.
    if kernel_passthrough() {
        for loc in chunk_locations(&store, &id, b"plain") {
            flip_chunk(&store_dir, &loc);
        }
        let store = Arc::new(Store::open(&store_dir).unwrap());
        let m = mount(store, &[id], &mnt, &opts(None)).unwrap();
        assert_eq!(fs::read(mnt.join("plain")).unwrap(), plain, "read through the materialised copy");
        assert_eq!(fs::read(mnt.join("big")).unwrap(), big);
        m.unmount().unwrap();
        // So does a mount whose kernel opens files itself (no passthrough):
        // its reads come from the copy, not from the corrupt chunks.
        let store = Arc::new(Store::open(&store_dir).unwrap());
        let m = mount(store, &[id], &mnt, &MountOptions { no_open: true, ..opts(None) }).unwrap();
        assert_eq!(fs::read(mnt.join("plain")).unwrap(), plain, "no-open read from the materialised copy");
        assert_eq!(fs::read(mnt.join("big")).unwrap(), big);
        assert_eq!(m.open_handles(), 0, "the kernel asked to open files on a no-open mount");
        m.unmount().unwrap();
    }
}

/// A mount that reads a big file and goes away at once does not copy the
/// file at unmount: the materialisation, still waiting for the reads to
/// pause, is dropped like the rest of the queue.
#[test]
fn unmount_drops_a_materialisation_not_started() {
    if !fuse_ok("unmount_drops_a_materialisation_not_started") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let big = noise(8 << 20, 11);
    let (store_dir, id) = store_with_files(t.path(), &[("big", &big)]);
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store, &[id], &mnt, &opts(None)).unwrap();
    assert_eq!(fs::read(mnt.join("big")).unwrap(), big);
    let started = Instant::now();
    m.unmount().unwrap();
    // Generous: the copy itself would take a fraction of this; what is
    // checked is that unmounting did not wait for the reads' pause (and
    // then the copy) and left nothing behind.
    assert!(started.elapsed() < Duration::from_secs(30), "unmount took {:?}", started.elapsed());
    assert!(entries(&store_dir).is_empty(), "materialised at unmount: {:?}", entries(&store_dir));
    assert!(temporaries(&store_dir).is_empty());
}

#[test]
fn corrupt_chunk_never_enters_the_cache() {
    if !fuse_ok("corrupt_chunk_never_enters_the_cache") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bad = noise(2 << 20, 3);
    let good = noise(2 << 20, 4);
    let (store_dir, id) = store_with_files(t.path(), &[("bad", &bad), ("good", &good)]);
    let store = Store::open(&store_dir).unwrap();
    // Only a chunk near the end: the first read succeeds and asks for the
    // file to be materialised.
    let locs = chunk_locations(&store, &id, b"bad");
    flip_chunk(&store_dir, locs.last().unwrap());
    drop(store);
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store, &[id], &mnt, &opts(None)).unwrap();
    let f = fs::File::open(mnt.join("bad")).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, bad[..4096]);
    let e = fs::read(mnt.join("bad")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()), "{e}");
    drop(f);
    // One materialiser works in order: once `good` is in, `bad` was tried.
    assert_eq!(fs::read(mnt.join("good")).unwrap(), good);
    let entry = wait_for_entry(&store_dir, &good);
    assert_eq!(entries(&store_dir), vec![entry], "the corrupt file has no entry");
    assert!(temporaries(&store_dir).is_empty(), "{:?}", temporaries(&store_dir));
    // Still EIO: the file is not passed through to anything.
    let e = fs::read(mnt.join("bad")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()), "{e}");
    m.unmount().unwrap();
}

#[test]
fn cache_respects_its_bound() {
    if !fuse_ok("cache_respects_its_bound") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..4).map(|i| noise((5 << 20) / 4, 10 + i)).collect();
    let named: Vec<(String, &[u8])> = files.iter().enumerate().map(|(i, d)| (format!("f{i}"), d.as_slice())).collect();
    let refs: Vec<(&str, &[u8])> = named.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    let (store_dir, id) = store_with_files(t.path(), &refs);
    let cap: u64 = 3 << 20;
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store, &[id], &mnt, &MountOptions { file_cache_bytes: cap, ..opts(None) }).unwrap();
    for (i, d) in files.iter().enumerate() {
        assert_eq!(&fs::read(mnt.join(format!("f{i}"))).unwrap(), d);
        let newest = wait_for_entry(&store_dir, d);
        let used: u64 = fs::read_dir(cache_dir(&store_dir))
            .unwrap()
            .flatten()
            .map(|e| std::os::unix::fs::MetadataExt::blocks(&e.metadata().unwrap()) * 512)
            .sum();
        assert!(used <= cap, "{used} bytes cached, bound {cap}");
        assert!(entries(&store_dir).contains(&newest));
    }
    assert_eq!(entries(&store_dir).len(), 2, "two files fit under the bound");
    m.unmount().unwrap();

    // No file cache at all with a bound of 0.
    fs::remove_dir_all(cache_dir(&store_dir)).unwrap();
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let m = mount(store, &[id], &mnt, &MountOptions { file_cache_bytes: 0, ..opts(None) }).unwrap();
    assert_eq!(&fs::read(mnt.join("f0")).unwrap(), &files[0]);
    m.unmount().unwrap();
    assert!(!cache_dir(&store_dir).exists());
}

#[test]
fn writing_a_materialised_file_copies_up_and_keeps_the_cache() {
    if !fuse_ok("writing_a_materialised_file_copies_up_and_keeps_the_cache") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let big = noise(3 << 20, 5);
    let (store_dir, id) = store_with_files(t.path(), &[("big", &big)]);
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let mnt = t.path().join("mnt");
    let upper = t.path().join("upper");
    fs::create_dir(&mnt).unwrap();
    let m = mount(store, &[id], &mnt, &opts(Some(&upper))).unwrap();
    assert_eq!(fs::read(mnt.join("big")).unwrap(), big);
    let entry = wait_for_entry(&store_dir, &big);
    // The read's RELEASE is sent after close returns; over io_uring it may
    // be served after the next OPEN, which would then find a cached handle
    // still open and not pass through.
    let t0 = std::time::Instant::now();
    while m.open_handles() > 0 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "the read's handle was never released");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    let reader = fs::File::open(mnt.join("big")).unwrap();
    if kernel_passthrough() {
        // The reader passes through to the cache entry, which must not be
        // the writer's backing file: the write open waits for the reader.
        let e = fs::OpenOptions::new().write(true).open(mnt.join("big")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::TXTBSY.raw_os_error()), "{e}");
        assert!(!upper.join("big").exists(), "refused before any copy-up");
    }
    drop(reader);

    let w = fs::OpenOptions::new().write(true).open(mnt.join("big")).unwrap();
    w.write_all_at(b"changed", 1000).unwrap();
    drop(w);
    let mut want = big.clone();
    want[1000..1007].copy_from_slice(b"changed");
    assert_eq!(fs::read(mnt.join("big")).unwrap(), want);
    assert_eq!(fs::read(upper.join("big")).unwrap(), want, "copied up");
    assert_eq!(fs::read(&entry).unwrap(), big, "the cache entry is untouched");
    // The copied-up file is read from the upper from now on.
    let r = fs::File::open(mnt.join("big")).unwrap();
    let mut b = [0u8; 7];
    r.read_exact_at(&mut b, 1000).unwrap();
    assert_eq!(&b, b"changed");
    drop(r);
    m.unmount().unwrap();
    assert_eq!(fs::read(&entry).unwrap(), big);
}

#[test]
fn guest_mount_opens_a_cached_file_read_write_while_a_reader_holds_it() {
    if !fuse_ok("guest_mount_opens_a_cached_file_read_write_while_a_reader_holds_it") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let big = noise(3 << 20, 6);
    let (store_dir, id) = store_with_files(t.path(), &[("disk.img", &big)]);
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let (mnt, upper) = (t.path().join("mnt"), t.path().join("upper"));
    fs::create_dir(&mnt).unwrap();
    // A plain mount puts the file in the cache.
    let m = mount(store.clone(), &[id], &mnt, &opts(Some(&upper))).unwrap();
    assert_eq!(fs::read(mnt.join("disk.img")).unwrap(), big);
    wait_for_entry(&store_dir, &big);
    m.unmount().unwrap();

    // A guest's mount (tracking writes): QEMU restoring a saved guest opens
    // its disk read-only, then read-write with the first handle open.
    let control = t.path().join("mount.ctl");
    let o = MountOptions { control: Some(control), ..opts(Some(&upper)) };
    let m = mount(store, &[id], &mnt, &o).unwrap();
    let reader = fs::File::open(mnt.join("disk.img")).unwrap();
    let w = fs::OpenOptions::new().read(true).write(true).open(mnt.join("disk.img")).unwrap();
    w.write_all_at(b"guest", 4096).unwrap();
    let mut b = [0u8; 5];
    reader.read_exact_at(&mut b, 4096).unwrap();
    assert_eq!(&b, b"guest", "the reader sees the write: both are served here");
    drop((reader, w));
    m.unmount().unwrap();
}

// --- Warming: a stack's big files cached before any read -----------------

/// A warm with no progress to watch.
fn warm_quietly(store: &Store, id: LayerId, cap: u64) -> xenod_cowfs::Result<xenod_cowfs::WarmReport> {
    xenod_cowfs::warm(store, &[id], cap, &mut |_, _| {})
}

#[test]
fn warm_caches_each_big_file_once_with_its_exact_bytes() {
    let t = tempfile::tempdir().unwrap();
    let big = with_hole(3 << 20, 21);
    let small = noise(MATERIALISE_MIN as usize - 1, 22);
    let edge = noise(MATERIALISE_MIN as usize, 23);
    // Two names, one content: one entry.
    let files: &[(&str, &[u8])] = &[("big", &big), ("copy", &big), ("small", &small), ("edge", &edge)];
    let (store_dir, id) = store_with_files(t.path(), files);
    let store = Store::open(&store_dir).unwrap();
    let mut seen = Vec::new();
    let r = xenod_cowfs::warm(&store, &[id], 64 << 20, &mut |d, t| seen.push((d, t))).unwrap();
    let total = (big.len() + edge.len()) as u64;
    assert_eq!((r.files, r.bytes, r.written, r.written_bytes, r.present), (2, total, 2, total, 0), "{r:?}");
    assert!(r.complete(), "{r:?}");
    assert_eq!(seen.first(), Some(&(0, total)));
    assert_eq!(seen.last(), Some(&(total, total)));
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "progress went back");
    let got: Vec<Vec<u8>> = entries(&store_dir).iter().map(|e| fs::read(e).unwrap()).collect();
    assert_eq!(got.len(), 2);
    assert!(got.contains(&big) && got.contains(&edge));
    assert!(entries(&store_dir).iter().all(|e| fs::metadata(e).unwrap().permissions().readonly()));
    assert!(temporaries(&store_dir).is_empty());

    // Again: nothing written, both found.
    let before: Vec<_> = entries(&store_dir).iter().map(|e| fs::metadata(e).unwrap().ino()).collect();
    let r = warm_quietly(&store, id, 64 << 20).unwrap();
    assert_eq!((r.written, r.present, r.present_bytes), (0, 2, total), "{r:?}");
    let after: Vec<_> = entries(&store_dir).iter().map(|e| fs::metadata(e).unwrap().ino()).collect();
    assert_eq!(before, after, "an entry was written again");
}

#[test]
fn warm_with_a_cap_too_small_writes_nothing_and_says_so() {
    let t = tempfile::tempdir().unwrap();
    let big = noise(3 << 20, 24);
    let (store_dir, id) = store_with_files(t.path(), &[("big", &big)]);
    let store = Store::open(&store_dir).unwrap();
    // Smaller than the file, and a cap the file is over half of.
    for cap in [2 << 20, 5 << 20] {
        let r = warm_quietly(&store, id, cap).unwrap();
        assert_eq!((r.files, r.written, r.too_big), (1, 0, 1), "cap {cap}: {r:?}");
        assert!(!r.complete());
        assert!(entries(&store_dir).is_empty());
    }
    // No cache at all.
    let r = warm_quietly(&store, id, 0).unwrap();
    assert_eq!((r.written, r.too_big), (0, 1));
}

/// Another stack's entries make room; this stack's own never do: what does
/// not fit beside them is skipped and counted.
#[test]
fn warm_evicts_other_stacks_but_never_its_own() {
    let t = tempfile::tempdir().unwrap();
    let old = noise(3 << 20, 30);
    let (store_dir, first) = store_with_files(t.path(), &[("old", &old)]);
    let store = Store::open(&store_dir).unwrap();
    let src = t.path().join("src2");
    fs::create_dir(&src).unwrap();
    let news: Vec<Vec<u8>> = (0..3).map(|i| noise(3 << 20, 31 + i)).collect();
    for (i, d) in news.iter().enumerate() {
        fs::write(src.join(format!("f{i}")), d).unwrap();
    }
    let second = publish_dir(&store, &src, None);
    let cap: u64 = 8 << 20;
    assert_eq!(warm_quietly(&store, first, cap).unwrap().written, 1);
    let r = warm_quietly(&store, second, cap).unwrap();
    assert_eq!((r.written, r.no_room, r.no_room_bytes), (2, 1, 3 << 20), "{r:?}");
    let got: Vec<Vec<u8>> = entries(&store_dir).iter().map(|e| fs::read(e).unwrap()).collect();
    assert_eq!(got.len(), 2, "the other stack's entry made room");
    assert!(!got.contains(&old));
    assert!(got.iter().all(|g| news.contains(g)));
}

#[test]
fn warm_stops_at_a_corrupt_chunk_naming_it_and_leaves_no_entry() {
    let t = tempfile::tempdir().unwrap();
    let bad = noise(2 << 20, 40);
    let (store_dir, id) = store_with_files(t.path(), &[("bad", &bad)]);
    let store = Store::open(&store_dir).unwrap();
    let locs = chunk_locations(&store, &id, b"bad");
    let loc = locs.last().unwrap();
    flip_chunk(&store_dir, loc);
    drop(store);
    let store = Store::open(&store_dir).unwrap();
    let e = warm_quietly(&store, id, 64 << 20).unwrap_err();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg += &format!(": {s}");
        src = s.source();
    }
    assert!(msg.contains("bad") && msg.contains("corrupt"), "{msg}");
    let bad_chunk = store.read_layer(&id).unwrap().find_map(|e| match e.unwrap().kind {
        Kind::File { extents, .. } => extents.iter().rev().find_map(|x| match x {
            xenod_store::Extent::Data { id, .. } => Some(*id),
            _ => None,
        }),
        _ => None,
    });
    assert!(msg.contains(&bad_chunk.unwrap().to_string()), "the chunk is not named: {msg}");
    assert_eq!(e.exit_code(), xenod_store::Exit::Damaged);
    assert!(entries(&store_dir).is_empty(), "{:?}", entries(&store_dir));
    assert!(temporaries(&store_dir).is_empty(), "{:?}", temporaries(&store_dir));
}

/// What a warm wrote is what a mount reads: here through the kernel, with
/// the file's chunks corrupt in the packs, so only the entry can answer.
#[test]
fn a_mount_reads_what_warm_cached() {
    if !fuse_ok("a_mount_reads_what_warm_cached") || !kernel_passthrough() {
        if Path::new("/dev/fuse").exists() {
            eprintln!("\n*** SKIPPING a_mount_reads_what_warm_cached: the kernel has no FUSE passthrough ***\n");
        }
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let plain = noise(2 << 20, 41);
    let (store_dir, id) = store_with_files(t.path(), &[("plain", &plain)]);
    let store = Store::open(&store_dir).unwrap();
    assert_eq!(warm_quietly(&store, id, 64 << 20).unwrap().written, 1);
    for loc in chunk_locations(&store, &id, b"plain") {
        flip_chunk(&store_dir, &loc);
    }
    drop(store);
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let (mnt, upper) = (t.path().join("mnt"), t.path().join("upper"));
    fs::create_dir(&mnt).unwrap();
    let m = mount(store, &[id], &mnt, &opts(Some(&upper))).unwrap();
    assert_eq!(fs::read(mnt.join("plain")).unwrap(), plain, "not read from the warmed entry");
    m.unmount().unwrap();
}

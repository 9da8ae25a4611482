//! Crash safety: the filesystem process is killed with SIGKILL during
//! whole-file copy-up and during block writes into a partial file; after a
//! remount no file is torn, every acknowledged write is there, and the
//! dirty map is consistent with the data; killed while materialising a
//! lower file into the file cache, no partial entry is ever visible.
//!
//! The serving process is this test binary re-run with `serve_child` and
//! `XENOD_CRASH_CHILD` set (store dir, layer id, upper, mount point).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xenod_cowfs::{DirtyMap, MountOptions, mount};
use xenod_store::Store;

const PAGE: usize = 4096;

/// Not a test of its own: the serving half of the crash tests.
#[test]
fn serve_child() {
    let Ok(spec) = std::env::var("XENOD_CRASH_CHILD") else { return };
    let parts: Vec<&str> = spec.split('\n').collect();
    let store = Arc::new(Store::open(parts[0]).unwrap());
    let id = parts[1].parse().unwrap();
    let opts = MountOptions { upper: Some(PathBuf::from(parts[2])), threads: 2, ..Default::default() };
    xenod_cowfs::serve(store, &[id], Path::new(parts[3]), &opts, || {}).unwrap();
}

fn spawn(store: &Path, id: &xenod_store::LayerId, upper: &Path, mnt: &Path) -> Child {
    let spec = format!("{}\n{id}\n{}\n{}", store.display(), upper.display(), mnt.display());
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "serve_child", "--nocapture", "--test-threads", "1"])
        .env("XENOD_CRASH_CHILD", spec)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !xenod_cowfs::is_mounted(mnt) {
        assert!(started.elapsed() < Duration::from_secs(30), "child did not mount");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

fn kill(mut child: Child, mnt: &Path) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    child.wait().unwrap();
    let _ = rustix::mount::unmount(mnt, rustix::mount::UnmountFlags::DETACH);
}

#[test]
fn killed_during_copy_up_leaves_no_torn_file() {
    if !fuse_ok("killed_during_copy_up_leaves_no_torn_file") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lower = noise(48 << 20, 11);
    let (store_dir, id) = store_with_files(t.path(), &[("big", &lower)]);
    let upper = t.path().join("upper");
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut outcomes = [0; 2];
    for round in 0..6u64 {
        let child = spawn(&store_dir, &id, &upper, &mnt);
        let path = mnt.join("big");
        // Opening for writing copies the 48 MiB file up; kill meanwhile.
        let opener = std::thread::spawn(move || {
            if let Ok(f) = fs::OpenOptions::new().write(true).open(&path) {
                let _ = f.write_all_at(b"MARK", 0);
            }
        });
        // The last round lets the copy-up finish before the kill.
        std::thread::sleep(Duration::from_millis(if round == 5 { 3000 } else { 5 + round * 7 }));
        kill(child, &mnt);
        opener.join().unwrap();
        let store = Arc::new(Store::open(&store_dir).unwrap());
        let opts = MountOptions { upper: Some(upper.clone()), threads: 2, ..Default::default() };
        let m = mount(store, &[id], &mnt, &opts).unwrap();
        let got = fs::read(mnt.join("big")).unwrap();
        assert_eq!(got.len(), lower.len(), "round {round}: size");
        let marked = &got[..4] == b"MARK";
        assert!(got[4..] == lower[4..], "round {round}: torn copy-up");
        if !marked {
            assert!(got[..4] == lower[..4]);
        }
        outcomes[marked as usize] += 1;
        assert_eq!(fs::read_dir(upper.join(".xenod/work")).unwrap().count(), 0, "staging left behind");
        m.unmount().unwrap();
        // Start over from the lower file.
        let _ = fs::remove_file(upper.join("big"));
    }
    eprintln!("copy-up crash rounds: {} before, {} after the copy-up finished", outcomes[0], outcomes[1]);
}

#[test]
fn killed_during_block_writes_keeps_acknowledged_writes() {
    if !fuse_ok("killed_during_block_writes_keeps_acknowledged_writes") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lower = noise(16 << 20, 12);
    // A fixed-chunked image: copies up block by block.
    let (store_dir, id) = store_with_files(t.path(), &[("disk.img", &lower)]);
    let upper = t.path().join("upper");
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let pages = lower.len() / PAGE;
    // Per page: (value, acknowledged) of every write attempted, in order.
    let mut history: Vec<Vec<(u8, bool)>> = vec![Vec::new(); pages];
    for round in 0..4u64 {
        let child = spawn(&store_dir, &id, &upper, &mnt);
        let path = mnt.join("disk.img");
        let (tx, rx) = std::sync::mpsc::channel::<(usize, u8, bool)>();
        let writer = std::thread::spawn(move || {
            let Ok(f) = fs::OpenOptions::new().write(true).open(&path) else { return };
            let mut x = round * 7919 + 1;
            for i in 0.. {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = (x % pages as u64) as usize;
                let v = (i % 250 + 1) as u8;
                let _ = tx.send((page, v, false));
                match f.write_all_at(&[v; PAGE], (page * PAGE) as u64) {
                    Ok(()) => {
                        let _ = tx.send((page, v, true));
                    }
                    Err(_) => return,
                }
            }
        });
        // Kill while writes are flowing: after the first one is
        // acknowledged (a loaded host may take long to get there), then a
        // while longer.
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !seen.iter().any(|m: &(usize, u8, bool)| m.2) {
            match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok(m) => seen.push(m),
                Err(_) => panic!("round {round}: no write acknowledged within 20 s"),
            }
        }
        std::thread::sleep(Duration::from_millis(100 + round * 50));
        kill(child, &mnt);
        writer.join().unwrap();
        for (page, v, acked) in seen.into_iter().chain(rx.try_iter()) {
            if acked {
                if let Some(last) = history[page].last_mut() {
                    last.1 = true;
                }
            } else {
                history[page].push((v, false));
            }
        }
        let store = Arc::new(Store::open(&store_dir).unwrap());
        let opts = MountOptions { upper: Some(upper.clone()), threads: 2, ..Default::default() };
        let m = mount(store, &[id], &mnt, &opts).unwrap();
        let got = fs::read(mnt.join("disk.img")).unwrap();
        assert_eq!(got.len(), lower.len());
        let mut written = 0;
        for (p, h) in history.iter_mut().enumerate() {
            let page = &got[p * PAGE..(p + 1) * PAGE];
            let last_acked = h.iter().rposition(|w| w.1);
            let allowed: Vec<u8> = match last_acked {
                Some(i) => h[i..].iter().map(|w| w.0).collect(),
                None => h.iter().map(|w| w.0).collect(),
            };
            let ok = allowed.iter().any(|&v| page.iter().all(|&b| b == v))
                || (last_acked.is_none() && page == &lower[p * PAGE..(p + 1) * PAGE]);
            assert!(ok, "round {round}: page {p} torn or lost (history {h:?})");
            // What the page holds now is what the next round builds on.
            if page != &lower[p * PAGE..(p + 1) * PAGE] {
                *h = vec![(page[0], true)];
                written += 1;
            } else {
                h.clear();
            }
        }
        m.unmount().unwrap();
        // The dirty map decodes and covers every page that differs from the lower file.
        let maps: Vec<_> = fs::read_dir(upper.join(".xenod/maps")).unwrap().map(|e| e.unwrap().path()).collect();
        let map_file = maps.iter().find(|p| p.extension().is_some_and(|e| e == "map")).expect("a dirty map");
        let map = DirtyMap::decode(&fs::read(map_file).unwrap()).expect("dirty map decodes");
        for (p, h) in history.iter().enumerate() {
            if !h.is_empty() {
                assert!(
                    map.is_dirty((p * PAGE / xenod_store::BLOCK) as u64),
                    "page {p} differs but its block is clean"
                );
            }
        }
        eprintln!("round {round}: {written} pages differ from the lower file, {} dirty blocks", map.dirty_count());
    }
}

#[test]
fn killed_during_materialisation_leaves_no_partial_entry() {
    if !fuse_ok("killed_during_materialisation_leaves_no_partial_entry") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lower = noise(96 << 20, 13);
    let (store_dir, id) = store_with_files(t.path(), &[("big", &lower)]);
    let upper = t.path().join("upper");
    let mnt = t.path().join("mnt");
    let cache = xenod_cowfs::cache_dir(&store_dir);
    fs::create_dir(&mnt).unwrap();
    let listing = |prefix: &str| -> Vec<PathBuf> {
        let Ok(rd) = fs::read_dir(&cache) else { return vec![] };
        rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).map(|e| e.path()).collect()
    };
    let child = spawn(&store_dir, &id, &upper, &mnt);
    // One read asks for the file to be materialised in the background;
    // kill the server once its temporary file shows (or the entry is in).
    let f = fs::File::open(mnt.join("big")).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    drop(f);
    let started = Instant::now();
    while listing(".tmp-").is_empty() && listing("").is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "materialisation never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let caught = !listing(".tmp-").is_empty();
    kill(child, &mnt);
    // Whatever is visible under an entry's name is whole.
    for e in listing("").into_iter().filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.')) {
        assert!(fs::read(&e).unwrap() == lower, "torn entry {}", e.display());
    }
    // A new mount removes the dead writer's temporary file; the file reads
    // back whole and gets materialised again.
    let store = Arc::new(Store::open(&store_dir).unwrap());
    let opts = MountOptions { upper: Some(upper.clone()), threads: 2, ..Default::default() };
    let m = mount(store, &[id], &mnt, &opts).unwrap();
    if caught {
        assert!(listing(".tmp-").is_empty(), "dead writer's temporary file left: {:?}", listing(".tmp-"));
    }
    assert!(fs::read(mnt.join("big")).unwrap() == lower);
    m.unmount().unwrap();
    eprintln!("materialisation crash: killed {}", if caught { "midway" } else { "after it finished" });
}

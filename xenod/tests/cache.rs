//! `xenod cache warm` and `xenod cache show`, and the daemon warming the
//! file cache after a fetch: the entry holds the file's exact bytes, and a
//! mount then reads the file through passthrough (its server answers no
//! READ for it).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, ok, run, within, xenod};

/// Incompressible bytes from a seed.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    xenod_store::testing::noise(n, seed)
}

/// A tree with one big file (`vm.img`, 3 MiB) and a small one; its layer id.
fn publish_tree(data: &Path, big: &[u8]) -> String {
    let src = data.with_extension("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("vm.img"), big).unwrap();
    fs::write(src.join("small"), b"small\n").unwrap();
    ok(data, &["publish", src.to_str().unwrap()])["id"].as_str().unwrap().to_owned()
}

/// The file cache's entries (not temporary files).
fn entries(data: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(xenod_cowfs::cache_dir(data)) else { return vec![] };
    rd.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).map(|e| e.path()).collect()
}

/// Whether the kernel can pass reads through to a backing file (6.9+).
fn kernel_passthrough() -> bool {
    let rel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (6, 9)
}

#[test]
fn cache_warm_caches_the_file_and_a_mount_passes_it_through() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let big = noise(3 << 20, 7);
    let id = publish_tree(&data, &big);

    let v = ok(&data, &["cache", "warm", &id]);
    assert_eq!((v["files"].as_u64(), v["written"].as_u64(), v["complete"].as_bool()), (Some(1), Some(1), Some(true)));
    assert_eq!(v["written_bytes"].as_u64(), Some(big.len() as u64));
    let e = entries(&data);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(fs::read(&e[0]).unwrap(), big, "the entry holds other bytes than the file");

    // Again: nothing to write.
    let v = ok(&data, &["cache", "warm", &id]);
    assert_eq!((v["written"].as_u64(), v["present"].as_u64()), (Some(0), Some(1)), "{v}");

    let v = ok(&data, &["cache", "show"]);
    assert_eq!(v["entries"].as_array().unwrap().len(), 1, "{v}");
    assert!(v["bytes"].as_u64().unwrap() >= big.len() as u64);
    assert_eq!(v["cap"].as_u64(), Some(xenod_cowfs::DEFAULT_FILE_CACHE));

    mount_reads_through_passthrough(&data, &id, &big, t.path());

    // A cap the file does not fit under writes nothing, and says why.
    fs::remove_dir_all(xenod_cowfs::cache_dir(&data)).unwrap();
    let v = ok(&data, &["cache", "warm", &id, "--file-cache-bytes", "1048576"]);
    assert_eq!(
        (v["written"].as_u64(), v["too_big"].as_u64(), v["complete"].as_bool()),
        (Some(0), Some(1), Some(false))
    );
    let out = xenod(&data).args(["cache", "warm", &id, "--file-cache-bytes", "1048576"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 of 1 big files") && text.contains("over half the cap"), "{text}");
    assert!(entries(&data).is_empty());

    // Without the flag, config.toml's file_cache_bytes is the cap, as for the daemon.
    fs::write(data.join("config.toml"), "file_cache_bytes = 1048576\n").unwrap();
    let v = ok(&data, &["cache", "warm", &id]);
    assert_eq!((v["cap"].as_u64(), v["too_big"].as_u64()), (Some(1 << 20), Some(1)), "{v}");
    assert_eq!(ok(&data, &["cache", "show"])["cap"].as_u64(), Some(1 << 20));
    let v = ok(&data, &["cache", "warm", &id, "--file-cache-bytes", "16777216"]);
    assert_eq!((v["cap"].as_u64(), v["written"].as_u64()), (Some(16 << 20), Some(1)), "{v}");
    fs::remove_file(data.join("config.toml")).unwrap();

    // An unknown reference names itself.
    let out = run(&data, &["cache", "warm", "template://no/such/1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Mounts `id` writable (a `xenod mount` process, whose counters are its
/// own), reads `vm.img` and checks the server answered no READ for it.
fn mount_reads_through_passthrough(data: &Path, id: &str, big: &[u8], t: &Path) {
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("\n*** SKIPPING the mount half of the cache warm test: needs root and /dev/fuse ***\n");
        return;
    }
    if !kernel_passthrough() {
        eprintln!("\n*** SKIPPING the mount half of the cache warm test: the kernel has no FUSE passthrough ***\n");
        return;
    }
    let (mnt, upper) = (t.join("mnt"), t.join("upper"));
    fs::create_dir_all(&mnt).unwrap();
    ok(data, &["mount", id, mnt.to_str().unwrap(), "--upper", upper.to_str().unwrap()]);
    let read = fs::read(mnt.join("vm.img"));
    let stats_dir = data.join("mounts").join("stats");
    let socket = fs::read_dir(&stats_dir).unwrap().flatten().map(|e| e.path()).next().expect("no stats socket");
    let s = xenod_cowfs::read_stats(&socket, Duration::from_secs(10)).unwrap();
    let um = xenod(data).arg("umount").arg(&mnt).output().unwrap();
    assert!(um.status.success(), "umount: {}", String::from_utf8_lossy(&um.stderr));
    assert_eq!(read.unwrap(), big);
    assert_eq!(s.file_cache_hits, 1, "{s:?}");
    assert_eq!(s.read_bytes, 0, "the server answered READs: the file was not passed through: {s:?}");
    assert!(!s.requests.iter().any(|o| o.op == "read" && o.count > 0), "READ requests: {s:?}");
}

#[test]
fn a_daemon_warms_the_file_cache_after_a_fetch() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, off) = (t.path().join("a"), t.path().join("b"), t.path().join("off"));
    let big = noise(3 << 20, 8);
    let id = publish_tree(&a, &big);
    let da = Daemon::start(&a, &[]);
    let db = Daemon::start(&b, &[]);
    ok(&b, &["fetch", &id, "--from", &da.addr]);
    within(60, "the fetched file's cache entry", || entries(&b).iter().any(|e| fs::read(e).is_ok_and(|d| d == big)));

    // Turned off, nothing is cached.
    fs::create_dir_all(&off).unwrap();
    fs::write(off.join("config.toml"), "warm_file_cache = false\n").unwrap();
    let doff = Daemon::start(&off, &[]);
    ok(&off, &["fetch", &id, "--from", &da.addr]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(entries(&off).is_empty(), "warmed with warm_file_cache = false");
    drop((da, db, doff));
}

//! Differential test against the kernel's overlayfs: the same seeded random
//! operations on both mounts over the same lower layers; after every step
//! the errno must match, at the end both merged trees and both upper
//! directories must be identical (modulo times, overlayfs's own
//! bookkeeping xattrs `origin`/`impure`/`uuid`, and each one's work directory).
//!
//! `XENOD_DIFF_SEQS` sets the number of sequences (default 300) and
//! `XENOD_DIFF_SEED` runs one seed alone.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use rustix::fs::{Mode, OFlags};
use xenod_cowfs::{MountOptions, mount};
use xenod_store::{LayerId, Store, tree_listing};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

fn lower_tree(root: &Path) {
    for d in ["d1/sub", "d2/deep/er", "d3", "e"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for (i, f) in ["f1", "d1/f2", "d1/sub/f3", "d2/f4", "d2/deep/f5", "d3/f6", "d2/deep/er/f7"].iter().enumerate() {
        fs::write(root.join(f), noise(1000 + i * 40_000, i as u64)).unwrap();
    }
    std::os::unix::fs::symlink("f1", root.join("l1")).unwrap();
    std::os::unix::fs::symlink("d1", root.join("d1/l2")).unwrap();
    rustix::fs::setxattr(root.join("d1/f2"), "user.a", b"lower", rustix::fs::XattrFlags::empty()).unwrap();
    fs::set_permissions(root.join("d3/f6"), fs::Permissions::from_mode(0o600)).unwrap();
    fix_times(root);
}

/// A stack of two layers (the second deletes and adds) and its export.
fn setup(store: &Store, t: &Path) -> (Vec<LayerId>, PathBuf) {
    let base = t.join("base");
    lower_tree(&base);
    let b = publish_dir(store, &base, None);
    let new = t.join("new");
    assert!(std::process::Command::new("cp").arg("-a").arg(&base).arg(&new).status().unwrap().success());
    fs::remove_file(new.join("d3/f6")).unwrap();
    fs::write(new.join("d3/g"), b"second layer").unwrap();
    fs::remove_dir_all(new.join("e")).unwrap();
    fs::write(new.join("e"), b"e is a file now").unwrap();
    fix_times(&new);
    let top = publish_overlay(store, b, &new);
    let stack = store.stack(&top).unwrap();
    let exported = t.join("lower");
    export(store, &stack, &exported);
    (stack, exported)
}

const NAMES: &[&str] = &["f1", "f2", "d1", "d2", "d3", "sub", "deep", "x", "y", "e", "l1", "g"];

fn rand_path(r: &mut Rng) -> String {
    let depth = match r.below(20) {
        0..=9 => 1,
        10..=16 => 2,
        _ => 3,
    };
    (0..depth).map(|_| *r.pick(NAMES)).collect::<Vec<_>>().join("/")
}

#[derive(Debug, Clone)]
enum Op {
    Create(String, u32, bool),
    Write(String, u64, usize, u64, bool),
    Truncate(String, u64),
    Rename(String, String, u32),
    Unlink(String),
    Rmdir(String),
    Mkdir(String, u32),
    Link(String, String),
    Symlink(String, String),
    Chmod(String, u32),
    SetXattr(String, String, Vec<u8>),
    RemoveXattr(String, String),
    Read(String),
}

fn gen_op(r: &mut Rng) -> Op {
    match r.below(16) {
        0 | 1 => Op::Create(rand_path(r), 0o600 + r.below(0o200) as u32, r.below(2) == 0),
        2..=4 => Op::Write(rand_path(r), r.below(200_000), 1 + r.below(70_000) as usize, r.next(), r.below(4) == 0),
        5 => Op::Truncate(rand_path(r), r.below(120_000)),
        6 | 7 => Op::Rename(rand_path(r), rand_path(r), if r.below(6) == 0 { 1 } else { 0 }),
        8 => Op::Unlink(rand_path(r)),
        9 => Op::Rmdir(rand_path(r)),
        10 | 11 => Op::Mkdir(rand_path(r), 0o700 + r.below(0o100) as u32),
        12 => Op::Link(rand_path(r), rand_path(r)),
        13 => Op::Symlink(rand_path(r), rand_path(r)),
        14 => match r.below(3) {
            0 => Op::Chmod(rand_path(r), r.below(0o1000) as u32),
            1 => Op::SetXattr(
                rand_path(r),
                format!("user.{}", r.pick(&["a", "b"])),
                noise(r.below(40) as usize, r.next()),
            ),
            _ => Op::RemoveXattr(rand_path(r), format!("user.{}", r.pick(&["a", "b"]))),
        },
        _ => Op::Read(rand_path(r)),
    }
}

type Outcome = Result<Option<Vec<u8>>, i32>;

fn errno(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}

fn apply(root: &Path, op: &Op) -> Outcome {
    let p = |s: &str| root.join(s);
    let r: Result<Option<Vec<u8>>, rustix::io::Errno> = (|| match op {
        Op::Create(a, mode, excl) => {
            let mut f = OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC;
            if *excl {
                f |= OFlags::EXCL;
            }
            rustix::fs::open(p(a), f, Mode::from_raw_mode(*mode))?;
            Ok(None)
        }
        Op::Write(a, off, len, seed, append) => {
            let mut f = OFlags::WRONLY | OFlags::CLOEXEC;
            if *append {
                f |= OFlags::APPEND;
            }
            let fd = rustix::fs::open(p(a), f, Mode::empty())?;
            let data = noise(*len, *seed);
            let file = fs::File::from(fd);
            if *append {
                use std::io::Write;
                (&file).write_all(&data).map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap())?;
            } else {
                file.write_all_at(&data, *off).map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap())?;
            }
            Ok(None)
        }
        Op::Truncate(a, n) => {
            let fd = rustix::fs::open(p(a), OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
            rustix::fs::ftruncate(&fd, *n)?;
            Ok(None)
        }
        Op::Rename(a, b, flags) => {
            let fl = if *flags == 1 { rustix::fs::RenameFlags::NOREPLACE } else { rustix::fs::RenameFlags::empty() };
            rustix::fs::renameat_with(rustix::fs::CWD, p(a), rustix::fs::CWD, p(b), fl)?;
            Ok(None)
        }
        Op::Unlink(a) => {
            rustix::fs::unlink(p(a))?;
            Ok(None)
        }
        Op::Rmdir(a) => {
            rustix::fs::rmdir(p(a))?;
            Ok(None)
        }
        Op::Mkdir(a, m) => {
            rustix::fs::mkdir(p(a), Mode::from_raw_mode(*m))?;
            Ok(None)
        }
        Op::Link(a, b) => {
            rustix::fs::link(p(a), p(b))?;
            Ok(None)
        }
        Op::Symlink(target, b) => {
            rustix::fs::symlink(target.as_str(), p(b))?;
            Ok(None)
        }
        Op::Chmod(a, m) => {
            rustix::fs::chmod(p(a), Mode::from_raw_mode(*m))?;
            Ok(None)
        }
        Op::SetXattr(a, n, v) => {
            rustix::fs::lsetxattr(p(a), n.as_str(), v, rustix::fs::XattrFlags::empty())?;
            Ok(None)
        }
        Op::RemoveXattr(a, n) => {
            rustix::fs::lremovexattr(p(a), n.as_str())?;
            Ok(None)
        }
        Op::Read(a) => {
            let fd = rustix::fs::open(p(a), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
            let mut out = Vec::new();
            use std::io::Read;
            fs::File::from(fd).read_to_end(&mut out).map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap())?;
            Ok(Some(out))
        }
    })();
    r.map_err(errno)
}

fn sh(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn run_seq(store: &Arc<Store>, stack: &[LayerId], lower: &Path, t: &Path, seed: u64, steps: usize) {
    let k = t.join(format!("k{seed}"));
    let x = t.join(format!("x{seed}"));
    for d in ["upper", "work", "mnt"] {
        fs::create_dir_all(k.join(d)).unwrap();
    }
    fs::create_dir_all(x.join("mnt")).unwrap();
    kernel_overlay(lower, &k.join("upper"), &k.join("work"), &k.join("mnt")).unwrap();
    let opts = MountOptions { upper: Some(x.join("upper")), threads: 2, ..Default::default() };
    let m = mount(store.clone(), stack, &x.join("mnt"), &opts).unwrap();
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut log = Vec::new();
    let mut failure = None;
    for step in 0..steps {
        let op = gen_op(&mut r);
        let a = apply(&k.join("mnt"), &op);
        let b = apply(&x.join("mnt"), &op);
        log.push(format!("{step}: {op:?} -> kernel {:?}", a.as_ref().map(|o| o.as_ref().map(Vec::len))));
        if a != b {
            failure = Some(format!(
                "seed {seed} step {step}: {op:?}: kernel {:?}, cowfs {:?}\n{}",
                a.as_ref().map(|o| o.as_ref().map(Vec::len)),
                b.as_ref().map(|o| o.as_ref().map(Vec::len)),
                log.join("\n")
            ));
            break;
        }
    }
    let merged = failure
        .is_none()
        .then(|| (normalize(tree_listing(&k.join("mnt")).unwrap()), normalize(tree_listing(&x.join("mnt")).unwrap())));
    xenod_cowfs::unmount(&k.join("mnt"), false).unwrap();
    m.unmount().unwrap();
    if let Some(f) = failure {
        panic!("{f}");
    }
    let (mk, mx) = merged.unwrap();
    if mk != mx {
        panic!(
            "seed {seed}: merged trees differ\nkernel:\n{}\ncowfs:\n{}\n{}",
            mk.join("\n"),
            mx.join("\n"),
            log.join("\n")
        );
    }
    let uk = normalize(tree_listing(&k.join("upper")).unwrap());
    let ux = normalize(tree_listing(&x.join("upper")).unwrap());
    if uk != ux {
        panic!(
            "seed {seed}: upper dirs differ\nkernel:\n{}\ncowfs:\n{}\n{}",
            uk.join("\n"),
            ux.join("\n"),
            log.join("\n")
        );
    }
    let _ = fs::remove_dir_all(&k);
    let _ = fs::remove_dir_all(&x);
}

#[test]
fn matches_kernel_overlayfs() {
    if !fuse_ok("matches_kernel_overlayfs") {
        return;
    }
    if !fs::read_to_string("/proc/filesystems").unwrap_or_default().contains("overlay") {
        let _ = std::process::Command::new("modprobe").arg("overlay").status();
        if !fs::read_to_string("/proc/filesystems").unwrap_or_default().contains("overlay") {
            eprintln!("\n*** SKIPPING matches_kernel_overlayfs: the kernel has no overlayfs ***\n");
            return;
        }
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let (stack, lower) = setup(&store, t.path());
    let seqs: u64 = std::env::var("XENOD_DIFF_SEQS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let seeds: Vec<u64> = match std::env::var("XENOD_DIFF_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => vec![s],
        None => (1..=seqs).collect(),
    };
    let started = Instant::now();
    for &seed in &seeds {
        run_seq(&store, &stack, &lower, t.path(), seed, 40);
    }
    eprintln!("{} sequences of 40 steps matched the kernel in {:?}", seeds.len(), started.elapsed());
    let _ = sh;
}

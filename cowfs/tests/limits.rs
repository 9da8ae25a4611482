//! Edges through a real mount: a full upper disk (ENOSPC, upper left
//! consistent), shared writable mmap, and offsets past 4 GiB. Need root
//! and /dev/fuse.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use common::*;
use xenod_cowfs::{MountOptions, mount};
use xenod_store::Store;

fn opts(upper: &Path) -> MountOptions {
    MountOptions { upper: Some(upper.to_path_buf()), threads: 2, ..Default::default() }
}

fn tmpfs(dir: &Path, size: &str) {
    fs::create_dir_all(dir).unwrap();
    let c = |s: &str| CString::new(s).unwrap();
    rustix::mount::mount(
        c("tmpfs"),
        CString::new(dir.as_os_str().as_encoded_bytes()).unwrap().as_c_str(),
        c("tmpfs"),
        rustix::mount::MountFlags::empty(),
        Some(c(&format!("size={size}")).as_c_str()),
    )
    .unwrap();
}

#[test]
fn full_upper_gives_enospc_and_stays_consistent() {
    if !fuse_ok("full_upper_gives_enospc_and_stays_consistent") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("small"), b"lower small\n").unwrap();
    // Large enough to copy up block by block.
    let f = fs::File::create(src.join("disk.img")).unwrap();
    f.set_len(80 << 20).unwrap();
    f.write_all_at(&noise(8 << 20, 9), 0).unwrap();
    drop(f);
    let id = publish_dir(&store, &src, None);
    let small = t.path().join("small-fs");
    tmpfs(&small, "4m");
    let upper = small.join("upper");
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let m = mount(store.clone(), &[id], &mnt, &opts(&upper)).unwrap();
        fs::write(mnt.join("small"), b"upper small\n").unwrap();
        // A new file larger than the upper disk.
        let mut big = fs::File::create(mnt.join("big")).unwrap();
        let e = (0..64).map(|i| big.write_all(&noise(256 << 10, i))).find_map(|r| r.err());
        let e = e.or_else(|| big.sync_all().err()).expect("writing 16 MiB into a 4 MiB upper succeeded");
        assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::NOSPC.raw_os_error()), "{e}");
        drop(big);
        fs::remove_file(mnt.join("big")).unwrap();
        // Leave about 512 KiB free, then write blocks into the large lower
        // file until their copies find no room either.
        let free = |p: &Path| {
            let s = rustix::fs::statvfs(p).unwrap();
            s.f_bavail * s.f_frsize
        };
        let mut filler = fs::File::create(mnt.join("filler")).unwrap();
        while free(&small) > 768 << 10 {
            filler.write_all(&noise(128 << 10, 7)).unwrap();
            filler.sync_all().unwrap();
        }
        drop(filler);
        let img = fs::OpenOptions::new().write(true).open(mnt.join("disk.img")).unwrap();
        let e = (0..64u64)
            .map(|i| img.write_all_at(&noise(64 << 10, 100 + i), i * (1 << 20)))
            .find_map(|r| r.err())
            .expect("block writes into a full upper succeeded");
        assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::NOSPC.raw_os_error()), "{e}");
        drop(img);
        // Room again: everything acknowledged before is there and intact.
        fs::remove_file(mnt.join("filler")).unwrap();
        assert_eq!(fs::read(mnt.join("small")).unwrap(), b"upper small\n");
        let mut first = vec![0u8; 64 << 10];
        fs::File::open(mnt.join("disk.img")).unwrap().read_exact_at(&mut first, 0).unwrap();
        assert!(first == noise(64 << 10, 100), "the first acknowledged block write survived");
        let mut clean = vec![0u8; 64 << 10];
        fs::File::open(mnt.join("disk.img")).unwrap().read_exact_at(&mut clean, 63 << 20).unwrap();
        assert!(clean.iter().all(|&b| b == 0), "a block never written reads from the lower file");
        m.unmount().unwrap();
        // A fresh mount of the same upper agrees, and it commits.
        let m = mount(store.clone(), &[id], &mnt, &opts(&upper)).unwrap();
        fs::File::open(mnt.join("disk.img")).unwrap().read_exact_at(&mut first, 0).unwrap();
        assert!(first == noise(64 << 10, 100), "after a remount");
        m.unmount().unwrap();
        xenod_cowfs::commit(store.clone(), &[id], &upper, Default::default()).unwrap();
    }));
    let _ = rustix::mount::unmount(&small, rustix::mount::UnmountFlags::DETACH);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn shared_mmap_and_offsets_past_4_gib() {
    if !fuse_ok("shared_mmap_and_offsets_past_4_gib") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(t.path().join("store")).unwrap());
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data"), noise(1 << 20, 5)).unwrap();
    let id = publish_dir(&store, &src, None);
    let (upper, mnt) = (t.path().join("upper"), t.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    let m = mount(store.clone(), &[id], &mnt, &opts(&upper)).unwrap();

    // Shared writable mapping of a lower file: copied up, written through.
    let f = fs::OpenOptions::new().read(true).write(true).open(mnt.join("data")).unwrap();
    unsafe {
        // SAFETY: a fresh shared mapping of 1 MiB of an open file, unmapped
        // below before the file is closed; nothing else aliases it.
        let p = rustix::mm::mmap(
            std::ptr::null_mut(),
            1 << 20,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &f,
            0,
        )
        .unwrap();
        let s = std::slice::from_raw_parts_mut(p.cast::<u8>(), 1 << 20);
        assert!(s[..4096] == noise(1 << 20, 5)[..4096], "mapped lower contents");
        s[4096..8192].fill(0x77);
        rustix::mm::msync(p, 1 << 20, rustix::mm::MsyncFlags::SYNC).unwrap();
        rustix::mm::munmap(p, 1 << 20).unwrap();
    }
    drop(f);
    let mut want = noise(1 << 20, 5);
    want[4096..8192].fill(0x77);
    assert!(fs::read(mnt.join("data")).unwrap() == want, "the mapped write reads back");

    // A sparse file with data past 4 GiB.
    let big = fs::File::create(mnt.join("big")).unwrap();
    let off = (5u64 << 30) + 12345;
    big.write_all_at(b"past four gibibytes", off).unwrap();
    drop(big);
    assert_eq!(fs::metadata(mnt.join("big")).unwrap().len(), off + 19);
    let mut buf = [0u8; 19];
    fs::File::open(mnt.join("big")).unwrap().read_exact_at(&mut buf, off).unwrap();
    assert_eq!(&buf, b"past four gibibytes");
    m.unmount().unwrap();
    assert!(fs::read(upper.join("data")).unwrap() == want, "the mapped write is in the upper");
}

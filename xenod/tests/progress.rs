//! Progress goes to stderr only when it is a terminal, unless asked.

mod common;

use std::path::Path;

use common::xenod;

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let noise: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(root.join("etc/big.bin"), &noise).unwrap();
}

#[test]
fn progress_stays_off_a_pipe_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    let data = tmp.path().join("d");
    // The tests' stderr is a pipe: no bar, only the summary.
    let out = xenod(&data).args(["publish", src.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("eta") && !err.contains("publishing"), "progress on a pipe: {err}");
    // Asked for: plain lines, with the total and percentage.
    let data2 = tmp.path().join("d2");
    let out = xenod(&data2).args(["publish", src.to_str().unwrap()]).env("XENOD_PROGRESS", "1").output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("publishing") && err.contains('%'), "no progress though asked: {err}");
}

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

/// The lines of `err` that show `what` at 100%, with a total (one, or
/// two when a tick drew the full bar before it ended).
fn done_lines<'a>(err: &'a str, what: &str) -> Vec<&'a str> {
    err.lines().filter(|l| l.starts_with(what) && l.contains("100%") && l.contains('/')).collect()
}

#[test]
fn gc_shows_its_phases_with_totals_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    let data = tmp.path().join("d");
    // Two layers; the second unpinned, so gc has packs to remove.
    let keep = xenod(&data).args(["publish", src.to_str().unwrap()]).output().unwrap();
    assert!(keep.status.success());
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let noise: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(40_503) >> 7) as u8).collect();
    std::fs::write(other.join("x.bin"), &noise).unwrap();
    let out = xenod(&data).args(["--json", "publish", other.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"].as_str().unwrap().to_owned();
    assert!(xenod(&data).args(["unpin", &id]).output().unwrap().status.success());

    // Not asked, on a pipe: nothing but the summary.
    let out = xenod(&data).args(["gc", "--dry-run"]).env_remove("XENOD_PROGRESS").output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains('%') && !err.contains("gc"), "progress on a pipe: {err}");
    let out = xenod(&data).args(["gc"]).env_remove("XENOD_PROGRESS").output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains('%') && !err.contains("gc"), "progress on a pipe: {err}");

    // Asked for: each phase ends at 100% of its total.
    let out = xenod(&data).args(["--progress", "gc"]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for phase in ["gc: marking", "gc: sweeping", "gc: packs"] {
        assert!(!done_lines(&err, phase).is_empty(), "{phase} does not reach 100% of a total: {err}");
    }
    assert!(done_lines(&err, "gc: marking")[0].contains(" entries "), "{err}");
    assert!(done_lines(&err, "gc: packs")[0].contains("iB/"), "the packs' total is in bytes: {err}");
}

#[test]
fn export_shows_the_bytes_it_writes_of_a_known_total_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    let data = tmp.path().join("d");
    let out = xenod(&data).args(["--json", "publish", src.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let base = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"].as_str().unwrap().to_owned();
    // An overlay that replaces the big file by 1 MiB and adds 512 KiB with
    // a hole: the union holds 1.5 MiB of the 4.5 MiB of its two layers.
    let over = tmp.path().join("over");
    tree(&over);
    std::fs::write(over.join("etc/big.bin"), vec![7u8; 1 << 20]).unwrap();
    let f = std::fs::File::create(over.join("etc/sparse.bin")).unwrap();
    f.set_len(512 << 10).unwrap();
    let out =
        xenod(&data).args(["--json", "overlay", "create", "--base", &base, over.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let top = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"].as_str().unwrap().to_owned();

    // Not asked, on a pipe: nothing but the summary.
    let dest = tmp.path().join("quiet");
    let out =
        xenod(&data).args(["export", &top, dest.to_str().unwrap()]).env_remove("XENOD_PROGRESS").output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains('%') && !err.contains("exporting"), "progress on a pipe: {err}");

    // Asked for: the union, the layer alone, a tar stream; each to 100%
    // of its total.
    let cases: [(&[&str], &str); 3] = [
        (&["export"], "1.50 MiB/1.50 MiB"),
        (&["export", "--layer-only"], "1.50 MiB/1.50 MiB"),
        (&["export"], "1.50 MiB/1.50 MiB"),
    ];
    for (i, (args, total)) in cases.iter().enumerate() {
        let dest = if i == 2 { "-".to_owned() } else { tmp.path().join(format!("out{i}")).display().to_string() };
        let out = xenod(&data).arg("--progress").args(*args).args([top.as_str(), dest.as_str()]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let err = String::from_utf8_lossy(&out.stderr);
        let done = done_lines(&err, "exporting");
        assert!(!done.is_empty(), "export {args:?} to {dest} does not reach 100% of a total: {err}");
        assert!(done.iter().all(|l| l.contains(total)), "export {args:?}: not {total}: {err}");
    }
    // The base alone: its 3 MiB.
    let dest = tmp.path().join("base");
    let out = xenod(&data).args(["--progress", "export", &base, dest.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(done_lines(&err, "exporting").first().is_some_and(|l| l.contains("3.00 MiB/3.00 MiB")), "{err}");
}

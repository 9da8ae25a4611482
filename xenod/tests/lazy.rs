//! A lazy deploy boots the fixture guest and answers before the whole
//! overlay is local. Host C holds the template (a host that ran it
//! before); the overlay on A carries the web service and 256 MiB the
//! guest never reads, served slowly (as over a thin link). C deploys it by
//! ticket with --lazy: the guest's first reads come through at once while
//! the background fetch is still far from done. Needs root, /dev/fuse and
//! QEMU; skips loudly when one is truly absent.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;

use common::*;

/// Compressible, never repeating: many distinct chunks.
fn noise_file(p: &Path, mib: usize) {
    let mut f = std::io::BufWriter::new(fs::File::create(p).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&(x & 0x3f3f_3f3f_3f3f_3f3f).to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
}

#[test]
fn lazy_deploy_answers_before_the_overlay_is_local() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: lazy deploy test: {why}");
        return;
    }
    let fix = fixture();
    let t = tempfile::tempdir().unwrap();
    let (a, c) = (t.path().join("a"), t.path().join("c"));
    let tree = t.path().join("template");
    cp(&fix.join("template"), &tree);
    add_boot(&fix, &tree);
    let base = ok(&a, &["publish", tree.to_str().unwrap()])["id"].as_str().unwrap().to_owned();
    let web = t.path().join("web");
    cp(&tree, &web);
    cp(&fix.join("web"), &web);
    noise_file(&web.join("srv/unused.bin"), 256);
    let spec = repo().join("fixtures/guest/web.spec.json");
    let top = ok(&a, &["overlay", "create", "--base", &base, web.to_str().unwrap(), "--spec", spec.to_str().unwrap()])
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // C holds the template already.
    let da = Daemon::start(&a, &[]);
    let dc = Daemon::start(&c, &[]);
    ok(&c, &["fetch", &base, "--from", &da.addr]);
    drop(da);
    // A now serves slowly: 25 ms per chunk on every stream.
    let da = Daemon::start(&a, &[("XENOD_TEST_DELAY_MS", "25")]);
    let ticket = String::from_utf8(xenod(&a).args(["share", &top]).output().unwrap().stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let name = format!("lazy{}", std::process::id());
    let d = ok(&c, &["deploy", &ticket, "--lazy", "--name", &name]);
    let guard = Instances(&c, vec![name.clone()]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    // deploy returns once the service answered; the overlay is not all here.
    let st = ok(&c, &["status"]);
    assert!(st["lazy_fetches"].get(&top).is_some(), "the background fetch is still running: {st}");
    assert_eq!(page(port).0, name);
    assert!(xenod(&c).args(["verify"]).output().unwrap().status.code() == Some(4), "chunks are still missing");
    drop(guard);
    drop((da, dc));
}

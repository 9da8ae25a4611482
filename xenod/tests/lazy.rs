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

/// `domain_prefix` for the daemons of these tests (several test runs and
/// engineers share one libvirt).
fn prefixed(data: &Path) {
    fs::create_dir_all(data).unwrap();
    fs::write(data.join("config.toml"), "domain_prefix = \"pf24-\"\n").unwrap();
}

/// Lazily deploys `ticket` on `data` as `name`; the instance's report.
fn lazy_deploy(data: &Path, ticket: &str, name: &str) -> serde_json::Value {
    let d = ok(data, &["deploy", ticket, "--lazy", "--name", name]);
    d["instances"][0].clone()
}

/// Reads of lazy mounts that waited for a provider, by `data`'s daemon.
fn stalls(data: &Path) -> u64 {
    let st = ok(data, &["status"]);
    st["lazy"]["stalls"].as_u64().unwrap_or_else(|| panic!("no stall count: {st}"))
}

fn ticket_of(data: &Path, top: &str) -> String {
    ok(data, &["share", top])["ticket"].as_str().unwrap().to_owned()
}

/// Waits (at most 180 s) until `data`'s daemon has no background fetch left.
fn wait_fetched(data: &Path) {
    let t = std::time::Instant::now();
    loop {
        let st = ok(data, &["status"]);
        if st["lazy_fetches"].as_object().is_none_or(|m| m.is_empty()) {
            return;
        }
        assert!(t.elapsed().as_secs() < 180, "the background fetch did not end: {st}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A lazy deploy on an empty host C records the order in which its guest
/// first read the stack (the kernel, the initrd, its root), and keeps it
/// with the stack; host D fetches the stack from C and gets the order with
/// it; host E, as empty as C was, deploys from D (as slow a provider as C
/// had) and prefetches in that order: its guest stalls on fewer chunks.
/// The template carries 32 MiB the guest never reads, ahead of /boot in
/// path order, where a fetch without an order starts.
#[test]
fn a_lazy_deploy_records_a_prefetch_order_that_travels_and_cuts_stalls() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: prefetch order test: {why}");
        return;
    }
    let fix = fixture();
    let t = tempfile::tempdir().unwrap();
    let (a, c, dd, e) = (t.path().join("a"), t.path().join("c"), t.path().join("d"), t.path().join("e"));
    for h in [&c, &e] {
        prefixed(h);
    }
    let tree = t.path().join("template");
    cp(&fix.join("template"), &tree);
    add_boot(&fix, &tree);
    noise_file(&tree.join("a-unused.bin"), 32);
    let base = ok(&a, &["publish", tree.to_str().unwrap()])["id"].as_str().unwrap().to_owned();
    let web = t.path().join("web");
    cp(&tree, &web);
    cp(&fix.join("web"), &web);
    let spec = repo().join("fixtures/guest/web.spec.json");
    let top = ok(&a, &["overlay", "create", "--base", &base, web.to_str().unwrap(), "--spec", spec.to_str().unwrap()])
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A serves slowly: 25 ms per chunk on every stream.
    let da = Daemon::start(&a, &[("XENOD_TEST_DELAY_MS", "25")]);
    let dc = Daemon::start(&c, &[]);
    let pid = std::process::id();
    let first = lazy_deploy(&c, &ticket_of(&a, &top), &format!("pfrec{pid}"));
    let guard = Instances(&c, vec![format!("pfrec{pid}")]);
    let stalls_without = stalls(&c);
    let recorded = first["lazy"]["recorded"].as_u64().expect("the first lazy deploy records an order");
    assert!(stalls_without > 0 && recorded > 0 && first["lazy"]["waits"].as_u64() > Some(0), "{first}");
    let shown = ok(&c, &["prefetch", "show", &top]);
    assert_eq!(shown["entries"].as_u64(), Some(recorded), "{shown}");
    let paths: Vec<&str> = shown["first"].as_array().unwrap().iter().filter_map(|e| e["path"].as_str()).collect();
    assert!(paths.iter().any(|p| p.starts_with("/boot/")), "the guest reads its kernel first: {paths:?}");
    assert!(!paths.iter().any(|p| p.contains("unused")), "{paths:?}");
    drop(guard);
    wait_fetched(&c);
    drop(da);

    // D fetches the stack from C, and the order with it; D then serves
    // slowly, as A did.
    let dd_daemon = Daemon::start(&dd, &[("XENOD_TEST_DELAY_MS", "25")]);
    let fetched = ok(&dd, &["fetch", &ticket_of(&c, &top)]);
    assert_eq!(fetched["order_from"].as_str(), Some(dc.node.as_str()), "{fetched}");
    let there = ok(&dd, &["prefetch", "show", &top]);
    assert_eq!(there["entries"], shown["entries"], "{there}");
    assert_eq!(there["first"], shown["first"]);

    // E, empty, deploys from D: the order comes with the manifests and its
    // chunks come first.
    let de = Daemon::start(&e, &[]);
    let second = lazy_deploy(&e, &ticket_of(&dd, &top), &format!("pfuse{pid}"));
    let guard = Instances(&e, vec![format!("pfuse{pid}")]);
    let stalls_with = stalls(&e);
    assert!(second["lazy"]["recorded"].is_null(), "an order was held: nothing recorded: {second}");
    assert_eq!(second["lazy"]["order"].as_u64(), Some(recorded));
    let st = ok(&e, &["status"]);
    assert!(
        st["lazy"]["prefetched"].as_u64().unwrap_or(0) > 0 || !st["lazy_fetches"].as_object().unwrap().is_empty(),
        "{st}"
    );
    eprintln!("stalls: {stalls_without} without an order, {stalls_with} with one ({recorded} entries)");
    assert!(stalls_with < stalls_without, "stalls {stalls_with} with the order, {stalls_without} without");
    assert_eq!(page(second["port"].as_u64().unwrap()).0, format!("pfuse{pid}"));

    // clear drops it; show then says there is none (exit 3); record asks
    // the next lazy deploy to record.
    ok(&e, &["prefetch", "clear", &top]);
    assert_eq!(run(&e, &["prefetch", "show", &top]).status.code(), Some(3));
    ok(&e, &["prefetch", "record", &top]);
    let out = run(&e, &["prefetch", "show", &top]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("the next lazy deploy records one"));
    drop(guard);
    drop((dc, dd_daemon, de));
}

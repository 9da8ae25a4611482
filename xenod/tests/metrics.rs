//! The daemon's Prometheus endpoint scraped while a fetch and a mount run:
//! the counters move as they should, and the exposition parses.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};

use common::{Daemon, ok, xenod};
use prometheus_parse::{LineInfo, Scrape, Value};

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/big.bin"), xenod_store::testing::noise(3 << 20, 1)).unwrap();
    std::fs::write(root.join("etc/hostname"), b"metrics\n").unwrap();
}

/// `xenod serve` with `metrics = "127.0.0.1:0"`; its metrics address.
fn serve_with_metrics(data: &Path) -> (Child, String, String) {
    std::fs::create_dir_all(data).unwrap();
    // No warming of the file cache after the fetch: the mount below must
    // read the big file's chunks (and count them), not a cached copy.
    std::fs::write(data.join("config.toml"), "metrics = \"127.0.0.1:0\"\nwarm_file_cache = false\n").unwrap();
    let mut child = xenod(data)
        .args(["--json", "serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve said {line:?}: {e}"));
    let metrics = v["metrics"].as_str().unwrap_or_else(|| panic!("no metrics address in {v}")).to_owned();
    (child, metrics, v["addr"].as_str().unwrap().to_owned())
}

/// GET /metrics: the body, checked line by line against the text format.
fn scrape(addr: &str) -> Scrape {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: xenod\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    for l in body.lines() {
        let info = LineInfo::parse(l);
        assert!(!matches!(info, LineInfo::Ignored), "not in the text format: {l:?}");
    }
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The sum of `metric`'s samples whose labels include `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => 0.0,
        })
        .sum()
}

#[test]
fn metrics_move_with_a_fetch_and_a_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, c) = (tmp.path().join("a"), tmp.path().join("c"));
    let src = tmp.path().join("src");
    tree(&src);
    let id = ok(&a, &["publish", src.to_str().unwrap()])["id"].as_str().unwrap().to_owned();
    let da = Daemon::start(&a, &[]);
    let (mut dc, metrics, _) = serve_with_metrics(&c);

    let before = scrape(&metrics);
    assert_eq!(value(&before, "xenod_chunks_received_total", &[]), 0.0);
    assert_eq!(value(&before, "xenod_store_chunks", &[]), 0.0);
    assert!(before.docs.contains_key("xenod_fuse_request_duration_seconds"), "every family is described");

    ok(&c, &["fetch", &id, "--from", &da.addr]);
    let after = scrape(&metrics);
    let got = value(&after, "xenod_chunks_received_total", &[]);
    assert!(got > 0.0, "chunks received after a fetch: {got}");
    assert!(value(&after, "xenod_peer_bytes_received_total", &[]) > 0.0);
    assert!(value(&after, "xenod_store_chunks", &[]) >= got);
    assert!(value(&after, "xenod_fetches_total", &[]) >= 1.0);
    assert!(value(&after, "xenod_store_dedup_ratio", &[]) > 0.0);

    let mounted = rustix::process::geteuid().is_root() && Path::new("/dev/fuse").exists();
    if !mounted {
        eprintln!("SKIPPED: the mount half of metrics_move_with_a_fetch_and_a_mount (needs root and /dev/fuse)");
    } else {
        let mp = tmp.path().join("mnt");
        std::fs::create_dir_all(&mp).unwrap();
        ok(&c, &["mount", &id, mp.to_str().unwrap()]);
        let mnt = mp.canonicalize().unwrap().display().to_string();
        let data = std::fs::read(mp.join("etc/big.bin")).unwrap();
        assert_eq!(data.len(), 3 << 20);
        let s = scrape(&metrics);
        let reads = value(&s, "xenod_fuse_requests_total", &[("mountpoint", &mnt), ("op", "read")]);
        assert!(reads > 0.0, "FUSE reads after reading a file through the mount: {reads}");
        assert!(value(&s, "xenod_fuse_requests_total", &[("mountpoint", &mnt), ("op", "lookup")]) > 0.0);
        assert!(value(&s, "xenod_chunk_cache_misses_total", &[("mountpoint", &mnt)]) > 0.0);
        assert!(value(&s, "xenod_fuse_request_duration_seconds", &[("op", "read")]) >= reads);
        assert_eq!(value(&s, "xenod_mounts", &[]), 1.0);
        // Reading again: more requests (the mount served them), never fewer.
        std::fs::read(mp.join("etc/hostname")).unwrap();
        let s2 = scrape(&metrics);
        assert!(
            value(&s2, "xenod_fuse_requests_total", &[("mountpoint", &mnt)])
                >= value(&s, "xenod_fuse_requests_total", &[("mountpoint", &mnt)])
        );
        let um = xenod(&c).arg("umount").arg(&mp).output().unwrap();
        assert!(um.status.success(), "umount: {}", String::from_utf8_lossy(&um.stderr));
        // The mount process is gone: its socket is dropped from the scrape.
        let t = std::time::Instant::now();
        while value(&scrape(&metrics), "xenod_mounts", &[]) != 0.0 {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "the unmounted mount is still scraped");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let _ = dc.kill();
    let _ = dc.wait();
}

#[test]
fn metrics_on_a_remote_address_need_metrics_remote() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.toml"), "metrics = \"0.0.0.0:0\"\n").unwrap();
    let out = xenod(tmp.path()).args(["serve", "--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics_remote"), "{err}");
}

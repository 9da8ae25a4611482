//! Admission and limits: a deploy beyond the configured memory is refused
//! (exit 9, naming the resource, what was asked and what is free) and
//! leaves nothing behind; limits a guest cannot take are refused unless
//! --best-effort; with real guests, a 25% CPU quota holds a busy guest to
//! a quarter of a CPU, a 64 MiB upper quota stops a 100 MiB write inside
//! the guest at about 64 MiB, and a migration onto a host without the
//! memory is refused in its prepare phase while the guest runs on;
//! `xenod usage` after a known workload (a busy loop, a write, pages
//! served) matches what was done, survives a daemon restart and moves
//! with a migrated instance; `xenod limit` changes a running guest's CPU
//! quota.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A tree the test driver deploys (it boots nothing: any file is a kernel).
fn fake_guest(data: &Path, work: &Path) {
    let src = work.join("src");
    fs::create_dir_all(src.join("boot")).unwrap();
    fs::write(src.join("boot/vmlinux"), b"not a kernel").unwrap();
    let spec = work.join("spec.json");
    fs::write(&spec, r#"{"kernel": "stack:boot/vmlinux", "memory_mib": 256}"#).unwrap();
    ok(data, &["publish", src.to_str().unwrap(), "--name", "template://t/fake/1", "--spec", spec.to_str().unwrap()]);
}

#[test]
fn deploys_beyond_capacity_are_refused_and_leave_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    fs::create_dir_all(&data).unwrap();
    let pid = std::process::id();
    fs::write(data.join("config.toml"), format!("domain_prefix = \"adm{pid}-\"\n[capacity]\nmemory_mib = 512\n"))
        .unwrap();
    fake_guest(&data, t.path());
    let _g = Instances(&data, vec!["a1".into(), "a2".into()]);
    let deploy = |name: &str, mem: &str, extra: &[&str]| {
        let mut args = vec!["deploy", "template://t/fake/1", "--uri", "test:///default", "--no-wait", "--name", name];
        args.extend(["--memory", mem]);
        args.extend(extra);
        run(&data, &args)
    };
    let out = deploy("a1", "384", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 256 MiB more does not fit in 512 with 384 held.
    let out = deploy("a2", "256", &[]);
    assert_eq!(out.status.code(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    let err: Value = serde_json::from_str(String::from_utf8_lossy(&out.stderr).lines().last().unwrap()).unwrap();
    assert_eq!(err["code"], 9);
    let msg = err["error"].as_str().unwrap();
    assert!(msg.contains("a2 not admitted: memory: 256 MiB asked, 128 MiB free of 512 MiB, 1 instance(s)"), "{msg}");
    assert!(!data.join("instances/a2").exists(), "nothing of the refused deploy is left");
    let ps = ok(&data, &["ps"]);
    assert_eq!(ps["instances"].as_array().unwrap().len(), 1, "{ps}");
    // Three replicas are admitted together or not at all.
    let out = run(
        &data,
        &["deploy", "template://t/fake/1", "--uri", "test:///default", "--no-wait", "--name", "r", "--replicas", "3"],
    );
    assert_eq!(out.status.code(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 replicas (r-1, ...) not admitted"));
    assert!(!data.join("instances/r-1").exists());

    // Limits this guest cannot take: refused, or dropped with --best-effort.
    ok(&data, &["destroy", "a1"]);
    let out = deploy("a2", "128", &["--disk-bps", "1000000"]);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("disk_bytes_sec (a shared-filesystem root has no disk"));
    let out = deploy("a2", "128", &["--cpu-quota", "0"]);
    assert_eq!(out.status.code(), Some(6), "an absurd quota: {}", String::from_utf8_lossy(&out.stderr));
    let out = deploy("a2", "128", &["--disk-bps", "1000000", "--best-effort", "--cpu-quota", "50"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec: Value = serde_json::from_slice(&fs::read(data.join("instances/a2/instance.json")).unwrap()).unwrap();
    assert_eq!(rec["spec"]["limits"], serde_json::json!({ "cpu_quota_pct": 50 }), "{rec}");
}

/// The fixture's fs-root web guest plus `services` (name, script) run at
/// boot and `files` (path, bytes), published in `data` as `template://t/lim/1`.
fn guest_with(fix: &Path, work: &Path, data: &Path, services: &[(&str, &str)], files: &[(&str, &[u8])]) {
    let tree = work.join("tree");
    cp(&fix.join("template"), &tree);
    cp(&fix.join("web"), &tree);
    add_boot(fix, &tree);
    for (path, bytes) in files {
        fs::write(tree.join(path), bytes).unwrap();
    }
    let dir = tree.join("etc/xenod/services.d");
    for (name, script) in services {
        fs::write(dir.join(name), script).unwrap();
        assert!(Command::new("chmod").arg("755").arg(dir.join(name)).status().unwrap().success());
    }
    let spec = repo().join("fixtures/guest/web.spec.json");
    ok(data, &["publish", tree.to_str().unwrap(), "--name", "template://t/lim/1", "--spec", spec.to_str().unwrap()]);
}

/// Nanoseconds of CPU the domain used, as libvirt counts them.
fn cpu_time(domain: &str) -> u64 {
    let out = Command::new("virsh").args(["-c", "qemu:///system", "domstats", "--cpu-total", domain]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("cpu.time="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{text}"))
}

#[test]
fn cpu_quota_and_upper_quota_hold_inside_real_guests() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: real-guest limits test: {why}");
        return;
    }
    let fix = fixture();
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    fs::create_dir_all(&data).unwrap();
    let pid = std::process::id();
    let prefix = format!("lim{pid}-");
    fs::write(data.join("config.toml"), format!("domain_prefix = \"{prefix}\"\n")).unwrap();
    // Each runs only in the guest whose kernel command line names it.
    let busy = "#!/bin/sh\ngrep -q lim=busy /proc/cmdline || exit 0\n( while :; do :; done ) &\n";
    let fill = "#!/bin/sh\ngrep -q lim=fill /proc/cmdline || exit 0\n\
                ( dd if=/dev/zero of=/fill bs=1M count=100 2>/tmp/dd.err; \
                echo \"fill: exit=$? bytes=$(wc -c < /fill) $(grep -i quota /tmp/dd.err)\" > /dev/console ) &\n";
    guest_with(&fix, t.path(), &data, &[("90-busy", busy), ("91-fill", fill)], &[]);
    let (cpu, quota) = (format!("cpu{pid}"), format!("q{pid}"));
    let _g = Instances(&data, vec![cpu.clone(), quota.clone()]);

    // A guest spinning at a 25% quota: a quarter of one CPU, measured here.
    ok(&data, &["deploy", "template://t/lim/1", "--name", &cpu, "--cpu-quota", "25", "--cmdline", "lim=busy"]);
    let domain = format!("{prefix}{cpu}");
    let (t0, c0) = (Instant::now(), cpu_time(&domain));
    std::thread::sleep(Duration::from_secs(10));
    let share = (cpu_time(&domain) - c0) as f64 / t0.elapsed().as_nanos() as f64;
    eprintln!("guest at a 25% quota used {:.1}% of a CPU over 10 s", share * 100.0);
    assert!((0.20..=0.30).contains(&share), "{:.1}% of a CPU", share * 100.0);
    ok(&data, &["destroy", &cpu]);

    // 100 MiB written against a 64 MiB upper quota.
    let free = |p: &Path| rustix::fs::statvfs(p).map(|s| s.f_bavail * s.f_frsize).unwrap();
    let before = free(&data);
    let d =
        ok(&data, &["deploy", "template://t/lim/1", "--name", &quota, "--upper-quota", "64", "--cmdline", "lim=fill"]);
    let line = wait_console_line(&data, &quota, "fill: ");
    eprintln!("inside the guest: {line}");
    assert!(line.contains("exit=1") && line.contains("quota exceeded"), "{line}");
    let bytes: u64 = line.split("bytes=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!((56 << 20..=64 << 20).contains(&bytes), "stopped at {bytes} bytes");
    // The host lost no more than the quota, and the upper holds what the
    // guest was told it wrote.
    let used = before.saturating_sub(free(&data));
    assert!(used <= (64 + 8) << 20, "the host's free space dropped by {} MiB", used >> 20);
    let upper = data.join("instances").join(&quota).join("upper/fill");
    assert_eq!(fs::metadata(&upper).unwrap().len(), bytes);
    let (name, _) = page(d["instances"][0]["port"].as_u64().unwrap());
    assert_eq!(name, quota, "the guest still serves");
    ok(&data, &["destroy", &quota]);
}

#[test]
fn a_migration_onto_a_full_host_is_refused_in_prepare() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: real-guest admission test: {why}");
        return;
    }
    let fix = fixture();
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let pid = std::process::id();
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(a.join("config.toml"), format!("domain_prefix = \"fa{pid}-\"\n")).unwrap();
    fs::write(b.join("config.toml"), format!("domain_prefix = \"fb{pid}-\"\n[capacity]\nmemory_mib = 128\n")).unwrap();
    publish_disk_fixture(&fix, t.path(), &a);
    let (da, db) = (Daemon::start(&a, &[]), Daemon::start(&b, &[]));
    ok(&b, &["allow", &da.node]);
    let name = format!("full{pid}");
    let _g = Instances(&a, vec![name.clone()]);
    let d = ok(&a, &["deploy", "template://t/disk/1", "--name", &name]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    assert_eq!(page(port).1, 1);
    let out = run(&a, &["migrate", &name, "--to", &db.addr]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prepare") && err.contains("not admitted: memory: 256 MiB asked, 128 MiB free"), "{err}");
    assert_eq!(page(port).1, 2, "the guest runs on at the source");
    assert!(!b.join("instances").join(&name).exists(), "nothing arrived at the target");
    drop((da, db));
}

/// Seconds of CPU the process `pid` used, as the kernel counts it.
fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    let hz: f64 = String::from_utf8_lossy(&hz.stdout).trim().parse().unwrap();
    ticks as f64 / hz
}

fn qemu_pid(domain: &str) -> u32 {
    fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid")).unwrap().trim().parse().unwrap()
}

/// Waits for `line` on an instance's console.
fn wait_console_line(data: &Path, name: &str, prefix: &str) -> String {
    let console = data.join("instances").join(name).join("console.log");
    let t0 = Instant::now();
    loop {
        let log = fs::read_to_string(&console).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| l.starts_with(prefix)) {
            return l.to_owned();
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "no {prefix:?} on the console:\n{log}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn within(what: &str, got: f64, want: f64, tolerance: f64) {
    eprintln!("usage: {what}: {got:.3} counted, {want:.3} done ({:+.1}%)", (got / want - 1.0) * 100.0);
    assert!((got - want).abs() <= want * tolerance, "{what}: {got} counted against {want} done");
}

#[test]
fn usage_counts_a_known_workload_and_follows_the_instance() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: real-guest usage test: {why}");
        return;
    }
    let fix = fixture();
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let pid = std::process::id();
    for (d, p) in [(&a, "ua"), (&b, "ub")] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("config.toml"), format!("domain_prefix = \"{p}{pid}-\"\nusage_interval_secs = 2\n")).unwrap();
    }
    // Eight seconds of a busy loop, then 40 MiB written and synced.
    let work = "#!/bin/sh\ngrep -q lim=work /proc/cmdline || exit 0\n\
                ( end=$(( $(date +%s) + 8 )); while [ $(date +%s) -lt $end ]; do :; done; \
                dd if=/dev/zero of=/work.bin bs=1M count=40 conv=fsync 2>/dev/null; sync; \
                echo \"work: done\" > /dev/console ) &\n";
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    guest_with(&fix, &t.path().join("w"), &a, &[("90-work", work)], &[("srv/www/big.bin", &big)]);
    let name = format!("use{pid}");
    let _g = Instances(&a, vec![name.clone()]);
    let _gb = Instances(&b, vec![name.clone()]);
    let da = Daemon::start(&a, &[]);
    let db = Daemon::start(&b, &[]);
    ok(&b, &["allow", &da.node]);
    let d = ok(&a, &["deploy", "template://t/lim/1", "--name", &name, "--cmdline", "lim=work"]);
    let port = d["instances"][0]["port"].as_u64().unwrap();
    let domain = format!("ua{pid}-{name}");
    wait_console_line(&a, &name, "work: done");
    for _ in 0..2 {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "60", "-o", "/dev/null", "-w", "%{size_download}"])
            .arg(format!("http://127.0.0.1:{port}/big.bin"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), (16u64 << 20).to_string(), "the page was served whole");
    }
    let u = ok(&a, &["usage", &name]);
    let cpu_done = proc_cpu_seconds(qemu_pid(&domain));
    let i = &u["instances"][0];
    assert_eq!(i["instance"], name.as_str(), "{u}");
    assert!(i["owner"].as_str().unwrap().starts_with("node:") || i["owner"].as_str().unwrap().starts_with("key:"));
    let us = &i["usage"];
    let n = |k: &str| us[k].as_u64().unwrap() as f64;
    within("CPU seconds (the guest's process, from /proc)", n("cpu_ns") / 1e9, cpu_done, 0.10);
    assert!(n("cpu_ns") / 1e9 >= 6.0, "the 8 s busy loop is in it: {us}");
    within("MiB written (dd of 40 MiB)", n("disk_written") / 1048576.0, 40.0, 0.10);
    within("MiB sent (two pages of 16 MiB)", n("net_out") / 1048576.0, 32.0, 0.10);
    within("MiB of upper", n("upper_bytes") / 1048576.0, 40.0, 0.10);
    assert!(us["memory_mib_seconds"].as_f64().unwrap() > 0.0 && n("memory_peak_mib") >= 128.0, "{us}");
    assert_eq!(u["owners"].as_array().unwrap().len(), 1);
    assert_eq!(u["total"]["cpu_ns"], us["cpu_ns"]);

    // A CPU quota set while it runs, then removed.
    let l = ok(&a, &["limit", &name, "--cpu-quota", "30"]);
    assert_eq!(l["limits"]["cpu_quota_pct"], 30, "{l}");
    let sched = Command::new("virsh").args(["-c", "qemu:///system", "schedinfo", &domain]).output().unwrap();
    let sched = String::from_utf8_lossy(&sched.stdout);
    assert!(sched.lines().any(|l| l.starts_with("global_quota") && l.trim_end().ends_with("30000")), "{sched}");
    let out = run(&a, &["limit", &name, "--disk-bps", "1000"]);
    assert_eq!(out.status.code(), Some(6), "a tree root has no disk: {}", String::from_utf8_lossy(&out.stderr));
    let out = run(&a, &["limit", &name, "--upper-quota", "1"]);
    assert_eq!(out.status.code(), Some(6), "below the upper's size: {}", String::from_utf8_lossy(&out.stderr));
    ok(&a, &["limit", &name, "--cpu-quota", "0"]);

    // Kept across a daemon restart: nothing is counted twice or lost.
    da.stop();
    let da = Daemon::start(&a, &[]);
    let again = ok(&a, &["usage", &name]);
    let after = &again["instances"][0]["usage"];
    assert!(after["cpu_ns"].as_u64().unwrap() >= us["cpu_ns"].as_u64().unwrap(), "{after} after {us}");
    within(
        "MiB written after a restart",
        after["disk_written"].as_u64().unwrap() as f64 / 1048576.0,
        n("disk_written") / 1048576.0,
        0.02,
    );

    // Its records go with it to the host it migrates to.
    ok(&a, &["migrate", &name, "--to", &db.addr, "--cold"]);
    let there = ok(&b, &["usage", &name]);
    let moved = &there["instances"][0]["usage"];
    assert!(moved["cpu_ns"].as_u64().unwrap() >= after["cpu_ns"].as_u64().unwrap(), "{moved} after {after}");
    assert!(moved["net_out"].as_u64().unwrap() >= after["net_out"].as_u64().unwrap(), "{moved}");
    assert_eq!(there["instances"][0]["owner"], i["owner"], "the owner moves too");
    let here = ok(&a, &["usage"]);
    assert!(here["instances"].as_array().unwrap().is_empty(), "the source forgot it: {here}");
    ok(&b, &["destroy", &name]);
    drop((da, db));
}

//! What the Debian package ships, checked against the code it comes from:
//! the systemd unit (`systemd-analyze verify`) and the daemon's side of it
//! (READY=1 / STOPPING=1 on NOTIFY_SOCKET), the completions (loaded into a
//! real bash), the man pages, the log formats, the config reference and the
//! packaged config (docs/config.md, packaging/config.toml), and the .deb
//! itself (built from the debug binary by `scripts/build-deb.sh --dev`).
//!
//! A check whose tool is missing here says `SKIPPED: ...` on stderr.
//! scripts/install-deps.sh installs them all (systemd, cargo-deb).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::repo;
use xenod_host::config::{Capacity, Config, RelayConfig, TrustEntry};

fn xenod_bin() -> &'static str {
    env!("CARGO_BIN_EXE_xenod")
}

/// Whether `tool` runs here; if not, says so loudly and the test returns.
fn have(tool: &str, args: &[&str], test: &str) -> bool {
    if Command::new(tool).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        return true;
    }
    eprintln!("SKIPPED: {test}: `{tool}` is not installed here (bash scripts/install-deps.sh installs it)");
    false
}

/// `systemd-analyze verify` of `unit` with its ExecStart pointed at `bin`
/// (verify wants the executable to exist); panics with what it said unless
/// it accepted the unit without a word. No systemd needs to run.
fn verify_unit(unit: &Path, bin: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(unit).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/xenod "), "the unit starts /usr/bin/xenod");
    let copy = dir.path().join("xenod.service");
    fs::write(&copy, text.replace("/usr/bin/xenod", bin.to_str().unwrap())).unwrap();
    // --man=no: the man pages it names are installed by the package, not here.
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {}\n{said}", out.status);
}

#[test]
fn systemd_accepts_the_unit() {
    if !have("systemd-analyze", &["--version"], "systemd_accepts_the_unit") {
        return;
    }
    verify_unit(&repo().join("packaging/xenod.service"), Path::new(xenod_bin()));
}

#[test]
fn unit_runs_the_daemon_on_the_packaged_data_dir() {
    let unit = fs::read_to_string(repo().join("packaging/xenod.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/xenod --data-dir /var/lib/xenod serve",
        "StateDirectory=xenod",
        "KillMode=process",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    // Options that give the unit its own mount namespace would hide the
    // daemon's FUSE mounts from libvirt's QEMU.
    for opt in ["ProtectSystem=", "ProtectHome=", "PrivateTmp=", "PrivateDevices=", "PrivateMounts=", "ReadWritePaths="]
    {
        assert!(!unit.lines().any(|l| l.starts_with(opt)), "{opt} would hide the daemon's mounts from QEMU");
    }
}

/// Runs `xenod GLOBAL.. serve` with NOTIFY_SOCKET set, as systemd would,
/// and `env`; returns the notices it sent, in order, and its stderr. It is
/// sent SIGHUP once ready (which logs at info), then SIGTERM.
fn serve_under_notify(global: &[&str], env: &[(&str, &str)]) -> (Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut c = common::xenod(&dir.path().join("data"));
    c.args(global)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("XENOD_LOG", "xenod_host=info")
        .env_remove("XENOD_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let pid = rustix::process::Pid::from_child(&child);
    let recv = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("no notice from the daemon within 60 s");
        String::from_utf8_lossy(&buf[..n]).trim().to_string()
    };
    let mut notices = vec![recv()];
    // READY comes after the ready line: the socket accepts by now.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("serving "), "serve said {line:?}");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    while notices.last().is_none_or(|n| n != "STOPPING=1") {
        notices.push(recv());
    }
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(child.wait().unwrap().success(), "serve failed: {err}");
    (notices, err)
}

#[test]
fn serve_tells_systemd_ready_and_stopping_and_logs_plain_text() {
    let (notices, err) = serve_under_notify(&[], &[]);
    assert_eq!(notices.first().map(String::as_str), Some("READY=1"), "{notices:?}");
    assert_eq!(notices.last().map(String::as_str), Some("STOPPING=1"), "{notices:?}");
    // Only watchdog pings between them (one per 5-second tick).
    assert!(notices[1..notices.len() - 1].iter().all(|n| n == "WATCHDOG=1"), "{notices:?}");
    // stderr is a pipe, not a terminal: no colour codes.
    assert!(err.contains("trust reloaded"), "no SIGHUP log line in {err:?}");
    assert!(!err.contains('\x1b'), "escape codes in logs to a pipe: {err:?}");
}

#[test]
fn log_format_json_gives_one_object_a_line() {
    let by_env = serve_under_notify(&[], &[("XENOD_LOG_FORMAT", "json")]).1;
    let by_flag = serve_under_notify(&["--log-format", "json"], &[]).1;
    for err in [by_env, by_flag] {
        let lines: Vec<serde_json::Value> = err
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?} is no JSON: {e}")))
            .collect();
        let reload = lines
            .iter()
            .find(|v| v["message"].as_str().is_some_and(|m| m.contains("trust reloaded")))
            .unwrap_or_else(|| panic!("no reload record in {lines:?}"));
        assert_eq!(reload["level"], "INFO");
        assert!(reload["timestamp"].is_string(), "{reload}");
    }
}

/// `xenod generate completions SHELL` into a file.
fn completion(shell: &str, dir: &Path) -> PathBuf {
    let out = Command::new(xenod_bin()).args(["generate", "completions", shell]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = dir.join(format!("xenod.{shell}"));
    fs::write(&p, out.stdout).unwrap();
    p
}

/// What bash's completion for xenod offers for `words` (the last one being
/// completed), as bash itself computes it from the generated script.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let line = words.join(" ");
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source '{}' || exit 9\n\
         complete -p xenod >/dev/null || exit 8\n\
         COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}\n\
         _xenod xenod '{}' '{}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len().saturating_sub(2)],
    );
    let out = Command::new("bash").arg("-c").arg(prog).output().unwrap();
    assert!(out.status.success(), "bash: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

#[test]
fn bash_completion_loads_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let script = completion("bash", dir.path());
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source '{}' && complete -p xenod", script.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("-F _xenod xenod"));

    assert_eq!(bash_complete(&script, &["xenod", "dep"]), ["deploy"]);
    assert_eq!(bash_complete(&script, &["xenod", "overlay", "cr"]), ["create"]);
    assert!(bash_complete(&script, &["xenod", "deploy", "--repl"]).contains(&"--replicas".to_string()));
    assert!(bash_complete(&script, &["xenod", "--log-f"]).contains(&"--log-format".to_string()));
}

#[test]
fn zsh_and_fish_completions_are_made() {
    let dir = tempfile::tempdir().unwrap();
    let zsh = fs::read_to_string(completion("zsh", dir.path())).unwrap();
    assert!(zsh.starts_with("#compdef xenod"), "{}", &zsh[..zsh.len().min(200)]);
    let fish = fs::read_to_string(completion("fish", dir.path())).unwrap();
    assert!(fish.contains("complete -c xenod") && fish.contains("deploy"));
}

#[test]
fn man_pages_cover_every_visible_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(xenod_bin()).args(["--json", "generate", "man"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pages: BTreeSet<&str> = v["pages"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    for p in ["xenod.1", "xenod-deploy.1", "xenod-serve.1", "xenod-overlay-create.1", "xenod-key-trust.1"] {
        assert!(pages.contains(p), "no {p} in {pages:?}");
    }
    assert!(!pages.contains("xenod-generate.1"), "the hidden `generate` got a page");
    let deploy = fs::read_to_string(dir.path().join("xenod-deploy.1")).unwrap();
    assert!(deploy.contains("replicas") && deploy.contains(".TH xenod-deploy 1"), "{deploy}");
    // The exit codes (after_help) reach the main page.
    let main = fs::read_to_string(dir.path().join("xenod.1")).unwrap();
    assert!(main.contains("Exit codes"), "{main}");
}

// --- The config reference and the packaged config -------------------------

const DOC: &str = include_str!("../../docs/config.md");
const PACKAGED: &str = include_str!("../../packaging/config.toml");

/// The first ```toml block of docs/config.md.
fn doc_example() -> &'static str {
    let start = DOC.find("```toml\n").expect("docs/config.md has a ```toml example") + "```toml\n".len();
    let len = DOC[start..].find("```").expect("the example block ends");
    &DOC[start..start + len]
}

/// A config with every field set, written out field by field: a field
/// added to `Config` fails to compile here until it is listed, and then
/// fails the tests below until docs/config.md documents it.
fn every_field() -> Config {
    Config {
        trust: vec![TrustEntry { key: "k".into(), publishers: vec!["p".into()] }],
        trusted_keys: vec!["k".into()],
        listen: Some("127.0.0.1:1".parse().unwrap()),
        peers: vec!["p".into()],
        relay: RelayConfig::Default,
        migrate_from: vec!["n".into()],
        domain_prefix: "d".into(),
        pull_from: vec!["n".into()],
        labels: [("l".to_string(), "v".to_string())].into(),
        host_expiry_secs: Some(1),
        capacity: Some(Capacity {
            vcpus: Some(2),
            memory_mib: Some(1024),
            reserved_memory_mib: Some(256),
            cpu_overcommit: Some(4.0),
            memory_overcommit: Some(1.0),
            upper_mib: Some(4096),
        }),
        metrics: Some("127.0.0.1:9464".parse().unwrap()),
        metrics_remote: true,
        net_underlay: Some("192.0.2.10".parse().unwrap()),
        net_vxlan_port: Some(4789),
        usage_interval_secs: Some(10),
        file_cache_bytes: Some(1 << 30),
        warm_file_cache: Some(false),
    }
}

/// The keys `c` writes: top-level ones, and `trust.KEY` inside `[[trust]]`.
fn keys(c: &Config) -> BTreeSet<String> {
    let v: toml::Table = toml::from_str(&toml::to_string(c).unwrap()).unwrap();
    let mut out = BTreeSet::new();
    for (k, val) in &v {
        out.insert(k.clone());
        if k == "trust" {
            for e in val.as_array().unwrap() {
                out.extend(e.as_table().unwrap().keys().map(|f| format!("trust.{f}")));
            }
        }
    }
    out
}

#[test]
fn config_reference_documents_every_key() {
    for k in keys(&every_field()) {
        let row = match k.strip_prefix("trust.") {
            Some(f) => format!("| `{f}` (in `[[trust]]`) |"),
            None if k == "trust" => "| `[[trust]]` |".to_string(),
            None if k == "labels" => "| `[labels]` |".to_string(),
            None if k == "capacity" => "| `[capacity]` |".to_string(),
            None => format!("| `{k}` |"),
        };
        assert!(DOC.contains(&row), "docs/config.md has no row {row:?} for the key `{k}`");
    }
    // The defaults the table states for keys whose default lives in code.
    let expiry = xenod_host::daemon::announce::HOST_EXPIRY.as_secs();
    assert!(DOC.contains(&format!("| `host_expiry_secs` | integer, seconds | `{expiry}` |")));
    assert!(DOC.contains("| `relay` | `\"disabled\"` or `\"default\"` | `\"disabled\"` |"));
    let cap = xenod_cowfs::DEFAULT_FILE_CACHE;
    assert!(DOC.contains(&format!("| `file_cache_bytes` | integer, bytes | `{cap}` ")));
    assert_eq!(Config::default().relay, RelayConfig::Disabled);
}

#[test]
fn config_reference_example_parses_and_sets_every_key() {
    let c: Config = toml::from_str(doc_example()).unwrap_or_else(|e| panic!("docs/config.md's example: {e}"));
    let mut want = keys(&every_field());
    want.remove("trusted_keys"); // refused: documented, never exemplified
    assert_eq!(keys(&c), want, "the example of docs/config.md must set every key");
    // And the values are ones the daemon takes.
    let nowhere = tempfile::tempdir().unwrap();
    c.trust(nowhere.path()).unwrap_or_else(|e| panic!("the example's [[trust]]: {e}"));
    c.pull_policy(nowhere.path()).unwrap_or_else(|e| panic!("the example's pull_from: {e}"));
    for p in &c.peers {
        xenod_peer::parse_peer(p).unwrap_or_else(|e| panic!("the example's peer {p}: {e}"));
    }
    // A typo is refused, not ignored.
    let typo = format!("{}\nlistne = \"0.0.0.0:1\"\n", doc_example());
    assert!(toml::from_str::<Config>(&typo).unwrap_err().to_string().contains("listne"));
}

#[test]
fn packaged_config_is_the_example_commented_out() {
    let (header, body) =
        PACKAGED.split_once("\n\n").expect("packaging/config.toml: a header, a blank line, the example");
    assert!(header.lines().all(|l| l.starts_with('#')), "the header is comments only");
    let want: String =
        doc_example().lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("# {l}\n") }).collect();
    assert_eq!(body, want, "packaging/config.toml must be docs/config.md's example, each line behind `# `");
    let c: Config = toml::from_str(PACKAGED).unwrap();
    assert_eq!(keys(&c), keys(&Config::default()), "the packaged config sets nothing");
}

// --- The .deb --------------------------------------------------------------

#[test]
fn deb_builds_with_unit_completions_man_pages_and_config() {
    if !have("cargo-deb", &["--version"], "deb_builds_with_unit_completions_man_pages_and_config")
        || !have("dpkg-deb", &["--version"], "deb_builds_with_unit_completions_man_pages_and_config")
    {
        return;
    }
    // The packaged binary is this build's (cargo-deb's target/release/ maps
    // to the dev profile's dir): make sure the script finds the same one.
    let target = Path::new(xenod_bin()).parent().unwrap().parent().unwrap();
    let out = Command::new("bash")
        .arg(repo().join("scripts/build-deb.sh"))
        .arg("--dev")
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap();
    assert!(out.status.success(), "build-deb.sh --dev: {}", String::from_utf8_lossy(&out.stderr));
    let deb = PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim());
    assert!(deb.is_file(), "no {}", deb.display());

    let info = Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends").output().unwrap();
    let depends = String::from_utf8(info.stdout).unwrap();
    for d in ["libvirt-daemon-system", "fuse3", "qemu-system-x86", "procps", "libc6"] {
        assert!(depends.split(',').any(|x| x.trim().starts_with(d)), "Depends: {depends} lacks {d}");
    }

    let x = tempfile::tempdir().unwrap();
    let st = Command::new("dpkg-deb").arg("-R").arg(&deb).arg(x.path()).status().unwrap();
    assert!(st.success());
    let root = x.path();
    for f in [
        "usr/bin/xenod",
        "usr/lib/systemd/system/xenod.service",
        "usr/share/bash-completion/completions/xenod",
        "usr/share/zsh/vendor-completions/_xenod",
        "usr/share/fish/vendor_completions.d/xenod.fish",
        "usr/share/man/man1/xenod.1.gz",
        "usr/share/man/man1/xenod-serve.1.gz",
        "usr/share/xenod/config.toml",
        "usr/share/doc/xenod/config.md",
    ] {
        assert!(root.join(f).is_file(), "the package has no {f}");
    }
    assert_eq!(fs::read_to_string(root.join("usr/share/xenod/config.toml")).unwrap(), PACKAGED);
    let postinst = fs::read_to_string(root.join("DEBIAN/postinst")).unwrap();
    assert!(
        postinst.contains("/var/lib/xenod/config.toml") && postinst.contains("deb-systemd-helper enable xenod.service")
    );
    let v = Command::new(root.join("usr/bin/xenod")).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), format!("xenod {}", env!("CARGO_PKG_VERSION")));
    if have("systemd-analyze", &["--version"], "the packaged unit's verify") {
        verify_unit(&root.join("usr/lib/systemd/system/xenod.service"), &root.join("usr/bin/xenod"));
    }
}

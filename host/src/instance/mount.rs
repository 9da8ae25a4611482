//! `xenod mount`, `xenod umount`, `xenod commit`: the cowfs union on a
//! directory, and an upper directory turned into an overlay layer.
//!
//! [`spawn`] is the one mount spawner: it starts `xenod --data-dir DIR
//! mount ... --foreground` (the running executable, which must be xenod)
//! as a detached process (its own session, stdin on /dev/null, output in
//! a log) and returns once the mount is in place, or fails with the
//! child's log if it died. `xenod mount` without `--foreground` logs to
//! `DATA_DIR/mounts/<mountpoint hash>.log`, an instance to its
//! `mount.log`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenod_cowfs::{CommitStats, MountOptions};
use xenod_store::Store;

use crate::bail;
use crate::error::{Context, Error, Result};
use xenod_store::Exit;

/// How long a background mount may take to appear.
const MOUNT_WAIT: Duration = Duration::from_secs(60);

/// How `xenod mount` stacks and serves.
#[derive(Debug, Default)]
pub struct MountHow {
    /// Writable upper directory; none: read-only.
    pub upper: Option<PathBuf>,
    /// Read-only even with an upper.
    pub read_only: bool,
    /// Read-only host directories over the stack, the first the highest.
    pub lower_dirs: Vec<PathBuf>,
    /// Use FUSE passthrough (upper files, materialised lower files) where
    /// the kernel offers it.
    pub passthrough: bool,
    /// Take requests through /dev/fuse even where the kernel offers FUSE
    /// over io_uring.
    pub no_uring: bool,
    /// Read-only mounts: have the kernel ask before each open, as writable
    /// mounts always do, so that materialised lower files pass through.
    pub open_requests: bool,
    /// Bound of the store's cache of materialised lower files, in bytes
    /// (0: none); none: the default.
    pub file_cache_bytes: Option<u64>,
    /// Dirty tracking's control socket (instances, for migration).
    pub control: Option<PathBuf>,
    /// Fetch chunks that are not here yet through the daemon (lazy deploy).
    pub lazy: bool,
    /// Bytes the upper may hold (writes past it fail with EDQUOT).
    pub upper_quota: Option<u64>,
}

/// Mounts the stack of `reference` (a local reference: see
/// `client::localize` for tickets) on `mountpoint`: read-only without an
/// upper or with `read_only`, writable into the upper otherwise. Serves in
/// this process with `foreground`, else in a detached child.
pub fn mount_cmd(data_dir: &Path, reference: &str, mountpoint: &Path, how: &MountHow, foreground: bool) -> Result<()> {
    let (upper, read_only, control, lazy) = (how.upper.as_deref(), how.read_only, how.control.as_deref(), how.lazy);
    let refuse = |why: String| Err(Error::coded(Exit::BadInput, why));
    if !mountpoint.is_dir() {
        return refuse(format!("mount point {} is not a directory", mountpoint.display()));
    }
    if xenod_cowfs::is_mounted(mountpoint) {
        return refuse(format!("{} is already a mount point", mountpoint.display()));
    }
    let store =
        Arc::new(Store::open(data_dir).with_context(|| format!("opening the store in {}", data_dir.display()))?);
    for d in &how.lower_dirs {
        if !d.is_dir() {
            return refuse(format!("lower directory {} is not a directory", d.display()));
        }
    }
    let top = store.resolve(reference)?;
    let stack = store.stack(&top)?;
    if foreground {
        let opts = MountOptions {
            upper: upper.map(Path::to_path_buf),
            read_only,
            control: control.map(Path::to_path_buf),
            fetch_missing: lazy.then(|| {
                let data = data_dir.to_path_buf();
                let f: xenod_cowfs::Fetcher = Arc::new(move |id| crate::api::fetch_chunk(&data, id));
                f
            }),
            // A lazy deploy keeps the order of first reads (the stack's
            // prefetch order, see `Instances::deploy`).
            record_touches: if lazy { xenod_store::MAX_ORDER } else { 0 },
            lower_dirs: how.lower_dirs.clone(),
            passthrough: how.passthrough,
            uring: !how.no_uring,
            no_open: !how.open_requests,
            file_cache_bytes: how.file_cache_bytes.unwrap_or(xenod_cowfs::DEFAULT_FILE_CACHE),
            upper_quota: how.upper_quota,
            stats: Some(stats_dir(data_dir).join(format!("{}.sock", std::process::id()))),
            ..Default::default()
        };
        return xenod_cowfs::serve(store, &stack, mountpoint, &opts, || {
            tracing::info!(mountpoint = %mountpoint.display(), layers = stack.len(), "mounted");
        })
        .with_context(|| format!("serving the union on {}", mountpoint.display()));
    }
    drop(store);
    let logs = data_dir.join("mounts");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let abs = mountpoint.canonicalize().with_context(|| format!("resolving {}", mountpoint.display()))?;
    let log = logs.join(format!("{}.log", &path_hash(abs.as_os_str().as_encoded_bytes())[..16]));
    spawn(data_dir, reference, &abs, how, &log).map(drop)
}

/// Serves the stack of `reference` on `mountpoint` from a detached `xenod
/// mount --foreground` process whose output goes to `log`; returns its pid
/// once the mount is in place. A long-lived caller (the daemon) reaps the
/// process when it exits; a short one leaves it to init.
pub fn spawn(data_dir: &Path, reference: &str, mountpoint: &Path, how: &MountHow, log: &Path) -> Result<u32> {
    let (upper, read_only, control, lazy) = (how.upper.as_deref(), how.read_only, how.control.as_deref(), how.lazy);
    let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let exe = std::env::current_exe().context("finding the xenod executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--data-dir").arg(data_dir).arg("mount").arg(reference).arg(mountpoint).arg("--foreground");
    if lazy {
        cmd.arg("--lazy");
    }
    if let Some(c) = control {
        cmd.arg("--control").arg(std::path::absolute(c).unwrap_or_else(|_| c.to_path_buf()));
    }
    if let Some(u) = upper {
        cmd.arg("--upper").arg(std::path::absolute(u).unwrap_or_else(|_| u.to_path_buf()));
    }
    if read_only {
        cmd.arg("--ro");
    }
    for d in &how.lower_dirs {
        cmd.arg("--lower-dir").arg(std::path::absolute(d).unwrap_or_else(|_| d.clone()));
    }
    if !how.passthrough {
        cmd.arg("--no-passthrough");
    }
    if how.no_uring {
        cmd.arg("--no-uring");
    }
    if how.open_requests {
        cmd.arg("--open-requests");
    }
    if let Some(b) = how.file_cache_bytes {
        cmd.arg("--file-cache-bytes").arg(b.to_string());
    }
    if let Some(q) = how.upper_quota {
        cmd.arg("--upper-quota").arg(q.to_string());
    }
    cmd.stdin(std::process::Stdio::null()).stdout(log_file.try_clone()?).stderr(log_file);
    // Detach: its own process group and session, so the terminal's signals
    // and the caller's exit leave it alone.
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| rustix::process::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().context("starting the mount process")?;
    let started = Instant::now();
    loop {
        if xenod_cowfs::is_mounted(mountpoint) {
            let pid = child.id();
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(pid);
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            // Its exit code is its cause's (a missing layer, damage, an upper in use).
            let code = status.code().map_or(Exit::Failure, |c| Exit::from_code(c as u64));
            let msg = format!("the mount process for {} exited ({status}):\n{}", mountpoint.display(), text.trim_end());
            return Err(Error::coded(code, msg));
        }
        if started.elapsed() > MOUNT_WAIT {
            let _ = child.kill();
            bail!("{} did not appear within {MOUNT_WAIT:?}; see {}", mountpoint.display(), log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where mount processes serve their counters, one socket each
/// (`PID.sock`), for the daemon's metrics to read at scrape time.
pub fn stats_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("mounts").join("stats")
}

fn path_hash(b: &[u8]) -> String {
    // A stable file name per mount point; not security relevant.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}{:016x}", h.rotate_left(29) ^ b.len() as u64)
}

/// How long `xenod umount` waits for the serving process to finish.
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// Unmounts a union and waits for its serving process to exit, so that
/// its upper directory can be committed or mounted again at once.
pub fn umount_cmd(mountpoint: &Path) -> Result<()> {
    if !xenod_cowfs::is_mounted(mountpoint) {
        bail!("{} is not a mount point", mountpoint.display());
    }
    let gone = xenod_cowfs::unmount_and_wait(mountpoint, EXIT_WAIT)
        .with_context(|| format!("unmounting {}", mountpoint.display()))?;
    if !gone {
        tracing::warn!(
            "{} is unmounted, but its serving process is still finishing after {EXIT_WAIT:?}; its upper directory stays locked until it exits",
            mountpoint.display()
        );
    }
    Ok(())
}

/// Turns the upper directory `upper` (not mounted meanwhile) over the stack
/// of `base` into a new overlay layer. The caller records a name, if any,
/// with its signing key: a layer's id depends on its content only, so
/// neither the name nor how the base was named is part of it.
pub fn commit_cmd(store: Arc<Store>, upper: &Path, base: &str) -> Result<CommitStats> {
    let upper: PathBuf = upper.to_path_buf();
    if xenod_cowfs::is_mounted(&upper) {
        let why = format!("{} is a mount point: unmount it and commit its upper directory", upper.display());
        return Err(Error::coded(Exit::BadInput, why));
    }
    let top = store.resolve(base)?;
    let stack = store.stack(&top)?;
    let stats = xenod_cowfs::commit(store, &stack, &upper, BTreeMap::new())
        .with_context(|| format!("committing {} onto {base}", upper.display()))?;
    Ok(stats)
}

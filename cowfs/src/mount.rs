//! Sessions: a union mounted on a directory, in a background thread or
//! serving in the calling thread until unmounted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};
use xenod_store::{LayerId, Store};

use crate::error::{Error, Result};
use crate::filecache::FileCache;
use crate::fs::CowFs;
use crate::lower::LowerTree;
use crate::union::Union;
use crate::upper::{Claim, check_stack, claim, record_stack, unescape};

/// Default bound of the materialised-file cache: room for a few large
/// files (images, databases, big libraries) without filling a small disk.
pub const DEFAULT_FILE_CACHE: u64 = 4 << 30;

/// How to mount.
#[derive(Clone)]
pub struct MountOptions {
    /// The writable upper directory (created if missing); none: read-only.
    pub upper: Option<PathBuf>,
    /// Refuse writes even with an upper directory.
    pub read_only: bool,
    /// FUSE worker threads reading `/dev/fuse`. Over io_uring ([`Self::uring`])
    /// two more threads per CPU serve that CPU's queue, and these only take
    /// FORGET and INTERRUPT.
    pub threads: usize,
    /// Bound of the decoded-chunk cache, in bytes.
    pub cache_bytes: usize,
    /// Let every user in (as the kernel's overlayfs does); the kernel checks
    /// permissions either way.
    pub allow_other: bool,
    /// Lower files at least this large copy up block by block.
    pub block_copy_min: u64,
    /// Read-only host directories over the stack (below the upper), the
    /// first the highest, as in overlayfs's `lowerdir=` list.
    pub lower_dirs: Vec<PathBuf>,
    /// Let the kernel do file I/O directly (FUSE passthrough) where it
    /// supports it: for whole upper files (not while `control` tracks
    /// writes) and for reads of lower files materialised in the file cache.
    pub passthrough: bool,
    /// Serve over FUSE's io_uring transport where the kernel offers it
    /// (Linux 6.14+ with `fuse.enable_uring=Y`): one request queue per CPU,
    /// served by a thread pinned to that CPU ([`crate::CowFs::uring`]).
    pub uring: bool,
    /// On a read-only mount, have the kernel open files itself, without a
    /// round trip here per open ([`crate::CowFs::no_open`]); no passthrough
    /// then. Ignored on a writable mount.
    pub no_open: bool,
    /// Bound of the store's cache of materialised lower files
    /// (`DATA_DIR/cache/files`, shared by every mount of the store), in
    /// bytes; 0: no file cache (lower files are always read through here).
    pub file_cache_bytes: u64,
    /// Track writes and answer `drain` on this Unix socket
    /// ([`crate::drain_dirty`]), for incremental commits.
    pub control: Option<PathBuf>,
    /// Asked for chunks the store lacks (lazy deployment).
    pub fetch_missing: Option<crate::Fetcher>,
    /// Bytes the upper directory may hold; writes past it fail with
    /// EDQUOT (see `quota`). None: no limit.
    pub upper_quota: Option<u64>,
    /// Serve this process's counters on this Unix socket
    /// ([`crate::read_stats`]), for the daemon's metrics.
    pub stats: Option<PathBuf>,
    /// Record up to this many chunks in the order readers first ask for
    /// them, for `touched` on the control socket ([`crate::first_touches`]);
    /// 0: none.
    pub record_touches: usize,
}

impl std::fmt::Debug for MountOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountOptions")
            .field("upper", &self.upper)
            .field("read_only", &self.read_only)
            .field("threads", &self.threads)
            .field("control", &self.control)
            .field("lower_dirs", &self.lower_dirs)
            .field("passthrough", &self.passthrough)
            .field("uring", &self.uring)
            .field("no_open", &self.no_open)
            .field("file_cache_bytes", &self.file_cache_bytes)
            .field("fetch_missing", &self.fetch_missing.is_some())
            .field("stats", &self.stats)
            .field("record_touches", &self.record_touches)
            .finish_non_exhaustive()
    }
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            upper: None,
            read_only: false,
            threads: std::thread::available_parallelism().map_or(4, |n| n.get().clamp(2, 16)),
            cache_bytes: 256 << 20,
            allow_other: true,
            block_copy_min: crate::union::BLOCK_COPY_MIN,
            control: None,
            fetch_missing: None,
            stats: None,
            record_touches: 0,
            lower_dirs: Vec::new(),
            passthrough: true,
            uring: true,
            no_open: false,
            file_cache_bytes: DEFAULT_FILE_CACHE,
            upper_quota: None,
        }
    }
}

/// The union to serve and how, and the claim on a writable upper
/// (held while the mount lives).
/// `fsname` is the source mountinfo shows for the mount.
fn prepare(
    store: Arc<Store>,
    stack: &[LayerId],
    opts: &MountOptions,
    fsname: String,
) -> Result<(CowFs, Config, Option<Claim>)> {
    let upper = if opts.read_only { None } else { opts.upper.as_deref() };
    // Claimed before the union touches it: another mount's staging area
    // must not be cleaned up under it.
    let claim = match upper {
        Some(u) => {
            let c = claim(u)?;
            check_stack(u, stack)?;
            record_stack(u, stack)?;
            Some(c)
        }
        None => None,
    };
    let lower = LowerTree::load_with(&store, stack, &opts.lower_dirs)?;
    let files = if opts.passthrough { FileCache::open(store.clone(), opts.file_cache_bytes)? } else { None };
    let mut union = Union::new(store, lower, upper, opts.cache_bytes)?;
    union.files = files;
    union.block_copy_min = opts.block_copy_min;
    if opts.control.is_some() {
        union.track_changes();
    }
    if let Some(f) = &opts.fetch_missing {
        union.fetch_missing(f.clone());
    }
    if let (Some(limit), Some(u)) = (opts.upper_quota, upper) {
        let q = crate::quota::Quota::new(limit, u).map_err(|source| Error::Io {
            what: "counting what the upper directory holds:",
            path: u.to_path_buf(),
            source,
        })?;
        tracing::info!(limit, used = q.used(), "upper quota");
        union.quota = Some(Arc::new(q));
    }
    if opts.record_touches > 0 {
        union.record_first_touches(opts.record_touches);
    }
    let union = Arc::new(union);
    if let Some(sock) = &opts.control {
        let (u, v) = (union.clone(), union.clone());
        let control = crate::track::Control {
            drain: Arc::new(move || u.drain_dirty()),
            touched: Arc::new(move || v.first_touches()),
        };
        crate::track::serve_control(sock, control)?;
    }
    let mut mount_options = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype("xenod".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
    ];
    if upper.is_none() {
        mount_options.push(MountOption::RO);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if opts.allow_other { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    // Passthrough writes bypass this process, and so the dirty tracker:
    // with `control`, upper files are served here (`Union::backing_file`);
    // lower files pass through either way, they are only ever read.
    Ok((CowFs::with_passthrough(union, opts.passthrough).uring(opts.uring).no_open(opts.no_open), config, claim))
}

/// How long an unmount may wait for the session to end before the FUSE
/// connection is aborted.
pub const UNMOUNT_GRACE: std::time::Duration = std::time::Duration::from_secs(15);

/// A mounted union, served by background threads; unmounted on drop.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    /// The FUSE connection's id (its directory under
    /// /sys/fs/fuse/connections), to abort a session that outlives its
    /// unmount.
    connection: Option<u64>,
    mountpoint: PathBuf,
    union: Arc<Union>,
    /// Released after the session ends (fields drop after `drop`).
    _claim: Option<Claim>,
}

impl Mounted {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Handles open on the mount, as far as this process has been told: a
    /// RELEASE the kernel sent at close may still be on its way.
    pub fn open_handles(&self) -> usize {
        self.union.open_handles()
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> Result<()> {
        let r = match self.session.take() {
            Some(s) => umount_and_join(s, self.connection, &self.mountpoint),
            None => Ok(()),
        };
        self.union.finish_background();
        r
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = umount_and_join(s, self.connection, &self.mountpoint);
            self.union.finish_background();
        }
    }
}

/// Unmounts and joins the session's threads. Once the kernel has dropped
/// the mount, the session ends when its connection does; seen here (once,
/// under load, over io_uring) is a connection that stayed up with every
/// session thread waiting for a request that never came, so the join never
/// returned. After [`UNMOUNT_GRACE`] the connection is aborted through
/// fusectl, which ends the session's reads, and the unmount says so.
fn umount_and_join(s: fuser::BackgroundSession, connection: Option<u64>, mnt: &Path) -> Result<()> {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = connection.map(|c| {
        let mnt = mnt.to_path_buf();
        std::thread::spawn(move || {
            if wait.recv_timeout(UNMOUNT_GRACE) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                tracing::warn!(mountpoint = %mnt.display(), "the FUSE session outlived its unmount by {UNMOUNT_GRACE:?}; aborting connection {c}");
                abort_connection(c);
            }
        })
    });
    let r = s.umount_and_join().map_err(Error::io("unmounting", mnt));
    let _ = done.send(());
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    r
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Aborts FUSE connection `c` (mounting fusectl first if it is not).
fn abort_connection(c: u64) {
    let dir = Path::new(FUSECTL);
    if !dir.join(c.to_string()).exists() {
        let _ = std::process::Command::new("mount").args(["-t", "fusectl", "none", FUSECTL]).status();
    }
    if let Err(e) = std::fs::write(dir.join(c.to_string()).join("abort"), b"1") {
        tracing::warn!("aborting FUSE connection {c}: {e}");
    }
}

/// The id fusectl gives the connection serving `mnt`: the kernel's device
/// number of the mount (major << 20 | minor).
fn connection_of(mnt: &Path) -> Option<u64> {
    let st = rustix::fs::stat(mnt).ok()?;
    let (major, minor) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    Some((u64::from(major) << 20) | u64::from(minor))
}

/// Mounts the union of `stack` (bottom first) on `mountpoint`, served in
/// the background. The lower tree is loaded before this returns.
pub fn mount(store: Arc<Store>, stack: &[LayerId], mountpoint: &Path, opts: &MountOptions) -> Result<Mounted> {
    let (fs, config, claim) = prepare(store, stack, opts, FSNAME.into())?;
    let union = fs.union.clone();
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(Error::io("mounting on", mountpoint))?;
    let connection = connection_of(mountpoint);
    Ok(Mounted { session: Some(session), connection, mountpoint: mountpoint.to_path_buf(), union, _claim: claim })
}

/// Mounts and serves in the calling thread until the filesystem is
/// unmounted; `ready` is called once the mount is in place.
pub fn serve(
    store: Arc<Store>,
    stack: &[LayerId],
    mountpoint: &Path,
    opts: &MountOptions,
    ready: impl FnOnce(),
) -> Result<()> {
    // A process that serves one mount and exits after it names itself, for
    // `unmount_and_wait` to find in mountinfo.
    let (fs, config, claim) = prepare(store, stack, opts, format!("{FSNAME}:{}", std::process::id()))?;
    let union = fs.union.clone();
    let session = fuser::Session::new(fs, mountpoint, &config).map_err(Error::io("mounting on", mountpoint))?;
    // Counters are for metrics only: a socket that cannot be bound (a path
    // over the 107 bytes of sun_path) costs them, not the mount.
    if let Some(p) = &opts.stats
        && let Err(e) = crate::stats::serve_stats(p, mountpoint)
    {
        tracing::warn!("this mount's counters are not served: {e}");
    }
    ready();
    let r = session.run().map_err(Error::io("serving", mountpoint));
    if let Some(p) = &opts.stats {
        let _ = std::fs::remove_file(p);
    }
    // Unmounted: the upper is free at once (a commit may be waiting).
    drop(claim);
    // The caller exits next: finish the file being materialised first.
    union.finish_background();
    r
}

/// Whether `path` is a mount point (of any filesystem).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else { return false };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    mounts.lines().any(|l| l.split(' ').nth(4).is_some_and(|mp| unescape(mp) == canon.as_os_str().as_encoded_bytes()))
}

/// The source our mounts show in mountinfo, before `:PID`.
const FSNAME: &str = "xenod";

/// The pid of the process serving our mount on `path` through [`serve`]
/// (from the source `xenod:PID` mountinfo shows), if `path` is one.
pub fn serving_pid(path: &Path) -> Option<u32> {
    let canon = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount on a path is the one seen there.
    mounts.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if unescape(left.split(' ').nth(4)?) != canon.as_os_str().as_encoded_bytes() {
            return None;
        }
        right.split(' ').nth(1)?.strip_prefix(FSNAME)?.strip_prefix(':')?.parse().ok()
    })
}

/// Unmounts `mountpoint` as [`unmount`] does, then waits up to `wait` for
/// the process that served it to exit, so that its upper directory is let
/// go and its last copied-up file is finished when this returns. Returns
/// whether that process is gone (or is not known: a [`mount`] in some
/// process lives on after it).
pub fn unmount_and_wait(mountpoint: &Path, wait: std::time::Duration) -> Result<bool> {
    let pid = serving_pid(mountpoint);
    unmount(mountpoint, false)?;
    let Some(pid) = pid else { return Ok(true) };
    let deadline = std::time::Instant::now() + wait;
    while process_runs(pid) {
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(true)
}

/// Whether process `pid` runs: it exists and is no zombie (one that exited
/// and waits for its parent to reap it).
pub fn process_runs(pid: u32) -> bool {
    // The state follows the parenthesised command name.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X'])))
}

/// How long an unmount that finds the mount busy tries again.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Unmounts `mnt`, trying again for [`BUSY_WAIT`] while the kernel says it
/// is busy, and returns the last answer. A file closed a moment ago can
/// still hold the mount: a process forked by another thread while the file
/// was open keeps a copy of its descriptor until its exec closes it (seen
/// in CI: `cp` spawned by a test beside one that had just closed a file).
/// The vendored fuser does the same for [`Mounted::unmount`].
fn unmount_when_free(mnt: &Path) -> rustix::io::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        match rustix::mount::unmount(mnt, rustix::mount::UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Unmounts `mountpoint` (`umount2`, lazily with `lazy`); the serving
/// process then exits. A busy mount is tried again for a moment first
/// ([`unmount_when_free`]) unless `lazy`.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let r = if lazy {
        rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH)
    } else {
        unmount_when_free(mountpoint)
    };
    match r {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) => {
            // Not root: fusermount3 is setuid and allowed to unmount our own mounts.
            let mut c = std::process::Command::new("fusermount3");
            c.arg("-u");
            if lazy {
                c.arg("-z");
            }
            let st = c.arg(mountpoint).status().map_err(Error::io("running fusermount3 for", mountpoint))?;
            if st.success() {
                Ok(())
            } else {
                Err(Error::io("unmounting", mountpoint)(std::io::Error::other(format!("fusermount3 -u: {st}"))))
            }
        }
        Err(e) => Err(Error::io("unmounting", mountpoint)(e.into())),
    }
}

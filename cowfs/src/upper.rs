//! What an upper directory says about its own use, in xenod's work area:
//!
//! ```text
//!  UPPER/.xenod/mount.lock  flock(2)ed exclusively by the process that has
//!                           the upper mounted read-write (or is committing
//!                           or flattening it); holds that process's id
//!  UPPER/.xenod/stack       the layer stack the upper was made on, one id
//!                           per line, bottom first (written at its first
//!                           writable mount)
//! ```
//!
//! A lock rather than a look at /proc/self/mountinfo: a FUSE mount's entry
//! names its mount point, not its upper directory, and a mount made in
//! another mount namespace is not listed at all; the lock is held by
//! whichever process serves the upper, wherever it is mounted, and the
//! kernel drops it when that process dies (even by SIGKILL), so no stale
//! claim survives a crash. The kernel's overlayfs takes no such lock, so
//! its mounts are found in mountinfo, whose options name `upperdir=`.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use xenod_store::LayerId;

use crate::error::{Error, Result};
use crate::union::WORK_DIR;

/// The lock file, in the work area.
pub const LOCK_FILE: &str = "mount.lock";
/// The stack record, in the work area.
pub const STACK_FILE: &str = "stack";
/// How long [`claim`] waits for a holder to let go before refusing.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// An exclusive hold on an upper directory, released when dropped (or
/// when the process ends).
#[derive(Debug)]
pub(crate) struct Claim {
    _file: File,
}

fn bad(upper: &Path, why: String) -> Error {
    Error::BadUpper { path: upper.to_path_buf(), why }
}

/// Takes the upper directory `upper` (created if missing) for this
/// process alone, or fails naming who has it mounted read-write.
pub(crate) fn claim(upper: &Path) -> Result<Claim> {
    let work = upper.join(WORK_DIR);
    std::fs::create_dir_all(&work).map_err(Error::io("creating", &work))?;
    if let Some(mp) = kernel_overlay_on(upper) {
        return Err(bad(
            upper,
            format!("mounted read-write by the kernel's overlayfs on {}; unmount it first", mp.display()),
        ));
    }
    let path = work.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(Error::io("opening", &path))?;
    // A mount just unmounted lets go when its serving process sees the
    // unmount, a moment after `umount` returns: wait that long.
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    let locked = loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r,
        }
    };
    match locked {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let who = match pid.trim() {
                "" => "another process".to_string(),
                p => format!("process {p}"),
            };
            return Err(bad(upper, format!("mounted read-write (or being committed) by {who}; unmount it first")));
        }
        Err(e) => return Err(Error::io("locking", &path)(e.into())),
    }
    let pid = std::process::id().to_string();
    let r = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(pid.as_bytes()));
    r.map_err(Error::io("writing", &path))?;
    Ok(Claim { _file: file })
}

/// Where the kernel's overlayfs has `upper` as its upper directory, if it does.
fn kernel_overlay_on(upper: &Path) -> Option<PathBuf> {
    let canon = upper.canonicalize().ok()?;
    let want = canon.as_os_str().as_encoded_bytes();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split(' ');
        if r.next()? != "overlay" {
            return None;
        }
        let opts = r.nth(1)?;
        let on = opts.split(',').any(|o| o.strip_prefix("upperdir=").is_some_and(|u| unescape(u) == want));
        let mp = left.split(' ').nth(4)?;
        on.then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(mp))))
    })
}

use std::os::unix::ffi::OsStrExt;

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
pub(crate) fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(Ok(v)) =
                b.get(i + 1..i + 4).map(|o| u8::from_str_radix(std::str::from_utf8(o).unwrap_or("x"), 8))
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The stack `upper` records having been made on; none if it records none
/// (an upper made before records were kept, by hand, or by the kernel).
pub fn recorded_stack(upper: &Path) -> Result<Option<Vec<LayerId>>> {
    let path = upper.join(WORK_DIR).join(STACK_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &path)(e)),
    };
    let mut stack = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let id = line.parse().map_err(|e| bad(upper, format!("its stack record {}: {line:?}: {e}", path.display())))?;
        stack.push(id);
    }
    Ok(Some(stack))
}

/// Refuses `stack` for `upper` if the upper records another one.
pub(crate) fn check_stack(upper: &Path, stack: &[LayerId]) -> Result<()> {
    let Some(rec) = recorded_stack(upper)? else { return Ok(()) };
    if rec == stack {
        return Ok(());
    }
    let top = |s: &[LayerId]| s.last().map_or_else(|| "nothing".to_string(), |t| t.to_string());
    Err(bad(
        upper,
        format!(
            "it was made on the stack of layer {} ({} layers), not on that of {} ({} layers); \
             name that layer as its base",
            top(&rec),
            rec.len(),
            top(stack),
            stack.len()
        ),
    ))
}

/// Records `stack` as the one `upper` is made on, unless it records one.
pub(crate) fn record_stack(upper: &Path, stack: &[LayerId]) -> Result<()> {
    let work = upper.join(WORK_DIR);
    let path = work.join(STACK_FILE);
    if path.exists() {
        return Ok(());
    }
    let mut text = String::from("# the layer stack this upper directory was made on, bottom first\n");
    for id in stack {
        text += &format!("{id}\n");
    }
    let tmp = work.join(format!("{STACK_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(Error::io("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(Error::io("writing", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_at_a_time_and_freed_on_drop() {
        let t = tempfile::tempdir().unwrap();
        let upper = t.path().join("upper");
        let c = claim(&upper).unwrap();
        let err = claim(&upper).unwrap_err().to_string();
        assert!(err.contains(&format!("process {}", std::process::id())) && err.contains("unmount"), "{err}");
        drop(c);
        claim(&upper).unwrap();
    }

    #[test]
    fn a_recorded_stack_refuses_another() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (LayerId::of(b"a"), LayerId::of(b"b"));
        check_stack(t.path(), &[a]).unwrap();
        std::fs::create_dir_all(t.path().join(WORK_DIR)).unwrap();
        record_stack(t.path(), &[a, b]).unwrap();
        record_stack(t.path(), &[a]).unwrap();
        assert_eq!(recorded_stack(t.path()).unwrap(), Some(vec![a, b]), "the first record stays");
        check_stack(t.path(), &[a, b]).unwrap();
        let err = check_stack(t.path(), &[a]).unwrap_err();
        assert!(err.to_string().contains(&b.to_string()) && err.to_string().contains(&a.to_string()), "{err}");
        assert_eq!(err.exit_code(), xenod_store::Exit::BadInput);
    }
}

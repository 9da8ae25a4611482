//! Dirty tracking from the write path, for incremental commits (pre-copy
//! migration, checkpoints).
//!
//! Every write records the 64 KiB blocks it touched, by inode; a truncate
//! marks the file whole; a namespace change (create, unlink, rename, link,
//! mkdir, rmdir) marks the paths it touched, a directory standing for its
//! subtree. [`Tracker::drain`] hands the set over and starts a new one, so
//! each pre-copy round reads only what was written since the previous
//! round, never rescanning the upper layer's data.
//!
//! A mount started with [`crate::MountOptions::control`] answers on that
//! Unix socket; the protocol is one request line and a text answer:
//!
//! ```text
//! -> drain
//! <- b <hex path> <block> <block> ...     blocks written since the last drain
//! <- w <hex path>                         whole file or subtree changed
//! <- end
//!
//! -> touched                              (a mount that records first reads)
//! <- waits <n>                            reads that waited for a chunk the store lacked
//! <- c <chunk id>                         chunks in the order first read
//! <- end
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xenod_store::{BLOCK, ChunkId};

use crate::error::{Error, Result};

/// What changed since the last drain, by union path (relative, no leading
/// slash).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// Files written in place: the 64 KiB block numbers written.
    pub blocks: BTreeMap<Vec<u8>, BTreeSet<u64>>,
    /// Paths whose content or existence changed as a whole; a directory
    /// stands for everything below it.
    pub whole: BTreeSet<Vec<u8>>,
}

impl DirtySet {
    /// Whether anything under `path` may differ from an earlier view other
    /// than in the blocks listed in `blocks`.
    pub fn whole_changed(&self, path: &[u8]) -> bool {
        if self.whole.contains(path) {
            return true;
        }
        // Ancestors: a renamed or replaced directory invalidates its subtree.
        let mut p = path;
        while let Some(i) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..i];
            if self.whole.contains(p) {
                return true;
            }
        }
        self.whole.contains(&b""[..])
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.whole.is_empty()
    }

    /// Blocks written, over every file.
    pub fn block_count(&self) -> u64 {
        self.blocks.values().map(|b| b.len() as u64).sum()
    }

    fn encode(&self, w: &mut impl Write) -> std::io::Result<()> {
        for (p, bs) in &self.blocks {
            write!(w, "b {}", hex(p))?;
            for b in bs {
                write!(w, " {b}")?;
            }
            writeln!(w)?;
        }
        for p in &self.whole {
            writeln!(w, "w {}", hex(p))?;
        }
        writeln!(w, "end")
    }

    fn decode(r: impl BufRead) -> std::result::Result<Self, AnswerFault> {
        let mut out = Self::default();
        for line in r.lines() {
            let line = line.map_err(AnswerFault::Read)?;
            let mut it = line.split(' ');
            match it.next() {
                Some("end") => return Ok(out),
                Some("b") => {
                    let p = unhex(it.next().unwrap_or_default())?;
                    let bs =
                        it.map(|b| b.parse::<u64>().map_err(|source| AnswerFault::Block { given: b.into(), source }));
                    out.blocks.insert(p, bs.collect::<std::result::Result<_, _>>()?);
                }
                Some("w") => {
                    out.whole.insert(unhex(it.next().unwrap_or_default())?);
                }
                _ => return Err(AnswerFault::Line { line }),
            }
        }
        Err(AnswerFault::NoEnd)
    }
}

/// Why a mount's answer to `drain` does not decode (see the module docs).
#[derive(Debug, thiserror::Error)]
pub enum AnswerFault {
    /// Reading a line of the answer failed.
    #[error("{0}")]
    Read(#[source] std::io::Error),
    /// A line that is not `b`, `w` or `end`.
    #[error("unexpected line {line:?}")]
    Line { line: String },
    /// A block number that is not one.
    #[error("block {given:?}: {source}")]
    Block { given: String, source: std::num::ParseIntError },
    /// A path of odd or no length.
    #[error("bad path {given:?}")]
    PathLength { given: String },
    /// A path that is not hex.
    #[error("{given:?}: {source}")]
    PathHex { given: String, source: std::num::ParseIntError },
    /// The answer ends before its `end` line.
    #[error("answer ended without `end`")]
    NoEnd,
}

fn hex(b: &[u8]) -> String {
    if b.is_empty() {
        return "-".into();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> std::result::Result<Vec<u8>, AnswerFault> {
    if s == "-" {
        return Ok(Vec::new());
    }
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return Err(AnswerFault::PathLength { given: s.into() });
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).map_err(|source| AnswerFault::PathHex { given: s.into(), source })
        })
        .collect()
}

#[derive(Default)]
struct Pending {
    /// Written blocks by inode, resolved to paths at drain time.
    blocks: HashMap<u64, BTreeSet<u64>>,
    whole_inos: HashSet<u64>,
    whole: BTreeSet<Vec<u8>>,
}

/// The write path's record of what changed; see the module docs.
#[derive(Default)]
pub struct Tracker {
    pending: Mutex<Pending>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn wrote(&self, ino: u64, off: u64, len: usize) {
        if len == 0 {
            return;
        }
        let b = BLOCK as u64;
        let (first, last) = (off / b, (off + len as u64 - 1) / b);
        let mut p = self.lock();
        p.blocks.entry(ino).or_default().extend(first..=last);
    }

    pub(crate) fn whole_ino(&self, ino: u64) {
        self.lock().whole_inos.insert(ino);
    }

    pub(crate) fn path(&self, path: Vec<u8>) {
        self.lock().whole.insert(path);
    }

    /// Takes the set recorded so far; `resolve` maps an inode to its union
    /// paths (none once it is gone, whose names were recorded on unlink).
    pub(crate) fn drain(&self, resolve: impl Fn(u64) -> Vec<Vec<u8>>) -> DirtySet {
        let p = std::mem::take(&mut *self.lock());
        let mut out = DirtySet { whole: p.whole, ..Default::default() };
        for ino in p.whole_inos {
            out.whole.extend(resolve(ino));
        }
        for (ino, bs) in p.blocks {
            for path in resolve(ino) {
                if !out.whole.contains(&path) {
                    out.blocks.entry(path).or_default().extend(bs.iter().copied());
                }
            }
        }
        out
    }
}

/// What a mount's control socket answers: `drain` (dirty tracking) and
/// `touched` (first reads, see [`crate::Union::record_first_touches`]).
pub(crate) struct Control {
    pub(crate) drain: Arc<dyn Fn() -> DirtySet + Send + Sync>,
    pub(crate) touched: Arc<dyn Fn() -> (Vec<ChunkId>, u64) + Send + Sync>,
}

/// Serves control requests on the Unix socket `path` in a background
/// thread for as long as the process lives.
pub(crate) fn serve_control(path: &Path, control: Control) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(Error::io("binding the control socket", path))?;
    std::thread::Builder::new()
        .name("cowfs-control".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                if let Err(e) = answer(s, &control) {
                    tracing::warn!("control socket: {e}");
                }
            }
        })
        .map_err(Error::io("starting the control thread for", path))?;
    Ok(())
}

fn answer(s: UnixStream, control: &Control) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let mut w = std::io::BufWriter::new(&s);
    match line.trim() {
        "drain" => (control.drain)().encode(&mut w)?,
        "touched" => {
            let (ids, waits) = (control.touched)();
            writeln!(w, "waits {waits}")?;
            for id in ids {
                writeln!(w, "c {id}")?;
            }
            writeln!(w, "end")?;
        }
        "ping" => writeln!(w, "ok")?,
        other => writeln!(w, "error unknown request {other:?}")?,
    }
    w.flush()
}

/// First reads a mount recorded, as its control socket `socket` tells:
/// the chunks in the order first read, and how many reads waited for a
/// chunk the store lacked (asked of the fetcher: the daemon).
pub fn first_touches(socket: &Path) -> Result<(Vec<ChunkId>, u64)> {
    let err = |why: String| Error::Control { socket: socket.to_path_buf(), why };
    let mut s = UnixStream::connect(socket).map_err(|e| err(format!("connecting: {e}")))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| err(e.to_string()))?;
    s.write_all(b"touched\n").map_err(|e| err(format!("sending: {e}")))?;
    let (mut ids, mut waits, mut ended) = (Vec::new(), None, false);
    for line in BufReader::new(s).lines() {
        let line = line.map_err(|e| err(format!("reading: {e}")))?;
        if let Some(n) = line.strip_prefix("waits ") {
            waits = Some(n.parse::<u64>().map_err(|e| err(format!("answer {line:?}: {e}")))?);
        } else if let Some(id) = line.strip_prefix("c ") {
            ids.push(id.parse::<ChunkId>().map_err(|e| err(format!("answer {line:?}: {e}")))?);
        } else if line == "end" {
            ended = true;
            break;
        } else {
            return Err(err(format!("answer {line:?} is not part of a touched answer")));
        }
    }
    match (waits, ended) {
        (Some(n), true) => Ok((ids, n)),
        _ => Err(err("the answer was cut short".into())),
    }
}

/// Asks the mount whose control socket is `socket` for what changed since
/// the last drain.
pub fn drain_dirty(socket: &Path) -> Result<DirtySet> {
    let err = |why: String| Error::Control { socket: socket.to_path_buf(), why };
    let mut s = UnixStream::connect(socket).map_err(|e| err(format!("connecting: {e}")))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| err(e.to_string()))?;
    s.write_all(b"drain\n").map_err(|e| err(format!("sending: {e}")))?;
    DirtySet::decode(BufReader::new(s)).map_err(|fault| Error::ControlAnswer { socket: socket.to_path_buf(), fault })
}

/// The control socket conventionally placed beside an upper directory.
pub fn control_socket_for(upper: &Path) -> PathBuf {
    upper.with_extension("ctl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_and_subtrees() {
        let t = Tracker::default();
        t.wrote(7, 0, 1);
        t.wrote(7, (BLOCK as u64) * 3 - 1, 2);
        t.wrote(8, 10, 0);
        t.path(b"etc/moved".to_vec());
        let d = t.drain(|ino| if ino == 7 { vec![b"disk/root.img".to_vec()] } else { vec![] });
        assert_eq!(d.blocks[&b"disk/root.img"[..]].iter().copied().collect::<Vec<_>>(), vec![0, 2, 3]);
        assert!(d.whole_changed(b"etc/moved/a/b") && !d.whole_changed(b"etc/movedx") && !d.whole_changed(b"etc"));
        let mut wire = Vec::new();
        d.encode(&mut wire).unwrap();
        assert_eq!(DirtySet::decode(&wire[..]).unwrap(), d);
        assert!(t.drain(|_| vec![]).is_empty(), "a drain starts a new set");
        assert!(DirtySet::decode(&b"b zz 1\nend\n"[..]).is_err());
        assert!(DirtySet::decode(&b"w 61\n"[..]).is_err(), "a cut answer is an error");
    }
}

//! External sort of entries, for inputs that arrive out of tree order
//! (tar streams). Entries are held in memory up to a byte budget, then
//! sorted and written to a run file; the sorted stream merges the runs.
//! Memory stays bounded by the budget plus one entry per run.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

use crate::error::{Error, IoContext, Result};
use crate::manifest::{Entry, cmp_paths, decode_entry, encode_entry};

/// Entries kept in memory before a run is written.
const BUDGET: usize = 64 << 20;

pub(crate) struct Spill {
    mem: Vec<Entry>,
    mem_bytes: usize,
    runs: Vec<PathBuf>,
    dir: PathBuf,
    budget: usize,
}

impl Spill {
    pub(crate) fn new() -> Self {
        Self::with_budget(BUDGET)
    }

    pub(crate) fn with_budget(budget: usize) -> Self {
        Self { mem: Vec::new(), mem_bytes: 0, runs: Vec::new(), dir: std::env::temp_dir(), budget }
    }

    pub(crate) fn push(&mut self, e: Entry) -> Result<()> {
        self.mem_bytes += e.path.len() + 64 + extents_bytes(&e);
        self.mem.push(e);
        if self.mem_bytes >= self.budget {
            self.write_run()?;
        }
        Ok(())
    }

    fn write_run(&mut self) -> Result<()> {
        self.mem.sort_by(|a, b| cmp_paths(&a.path, &b.path));
        let mut r = [0u8; 8];
        rustix::rand::getrandom(&mut r, rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Error::io("getting random bytes", &self.dir)(e.into()))?;
        let path = self.dir.join(format!("xenod-sort-{:016x}.run", u64::from_le_bytes(r)));
        let f = File::create(&path).ctx("creating sort run", &path)?;
        self.runs.push(path.clone());
        let mut w = BufWriter::new(f);
        let mut buf = Vec::new();
        for e in self.mem.drain(..) {
            buf.clear();
            encode_entry(&e, &mut buf);
            w.write_all(&buf).ctx("writing sort run", &path)?;
        }
        w.flush().ctx("writing sort run", &path)?;
        self.mem_bytes = 0;
        Ok(())
    }

    /// All entries in tree order; may be called more than once.
    pub(crate) fn sorted(&mut self) -> Result<Sorted> {
        self.mem.sort_by(|a, b| cmp_paths(&a.path, &b.path));
        let mut heads = BinaryHeap::new();
        let mut readers = Vec::new();
        for (i, p) in self.runs.iter().enumerate() {
            let mut r = RunReader {
                file: BufReader::new(File::open(p).ctx("opening sort run", p)?),
                buf: Vec::new(),
                path: p.clone(),
            };
            if let Some(e) = r.next()? {
                heads.push(Head { e, src: i });
            }
            readers.push(r);
        }
        Ok(Sorted { mem: self.mem.clone().into_iter().peekable(), heads, readers })
    }
}

fn extents_bytes(e: &Entry) -> usize {
    match &e.kind {
        crate::manifest::Kind::File { extents, .. } => extents.len() * 40,
        _ => 0,
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        for p in &self.runs {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct RunReader {
    file: BufReader<File>,
    buf: Vec<u8>,
    path: PathBuf,
}

impl RunReader {
    fn next(&mut self) -> Result<Option<Entry>> {
        loop {
            if let Some((e, n)) =
                decode_entry(&self.buf).map_err(|fault| Error::bad_entry(self.path.display().to_string(), fault))?
            {
                self.buf.drain(..n);
                return Ok(Some(e));
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.file.read(&mut chunk).ctx("reading sort run", &self.path)?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::bad_input(self.path.display().to_string(), "truncated sort run"))
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

struct Head {
    e: Entry,
    src: usize,
}

impl PartialEq for Head {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Head {
    // BinaryHeap is a max-heap: reverse for the smallest path first.
    fn cmp(&self, o: &Self) -> Ordering {
        cmp_paths(&o.e.path, &self.e.path).then(o.src.cmp(&self.src))
    }
}

pub(crate) struct Sorted {
    mem: std::iter::Peekable<std::vec::IntoIter<Entry>>,
    heads: BinaryHeap<Head>,
    readers: Vec<RunReader>,
}

impl Sorted {
    fn step(&mut self) -> Result<Option<Entry>> {
        let from_runs = match (self.heads.peek(), self.mem.peek()) {
            (None, None) => return Ok(None),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(h), Some(m)) => cmp_paths(&h.e.path, &m.path) != Ordering::Greater,
        };
        if !from_runs {
            return Ok(self.mem.next());
        }
        let Some(Head { e, src }) = self.heads.pop() else { return Ok(None) };
        if let Some(next) = self.readers[src].next()? {
            self.heads.push(Head { e: next, src });
        }
        Ok(Some(e))
    }
}

impl Iterator for Sorted {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Kind, Timestamp};

    #[test]
    fn spilled_runs_merge_in_tree_order() {
        let mut s = Spill::with_budget(2_000);
        let mut want = Vec::new();
        for i in (0..500u32).rev() {
            let path = format!("d{}/f{i}", i % 7).into_bytes();
            want.push(path.clone());
            s.push(Entry {
                path,
                kind: Kind::Fifo,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: Timestamp::default(),
                xattrs: vec![],
            })
            .unwrap();
        }
        assert!(s.runs.len() > 5, "budget forces runs");
        want.sort_by(|a, b| cmp_paths(a, b));
        for _ in 0..2 {
            let got: Vec<Vec<u8>> = s.sorted().unwrap().map(|e| e.unwrap().path).collect();
            assert_eq!(got, want);
        }
        let runs = s.runs.clone();
        drop(s);
        assert!(runs.iter().all(|p| !p.exists()), "runs removed");
    }
}

//! A guest's saved memory, sent as references to files the target holds.
//!
//! Much of a running guest's memory repeats files: its page cache holds
//! the disk blocks it read or wrote, the hypervisor loaded the kernel and
//! initrd, and freed pages keep what they held. A migration sends the
//! guest's disk (its upper layer) and the target holds the stack, so those
//! pages need not travel twice. [`encode`] rewrites a save image as a
//! *page delta*: literal runs, and for each 4 KiB page equal to a page of
//! one of the instance's source files (its disk image, kernel, initrd) a
//! reference to that page; [`decode`] writes the image back from the
//! delta and the files into a file (for libvirt's restore), and
//! [`decode_stream`] in one pass, in image order, into a QEMU waiting for
//! its state (no file; on the migration benchmark 0.15 s for 242 MB, with
//! QEMU loading at the same time). Measured on the migration benchmark (a guest that
//! wrote a 200 MiB log): 47,929 of 58,891 non-zero pages matched, and the
//! state on the wire went from 58 MB to about 10.
//!
//! A page close to a source page without equalling it (the kernel's text,
//! which the kernel patches as it boots) goes as a *patch*: its XOR with
//! that page, mostly zeros, which the chunk compression then all but
//! removes. The source page is guessed, not searched for: the one at the
//! same distance in the guest's memory from the last referenced page, in
//! the same file (the kernel lies in memory as in its file); the patch is
//! used when the XOR has at least `PATCH_GAIN` more zero bytes than the
//! page. On the migration benchmark 2,878 of the 11,072 pages left after
//! references were kernel pages so patched, and the state on the wire went
//! from 11.1 MB to 5.5 MB.
//!
//! ```text
//! delta := "XNPAGES1" nsrc:u16 (len:u16 path[len] digest[32])*nsrc size:u64 op*
//! op    := 0x01 len:u32 bytes[len]        literal
//!        | 0x02 src:u16 page:u32           GUEST_PAGE bytes at page * GUEST_PAGE
//!                                          of source file src
//!        | 0x03 src:u16 page:u32 xor[GUEST_PAGE]
//!                                          that page XOR xor
//! ```
//!
//! Source files are paths in the union of the layer the state is restored
//! on (the instance's committed upper layer over its stack); `digest`
//! (BLAKE3 of the file's extent list) makes a restore on any other version
//! of a file fail with a clear error instead of wrong memory.
//!
//! Pages are found where QEMU's stream keeps them
//! ([`xenod_deployer::ram_record`]), and a reference is only written for a
//! page whose BLAKE3 equals that of the file page it names, so a wrong
//! guess about the stream costs bytes, never correctness. The source files
//! are read from the store through their chunks, which verify; the page
//! hashes of chunk-aligned files are kept per chunk across pre-copy
//! rounds, so each round hashes only what was written since.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;
use xenod_deployer::{GUEST_PAGE, MAX_RAM_RECORD, RamRecord, ram_record};
use xenod_store::{ChunkId, Extent, FileReader, Kind, LayerId, Merged, Store};

use crate::error::{Context, Error, Result};

const MAGIC: &[u8; 8] = b"XNPAGES1";
const OP_LITERAL: u8 = 1;
const OP_PAGE: u8 = 2;
const OP_PATCH: u8 = 3;
/// A page goes as a patch when its XOR with the guessed source page has at
/// least this many more zero bytes than the page itself.
const PATCH_GAIN: usize = 1024;
/// How far (guest pages) from the last referenced page a patch's source
/// page is guessed; the benchmark's kernel pages were at most 814 away.
const PATCH_REACH: u64 = 1024;
/// Bytes of the save image scanned per read.
const WINDOW: usize = 4 << 20;
/// Most source files a delta may name.
const MAX_SOURCES: usize = 64;
/// Most pages indexed: 16 GiB of file data, about 200 MB of index (and
/// as much again of per-chunk hashes kept between rounds).
const MAX_PAGES: usize = 1 << 22;

type Hash = [u8; 32];

fn page_hash(p: &[u8]) -> Hash {
    *ChunkId::of(p).as_bytes()
}

/// Page hashes of source files, kept between calls so that each pre-copy
/// round hashes only chunks it has not seen.
#[derive(Default)]
pub struct PageHashes {
    /// Chunks of chunk-aligned files (disk images): the hash of each whole
    /// page, `None` for a page of zeros.
    by_chunk: HashMap<ChunkId, Vec<Option<Hash>>>,
    /// Other files, by the digest of their extent list.
    by_file: HashMap<Hash, Vec<(u32, Hash)>>,
}

/// Where each indexed page of the sources is: hash -> (source, page).
pub struct PageIndex {
    /// (path, digest of its extent list).
    pub files: Vec<(Vec<u8>, Hash)>,
    /// Each file's extents, in the order of `files`.
    extents: Vec<Vec<Extent>>,
    map: HashMap<Hash, (u16, u32)>,
}

/// Reads whole pages of one source file through its chunks (which
/// verify), keeping the last chunks decoded (one by default: pages are
/// mostly asked for in order).
struct SourcePages<'a> {
    store: &'a Store,
    extents: &'a [Extent],
    /// Where each extent starts in the file.
    starts: Vec<u64>,
    len: u64,
    /// The chunks last decoded, by extent, and their order (the oldest
    /// first): a streaming decode asks for one per page, so this is a
    /// lookup, not a scan.
    recent: HashMap<usize, Arc<Vec<u8>>>,
    order: std::collections::VecDeque<usize>,
    keep: usize,
    warm: Option<&'a Warm>,
    /// Chunks read from the store (not found read ahead or kept).
    reads: u64,
}

/// Chunks read ahead ([`warm`]), by id.
pub type Warm = HashMap<ChunkId, Arc<Vec<u8>>>;

/// Reads ahead, in parallel, the chunks a guest's saved memory most
/// likely repeats: those of `paths` in `top`'s union (its disk image,
/// kernel, initrd) that differ from the same files in `below`'s (what the
/// guest wrote since it was deployed, which its page cache holds), in
/// file order, up to `cap` bytes. A target holding the guest staged does
/// this before the stop, so that decoding the state after it finds them
/// decoded.
pub fn warm(store: &Store, top: &LayerId, below: Option<&LayerId>, paths: &[Vec<u8>], cap: u64) -> Result<Warm> {
    let old: std::collections::HashSet<ChunkId> = match below {
        Some(b) => source_files(store, b, paths)?
            .into_iter()
            .flat_map(|(_, x)| x)
            .filter_map(|x| if let Extent::Data { id, .. } = x { Some(id) } else { None })
            .collect(),
        None => Default::default(),
    };
    let mut ids = Vec::new();
    let mut bytes = 0u64;
    'files: for (_, extents) in source_files(store, top, paths)? {
        for x in extents {
            if let Extent::Data { id, len } = x
                && !old.contains(&id)
            {
                if bytes + len as u64 > cap {
                    break 'files;
                }
                bytes += len as u64;
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids.par_iter().map(|id| Ok((*id, Arc::new(store.get(id)?)))).collect()
}

impl<'a> SourcePages<'a> {
    fn new(store: &'a Store, extents: &'a [Extent]) -> Self {
        let mut len = 0;
        let starts = extents
            .iter()
            .map(|x| {
                let s = len;
                len += x.len();
                s
            })
            .collect();
        Self {
            store,
            extents,
            starts,
            len,
            recent: HashMap::new(),
            order: Default::default(),
            keep: 1,
            warm: None,
            reads: 0,
        }
    }

    fn warmed(mut self, warm: &'a Warm) -> Self {
        self.warm = Some(warm);
        self
    }

    /// Keeps the last `n` chunks decoded instead of one.
    fn keeping(mut self, n: usize) -> Self {
        self.keep = n.max(1);
        self
    }

    /// The plain bytes of extent `x`, chunk `id`.
    fn chunk(&mut self, x: usize, id: ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Some(plain) = self.recent.get(&x) {
            return Ok(plain.clone());
        }
        if let Some(plain) = self.warm.and_then(|w| w.get(&id)) {
            return Ok(plain.clone());
        }
        let plain = Arc::new(self.store.get(&id).with_context(|| format!("reading chunk {id} of a page"))?);
        self.reads += 1;
        if self.order.len() >= self.keep
            && let Some(old) = self.order.pop_front()
        {
            self.recent.remove(&old);
        }
        self.order.push_back(x);
        self.recent.insert(x, plain.clone());
        Ok(plain)
    }

    /// Whole pages in the file.
    fn pages(&self) -> u64 {
        self.len / GUEST_PAGE as u64
    }

    /// Reads page `n` (which must be whole in the file) into `page`.
    fn read(&mut self, n: u32, page: &mut [u8]) -> Result<()> {
        let (mut pos, end) = (n as u64 * GUEST_PAGE as u64, (n as u64 + 1) * GUEST_PAGE as u64);
        let mut x = self.starts.partition_point(|&s| s <= pos).saturating_sub(1);
        while pos < end {
            while self.starts[x] + self.extents[x].len() <= pos {
                x += 1;
            }
            let (start, len) = (self.starts[x], self.extents[x].len());
            let (from, to) = ((pos - start) as usize, ((end.min(start + len)) - start) as usize);
            let dst = &mut page[(pos - n as u64 * GUEST_PAGE as u64) as usize..][..to - from];
            match self.extents[x] {
                Extent::Hole { .. } => dst.fill(0),
                Extent::Data { id, .. } => {
                    let plain = self.chunk(x, id)?;
                    dst.copy_from_slice(&plain[from..to]);
                }
            }
            pos = start + to as u64;
        }
        Ok(())
    }
}

/// The files of `top`'s union named in `paths` (those that exist and are
/// regular files), with their extents.
fn source_files(store: &Store, top: &LayerId, paths: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<Extent>)>> {
    let mut out = Vec::new();
    if paths.is_empty() {
        // A cold migration (or an instance without a spec): no tree walk.
        return Ok(out);
    }
    for e in Merged::of(store, top)? {
        let e = e?;
        if let Kind::File { extents, .. } = e.kind
            && paths.contains(&e.path)
        {
            out.push((e.path, extents));
            if out.len() == paths.len() {
                break;
            }
        }
    }
    Ok(out)
}

impl PageHashes {
    /// Indexes every page of the files `paths` in `top`'s union.
    pub fn index(&mut self, store: &Store, top: &LayerId, paths: &[Vec<u8>]) -> Result<PageIndex> {
        let files = source_files(store, top, &paths[..paths.len().min(MAX_SOURCES)])?;
        let mut index = PageIndex { files: Vec::new(), extents: Vec::new(), map: HashMap::new() };
        for (src, (path, extents)) in files.into_iter().enumerate() {
            index.files.push((path, extents_digest(&extents)));
            index.extents.push(extents.clone());
            let src = src as u16;
            let aligned = extents.iter().all(|x| x.len() % GUEST_PAGE as u64 == 0);
            let add = |map: &mut HashMap<Hash, (u16, u32)>, page: u64, h: Hash| {
                if map.len() < MAX_PAGES && page <= u32::MAX as u64 {
                    map.entry(h).or_insert((src, page as u32));
                }
            };
            if aligned {
                let mut at = 0u64;
                for x in &extents {
                    if index.map.len() >= MAX_PAGES {
                        break;
                    }
                    if let Extent::Data { id, .. } = x {
                        if !self.by_chunk.contains_key(id) {
                            let plain = store.get(id)?;
                            let hashes = plain
                                .chunks(GUEST_PAGE)
                                .map(|p| (!p.iter().all(|&b| b == 0)).then(|| page_hash(p)))
                                .collect();
                            self.by_chunk.insert(*id, hashes);
                        }
                        for (i, h) in self.by_chunk[id].iter().enumerate() {
                            if let Some(h) = h {
                                add(&mut index.map, at / GUEST_PAGE as u64 + i as u64, *h);
                            }
                        }
                    }
                    at += x.len();
                }
            } else {
                let key = extents_digest(&extents);
                if let std::collections::hash_map::Entry::Vacant(slot) = self.by_file.entry(key) {
                    let mut pages = Vec::new();
                    let mut r = FileReader::new(store, extents);
                    let mut buf = vec![0u8; GUEST_PAGE];
                    for page in 0..MAX_PAGES as u32 {
                        let n = read_full(&mut r, &mut buf)?;
                        if n < GUEST_PAGE {
                            break;
                        }
                        if !buf.iter().all(|&b| b == 0) {
                            pages.push((page, page_hash(&buf)));
                        }
                    }
                    slot.insert(pages);
                }
                for (page, h) in &self.by_file[&key] {
                    add(&mut index.map, *page as u64, *h);
                }
            }
        }
        Ok(index)
    }
}

fn extents_digest(extents: &[Extent]) -> Hash {
    let mut h = Vec::with_capacity(extents.len() * 41);
    for x in extents {
        match x {
            Extent::Data { id, len } => {
                h.push(1);
                h.extend_from_slice(id.as_bytes());
                h.extend_from_slice(&len.to_le_bytes());
            }
            Extent::Hole { len } => {
                h.push(0);
                h.extend_from_slice(&len.to_le_bytes());
            }
        }
    }
    page_hash(&h)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// What [`encode`] did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct EncodeStats {
    pub state_bytes: u64,
    /// Distinct pages of the source files that could be referenced.
    pub pages_indexed: u64,
    pub pages: u64,
    pub pages_referenced: u64,
    /// Pages sent as patches of a source page.
    pub pages_patched: u64,
    pub delta_bytes: u64,
}

/// The patch of `page` (guest page `g`) against the source page guessed
/// from the last reference `last` (source, file page minus guest page,
/// guest page), left in `xor`; `None` when no page is guessed or the patch
/// would not pay.
fn patch(
    page: &[u8],
    g: u64,
    last: Option<(usize, i64, u64)>,
    sources: &mut [SourcePages<'_>],
    xor: &mut [u8],
) -> Result<Option<(u16, u32)>> {
    let Some((src, delta, g0)) = last else { return Ok(None) };
    let Some(n) = (g as i64).checked_add(delta).filter(|&n| n >= 0 && g.abs_diff(g0) <= PATCH_REACH) else {
        return Ok(None);
    };
    let Some(file) = sources.get_mut(src).filter(|f| (n as u64) < f.pages()) else { return Ok(None) };
    file.read(n as u32, xor)?;
    for (x, b) in xor.iter_mut().zip(page) {
        *x ^= b;
    }
    let zeros = |b: &[u8]| b.iter().filter(|&&x| x == 0).count();
    Ok((zeros(xor) >= zeros(page) + PATCH_GAIN).then_some((src as u16, n as u32)))
}

/// Reads a file another thread is still writing: at its end, waits for
/// more until `done` is set (with release ordering, after the last
/// write), then ends where the file does. A file not there yet is waited
/// for too (and is empty if `done` comes first).
pub struct Follow {
    path: std::path::PathBuf,
    file: Option<File>,
    done: Arc<AtomicBool>,
}

impl Follow {
    pub fn new(path: &Path, done: Arc<AtomicBool>) -> Self {
        Self { path: path.to_path_buf(), file: None, done }
    }
}

impl Read for Follow {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        const WAIT: std::time::Duration = std::time::Duration::from_millis(1);
        loop {
            let done = self.done.load(Ordering::Acquire);
            let Some(f) = &mut self.file else {
                match File::open(&self.path) {
                    Ok(f) => self.file = Some(f),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && !done => std::thread::sleep(WAIT),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                    Err(e) => return Err(e),
                }
                continue;
            };
            // Read after seeing `done`: whatever was written before it.
            match f.read(buf)? {
                0 if done => return Ok(0),
                0 => std::thread::sleep(WAIT),
                n => return Ok(n),
            }
        }
    }
}

/// Writes the page delta of the save image `state` (read to its end)
/// against `index` (whose files `store` holds) to `out`.
pub fn encode(store: &Store, state: impl Read, index: &PageIndex, out: &Path) -> Result<EncodeStats> {
    let mut f = state;
    let out_file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, &out_file);
    let mut st = EncodeStats { pages_indexed: index.map.len() as u64, ..EncodeStats::default() };
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&(index.files.len() as u16).to_le_bytes());
    for (p, digest) in &index.files {
        head.extend_from_slice(&(p.len() as u16).to_le_bytes());
        head.extend_from_slice(p);
        head.extend_from_slice(digest);
    }
    // The image's size, written once it is known.
    let size_at = head.len() as u64;
    head.extend_from_slice(&0u64.to_le_bytes());
    w.write_all(&head)?;
    st.delta_bytes += head.len() as u64;

    fn literal(w: &mut impl Write, bytes: &[u8], st: &mut EncodeStats) -> std::io::Result<()> {
        for part in bytes.chunks(u32::MAX as usize) {
            w.write_all(&[OP_LITERAL])?;
            w.write_all(&(part.len() as u32).to_le_bytes())?;
            w.write_all(part)?;
            st.delta_bytes += 5 + part.len() as u64;
        }
        Ok(())
    }
    let mut sources: Vec<SourcePages<'_>> = index.extents.iter().map(|x| SourcePages::new(store, x)).collect();
    let mut last = None;
    let mut xor = vec![0u8; GUEST_PAGE];
    let mut buf: Vec<u8> = Vec::with_capacity(WINDOW + MAX_RAM_RECORD);
    let (mut p, mut lit, mut eof) = (0usize, 0usize, false);
    loop {
        if !eof && buf.len() - p < MAX_RAM_RECORD {
            literal(&mut w, &buf[lit..p], &mut st)?;
            buf.drain(..p);
            (p, lit) = (0, 0);
            let want = WINDOW + MAX_RAM_RECORD - buf.len();
            let n = (&mut f).take(want as u64).read_to_end(&mut buf).context("reading the saved state")?;
            st.state_bytes += n as u64;
            eof = n < want;
        }
        if p >= buf.len() {
            break;
        }
        // Where the window's page records are (a sequential walk), with
        // each page's number in its RAM block, then their hashes (in
        // parallel), then the delta.
        let mut records = Vec::new();
        while p < buf.len() && (eof || buf.len() - p >= MAX_RAM_RECORD) {
            match ram_record(&buf[p..]) {
                Some(RamRecord::Page { data }) => {
                    let g = u64::from_be_bytes(buf[p..p + 8].try_into().unwrap_or_default()) >> 12;
                    records.push((p + data, g));
                    p += data + GUEST_PAGE;
                }
                Some(RamRecord::Zero { len }) => p += len,
                None => p += 1,
            }
        }
        let found: Vec<Option<(u16, u32)>> =
            records.par_iter().map(|&(at, _)| index.map.get(&page_hash(&buf[at..at + GUEST_PAGE])).copied()).collect();
        st.pages += records.len() as u64;
        for ((at, g), hit) in records.into_iter().zip(found) {
            let page = &buf[at..at + GUEST_PAGE];
            let (op, src, n) = match hit {
                Some((src, n)) => {
                    last = Some((src as usize, n as i64 - g as i64, g));
                    st.pages_referenced += 1;
                    (OP_PAGE, src, n)
                }
                None => match patch(page, g, last, &mut sources, &mut xor)? {
                    Some((src, n)) => {
                        st.pages_patched += 1;
                        (OP_PATCH, src, n)
                    }
                    None => continue,
                },
            };
            literal(&mut w, &buf[lit..at], &mut st)?;
            w.write_all(&[op])?;
            w.write_all(&src.to_le_bytes())?;
            w.write_all(&n.to_le_bytes())?;
            st.delta_bytes += 7;
            if op == OP_PATCH {
                w.write_all(&xor)?;
                st.delta_bytes += GUEST_PAGE as u64;
            }
            lit = at + GUEST_PAGE;
        }
    }
    literal(&mut w, &buf[lit..], &mut st)?;
    w.flush()?;
    drop(w);
    out_file.write_all_at(&st.state_bytes.to_le_bytes(), size_at)?;
    Ok(st)
}

/// A page delta's header, checked against the files of the layer it is
/// decoded on.
struct Head {
    paths: Vec<Vec<u8>>,
    /// Each source file's extents and length.
    sources: Vec<(Vec<Extent>, u64)>,
    /// The image's size.
    size: u64,
}

fn bad(why: String) -> Error {
    Error::msg(format!("saved state (page delta): {why}"))
}

/// Reads a page delta's header from `r` and finds its source files in the
/// union of `top`, each the version it was saved against.
fn read_head(store: &Store, top: &LayerId, r: &mut impl Read) -> Result<Head> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|_| bad("shorter than its header".into()))?;
    if &magic != MAGIC {
        return Err(bad("not a page delta (bad magic)".into()));
    }
    let nsrc = read_u16(r).map_err(|_| bad("truncated header".into()))? as usize;
    if nsrc > MAX_SOURCES {
        return Err(bad(format!("{nsrc} source files (at most {MAX_SOURCES})")));
    }
    let mut paths = Vec::with_capacity(nsrc);
    let mut digests = Vec::with_capacity(nsrc);
    for _ in 0..nsrc {
        let len = read_u16(r).map_err(|_| bad("truncated header".into()))? as usize;
        let mut p = vec![0u8; len];
        let mut digest = [0u8; 32];
        r.read_exact(&mut p).map_err(|_| bad("truncated header".into()))?;
        r.read_exact(&mut digest).map_err(|_| bad("truncated header".into()))?;
        paths.push(p);
        digests.push(digest);
    }
    let size = read_u64(r).map_err(|_| bad("truncated header".into()))?;
    let files = if nsrc == 0 { Vec::new() } else { source_files(store, top, &paths)? };
    let mut sources = Vec::with_capacity(nsrc);
    for (p, digest) in paths.iter().zip(&digests) {
        let name = String::from_utf8_lossy(p);
        let Some((_, x)) = files.iter().find(|(q, _)| q == p) else {
            return Err(bad(format!("its source file {name} is not in layer {top}")));
        };
        if extents_digest(x) != *digest {
            return Err(bad(format!("it was saved against another version of {name} than layer {top} holds")));
        }
        sources.push((x.clone(), x.iter().map(Extent::len).sum()));
    }
    Ok(Head { paths, sources, size })
}

/// What a page delta says, in image order.
enum Piece<'a> {
    /// Bytes of the image (a run of a literal: at most 1 MiB at a time).
    Literal(&'a [u8]),
    /// Page `page` of source `src`, XORed with `xor` for a patch.
    Page { src: u16, page: u32, xor: Option<&'a [u8]> },
}

/// Reads the ops of a page delta after its header, giving each piece of
/// the image with its offset to `put` until that returns `false`, and
/// checks that they describe exactly `head.size` bytes, every reference
/// inside its file.
fn walk(r: &mut impl Read, head: &Head, mut put: impl FnMut(u64, Piece<'_>) -> Result<bool>) -> Result<()> {
    let size = head.size;
    let mut at = 0u64;
    let mut copy = vec![0u8; 1 << 20];
    loop {
        let mut op = [0u8; 1];
        if r.read(&mut op)? == 0 {
            break;
        }
        match op[0] {
            OP_LITERAL => {
                let len = read_u32(r).map_err(|_| bad("truncated literal".into()))? as u64;
                if at + len > size {
                    return Err(bad(format!("literal at {at} runs past the image's {size} bytes")));
                }
                let mut left = len;
                while left > 0 {
                    let n = left.min(copy.len() as u64) as usize;
                    r.read_exact(&mut copy[..n]).map_err(|_| bad(format!("literal at {at} cut short")))?;
                    if !put(at + len - left, Piece::Literal(&copy[..n]))? {
                        return Ok(());
                    }
                    left -= n as u64;
                }
                at += len;
            }
            op @ (OP_PAGE | OP_PATCH) => {
                let src = read_u16(r).map_err(|_| bad("truncated page reference".into()))?;
                let page = read_u32(r).map_err(|_| bad("truncated page reference".into()))?;
                let Some(&(_, flen)) = head.sources.get(src as usize) else {
                    return Err(bad(format!("page reference to source {src} of {}", head.sources.len())));
                };
                if (page as u64 + 1) * GUEST_PAGE as u64 > flen {
                    return Err(bad(format!(
                        "page {page} is beyond the end of {}",
                        String::from_utf8_lossy(&head.paths[src as usize])
                    )));
                }
                if at + GUEST_PAGE as u64 > size {
                    return Err(bad(format!("page at {at} runs past the image's {size} bytes")));
                }
                let xor = if op == OP_PATCH {
                    r.read_exact(&mut copy[..GUEST_PAGE]).map_err(|_| bad(format!("patch at {at} cut short")))?;
                    Some(&copy[..GUEST_PAGE])
                } else {
                    None
                };
                if !put(at, Piece::Page { src, page, xor })? {
                    return Ok(());
                }
                at += GUEST_PAGE as u64;
            }
            op => return Err(bad(format!("unknown op {op} at image offset {at}"))),
        }
    }
    if at != size {
        return Err(bad(format!("describes {at} bytes of a {size}-byte image")));
    }
    Ok(())
}

/// Writes the save image a page delta describes to the file `out`,
/// reading the pages it references from the union of `top` in the store
/// (or from `warm`, chunks read ahead). Literals are written as they come;
/// references are gathered (7 bytes per page of the image at most) and
/// filled in file order, in parallel, so each source chunk is read once.
pub fn decode(store: &Store, top: &LayerId, delta: impl Read, out: &Path, warm: &Warm) -> Result<u64> {
    let mut r = std::io::BufReader::with_capacity(1 << 20, delta);
    let head = read_head(store, top, &mut r)?;
    let t = std::time::Instant::now();
    // Read back too: a patch XORs what was written for it.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    // Every byte written in order (a referenced page as zeros, filled in
    // below): one write per MiB. Leaving those pages holes instead took a
    // write for each record header between them, and longer.
    let mut w = BufWriter::with_capacity(1 << 20, &f);
    // (source, page, image offset, a patch: XOR what is written there).
    let mut refs: Vec<(u16, u32, u64, bool)> = Vec::new();
    walk(&mut r, &head, |at, piece| {
        match piece {
            Piece::Literal(b) => w.write_all(b)?,
            Piece::Page { src, page, xor } => {
                w.write_all(xor.unwrap_or(&[0u8; GUEST_PAGE]))?;
                refs.push((src, page, at, xor.is_some()));
            }
        }
        Ok(true)
    })?;
    w.flush()?;
    drop(w);
    let literals = t.elapsed();
    refs.sort_unstable();
    let mut i = 0;
    while i < refs.len() {
        let src = refs[i].0;
        let end = refs[i..].iter().position(|r| r.0 != src).map_or(refs.len(), |n| i + n);
        let extents = &head.sources[src as usize].0;
        // In parallel, by runs of pages: a chunk is decoded at most once
        // per run it appears in.
        refs[i..end].par_chunks(1024).try_for_each(|part| fill(store, extents, warm, part, &f))?;
        i = end;
    }
    tracing::info!(
        "saved state decoded: {} bytes, {} pages from files; literals {:.3} s, pages {:.3} s",
        head.size,
        refs.len(),
        literals.as_secs_f64(),
        (t.elapsed() - literals).as_secs_f64()
    );
    Ok(head.size)
}

/// Chunks of source files a streaming decode keeps decoded besides those
/// read ahead (64 KiB each for disk images): 32 MiB per file at most.
const STREAM_KEEP: usize = 512;

/// Writes the save image a page delta describes to `out` in one pass, in
/// image order (into a waiting QEMU's socket), reading each referenced
/// page from `warm` (chunks read ahead), the last `STREAM_KEEP` chunks
/// decoded, or the store. Memory stays bounded by those: no image is
/// held. Returns the image's size.
pub fn decode_stream(store: &Store, top: &LayerId, delta: impl Read, out: impl Write, warm: &Warm) -> Result<u64> {
    decode_upto(store, top, delta, out, warm, u64::MAX)
}

/// The first `n` bytes of the image a page delta describes (all of it
/// when shorter), decoded without the rest.
pub fn decode_head(store: &Store, top: &LayerId, delta: impl Read, n: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decode_upto(store, top, delta, &mut out, &Warm::new(), n)?;
    out.truncate(n as usize);
    Ok(out)
}

/// [`decode_stream`], stopping once `limit` bytes (or more) are written.
fn decode_upto(
    store: &Store,
    top: &LayerId,
    delta: impl Read,
    out: impl Write,
    warm: &Warm,
    limit: u64,
) -> Result<u64> {
    let mut r = std::io::BufReader::with_capacity(1 << 20, delta);
    let head = read_head(store, top, &mut r)?;
    let t = std::time::Instant::now();
    let mut w = BufWriter::with_capacity(1 << 20, out);
    let mut files: Vec<SourcePages<'_>> =
        head.sources.iter().map(|(x, _)| SourcePages::new(store, x).warmed(warm).keeping(STREAM_KEEP)).collect();
    let mut page_buf = vec![0u8; GUEST_PAGE];
    let mut pages = 0u64;
    let mut written = 0u64;
    walk(&mut r, &head, |_, piece| {
        let len = match piece {
            Piece::Literal(b) => {
                w.write_all(b).context("writing the saved state")?;
                b.len() as u64
            }
            Piece::Page { src, page, xor } => {
                files[src as usize].read(page, &mut page_buf)?;
                if let Some(xor) = xor {
                    page_buf.iter_mut().zip(xor).for_each(|(p, x)| *p ^= x);
                }
                w.write_all(&page_buf).context("writing the saved state")?;
                pages += 1;
                GUEST_PAGE as u64
            }
        };
        written += len;
        Ok(written < limit)
    })?;
    w.flush().context("writing the saved state")?;
    if limit < u64::MAX {
        return Ok(head.size);
    }
    tracing::info!(
        "saved state decoded as a stream: {} bytes, {pages} pages from files ({} chunks read, {} read ahead) in {:.3} s",
        head.size,
        files.iter().map(|f| f.reads).sum::<u64>(),
        warm.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(head.size)
}

/// Copies the pages `refs` (sorted by page) of the file `extents` into
/// `out` at their offsets (a patch XORs what is there), decoding each
/// chunk once.
fn fill(store: &Store, extents: &[Extent], warm: &Warm, refs: &[(u16, u32, u64, bool)], out: &File) -> Result<()> {
    let mut file = SourcePages::new(store, extents).warmed(warm);
    let (mut page, mut xor) = (vec![0u8; GUEST_PAGE], vec![0u8; GUEST_PAGE]);
    for &(_, n, to, patch) in refs {
        file.read(n, &mut page)?;
        if patch {
            out.read_exact_at(&mut xor, to)?;
            for (p, x) in page.iter_mut().zip(&xor) {
                *p ^= x;
            }
        }
        out.write_all_at(&page, to)?;
    }
    Ok(())
}

fn read_u16(r: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use xenod_store::testing::noise;
    use xenod_store::{Chunking, Entry, ImportOptions, LayerWriter, Timestamp, chunk_stream};

    use super::*;

    fn file(path: &str, size: u64, chunking: Chunking, extents: Vec<Extent>) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: Kind::File { size, chunking, extents },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            xattrs: vec![],
        }
    }

    /// A layer with a chunk-aligned image (64 KiB blocks, one a hole) and
    /// a content-cut kernel, both of noise; returns it with both contents.
    fn layer(store: &Store, seed: u64) -> (LayerId, Vec<u8>, Vec<u8>) {
        let mut image = Vec::new();
        let mut extents = Vec::new();
        for b in 0..6u64 {
            let block = if b == 2 { vec![0u8; 65536] } else { noise(65536, seed + b) };
            extents.push(if b == 2 {
                Extent::Hole { len: 65536 }
            } else {
                Extent::Data { id: store.put(&block).unwrap().0, len: 65536 }
            });
            image.extend_from_slice(&block);
        }
        let kernel = noise(300_000, seed + 100);
        let at = || "kernel".to_string();
        let (kx, ksize) =
            chunk_stream(store, kernel.as_slice(), Chunking::Cdc, kernel.len() as u64, &ImportOptions::default(), &at)
                .unwrap();
        let mut w = LayerWriter::new(store);
        w.push(&Entry::dir(Vec::new())).unwrap();
        w.push(&Entry::dir(b"boot".to_vec())).unwrap();
        w.push(&file("boot/vmlinux", ksize, Chunking::Cdc, kx)).unwrap();
        w.push(&Entry::dir(b"disk".to_vec())).unwrap();
        w.push(&file("disk/root.img", image.len() as u64, Chunking::Fixed, extents)).unwrap();
        (w.finish(None, BTreeMap::new()).unwrap(), image, kernel)
    }

    /// A save image shaped like QEMU's: a header, page records (with and
    /// without a block name), zero-page records, bytes that are no record,
    /// a kernel page patched in a few bytes, and a tail shorter than a
    /// record. Returns it with the pages that equal a source page.
    fn save_image(image: &[u8], kernel: &[u8]) -> (Vec<u8>, u64) {
        let mut s = b"LibvirtQemudSave".to_vec();
        s.extend_from_slice(&noise(1000, 7));
        let mut refs = 0;
        let rec = |s: &mut Vec<u8>, addr: u64, named: bool, page: &[u8]| {
            let flags = if named { 0x08 } else { 0x28 };
            s.extend_from_slice(&((addr << 12) | flags).to_be_bytes());
            if named {
                s.extend_from_slice(b"\x06pc.ram");
            }
            s.extend_from_slice(page);
        };
        let pg = |b: &[u8], n: usize| b[n * 4096..(n + 1) * 4096].to_vec();
        rec(&mut s, 0, true, &pg(image, 0));
        rec(&mut s, 1, false, &pg(image, 17));
        rec(&mut s, 2, false, &noise(4096, 9)); // matches nothing
        s.extend_from_slice(&((3u64 << 12) | 0x22).to_be_bytes());
        s.push(0);
        rec(&mut s, 4, false, &pg(kernel, 5)); // straddles the kernel's chunks
        // Guest page 9 holds kernel page 10 (as page 4 holds 5), changed a
        // little: a patch. Page 10 is noise: nothing close, a literal.
        let mut patched = pg(kernel, 10);
        patched[100..108].copy_from_slice(b"patched!");
        rec(&mut s, 9, false, &patched);
        rec(&mut s, 10, false, &noise(4096, 12));
        s.extend_from_slice(&noise(333, 11));
        rec(&mut s, 5, false, &pg(image, 95)); // last page of the image
        rec(&mut s, 6, false, &pg(image, 17)); // the same page again
        rec(&mut s, 7, false, &vec![0u8; 4096]); // zeros are never referenced
        refs += 5;
        s.extend_from_slice(&pg(image, 3)[..2000]);
        (s, refs)
    }

    /// [`save_image`] of `top`'s files, encoded against `paths` into
    /// `dir`: the image and the delta's path.
    fn encoded(
        dir: &Path,
        store: &Store,
        top: &LayerId,
        image: &[u8],
        kernel: &[u8],
        paths: &[Vec<u8>],
    ) -> (Vec<u8>, std::path::PathBuf) {
        let index = PageHashes::default().index(store, top, paths).unwrap();
        let (state, _) = save_image(image, kernel);
        let (sp, dp) = (dir.join("s.save"), dir.join("s.pages"));
        std::fs::write(&sp, &state).unwrap();
        encode(store, File::open(&sp).unwrap(), &index, &dp).unwrap();
        (state, dp)
    }

    #[test]
    fn delta_round_trips_and_refers_to_matching_pages() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path().join("store")).unwrap();
        let (top, image, kernel) = layer(&store, 1);
        let paths = vec![b"disk/root.img".to_vec(), b"boot/vmlinux".to_vec(), b"no/such".to_vec()];
        let mut hashes = PageHashes::default();
        let index = hashes.index(&store, &top, &paths).unwrap();
        assert_eq!(index.files.len(), 2, "a missing source is skipped");
        let (state, refs) = save_image(&image, &kernel);
        let (sp, dp, out) = (t.path().join("s.save"), t.path().join("s.pages"), t.path().join("back.save"));
        std::fs::write(&sp, &state).unwrap();
        let st = encode(&store, File::open(&sp).unwrap(), &index, &dp).unwrap();
        assert_eq!(st.pages_referenced, refs, "{st:?}");
        assert_eq!((st.pages, st.pages_patched), (9, 1), "{st:?}");
        assert!(st.delta_bytes < state.len() as u64 - refs * 4000, "{st:?}");
        assert_eq!(decode(&store, &top, File::open(&dp).unwrap(), &out, &Warm::new()).unwrap(), state.len() as u64);
        assert_eq!(std::fs::read(&out).unwrap(), state);
        // In one pass into a stream, the same image.
        let mut streamed = Vec::new();
        let n = decode_stream(&store, &top, File::open(&dp).unwrap(), &mut streamed, &Warm::new()).unwrap();
        assert!(n == state.len() as u64 && streamed == state);
        // Its head alone (a save image's XML), or all of a shorter one.
        for k in [10, 1500, state.len() + 10] {
            let head = decode_head(&store, &top, File::open(&dp).unwrap(), k as u64).unwrap();
            assert!(head == state[..k.min(state.len())], "the first {k} bytes");
        }

        // Encoded while the image is still being written (a live save),
        // the delta is the same.
        let (growing, followed) = (t.path().join("g.save"), t.path().join("g.pages"));
        let done = Arc::new(AtomicBool::new(false));
        let reader = Follow::new(&growing, done.clone());
        let (writer, bytes) = (done.clone(), state.clone());
        let w = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut f = File::create(&growing).unwrap();
            for part in bytes.chunks(1000) {
                f.write_all(part).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            writer.store(true, Ordering::Release);
        });
        let st2 = encode(&store, reader, &index, &followed).unwrap();
        w.join().unwrap();
        assert_eq!(st2.state_bytes, state.len() as u64);
        assert!(std::fs::read(&followed).unwrap() == std::fs::read(&dp).unwrap(), "the same delta");
        // A file that never came: empty once done.
        let mut none = Follow::new(&t.path().join("never"), Arc::new(AtomicBool::new(true)));
        assert_eq!(none.read(&mut [0u8; 8]).unwrap(), 0);

        // Against another version of the files: refused, by name.
        let (other, _, _) = layer(&store, 50);
        let e = decode(&store, &other, File::open(&dp).unwrap(), &out, &Warm::new()).unwrap_err().to_string();
        assert!(e.contains("another version of boot/vmlinux"), "{e}");
    }

    #[test]
    fn reads_ahead_what_changed_since_below_up_to_a_cap() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path().join("store")).unwrap();
        // Image blocks of noise seeds 1 2 - 4 5 6, then 2 3 - 5 6 7.
        let (below, _, _) = layer(&store, 1);
        let (top, image, kernel) = layer(&store, 2);
        let disk = vec![b"disk/root.img".to_vec()];
        let id = |seed| ChunkId::of(&noise(65536, seed));
        let w = warm(&store, &top, Some(&below), &disk, 1 << 30).unwrap();
        let mut got: Vec<ChunkId> = w.keys().copied().collect();
        got.sort_unstable();
        let mut want = vec![id(3), id(7)];
        want.sort_unstable();
        assert_eq!(got, want, "only the blocks that changed");
        assert!(*w[&id(3)] == image[65536..131072], "decoded");
        // Up to the cap, in file order.
        let w = warm(&store, &top, Some(&below), &disk, 65536).unwrap();
        assert_eq!(w.keys().collect::<Vec<_>>(), [&id(3)]);
        // Without a layer below: every chunk of the files.
        assert_eq!(warm(&store, &top, None, &disk, 1 << 30).unwrap().len(), 5);
        // Decoding with chunks read ahead gives the same image.
        let (state, dp) =
            encoded(t.path(), &store, &top, &image, &kernel, &[disk[0].clone(), b"boot/vmlinux".to_vec()]);
        let out = t.path().join("back.save");
        let all = warm(&store, &top, None, &[disk[0].clone(), b"boot/vmlinux".to_vec()], 1 << 30).unwrap();
        decode(&store, &top, File::open(&dp).unwrap(), &out, &all).unwrap();
        assert!(std::fs::read(&out).unwrap() == state);
        let mut streamed = Vec::new();
        decode_stream(&store, &top, File::open(&dp).unwrap(), &mut streamed, &all).unwrap();
        assert!(streamed == state);
    }

    #[test]
    fn hostile_deltas_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path().join("store")).unwrap();
        let (top, image, kernel) = layer(&store, 1);
        let (_, dp) = encoded(t.path(), &store, &top, &image, &kernel, &[b"disk/root.img".to_vec()]);
        let out = t.path().join("back.save");
        let delta = std::fs::read(&dp).unwrap();
        let head = 8 + 2 + 2 + 13 + 32 + 8;
        let op_ref = |op: u8, src: u16, page: u32| {
            let mut d = delta[..head].to_vec();
            d.push(op);
            d.extend_from_slice(&src.to_le_bytes());
            d.extend_from_slice(&page.to_le_bytes());
            d
        };
        let page_ref = |src, page| op_ref(OP_PAGE, src, page);
        for (bad, why) in [
            (b"XNPAGES0".to_vec(), "bad magic"),
            (delta[..20].to_vec(), "truncated header"),
            (delta[..delta.len() - 1].to_vec(), "cut short"),
            (delta[..head].to_vec(), "describes 0 bytes"),
            (page_ref(1, 0), "source 1 of 1"),
            (page_ref(0, 96), "beyond the end of disk/root.img"),
            ([op_ref(OP_PATCH, 0, 95), vec![0u8; 100]].concat(), "patch at 0 cut short"),
            ([op_ref(OP_PATCH, 0, 96), vec![0u8; 4096]].concat(), "beyond the end of disk/root.img"),
            ([&delta[..head], &[9u8][..]].concat(), "unknown op 9"),
        ] {
            let e = decode(&store, &top, bad.as_slice(), &out, &Warm::new()).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
            let e = decode_stream(&store, &top, bad.as_slice(), std::io::sink(), &Warm::new()).unwrap_err().to_string();
            assert!(e.contains(why), "streamed, {why}: {e}");
        }
    }
}

//! Import: directory trees, tar streams and disk images become entries.
//!
//! Directory import is a pipeline: one thread walks the tree in tree order
//! (each directory listing sorted), rayon hashes, compresses and stores file
//! contents in parallel, and entries come out in order through a bounded
//! window, so memory is bounded by the window and the batch size, not by
//! the input.
//!
//! How a regular file is cut ([`Chunking`]): fixed 64 KiB blocks when it is
//! a disk image, content-defined otherwise. A file is taken for a disk image
//! when import is told so (`--image`), when its name ends in `.img`, `.raw`
//! or `.qcow2`, when it is 1 GiB or larger, or when it is sparse. Images are
//! read by their data regions (`SEEK_DATA`), so holes cost neither reading
//! nor storage.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use crate::chunker::{BLOCK, Batcher, Chunking, is_zero};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Entry, Extent, Kind, OrderCheck, Timestamp, Xattr, cmp_paths, display_path, parent};
use crate::spill::Spill;
use crate::store::Store;

/// Files at least this large are cut as images.
pub const IMAGE_MIN_SIZE: u64 = 1 << 30;
/// Entries in flight between the walker and the writer.
const WINDOW: usize = 512;

pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

#[derive(Clone, Default)]
pub struct ImportOptions {
    /// Cut every regular file as a disk image.
    pub all_images: bool,
    /// Called with the number of content bytes just processed.
    pub progress: Option<Progress>,
    /// Store each chunk alone rather than in solid blocks: for data that
    /// is about to be sent chunk by chunk, where taking members out of
    /// blocks again would cost time (a migrating guest's memory).
    pub single_chunks: bool,
}

impl std::fmt::Debug for ImportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportOptions").field("all_images", &self.all_images).finish_non_exhaustive()
    }
}

impl ImportOptions {
    fn chunking(&self, name: &[u8], size: u64, sparse: bool) -> Chunking {
        let image_name = [&b".img"[..], b".raw", b".qcow2"].iter().any(|s| name.ends_with(s));
        if self.all_images || image_name || size >= IMAGE_MIN_SIZE || sparse { Chunking::Fixed } else { Chunking::Cdc }
    }

    fn tick(&self, n: u64) {
        if let Some(p) = &self.progress {
            p(n);
        }
    }
}

/// Chunks cut by content go into solid blocks (read in order, compressed
/// together, at the store handle's block level); fixed image blocks are
/// stored alone (read at random).
fn put_chunk(store: &Store, chunk: &[u8], solid: bool) -> Result<Extent> {
    if is_zero(chunk) {
        return Ok(Extent::Hole { len: chunk.len() as u64 });
    }
    let (id, _) = if solid { store.put_solid(chunk)? } else { store.put(chunk)? };
    Ok(Extent::Data { id, len: chunk.len() as u32 })
}

fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if let (Some(Extent::Hole { len: prev }), Extent::Hole { len }) = (out.last_mut(), e) {
        *prev += len;
    } else {
        out.push(e);
    }
}

/// Chunks a stream; hashing and compression of each batch run in parallel.
pub fn chunk_stream(
    store: &Store,
    reader: impl Read,
    chunking: Chunking,
    size_hint: u64,
    opts: &ImportOptions,
    at: &dyn Fn() -> String,
) -> Result<(Vec<Extent>, u64)> {
    let mut b = Batcher::with_capacity(reader, chunking, size_hint.saturating_add(1) as usize);
    let solid = chunking == Chunking::Cdc && !opts.single_chunks;
    let mut out = Vec::new();
    let mut total = 0u64;
    while let Some(batch) = b.next_batch().map_err(|e| Error::io("reading", at())(e))? {
        let chunks: Vec<&[u8]> = batch.chunks().collect();
        let exts: Vec<Result<Extent>> = if chunks.len() > 1 {
            chunks.par_iter().map(|c| put_chunk(store, c, solid)).collect()
        } else {
            chunks.iter().map(|c| put_chunk(store, c, solid)).collect()
        };
        for e in exts {
            let e = e?;
            total += e.len();
            push_extent(&mut out, e);
        }
        opts.tick(batch.data.len() as u64);
    }
    Ok((out, total))
}

/// Chunks a file of `size` bytes; images are read by data region.
fn chunk_file(store: &Store, path: &Path, size: u64, chunking: Chunking, opts: &ImportOptions) -> Result<Vec<Extent>> {
    let mut f = File::open(path).ctx("opening", path)?;
    let at = || path.display().to_string();
    let (extents, total) = match chunking {
        Chunking::Cdc => chunk_stream(store, &mut f, chunking, size, opts, &at)?,
        Chunking::Fixed => {
            let mut out = Vec::new();
            let mut pos = 0u64;
            while pos < size {
                let data = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(pos)) {
                    Ok(d) => d.min(size),
                    Err(rustix::io::Errno::NXIO) => size,
                    Err(e) => return Err(Error::io("seeking data in", path)(e.into())),
                };
                let start = data / BLOCK as u64 * BLOCK as u64;
                if start > pos {
                    push_extent(&mut out, Extent::Hole { len: start - pos });
                    pos = start;
                }
                if pos >= size {
                    break;
                }
                let hole = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(pos)) {
                    Ok(h) => h.min(size),
                    Err(e) => return Err(Error::io("seeking hole in", path)(e.into())),
                };
                let end = hole.div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64).min(size).max(pos + 1);
                f.seek(SeekFrom::Start(pos)).ctx("seeking in", path)?;
                let (exts, n) = chunk_stream(store, (&mut f).take(end - pos), chunking, end - pos, opts, &at)?;
                for e in exts {
                    push_extent(&mut out, e);
                }
                if n != end - pos {
                    break;
                }
                pos = end;
            }
            let total = out.iter().map(Extent::len).sum();
            (out, total)
        }
    };
    if total != size {
        return Err(Error::bad_input(at(), format!("changed while being read ({size} bytes at stat, {total} read)")));
    }
    Ok(extents)
}

fn timestamp(md: &fs::Metadata) -> Timestamp {
    Timestamp { secs: md.mtime(), nanos: md.mtime_nsec() as u32 }
}

fn read_xattrs(path: &Path) -> Result<Vec<Xattr>> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(vec![]),
            Err(e) => return Err(Error::io("listing xattrs of", path)(e.into())),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::OsStr::from_bytes(name);
        let mut value = vec![0u8; 256];
        let len = loop {
            match rustix::fs::lgetxattr(path, cname, &mut value) {
                Ok(len) => break len,
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 16, 0),
                Err(rustix::io::Errno::NODATA) => break usize::MAX,
                Err(e) => return Err(Error::io("reading xattrs of", path)(e.into())),
            }
        };
        if len != usize::MAX {
            value.truncate(len);
            out.push(Xattr { name: name.to_vec(), value });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What the walker hands on: a finished entry, or a file whose contents a
/// rayon task is still chunking.
enum Slot {
    Ready(Entry),
    Chunking(Entry, crossbeam_channel::Receiver<Result<Vec<Extent>>>),
}

/// Walks `root` and feeds its entries, in tree order, to `sink`.
pub fn import_dir(
    store: &Store,
    root: &Path,
    opts: &ImportOptions,
    sink: &mut (dyn FnMut(Entry) -> Result<()> + Send),
) -> Result<()> {
    let md = fs::symlink_metadata(root).ctx("reading", root)?;
    if !md.is_dir() {
        return Err(Error::bad_input(root.display().to_string(), "not a directory"));
    }
    let (tx, rx) = crossbeam_channel::bounded::<Slot>(WINDOW);
    rayon::in_place_scope(|rs| {
        std::thread::scope(|ts| {
            let consumer = ts.spawn(move || -> Result<()> {
                for slot in rx {
                    let e = match slot {
                        Slot::Ready(e) => e,
                        Slot::Chunking(mut e, done) => {
                            let extents = done
                                .recv()
                                .map_err(|_| Error::bad_input(e.display_path(), "chunking task vanished"))??;
                            if let Kind::File { extents: ref mut x, .. } = e.kind {
                                *x = extents;
                            }
                            e
                        }
                    };
                    sink(e)?;
                }
                Ok(())
            });
            let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
            let walked = walk(root, &[], &md, &mut |rel, path, md| {
                let slot = entry_for(store, rs, opts, rel, path, md, &mut links)?;
                tx.send(slot).map_err(|_| Error::bad_input(display_path(rel), "import stopped"))
            });
            drop(tx);
            let consumed = consumer.join().unwrap_or_else(|_| Err(Error::bad_input("import", "writer panicked")));
            // The writer's error explains a walker stopped by it.
            consumed.and(walked)
        })
    })
}

type Visit<'a> = dyn FnMut(&[u8], &Path, &fs::Metadata) -> Result<()> + 'a;

fn walk(path: &Path, rel: &[u8], md: &fs::Metadata, visit: &mut Visit<'_>) -> Result<()> {
    visit(rel, path, md)?;
    if !md.is_dir() {
        return Ok(());
    }
    let mut children: Vec<_> = fs::read_dir(path)
        .ctx("listing", path)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .ctx("listing", path)?;
    children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in children {
        let child = path.join(&name);
        let md = fs::symlink_metadata(&child).ctx("reading", &child)?;
        let mut crel = rel.to_vec();
        if !crel.is_empty() {
            crel.push(b'/');
        }
        crel.extend_from_slice(name.as_bytes());
        walk(&child, &crel, &md, visit)?;
    }
    Ok(())
}

/// The kind of a host file that is neither a directory nor a regular file
/// (symlink, device, fifo, socket); `None` for those two.
pub fn special_kind(path: &Path, md: &fs::Metadata) -> Result<Option<Kind>> {
    let ft = md.file_type();
    Ok(Some(if ft.is_symlink() {
        let t = fs::read_link(path).ctx("reading symlink", path)?;
        Kind::Symlink { target: t.as_os_str().as_bytes().to_vec() }
    } else if ft.is_char_device() {
        Kind::CharDev { rdev: md.rdev() }
    } else if ft.is_block_device() {
        Kind::BlockDev { rdev: md.rdev() }
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else {
        return Ok(None);
    }))
}

fn entry_for<'s>(
    store: &'s Store,
    rs: &rayon::Scope<'s>,
    opts: &ImportOptions,
    rel: &[u8],
    path: &Path,
    md: &fs::Metadata,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
) -> Result<Slot> {
    let ft = md.file_type();
    let mut e = Entry {
        path: rel.to_vec(),
        kind: Kind::Fifo,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: timestamp(md),
        xattrs: read_xattrs(path)?,
    };
    if ft.is_file() && md.nlink() > 1 {
        if let Some(target) = links.get(&(md.dev(), md.ino())) {
            return Ok(Slot::Ready(hardlink(rel, target.clone())));
        }
        links.insert((md.dev(), md.ino()), rel.to_vec());
    }
    e.kind = if ft.is_dir() {
        Kind::Dir { opaque: false }
    } else if let Some(kind) = special_kind(path, md)? {
        kind
    } else {
        let size = md.len();
        let sparse = size > 0 && md.blocks() * 512 < size / 2;
        let chunking = opts.chunking(crate::manifest::file_name(rel), size, sparse);
        e.kind = Kind::File { size, chunking, extents: vec![] };
        if size == 0 {
            return Ok(Slot::Ready(e));
        }
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let path = path.to_path_buf();
        let opts = opts.clone();
        rs.spawn(move |_| {
            let _ = done_tx.send(chunk_file(store, &path, size, chunking, &opts));
        });
        return Ok(Slot::Chunking(e, done_rx));
    };
    Ok(Slot::Ready(e))
}

fn hardlink(path: &[u8], target: Vec<u8>) -> Entry {
    Entry::hardlink(path.to_vec(), target)
}

/// Imports one file as a single-file layer: the root directory holding it
/// under `name`. Used for raw disk images.
pub fn import_image(
    store: &Store,
    path: &Path,
    name: &[u8],
    opts: &ImportOptions,
    sink: &mut dyn FnMut(Entry) -> Result<()>,
) -> Result<()> {
    let md = fs::metadata(path).ctx("reading", path)?;
    if !md.is_file() {
        return Err(Error::bad_input(path.display().to_string(), "not a regular file"));
    }
    let root = Entry {
        path: vec![],
        kind: Kind::Dir { opaque: false },
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: timestamp(&md),
        xattrs: vec![],
    };
    sink(root)?;
    let size = md.len();
    let extents = chunk_file(store, path, size, Chunking::Fixed, opts)?;
    sink(Entry {
        path: name.to_vec(),
        kind: Kind::File { size, chunking: Chunking::Fixed, extents },
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: timestamp(&md),
        xattrs: vec![],
    })
}

/// Normalises a tar member name: strips `./` and trailing `/`, refuses
/// `..`, absolute paths and NUL.
fn tar_path(raw: &[u8]) -> Result<Vec<u8>> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    if raw.contains(&0) {
        return Err(Error::bad_input(shown, "NUL in tar member name"));
    }
    if raw.first() == Some(&b'/') {
        return Err(Error::bad_input(shown, "absolute tar member name"));
    }
    let mut parts = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Error::bad_input(shown, "'..' in tar member name")),
            c => parts.push(c),
        }
    }
    Ok(parts.join(&b'/'))
}

/// Bytes [`sniff`] looks at: one tar record.
pub const SNIFF_LEN: usize = 512;

/// What an input is, by its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// No bytes at all.
    Empty,
    /// A tar archive: a header record whose checksum holds (any tar
    /// format: v7, ustar, GNU, pax), or the zero records that end one.
    Tar,
    /// A compressed stream, by the name of its format.
    Compressed(&'static str),
    /// Anything else (a disk image, a text file, ...).
    Other,
}

/// Tells what `head` (the first [`SNIFF_LEN`] bytes of an input, fewer
/// only if the input is shorter) begins.
pub fn sniff(head: &[u8]) -> Sniffed {
    const MAGIC: [(&[u8], &str); 6] = [
        (&[0x1f, 0x8b], "gzip"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
        (b"BZh", "bzip2"),
        (&[0x04, 0x22, 0x4d, 0x18], "lz4"),
        (b"LZIP", "lzip"),
    ];
    if head.is_empty() {
        return Sniffed::Empty;
    }
    if let Some((_, name)) = MAGIC.iter().find(|(m, _)| head.starts_with(m)) {
        return Sniffed::Compressed(name);
    }
    match head.get(..SNIFF_LEN) {
        Some(rec) if rec.iter().all(|&b| b == 0) || tar_checksum_holds(rec) => Sniffed::Tar,
        _ => Sniffed::Other,
    }
}

/// Whether a 512-byte record is a tar header: its checksum field (octal,
/// bytes 148..156) is the sum of its bytes with that field as spaces.
fn tar_checksum_holds(rec: &[u8]) -> bool {
    let field = &rec[148..156];
    let digits: Vec<u8> = field.iter().copied().filter(|b| (b'0'..=b'7').contains(b)).collect();
    let Some(want) = std::str::from_utf8(&digits).ok().and_then(|d| u64::from_str_radix(d, 8).ok()) else {
        return false;
    };
    let sum: u64 = rec.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    sum == want
}

/// Reads up to [`SNIFF_LEN`] bytes of `r` (fewer only at its end).
fn read_head(r: &mut impl Read) -> Result<Vec<u8>> {
    let mut head = vec![0u8; SNIFF_LEN];
    let mut n = 0;
    while n < head.len() {
        match r.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading tar stream", "-")(e)),
        }
    }
    head.truncate(n);
    Ok(head)
}

/// The tar archive in `reader`: a plain one, or one compressed with zstd.
/// An empty stream, another compression and anything not a tar archive
/// are refused, naming what they are.
fn open_tar<'r>(mut reader: impl Read + 'r) -> Result<Box<dyn Read + 'r>> {
    let refuse = |why: String| Error::bad_input("tar stream", why);
    let head = read_head(&mut reader)?;
    match sniff(&head) {
        Sniffed::Tar => Ok(Box::new(std::io::Cursor::new(head).chain(reader))),
        Sniffed::Empty => Err(refuse("empty: no tar archive to publish".into())),
        Sniffed::Compressed("zstd") => {
            let mut inner = zstd::stream::read::Decoder::new(std::io::Cursor::new(head).chain(reader))
                .map_err(|e| Error::io("starting zstd decompression of", "-")(e))?;
            let head = read_head(&mut inner)?;
            match sniff(&head) {
                Sniffed::Tar => Ok(Box::new(std::io::Cursor::new(head).chain(inner))),
                Sniffed::Empty => Err(refuse("empty zstd stream: no tar archive to publish".into())),
                other => Err(refuse(format!("a zstd stream that holds no tar archive ({})", other.describe()))),
            }
        }
        Sniffed::Compressed(name) => Err(refuse(format!(
            "compressed tar: {name} is not read here (zstd is); decompress it first, e.g. `{name} -dc FILE | xenod publish -`"
        ))),
        Sniffed::Other => Err(refuse("not a tar archive (its first record is no tar header)".into())),
    }
}

impl Sniffed {
    /// A few words for messages.
    pub fn describe(self) -> String {
        match self {
            Sniffed::Empty => "empty".into(),
            Sniffed::Tar => "a tar archive".into(),
            Sniffed::Compressed(n) => format!("{n}-compressed"),
            Sniffed::Other => "not a tar archive".into(),
        }
    }
}

/// Imports a tar stream: a tar archive, plain or zstd-compressed (other
/// compressions, empty streams and anything else are refused, see
/// [`sniff`]), holding at least one member. Tar members come in any
/// order, so entries go through an external sort (bounded memory;
/// hardlink members are kept in memory) before they reach `sink` in tree
/// order. GNU sparse members keep their holes.
pub fn import_tar(
    store: &Store,
    reader: impl Read,
    opts: &ImportOptions,
    sink: &mut dyn FnMut(Entry) -> Result<()>,
) -> Result<()> {
    let mut ar = tar::Archive::new(open_tar(std::io::BufReader::with_capacity(1 << 20, reader))?);
    let mut spill = Spill::new();
    let mut links: Vec<Entry> = Vec::new();
    let iter = ar.entries().map_err(|e| Error::io("reading tar stream", "-")(e))?;
    let mut members = 0usize;
    for (n, member) in iter.enumerate() {
        members = n + 1;
        let mut member = member.map_err(|e| Error::bad_input(format!("tar member {}", n + 1), e.to_string()))?;
        let raw = member.path_bytes().into_owned();
        let path = tar_path(&raw)?;
        let at = display_path(&path);
        let h = member.header().clone();
        let mut xattrs = Vec::new();
        let mut mtime = Timestamp { secs: h.mtime().unwrap_or(0) as i64, nanos: 0 };
        if let Some(pax) = member.pax_extensions().map_err(|e| Error::bad_input(&at, e.to_string()))? {
            for ext in pax.flatten() {
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push(Xattr { name: name.to_vec(), value: ext.value_bytes().to_vec() });
                } else if key == b"mtime"
                    && let Ok(v) = std::str::from_utf8(ext.value_bytes())
                {
                    let (s, frac) = v.split_once('.').unwrap_or((v, "0"));
                    let nanos = format!("{frac:0<9}")[..9].parse().unwrap_or(0);
                    mtime = Timestamp { secs: s.parse().unwrap_or(mtime.secs), nanos };
                }
            }
        }
        xattrs.sort_by(|a, b| a.name.cmp(&b.name));
        xattrs.dedup_by(|a, b| a.name == b.name);
        let rdev = || {
            let major = h.device_major().ok().flatten().unwrap_or(0) as u64;
            let minor = h.device_minor().ok().flatten().unwrap_or(0) as u64;
            rustix::fs::makedev(major as u32, minor as u32)
        };
        let link = || -> Result<Vec<u8>> {
            member
                .link_name_bytes()
                .map(|l| l.into_owned())
                .ok_or_else(|| Error::bad_input(at.clone(), "link without a target"))
        };
        use tar::EntryType as T;
        let kind = match h.entry_type() {
            T::Directory => Kind::Dir { opaque: false },
            T::Symlink => Kind::Symlink { target: link()? },
            T::Link => Kind::Hardlink { target: tar_path(&link()?)? },
            T::Char => Kind::CharDev { rdev: rdev() },
            T::Block => Kind::BlockDev { rdev: rdev() },
            T::Fifo => Kind::Fifo,
            T::Regular | T::Continuous | T::GNUSparse => {
                let sparse = h.entry_type() == T::GNUSparse;
                // A sparse member's header gives its bytes in the stream; the file's is the entry's.
                let size =
                    if sparse { member.size() } else { h.size().map_err(|e| Error::bad_input(&at, e.to_string()))? };
                let chunking = opts.chunking(crate::manifest::file_name(&path), size, sparse);
                let (extents, total) = chunk_stream(store, &mut member, chunking, size, opts, &|| at.clone())?;
                if total != size {
                    return Err(Error::bad_input(at, format!("tar member holds {total} bytes, header says {size}")));
                }
                Kind::File { size, chunking, extents }
            }
            other => return Err(Error::bad_input(at, format!("unsupported tar member type {other:?}"))),
        };
        let mut e = Entry {
            path,
            kind,
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            uid: h.uid().unwrap_or(0) as u32,
            gid: h.gid().unwrap_or(0) as u32,
            mtime,
            xattrs,
        };
        if let Kind::Hardlink { target } = &e.kind {
            e = hardlink(&e.path, target.clone());
            links.push(e);
        } else {
            spill.push(e)?;
        }
    }
    if members == 0 {
        return Err(Error::bad_input("tar stream", "a tar archive with no members: nothing to publish"));
    }
    let plan = LinkPlan::new(links, &mut spill)?;
    // Synthesise directories the archive does not list (`tar c usr/bin/x`).
    let mut check = OrderCheck::default();
    let mut emitted: Vec<Vec<u8>> = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    let mut first = true;
    for e in plan.apply(spill.sorted()?) {
        let e = e?;
        if last.as_ref().is_some_and(|l| *l == e.path) {
            return Err(Error::bad_input(e.display_path(), "duplicate member in tar stream"));
        }
        last = Some(e.path.clone());
        if first && !e.path.is_empty() {
            let root = synthetic_dir(b"");
            check.check(&root).map_err(|fault| Error::bad_entry("/", fault))?;
            emitted.push(vec![]);
            sink(root)?;
        }
        first = false;
        let mut missing = Vec::new();
        let mut p = parent(&e.path);
        while let Some(d) = p {
            while emitted.last().is_some_and(|x| x.as_slice() != d && !crate::manifest::is_below(d, x)) {
                emitted.pop();
            }
            if emitted.last().is_some_and(|x| x.as_slice() == d) {
                break;
            }
            missing.push(d.to_vec());
            p = parent(d);
        }
        for d in missing.into_iter().rev() {
            let de = synthetic_dir(&d);
            check.check(&de).map_err(|fault| Error::bad_entry(de.display_path(), fault))?;
            emitted.push(d);
            sink(de)?;
        }
        check.check(&e).map_err(|fault| Error::bad_entry(e.display_path(), fault))?;
        if e.is_dir() {
            emitted.push(e.path.clone());
        }
        sink(e)?;
    }
    if first {
        sink(synthetic_dir(b""))?;
    }
    Ok(())
}

fn synthetic_dir(path: &[u8]) -> Entry {
    Entry::dir(path.to_vec())
}

/// Hardlink sets of a tar stream. In tree order the first member of a set
/// must carry the data, but a tar stream may have put it under a later
/// name; such sets are rewritten (the carrier's entry is found in a first
/// pass over the sorted entries). Only link members are held in memory.
struct LinkPlan {
    /// Link path -> the member that now carries the data.
    link_to: HashMap<Vec<u8>, Vec<u8>>,
    /// Old data path -> its new carrier (a link path that sorts first).
    moved: HashMap<Vec<u8>, Vec<u8>>,
    /// New carrier path -> the data entry, renamed.
    carriers: HashMap<Vec<u8>, Entry>,
    links: std::iter::Peekable<std::vec::IntoIter<Entry>>,
}

impl LinkPlan {
    fn new(mut links: Vec<Entry>, spill: &mut Spill) -> Result<Self> {
        let target_of: HashMap<Vec<u8>, Vec<u8>> = links
            .iter()
            .filter_map(|e| match &e.kind {
                Kind::Hardlink { target } => Some((e.path.clone(), target.clone())),
                _ => None,
            })
            .collect();
        // Follow link-to-link chains to the member holding the data.
        let mut data_of: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for (l, t) in &target_of {
            let mut t = t.clone();
            let mut hops = 0;
            while let Some(next) = target_of.get(&t) {
                t = next.clone();
                hops += 1;
                if hops > target_of.len() {
                    return Err(Error::bad_input(display_path(l), "hardlink cycle"));
                }
            }
            data_of.insert(l.clone(), t);
        }
        let mut first_of: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for (l, d) in &data_of {
            let f = first_of.entry(d.clone()).or_insert_with(|| d.clone());
            if cmp_paths(l, f) == std::cmp::Ordering::Less {
                *f = l.clone();
            }
        }
        let moved: HashMap<Vec<u8>, Vec<u8>> =
            first_of.iter().filter(|(d, f)| d != f).map(|(d, f)| (d.clone(), f.clone())).collect();
        let mut carriers = HashMap::new();
        let mut found = std::collections::HashSet::new();
        for e in spill.sorted()? {
            let e = e?;
            if first_of.contains_key(&e.path) {
                if !matches!(e.kind, Kind::File { .. }) {
                    return Err(Error::bad_input(e.display_path(), "hardlink to something other than a regular file"));
                }
                found.insert(e.path.clone());
                if let Some(to) = moved.get(&e.path) {
                    let mut c = e.clone();
                    c.path = to.clone();
                    carriers.insert(to.clone(), c);
                }
            }
        }
        if let Some((l, d)) = data_of.iter().find(|(_, d)| !found.contains(*d)) {
            return Err(Error::bad_input(display_path(l), format!("hardlink to missing member {}", display_path(d))));
        }
        let link_to = data_of.iter().map(|(l, d)| (l.clone(), first_of[d].clone())).collect();
        links.sort_by(|a, b| cmp_paths(&a.path, &b.path));
        Ok(Self { link_to, moved, carriers, links: links.into_iter().peekable() })
    }

    /// Merges the link members into the sorted entries, rewriting sets.
    fn apply(mut self, sorted: impl Iterator<Item = Result<Entry>>) -> impl Iterator<Item = Result<Entry>> {
        let mut sorted = sorted.peekable();
        std::iter::from_fn(move || {
            let take_link = match (sorted.peek(), self.links.peek()) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(Err(_)), _) => false,
                (Some(Ok(e)), Some(l)) => cmp_paths(&l.path, &e.path) == std::cmp::Ordering::Less,
            };
            let e = if take_link { self.links.next().map(Ok) } else { sorted.next() }?;
            Some(e.map(|e| {
                if let Some(c) = self.carriers.remove(&e.path) {
                    c
                } else if let Some(to) = self.moved.get(&e.path) {
                    hardlink(&e.path, to.clone())
                } else if let Some(to) = self.link_to.get(&e.path) {
                    hardlink(&e.path, to.clone())
                } else {
                    e
                }
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(store: &Store, bytes: &[u8]) -> Result<usize> {
        let mut n = 0;
        import_tar(store, bytes, &ImportOptions::default(), &mut |_| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }

    fn one_file_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "f", &b"hello"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn sniff_tells_tar_from_compressed_and_other() {
        let tar = one_file_tar();
        assert_eq!(sniff(&tar[..SNIFF_LEN]), Sniffed::Tar);
        assert_eq!(sniff(&[0; SNIFF_LEN]), Sniffed::Tar, "the end-of-archive records");
        assert_eq!(sniff(b""), Sniffed::Empty);
        assert_eq!(sniff(&[0x1f, 0x8b, 8, 0]), Sniffed::Compressed("gzip"));
        assert_eq!(sniff(&zstd::encode_all(&tar[..], 3).unwrap()), Sniffed::Compressed("zstd"));
        assert_eq!(sniff(b"\xfd7zXZ\0rest"), Sniffed::Compressed("xz"));
        assert_eq!(sniff(b"BZh91AY"), Sniffed::Compressed("bzip2"));
        assert_eq!(sniff(&[7u8; SNIFF_LEN]), Sniffed::Other, "a disk image");
        assert_eq!(sniff(b"short text"), Sniffed::Other);
        // A header with one byte changed fails its checksum.
        let mut bad = tar[..SNIFF_LEN].to_vec();
        bad[0] ^= 1;
        assert_eq!(sniff(&bad), Sniffed::Other);
    }

    #[test]
    fn empty_compressed_and_non_tar_streams_are_refused_and_zstd_is_read() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let tar = one_file_tar();
        assert_eq!(import(&store, &tar).unwrap(), 2, "root and f");
        assert_eq!(import(&store, &zstd::encode_all(&tar[..], 3).unwrap()).unwrap(), 2);
        let refused = |bytes: &[u8], says: &str| {
            let e = import(&store, bytes).unwrap_err();
            assert_eq!(e.exit_code(), crate::Exit::BadInput, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        };
        refused(b"", "empty");
        refused(&[0; 1024], "no members");
        refused(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0], "compressed tar: gzip");
        refused(b"\xfd7zXZ\0\0\0", "compressed tar: xz");
        refused(&zstd::encode_all(&b"plain text"[..], 3).unwrap(), "zstd stream that holds no tar");
        refused(&zstd::encode_all(&b""[..], 3).unwrap(), "empty zstd stream");
        refused(&[9u8; 4096], "not a tar archive");
    }
}

//! Retargeting a libvirt/QEMU save image to another domain identity.
//!
//! A state file written by `virDomainSave` is a 92-byte header, a block of
//! `data_len` bytes holding the domain XML (NUL-terminated) and a migration
//! cookie at `cookie_offset`, then QEMU's migration stream:
//!
//! ```text
//! "LibvirtQemudSave" u32 version(2) u32 data_len u32 was_running
//! u32 compressed u32 cookie_offset u32 unused[14]
//! data_len bytes: domain XML \0 cookie \0 padding
//! QEMU migration stream ("QEVM" ...)
//! ```
//!
//! libvirt's restore accepts a replacement XML only with the same name and
//! UUID. A guest moved to another host keeps its name there; but where two
//! xenod daemons share one libvirt (a test bed, or two tenants of one
//! machine) the target needs its own domain name, UUID and paths. This
//! rewrites the XML block in place: the QEMU stream does not move, so the
//! state itself is untouched, and libvirt then restores the image as the
//! new domain.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::{DomainXmlFault, Error, Result, SaveImageFault};
use crate::xml::{META_NS, parse_meta};

const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
const HEADER: usize = 92;
/// More than any domain XML plus cookie; libvirt itself pads by 64 KiB.
const MAX_DATA: u32 = 16 << 20;

fn bad(file: &Path, fault: impl Into<SaveImageFault>) -> Error {
    Error::SaveImage { file: file.to_path_buf(), fault: fault.into() }
}

/// The start of a save image for domain `xml` as `virDomainSave` writes
/// it: header (running, uncompressed, no cookie) and the XML block, padded
/// by 64 KiB as libvirt pads it so that [`retarget`] has room; QEMU's
/// stream follows.
pub(crate) fn image_head(xml: &str) -> Vec<u8> {
    let data_len = (xml.len() + 1 + (64 << 10)).next_multiple_of(4096);
    let mut b = MAGIC.to_vec();
    for v in [2u32, data_len as u32, 1, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.resize(HEADER, 0);
    b.extend_from_slice(xml.as_bytes());
    b.resize(HEADER + data_len, 0);
    b
}

/// The domain XML of a save image.
pub fn saved_xml(file: &Path) -> Result<String> {
    let (_, data) = read_block(file)?;
    block_xml(&data).map_err(|why| bad(file, why))
}

/// Bytes at the start of a save image that tell [`head_len`] how long its
/// head is.
pub const SAVE_HEADER: usize = HEADER;

/// The length of a save image's head (its header and XML block) from its
/// first [`SAVE_HEADER`] bytes.
pub fn head_len(first: &[u8]) -> std::result::Result<usize, SaveImageFault> {
    let h: &[u8; HEADER] = first.get(..HEADER).and_then(|h| h.try_into().ok()).ok_or(SaveImageFault::ShortHeader)?;
    Ok(HEADER + check_header(h)? as usize)
}

/// The domain XML of a save image's head ([`head_len`] bytes or more).
pub fn head_xml(head: &[u8]) -> std::result::Result<String, SaveImageFault> {
    let len = head_len(head)?;
    block_xml(head.get(HEADER..len).ok_or(SaveImageFault::TruncatedBlock)?)
}

fn block_xml(data: &[u8]) -> std::result::Result<String, SaveImageFault> {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8(data[..end].to_vec()).map_err(|_| SaveImageFault::NotUtf8)
}

fn read_block(file: &Path) -> Result<([u8; HEADER], Vec<u8>)> {
    let mut f = std::fs::File::open(file).map_err(Error::io("open state file", file))?;
    let mut h = [0u8; HEADER];
    f.read_exact(&mut h).map_err(|_| bad(file, SaveImageFault::ShortHeader))?;
    let data_len = check_header(&h).map_err(|fault| bad(file, fault))?;
    let mut data = vec![0u8; data_len as usize];
    f.read_exact(&mut data).map_err(|_| bad(file, SaveImageFault::TruncatedBlock))?;
    Ok((h, data))
}

/// Passes on only what follows a save image's header and XML block
/// (QEMU's stream) of the bytes written through it: a save image written
/// whole comes out as what a QEMU waiting for an incoming migration
/// takes. A header that is not a save image's is an `InvalidData` error.
pub struct StreamOnly<W> {
    inner: W,
    head: Vec<u8>,
    /// Bytes of the XML block still to drop, once the header is read.
    skip: Option<u64>,
}

impl<W: Write> StreamOnly<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, head: Vec::with_capacity(HEADER), skip: None }
    }
}

impl<W: Write> Write for StreamOnly<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.skip {
            None => {
                let n = (HEADER - self.head.len()).min(buf.len());
                self.head.extend_from_slice(&buf[..n]);
                if self.head.len() == HEADER {
                    let h: [u8; HEADER] = self.head[..].try_into().unwrap_or([0; HEADER]);
                    let data_len = check_header(&h).map_err(std::io::Error::other)?;
                    self.skip = Some(data_len as u64);
                }
                Ok(n)
            }
            Some(0) => self.inner.write(buf),
            Some(left) => {
                let n = left.min(buf.len() as u64);
                self.skip = Some(left - n);
                Ok(n as usize)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The length of the XML block a save image's header announces.
fn check_header(h: &[u8; HEADER]) -> std::result::Result<u32, SaveImageFault> {
    if &h[..16] != MAGIC {
        return Err(SaveImageFault::BadMagic);
    }
    let u = |i: usize| u32::from_le_bytes(h[16 + 4 * i..20 + 4 * i].try_into().unwrap_or_default());
    if u(0) != 2 {
        return Err(SaveImageFault::Version { version: u(0) });
    }
    match u(1) {
        n if n > MAX_DATA => Err(SaveImageFault::BlockTooLarge { len: n }),
        n => Ok(n),
    }
}

/// Gives the save image `file` the domain name `name`, the UUID `uuid`,
/// every occurrence of each `(from, to)` path prefix replaced and each
/// `(from, to)` host port of the guest's forwards moved (in QEMU's
/// arguments and in xenod's metadata), keeping the migration cookie and the
/// QEMU stream byte for byte. Not synced: the
/// image is written for the restore that follows, which reads it through
/// the page cache.
pub fn retarget(file: &Path, name: &str, uuid: &str, paths: &[(String, String)], ports: &[(u16, u16)]) -> Result<()> {
    let (mut h, data) = read_block(file)?;
    let cookie_off = u32::from_le_bytes(h[32..36].try_into().unwrap_or_default()) as usize;
    let xml_end = data.iter().position(|&b| b == 0).ok_or_else(|| bad(file, SaveImageFault::UnterminatedXml))?;
    let xml = std::str::from_utf8(&data[..xml_end]).map_err(|_| bad(file, SaveImageFault::NotUtf8))?;
    let cookie = match cookie_off {
        0 => &[][..],
        o if o > xml_end && o < data.len() => {
            let end = data[o..].iter().position(|&b| b == 0).map_or(data.len(), |e| o + e);
            &data[o..end]
        }
        offset => return Err(bad(file, SaveImageFault::CookieOffset { offset })),
    };
    let xml = retarget_xml(xml, name, uuid, paths, ports).map_err(|fault| bad(file, fault))?;
    let mut block = Vec::with_capacity(data.len());
    block.extend_from_slice(xml.as_bytes());
    block.push(0);
    let new_cookie = if cookie.is_empty() { 0 } else { block.len() };
    block.extend_from_slice(cookie);
    if !cookie.is_empty() {
        block.push(0);
    }
    if block.len() > data.len() {
        return Err(bad(file, SaveImageFault::NoRoom { need: block.len(), have: data.len() }));
    }
    block.resize(data.len(), 0);
    h[32..36].copy_from_slice(&(new_cookie as u32).to_le_bytes());
    let mut f = OpenOptions::new().write(true).open(file).map_err(Error::io("open state file", file))?;
    f.write_all(&h).map_err(Error::io("write state file", file))?;
    f.seek(SeekFrom::Start(HEADER as u64)).map_err(Error::io("write state file", file))?;
    f.write_all(&block).map_err(Error::io("write state file", file))
}

/// Moves host ports of the forwards in `xml`: QEMU's `hostfwd` arguments
/// (as `crate::xml` writes them) and the ports of xenod's metadata, so
/// that the restored domain reports where it listens.
/// Gives domain `xml` the name `name`, the UUID `uuid`, every occurrence
/// of each `(from, to)` path prefix replaced and each `(from, to)` host
/// port of the guest's forwards moved (in QEMU's arguments and in xenod's
/// metadata). Errors say what the XML lacks.
pub fn retarget_xml(
    xml: &str,
    name: &str,
    uuid: &str,
    paths: &[(String, String)],
    ports: &[(u16, u16)],
) -> std::result::Result<String, DomainXmlFault> {
    let xml = replace_element(xml, "name", &xml_escape(name))?;
    let mut xml = replace_element(&xml, "uuid", uuid)?;
    for (from, to) in paths {
        xml = xml.replace(&xml_escape(from), &xml_escape(to));
    }
    if !ports.is_empty() {
        xml = move_ports(&xml, ports)?;
    }
    Ok(xml)
}

fn move_ports(xml: &str, ports: &[(u16, u16)]) -> std::result::Result<String, DomainXmlFault> {
    let mut xml = xml.to_owned();
    for (from, to) in ports {
        let (a, b) = (format!("hostfwd=tcp:127.0.0.1:{from}-:"), format!("hostfwd=tcp:127.0.0.1:{to}-:"));
        if !xml.contains(&a) {
            return Err(DomainXmlFault::NoForward { port: *from });
        }
        xml = xml.replace(&a, &b);
    }
    let at = xml.find(META_NS).ok_or(DomainXmlFault::NoMetadata)?;
    let start = xml[..at].rfind('<').ok_or(DomainXmlFault::MalformedMetadata)?;
    let text = xml[at..].find('>').map(|e| at + e + 1).ok_or(DomainXmlFault::MalformedMetadata)?;
    let end = xml[text..].find("</").map(|e| text + e).ok_or(DomainXmlFault::UnterminatedMetadata)?;
    let close = xml[end..].find('>').map(|e| end + e + 1).ok_or(DomainXmlFault::UnterminatedMetadata)?;
    let mut meta = parse_meta(&xml[start..close]).ok_or(DomainXmlFault::MetadataParse)?;
    crate::model::move_host_ports(&mut meta.ports, ports);
    let json = serde_json::to_string(&meta).map_err(DomainXmlFault::MetadataJson)?;
    Ok(format!("{}{}{}", &xml[..text], xml_escape(&json), &xml[end..]))
}

/// Replaces the text of the first top-level `<tag>` element.
fn replace_element(xml: &str, tag: &'static str, text: &str) -> std::result::Result<String, DomainXmlFault> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let start = xml.find(&open).ok_or(DomainXmlFault::NoElement { tag })? + open.len();
    let end = xml[start..].find(&close).ok_or(DomainXmlFault::UnterminatedElement { tag })? + start;
    Ok(format!("{}{text}{}", &xml[..start], &xml[end..]))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// A random (version 4) UUID in its text form.
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Bytes of a guest page (x86: QEMU's TARGET_PAGE_SIZE).
pub const GUEST_PAGE: usize = 4096;
/// The longest RAM page record: header, RAMBlock name, page.
pub const MAX_RAM_RECORD: usize = 8 + 1 + 255 + GUEST_PAGE;

/// A RAM page record of QEMU's migration stream, found at some offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamRecord {
    /// A whole page: its bytes are `rec[data..data + GUEST_PAGE]`, and the
    /// record ends there.
    Page { data: usize },
    /// A page of zeros, stored as one fill byte; the record is `len` long.
    Zero { len: usize },
}

/// Reads `rec` as a RAM page record of QEMU's migration stream
/// (migration/ram.c): a big-endian u64 of the page's offset in its RAM
/// block with flags in the low 12 bits (0x02 zero page, 0x08 page, 0x20
/// same block as the record before), without 0x20 the block's name
/// (length byte, printable ASCII), then the page (4096 bytes) or the fill
/// byte. `None` when the bytes do not look like one, or `rec` ends first.
///
/// Only a heuristic for where pages sit in a save image: whoever uses a
/// page found here must compare its bytes, never trust the guess. It
/// accepts block offsets below 1 TiB and nothing but these flags, so a
/// random position passes with a chance of about 2^-40.
pub fn ram_record(rec: &[u8]) -> Option<RamRecord> {
    const ZERO: u64 = 0x02;
    const PAGE: u64 = 0x08;
    const CONTINUE: u64 = 0x20;
    let v = u64::from_be_bytes(rec.get(..8)?.try_into().ok()?);
    let flags = v & 0xfff;
    if v >> 40 != 0 || flags & !(ZERO | PAGE | CONTINUE) != 0 || (flags & (ZERO | PAGE)).count_ones() != 1 {
        return None;
    }
    let mut at = 8;
    if flags & CONTINUE == 0 {
        let len = *rec.get(8)? as usize;
        let name = rec.get(9..9 + len)?;
        if len == 0 || !name.iter().all(|c| c.is_ascii_graphic()) {
            return None;
        }
        at += 1 + len;
    }
    if flags & PAGE != 0 {
        rec.get(at..at + GUEST_PAGE)?;
        Some(RamRecord::Page { data: at })
    } else {
        rec.get(at)?;
        Some(RamRecord::Zero { len: at + 1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, xml: &str, cookie: &str, data_len: usize) -> std::path::PathBuf {
        let mut block = xml.as_bytes().to_vec();
        block.push(0);
        let off = block.len() as u32;
        block.extend_from_slice(cookie.as_bytes());
        block.push(0);
        block.resize(data_len, 0);
        let mut h = MAGIC.to_vec();
        for v in [2u32, data_len as u32, 1, 0, off] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.resize(HEADER, 0);
        let p = dir.join("s.save");
        std::fs::write(&p, [h, block, b"QEVM-stream".to_vec()].concat()).unwrap();
        p
    }

    #[test]
    fn rename_keeps_cookie_and_stream() {
        let t = tempfile::tempdir().unwrap();
        let xml = "<domain type='qemu'>\n  <name>web</name>\n  <uuid>2e47d3b4-23a4-4ffe-a294-5cfe7a2f01e5</uuid>\n  \
                   <source file='/a/instances/web/root/disk.img'/>\n</domain>\n";
        let p = image(t.path(), xml, "<cookie/>", 4096);
        let before = std::fs::read(&p).unwrap();
        retarget(&p, "b-web", "11111111-2222-4333-8444-555555555555", &[("/a/".into(), "/data/b/".into())], &[])
            .unwrap();
        let after = std::fs::read(&p).unwrap();
        assert_eq!(after.len(), before.len());
        assert_eq!(&after[after.len() - 11..], b"QEVM-stream", "the QEMU stream does not move");
        let x = saved_xml(&p).unwrap();
        assert!(x.contains("<name>b-web</name>") && x.contains("<uuid>11111111-2222-4333-8444-555555555555</uuid>"));
        assert!(x.contains("/data/b/instances/web/root/disk.img") && !x.contains("'/a/"), "{x}");
        let off = u32::from_le_bytes(after[32..36].try_into().unwrap()) as usize;
        assert_eq!(&after[HEADER + off..HEADER + off + 9], b"<cookie/>");
    }

    #[test]
    fn a_live_saves_head_reads_as_a_save_and_has_room_to_retarget() {
        let t = tempfile::tempdir().unwrap();
        let xml = "<domain type='qemu'><name>web</name><uuid>u</uuid><source file='/a/x.img'/></domain>";
        let mut img = image_head(xml);
        assert_eq!((img.len() - HEADER) % 4096, 0);
        img.extend_from_slice(b"QEVM-stream");
        let p = t.path().join("live.save");
        std::fs::write(&p, &img).unwrap();
        assert_eq!(saved_xml(&p).unwrap(), xml);
        // From the head alone, as a stream gives it.
        let n = head_len(&img[..SAVE_HEADER]).unwrap();
        assert_eq!(head_xml(&img[..n]).unwrap(), xml);
        assert!(head_xml(&img[..n - 1]).unwrap_err().to_string().contains("truncated"));
        assert!(head_len(&img[..10]).is_err());
        let long = format!("/{}/", "d".repeat(2000));
        retarget(&p, "a-much-longer-name", &random_uuid(), &[("/a/".into(), long.clone())], &[]).unwrap();
        assert!(saved_xml(&p).unwrap().contains(&format!("{long}x.img")));
        assert!(std::fs::read(&p).unwrap().ends_with(b"QEVM-stream"));
    }

    #[test]
    fn moves_host_ports_in_qemus_arguments_and_the_metadata() {
        use crate::model::DomainMeta;
        use crate::spec::{PortForward, RootMode};
        let t = tempfile::tempdir().unwrap();
        let meta = DomainMeta {
            root: RootMode::Disk,
            share: None,
            root_path: "/a/x.img".into(),
            ports: vec![PortForward { host: 8080, guest: 80 }, PortForward { host: 2222, guest: 22 }],
            console_log: None,
        };
        // As libvirt formats it: quotes in text are not escaped.
        let xml = format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n  <name>web</name>\n  \
             <uuid>u</uuid>\n  <metadata>\n    <xenod:instance xmlns:xenod=\"{META_NS}\">{}</xenod:instance>\n  \
             </metadata>\n  <qemu:commandline>\n    <qemu:arg value='user,id=xenodnet0,restrict=on,\
             hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22'/>\n  </qemu:commandline>\n</domain>\n",
            serde_json::to_string(&meta).unwrap()
        );
        let p = image(t.path(), &xml, "", 8192);
        retarget(&p, "b-web", &random_uuid(), &[], &[(8080, 40001)]).unwrap();
        let x = saved_xml(&p).unwrap();
        assert!(x.contains("hostfwd=tcp:127.0.0.1:40001-:80,hostfwd=tcp:127.0.0.1:2222-:22"), "{x}");
        let at = x.find("<xenod:instance").unwrap();
        let end = x.find("</xenod:instance>").unwrap() + "</xenod:instance>".len();
        let moved = parse_meta(&x[at..end]).expect("metadata still parses");
        assert_eq!(moved.ports, vec![PortForward { host: 40001, guest: 80 }, PortForward { host: 2222, guest: 22 }]);
        assert_eq!(moved.root_path, meta.root_path);
        // A port the guest does not forward is an error, and nothing is written.
        let before = std::fs::read(&p).unwrap();
        let e = retarget(&p, "c-web", &random_uuid(), &[], &[(9999, 1)]).unwrap_err().to_string();
        assert!(e.contains("host port 9999"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }

    #[test]
    fn stream_only_passes_on_what_follows_the_xml_block() {
        let t = tempfile::tempdir().unwrap();
        let p = image(t.path(), "<domain><name>a</name></domain>", "<c/>", 8192);
        let img = std::fs::read(&p).unwrap();
        // Written in pieces that straddle the header and the block's end.
        for piece in [1, 7, 92, 100, 4096, img.len()] {
            let mut out = StreamOnly::new(Vec::new());
            for part in img.chunks(piece) {
                out.write_all(part).unwrap();
            }
            assert_eq!(out.inner, b"QEVM-stream", "pieces of {piece}");
        }
        let mut out = StreamOnly::new(Vec::new());
        let e = out.write_all(&[b"LibvirtQemudPart".as_slice(), &[0u8; 100]].concat()).unwrap_err().to_string();
        assert!(e.contains("bad magic") && out.inner.is_empty(), "{e}");
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x");
        std::fs::write(&p, b"LibvirtQemudPart\0\0").unwrap();
        assert!(retarget(&p, "n", &random_uuid(), &[], &[]).is_err());
        let p = image(t.path(), "<domain><name>a</name><uuid>u</uuid></domain>", "<c/>", 64);
        let long = "x".repeat(100);
        let e = retarget(&p, &long, "u", &[], &[]).unwrap_err().to_string();
        assert!(e.contains("holds 64"), "{e}");
    }

    #[test]
    fn ram_records() {
        let page = |head: u64, name: &[u8]| {
            let mut r = head.to_be_bytes().to_vec();
            r.extend_from_slice(name);
            r.extend_from_slice(&[7u8; GUEST_PAGE]);
            r
        };
        assert_eq!(ram_record(&page(0x1000 | 0x28, b"")), Some(RamRecord::Page { data: 8 }));
        assert_eq!(ram_record(&page(0x08, b"\x06pc.ram")), Some(RamRecord::Page { data: 15 }));
        assert_eq!(ram_record(&[0, 0, 0, 0, 0, 0, 0x20, 0x22, 0]), Some(RamRecord::Zero { len: 9 }));
        // Cut short, both flags, unknown flags, a huge offset, a bad name.
        assert_eq!(ram_record(&page(0x28, b"")[..100]), None);
        assert_eq!(ram_record(&page(0x2a, b"")), None);
        assert_eq!(ram_record(&page(0x128, b"")), None);
        assert_eq!(ram_record(&page((1 << 40) | 0x28, b"")), None);
        assert_eq!(ram_record(&page(0x08, b"\x02a\n")), None);
        assert_eq!(ram_record(&page(0x08, b"\x00")), None);
    }
}

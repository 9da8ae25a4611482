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

use crate::error::{Error, Result};

const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
const HEADER: usize = 92;
/// More than any domain XML plus cookie; libvirt itself pads by 64 KiB.
const MAX_DATA: u32 = 16 << 20;

fn bad(file: &Path, why: impl Into<String>) -> Error {
    Error::Unsupported { op: "retarget saved state", reason: format!("{}: {}", file.display(), why.into()) }
}

/// The domain XML of a save image.
pub fn saved_xml(file: &Path) -> Result<String> {
    let (_, data) = read_block(file)?;
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8(data[..end].to_vec()).map_err(|_| bad(file, "domain XML is not UTF-8"))
}

fn read_block(file: &Path) -> Result<([u8; HEADER], Vec<u8>)> {
    let mut f = std::fs::File::open(file).map_err(Error::io("open state file", file))?;
    let mut h = [0u8; HEADER];
    f.read_exact(&mut h).map_err(|_| bad(file, "shorter than a save image header"))?;
    if &h[..16] != MAGIC {
        return Err(bad(file, "not a complete libvirt save image (bad magic)"));
    }
    let u = |i: usize| u32::from_le_bytes(h[16 + 4 * i..20 + 4 * i].try_into().unwrap_or_default());
    if u(0) != 2 {
        return Err(bad(file, format!("save image version {} (only 2 is known)", u(0))));
    }
    let data_len = u(1);
    if data_len > MAX_DATA {
        return Err(bad(file, format!("XML block of {data_len} bytes")));
    }
    let mut data = vec![0u8; data_len as usize];
    f.read_exact(&mut data).map_err(|_| bad(file, "truncated in its XML block"))?;
    Ok((h, data))
}

/// Gives the save image `file` the domain name `name`, the UUID `uuid` and
/// every occurrence of each `(from, to)` path prefix replaced, keeping the
/// migration cookie and the QEMU stream byte for byte.
pub fn retarget(file: &Path, name: &str, uuid: &str, paths: &[(String, String)]) -> Result<()> {
    let (mut h, data) = read_block(file)?;
    let cookie_off = u32::from_le_bytes(h[32..36].try_into().unwrap_or_default()) as usize;
    let xml_end = data.iter().position(|&b| b == 0).ok_or_else(|| bad(file, "unterminated domain XML"))?;
    let xml = std::str::from_utf8(&data[..xml_end]).map_err(|_| bad(file, "domain XML is not UTF-8"))?;
    let cookie = match cookie_off {
        0 => &[][..],
        o if o > xml_end && o < data.len() => {
            let end = data[o..].iter().position(|&b| b == 0).map_or(data.len(), |e| o + e);
            &data[o..end]
        }
        o => return Err(bad(file, format!("cookie offset {o} outside the XML block"))),
    };
    let xml = replace_element(file, xml, "name", &xml_escape(name))?;
    let mut xml = replace_element(file, &xml, "uuid", uuid)?;
    for (from, to) in paths {
        xml = xml.replace(&xml_escape(from), &xml_escape(to));
    }
    let mut block = Vec::with_capacity(data.len());
    block.extend_from_slice(xml.as_bytes());
    block.push(0);
    let new_cookie = if cookie.is_empty() { 0 } else { block.len() };
    block.extend_from_slice(cookie);
    if !cookie.is_empty() {
        block.push(0);
    }
    if block.len() > data.len() {
        return Err(bad(file, format!("the new XML needs {} bytes, the image holds {}", block.len(), data.len())));
    }
    block.resize(data.len(), 0);
    h[32..36].copy_from_slice(&(new_cookie as u32).to_le_bytes());
    let mut f = OpenOptions::new().write(true).open(file).map_err(Error::io("open state file", file))?;
    f.write_all(&h).map_err(Error::io("write state file", file))?;
    f.seek(SeekFrom::Start(HEADER as u64)).map_err(Error::io("write state file", file))?;
    f.write_all(&block).map_err(Error::io("write state file", file))?;
    f.sync_all().map_err(Error::io("sync state file", file))
}

/// Replaces the text of the first top-level `<tag>` element.
fn replace_element(file: &Path, xml: &str, tag: &str, text: &str) -> Result<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let start = xml.find(&open).ok_or_else(|| bad(file, format!("domain XML has no <{tag}>")))? + open.len();
    let end = xml[start..].find(&close).ok_or_else(|| bad(file, format!("unterminated <{tag}>")))? + start;
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
        retarget(&p, "b-web", "11111111-2222-4333-8444-555555555555", &[("/a/".into(), "/data/b/".into())]).unwrap();
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
    fn refuses_what_it_does_not_know() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x");
        std::fs::write(&p, b"LibvirtQemudPart\0\0").unwrap();
        assert!(retarget(&p, "n", &random_uuid(), &[]).is_err());
        let p = image(t.path(), "<domain><name>a</name><uuid>u</uuid></domain>", "<c/>", 64);
        let long = "x".repeat(100);
        let e = retarget(&p, &long, "u", &[]).unwrap_err().to_string();
        assert!(e.contains("holds 64"), "{e}");
    }
}

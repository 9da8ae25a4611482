//! The chunk protocol's wire format (ALPN [`ALPN`]).
//!
//! One request per QUIC bidirectional stream; the client finishes its send
//! side after the request, the server answers and finishes its own.
//!
//! ```text
//! request  := "XNQ1" op:u8 body
//!   op 1 chunks: count:u16le id[32]*count        1 <= count <= MAX_BATCH
//!   op 2 names:  (empty)
//!   op 3 solid:  as chunks; the answer may also hold solid frames
//!   op 4 dense:  codec:u8 then as chunks; every run of present chunks
//!                comes in solid frames: codec 1..=16 asks for zstd at
//!                that level, 128 for PPMd (see [`Dense`])
//!   op 5 layout: count:u16le id[32]*count         1 <= count <= MAX_LAYOUT
//!   op 6 order:  layer[32]                        the stack's prefetch order
//!
//! answer to chunks: frames in request order, one per requested id, or
//! (op 3 only) one solid frame for the next `count` ids
//!   frame   := 0x00 enc:u8 plain_len:u32le stored_len:u32le stored[stored_len]
//!            | 0x01                            (this provider lacks the chunk)
//!            | 0x02 count:u16le stored_len:u32le block[stored_len]
//!            | 0x03 len:u16le why[len]         (the request is refused, and
//!                                              the stream ends; len <= MAX_REFUSAL)
//! answer to names:
//!   names   := len:u32le json(Vec<NameRecord>)[len]
//! answer to layout: ( block:u64le start:u32le ){count}, in request order
//! answer to order:  len:u32le record[len]         len 0: none held; at most
//!                                                 MAX_ORDER_BYTES (the record:
//!                                                 `store/src/order.rs`)
//! ```
//!
//! `stored` is the chunk exactly as the provider keeps it at rest (zstd, or
//! raw when compression did not shrink it), so nothing is recompressed on
//! either side. Chunks the provider keeps in solid blocks (see
//! `store/src/store.rs`) travel in solid frames: `block` has the layout of
//! a block record's payload, a member table naming exactly the next
//! `count` requested ids in order, then one zstd frame of their
//! plaintexts. The provider compresses the members asked for together (one
//! frame for up to the store's [`BLOCK_TARGET`](xenod_store::BLOCK_TARGET)),
//! and a receiver that needed every member keeps the block as it came. A dense request (op 4) asks for every chunk
//! in solid frames at a level of the fetcher's choosing (1 to
//! [`MAX_DENSE_LEVEL`]), chunks kept singly included: for moves where
//! bytes on the wire are what is short and the provider has CPU to spare
//! (migration). Or it asks for PPMd: then a frame's zstd frame is replaced
//! by a PPMd stream, marked in the block's level byte, wherever that is
//! smaller (text and code); a receiver decodes it and stores the chunks in
//! its own blocks, so PPMd never reaches a store at rest.
//!
//! A provider forwards a solid block as it keeps it, without decompressing
//! or compressing anything, when a solid request (op 3) names exactly its
//! members in its order, whatever level the block was made at: the
//! publisher's `--level` decides the bytes on the wire, and no provider
//! spends CPU per transfer on whole blocks (recompressing them at 6 held a
//! template fetch on loopback to 58-90 MB/s, the provider's two cores
//! busy). Runs of members asked for without their whole block (a prefetch
//! order) are still packed at level 6 or the store's, whichever is higher.
//! Layout (op 5) tells a fetcher which of its wanted ids share a block of
//! the provider's (`block`, a key local to the provider, 0 for a chunk
//! kept alone) and where (`start`, the member's plaintext offset), so it
//! can ask for whole blocks in order. A receiver trusts nothing in a frame: `plain_len` is capped
//! at [`MAX_PLAIN`], `stored_len` may not exceed `plain_len` (the encoder
//! only keeps zstd output that is smaller), and the chunk must decode to
//! bytes that hash to the id asked for before it is stored.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use xenod_store::{ChunkId, Encoding, LayerId, MAX_ORDER_BYTES};
pub use xenod_store::{Dense, MAX_DENSE_LEVEL};

/// The ALPN of the chunk protocol; a connection for any other is refused
/// in the TLS handshake.
pub const ALPN: &[u8] = b"xenod/chunks/1";
/// Most chunk ids in one request: a whole 1 MiB block of 1 KiB members.
pub const MAX_BATCH: usize = 1024;
/// Most chunk ids in one layout request.
pub const MAX_LAYOUT: usize = 8192;
/// Largest chunk plaintext accepted in a frame. Data chunks are at most
/// [`CDC_MAX`](xenod_store::CDC_MAX); a layer root grows with the tree (36
/// bytes per manifest chunk), so this leaves room for trees of ~10^8 entries.
pub const MAX_PLAIN: u32 = 16 << 20;
/// Largest names answer accepted.
pub const MAX_NAMES: u32 = 8 << 20;

const MAGIC: &[u8; 4] = b"XNQ1";
const OP_CHUNKS: u8 = 1;
const OP_NAMES: u8 = 2;
const OP_SOLID: u8 = 3;
const OP_DENSE: u8 = 4;
const OP_LAYOUT: u8 = 5;
const OP_ORDER: u8 = 6;
const PRESENT: u8 = 0;
const ABSENT: u8 = 1;
const SOLID: u8 = 2;
const REFUSED: u8 = 3;
/// Longest reason for a refused request, in bytes.
pub const MAX_REFUSAL: usize = 1024;
/// Largest solid frame accepted: a full block of incompressible members
/// with its table and zstd's framing.
pub const MAX_SOLID: u32 = (xenod_store::BLOCK_MAX_PLAIN + (MAX_BATCH * 36) + (1 << 20)) as u32;
const FRAME_HEADER: usize = 1 + 1 + 4 + 4;

/// A request from a fetcher to a provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Chunks, each in its own frame.
    Chunks(Vec<ChunkId>),
    /// Chunks; runs of them may come in solid frames.
    Solid(Vec<ChunkId>),
    /// Chunks, every run of them in solid frames made by `codec`.
    Dense {
        codec: Dense,
        ids: Vec<ChunkId>,
    },
    Names,
    /// Which stored block holds each id, and where in it.
    Layout(Vec<ChunkId>),
    /// The prefetch order held for the stack of a layer.
    Order(LayerId),
}

/// The provider's answer for the next requested id(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// This provider lacks the chunk.
    Absent,
    One(Frame),
    /// The next `count` requested ids, as a block payload.
    Solid {
        count: u16,
        block: Vec<u8>,
    },
}

/// One chunk as it travels: its encoding, plaintext length and stored bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub encoding: Encoding,
    pub plain_len: u32,
    pub stored: Vec<u8>,
}

/// What was wrong with bytes read from a peer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("stream ended inside a {0}")]
    Truncated(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error("reading from peer")]
    Io(#[source] std::io::Error),
    /// This node failed to answer (its own store or task): no fault of the
    /// peer, and not counted against it.
    #[error("answering: {0}")]
    Local(String),
    /// The provider refused the request, saying why.
    #[error("the provider refused the request: {0}")]
    Refused(String),
}

impl WireError {
    fn from_read(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |e| if e.kind() == std::io::ErrorKind::UnexpectedEof { Self::Truncated(what) } else { Self::Io(e) }
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        match self {
            Self::Chunks(ids) | Self::Solid(ids) | Self::Dense { ids, .. } => {
                debug_assert!(!ids.is_empty() && ids.len() <= MAX_BATCH);
                match self {
                    Self::Chunks(_) => b.push(OP_CHUNKS),
                    Self::Solid(_) => b.push(OP_SOLID),
                    Self::Dense { codec, .. } => b.extend_from_slice(&[OP_DENSE, codec.byte()]),
                    Self::Names | Self::Layout(_) | Self::Order(_) => unreachable!(),
                }
                b.extend_from_slice(&(ids.len() as u16).to_le_bytes());
                for id in ids {
                    b.extend_from_slice(id.as_bytes());
                }
            }
            Self::Names => b.push(OP_NAMES),
            Self::Order(layer) => {
                b.push(OP_ORDER);
                b.extend_from_slice(layer.as_bytes());
            }
            Self::Layout(ids) => {
                debug_assert!(!ids.is_empty() && ids.len() <= MAX_LAYOUT);
                b.push(OP_LAYOUT);
                b.extend_from_slice(&(ids.len() as u16).to_le_bytes());
                for id in ids {
                    b.extend_from_slice(id.as_bytes());
                }
            }
        }
        b
    }

    /// Reads one request, refusing anything malformed or oversized.
    pub async fn read(r: &mut (impl AsyncRead + Unpin)) -> Result<Self, WireError> {
        let mut head = [0u8; 5];
        r.read_exact(&mut head).await.map_err(WireError::from_read("request header"))?;
        if &head[..4] != MAGIC {
            return Err(WireError::Invalid("not a xenod chunk request (bad magic)".into()));
        }
        match head[4] {
            op @ (OP_CHUNKS | OP_SOLID | OP_DENSE | OP_LAYOUT) => {
                let codec = if op == OP_DENSE {
                    let mut l = [0u8; 1];
                    r.read_exact(&mut l).await.map_err(WireError::from_read("request"))?;
                    // Refused with its message: a peer hears why.
                    Some(Dense::from_byte(l[0]).map_err(|e| WireError::Invalid(e.to_string()))?)
                } else {
                    None
                };
                let mut n = [0u8; 2];
                r.read_exact(&mut n).await.map_err(WireError::from_read("request"))?;
                let n = u16::from_le_bytes(n) as usize;
                let max = if op == OP_LAYOUT { MAX_LAYOUT } else { MAX_BATCH };
                if n == 0 || n > max {
                    return Err(WireError::Invalid(format!("batch of {n} ids is outside 1..={max}")));
                }
                let mut raw = vec![0u8; n * 32];
                r.read_exact(&mut raw).await.map_err(WireError::from_read("request"))?;
                let ids = raw.chunks_exact(32).map(|c| ChunkId::from_bytes(c.try_into().unwrap_or([0; 32]))).collect();
                Ok(match (op, codec) {
                    (_, Some(codec)) => Self::Dense { codec, ids },
                    (OP_SOLID, _) => Self::Solid(ids),
                    (OP_LAYOUT, _) => Self::Layout(ids),
                    _ => Self::Chunks(ids),
                })
            }
            OP_NAMES => Ok(Self::Names),
            OP_ORDER => {
                let mut l = [0u8; 32];
                r.read_exact(&mut l).await.map_err(WireError::from_read("request"))?;
                Ok(Self::Order(LayerId::from_bytes(l)))
            }
            op => Err(WireError::Invalid(format!("unknown request op {op}"))),
        }
    }
}

/// Writes one answer.
pub async fn write_answer(w: &mut (impl AsyncWrite + Unpin), answer: &Answer) -> std::io::Result<()> {
    match answer {
        Answer::Absent => w.write_all(&[ABSENT]).await,
        Answer::One(f) => {
            let mut h = [0u8; FRAME_HEADER];
            h[0] = PRESENT;
            h[1] = f.encoding as u8;
            h[2..6].copy_from_slice(&f.plain_len.to_le_bytes());
            h[6..10].copy_from_slice(&(f.stored.len() as u32).to_le_bytes());
            w.write_all(&h).await?;
            w.write_all(&f.stored).await
        }
        Answer::Solid { count, block } => {
            let mut h = [0u8; 7];
            h[0] = SOLID;
            h[1..3].copy_from_slice(&count.to_le_bytes());
            h[3..7].copy_from_slice(&(block.len() as u32).to_le_bytes());
            w.write_all(&h).await?;
            w.write_all(block).await
        }
    }
}

/// Tells the fetcher why its request is refused (cut to [`MAX_REFUSAL`]
/// bytes); the stream should end after it.
pub async fn write_refusal(w: &mut (impl AsyncWrite + Unpin), why: &str) -> std::io::Result<()> {
    let mut end = why.len().min(MAX_REFUSAL);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    let mut b = vec![REFUSED];
    b.extend_from_slice(&(end as u16).to_le_bytes());
    b.extend_from_slice(&why.as_bytes()[..end]);
    w.write_all(&b).await
}

/// Reads one answer. The length fields are checked before any buffer is
/// sized from them; what a solid frame holds is checked by the store.
pub async fn read_answer(r: &mut (impl AsyncRead + Unpin)) -> Result<Answer, WireError> {
    let mut status = [0u8; 1];
    r.read_exact(&mut status).await.map_err(WireError::from_read("frame header"))?;
    match status[0] {
        ABSENT => Ok(Answer::Absent),
        PRESENT => {
            let mut h = [0u8; FRAME_HEADER - 1];
            r.read_exact(&mut h).await.map_err(WireError::from_read("frame header"))?;
            let encoding = Encoding::from_u8(h[0])
                .filter(|e| *e != Encoding::Block)
                .ok_or_else(|| WireError::Invalid(format!("unknown encoding {}", h[0])))?;
            let plain_len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
            let stored_len = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
            if plain_len > MAX_PLAIN {
                return Err(WireError::Invalid(format!(
                    "frame claims {plain_len} plaintext bytes, more than {MAX_PLAIN}"
                )));
            }
            if stored_len > plain_len || (encoding == Encoding::Raw && stored_len != plain_len) {
                return Err(WireError::Invalid(format!(
                    "frame stores {stored_len} bytes for {plain_len} of plaintext in encoding {encoding:?}"
                )));
            }
            let mut stored = vec![0u8; stored_len as usize];
            r.read_exact(&mut stored).await.map_err(WireError::from_read("frame"))?;
            Ok(Answer::One(Frame { encoding, plain_len, stored }))
        }
        SOLID => {
            let mut h = [0u8; 6];
            r.read_exact(&mut h).await.map_err(WireError::from_read("solid frame header"))?;
            let count = u16::from_le_bytes([h[0], h[1]]);
            let len = u32::from_le_bytes([h[2], h[3], h[4], h[5]]);
            if count == 0 || count as usize > MAX_BATCH {
                return Err(WireError::Invalid(format!("solid frame of {count} chunks is outside 1..={MAX_BATCH}")));
            }
            if len > MAX_SOLID {
                return Err(WireError::Invalid(format!("solid frame of {len} bytes exceeds {MAX_SOLID}")));
            }
            let mut block = vec![0u8; len as usize];
            r.read_exact(&mut block).await.map_err(WireError::from_read("solid frame"))?;
            Ok(Answer::Solid { count, block })
        }
        REFUSED => {
            let mut h = [0u8; 2];
            r.read_exact(&mut h).await.map_err(WireError::from_read("refusal"))?;
            let len = u16::from_le_bytes(h) as usize;
            if len > MAX_REFUSAL {
                return Err(WireError::Invalid(format!("refusal of {len} bytes exceeds {MAX_REFUSAL}")));
            }
            let mut why = vec![0u8; len];
            r.read_exact(&mut why).await.map_err(WireError::from_read("refusal"))?;
            Err(WireError::Refused(String::from_utf8_lossy(&why).into_owned()))
        }
        s => Err(WireError::Invalid(format!("unknown frame status {s}"))),
    }
}

/// Writes a layout answer: `(block, start)` per requested id.
pub async fn write_layout(w: &mut (impl AsyncWrite + Unpin), layout: &[(u64, u32)]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(layout.len() * 12);
    for (block, start) in layout {
        b.extend_from_slice(&block.to_le_bytes());
        b.extend_from_slice(&start.to_le_bytes());
    }
    w.write_all(&b).await
}

/// Reads the layout answer for a request of `n` ids.
pub async fn read_layout(r: &mut (impl AsyncRead + Unpin), n: usize) -> Result<Vec<(u64, u32)>, WireError> {
    let mut b = vec![0u8; n.min(MAX_LAYOUT) * 12];
    r.read_exact(&mut b).await.map_err(WireError::from_read("layout answer"))?;
    Ok(b.chunks_exact(12)
        .map(|c| {
            (u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8])), u32::from_le_bytes([c[8], c[9], c[10], c[11]]))
        })
        .collect())
}

/// Writes an order answer: the record, or none (empty).
pub async fn write_order(w: &mut (impl AsyncWrite + Unpin), record: &[u8]) -> std::io::Result<()> {
    w.write_all(&(record.len() as u32).to_le_bytes()).await?;
    w.write_all(record).await
}

/// Reads an order answer (not yet checked): none when empty.
pub async fn read_order(r: &mut (impl AsyncRead + Unpin)) -> Result<Option<Vec<u8>>, WireError> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n).await.map_err(WireError::from_read("order header"))?;
    let n = u32::from_le_bytes(n) as usize;
    if n > MAX_ORDER_BYTES {
        return Err(WireError::Invalid(format!("order answer of {n} bytes exceeds {MAX_ORDER_BYTES}")));
    }
    let mut b = vec![0u8; n];
    r.read_exact(&mut b).await.map_err(WireError::from_read("order answer"))?;
    Ok((n > 0).then_some(b))
}

/// Writes a names answer.
pub async fn write_names(w: &mut (impl AsyncWrite + Unpin), json: &[u8]) -> std::io::Result<()> {
    w.write_all(&(json.len() as u32).to_le_bytes()).await?;
    w.write_all(json).await
}

/// Reads a names answer (raw JSON, not yet trusted).
pub async fn read_names(r: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, WireError> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n).await.map_err(WireError::from_read("names header"))?;
    let n = u32::from_le_bytes(n);
    if n > MAX_NAMES {
        return Err(WireError::Invalid(format!("names answer of {n} bytes exceeds {MAX_NAMES}")));
    }
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b).await.map_err(WireError::from_read("names answer"))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn request_round_trip_and_limits() {
        rt().block_on(async {
            // Boundary batch sizes: 1 and MAX_BATCH pass.
            for n in [1, 2, MAX_BATCH] {
                let ids: Vec<ChunkId> = (0..n).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
                let solid = Request::Solid(ids.clone());
                assert_eq!(Request::read(&mut solid.encode().as_slice()).await.unwrap(), solid);
                for codec in [Dense::Zstd(1), Dense::Zstd(MAX_DENSE_LEVEL), Dense::Ppmd] {
                    let dense = Request::Dense { codec, ids: ids.clone() };
                    assert_eq!(Request::read(&mut dense.encode().as_slice()).await.unwrap(), dense);
                }
                let req = Request::Chunks(ids);
                let b = req.encode();
                assert_eq!(Request::read(&mut b.as_slice()).await.unwrap(), req);
                // Every truncation is refused as truncated.
                let e = Request::read(&mut &b[..b.len() - 1]).await.unwrap_err();
                assert!(matches!(e, WireError::Truncated(_)), "{e}");
            }
            assert_eq!(Request::read(&mut Request::Names.encode().as_slice()).await.unwrap(), Request::Names);
            let order = Request::Order(ChunkId::of(b"top"));
            assert_eq!(Request::read(&mut order.encode().as_slice()).await.unwrap(), order);
            let e = Request::read(&mut &order.encode()[..20]).await.unwrap_err();
            assert!(matches!(e, WireError::Truncated(_)), "{e}");
            for rec in [&b""[..], b"some record"] {
                let mut answer = Vec::new();
                write_order(&mut answer, rec).await.unwrap();
                assert_eq!(
                    read_order(&mut answer.as_slice()).await.unwrap().as_deref(),
                    (!rec.is_empty()).then_some(rec)
                );
            }
            let huge = ((MAX_ORDER_BYTES + 1) as u32).to_le_bytes();
            assert!(read_order(&mut huge.as_slice()).await.unwrap_err().to_string().contains("exceeds"));
            // Layout requests may be longer than chunk batches, up to MAX_LAYOUT.
            let many: Vec<ChunkId> = (0..MAX_LAYOUT + 1).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
            let layout = Request::Layout(many[..MAX_LAYOUT].to_vec());
            assert_eq!(Request::read(&mut layout.encode().as_slice()).await.unwrap(), layout);
            let mut too_long = b"XNQ1\x05".to_vec();
            too_long.extend_from_slice(&((MAX_LAYOUT + 1) as u16).to_le_bytes());
            too_long.extend(many.iter().flat_map(|id| *id.as_bytes()));
            let e = Request::read(&mut too_long.as_slice()).await.unwrap_err().to_string();
            assert!(e.contains("outside 1..=8192"), "{e}");
            let mut answer = Vec::new();
            write_layout(&mut answer, &[(7, 1), (0, 0)]).await.unwrap();
            assert_eq!(read_layout(&mut answer.as_slice(), 2).await.unwrap(), vec![(7, 1), (0, 0)]);
            let e = read_layout(&mut &answer[..23], 2).await.unwrap_err();
            assert!(matches!(e, WireError::Truncated("layout answer")), "{e}");
            for (bad, why) in [
                (b"XNQ1\x01\x00\x00".to_vec(), "outside"),
                (b"XNQ1\x01\x01\x05".to_vec(), "outside"),
                (b"XNQ1\x09".to_vec(), "unknown request op"),
                (b"XNQ1\x06\x01".to_vec(), "stream ended"),
                (b"XNQ1\x04\x00\x01\x00".to_vec(), "dense level 0"),
                (b"XNQ1\x04\x16\x01\x00".to_vec(), "dense level 22"),
                (b"XNQ1\x04\x81\x01\x00".to_vec(), "dense level 129"),
                (b"HTTP/".to_vec(), "bad magic"),
            ] {
                let e = Request::read(&mut bad.as_slice()).await.unwrap_err().to_string();
                assert!(e.contains(why), "{e}");
            }
        });
    }

    #[test]
    fn dense_codecs_parse_and_print() {
        for (text, codec) in
            [("ppmd", Dense::Ppmd), ("PPMd", Dense::Ppmd), ("1", Dense::Zstd(1)), ("16", Dense::Zstd(16))]
        {
            assert_eq!(text.parse::<Dense>().unwrap(), codec);
            assert_eq!(codec.to_string().parse::<Dense>().unwrap(), codec);
            assert_eq!(Dense::from_byte(codec.byte()).unwrap(), codec);
        }
        for bad in ["0", "17", "zstd", "", "-3"] {
            let e = bad.parse::<Dense>().unwrap_err().to_string();
            assert!(e.contains("neither ppmd nor a zstd level from 1 to 16"), "{e}");
        }
        assert_eq!(serde_json::to_string(&Dense::Ppmd).unwrap(), "\"ppmd\"");
        assert_eq!(serde_json::from_str::<Dense>("{\"zstd\":9}").unwrap(), Dense::Zstd(9));
    }

    #[test]
    fn frames_round_trip_and_hostile_lengths() {
        rt().block_on(async {
            let f = Answer::One(Frame { encoding: Encoding::Zstd, plain_len: 100, stored: vec![7; 40] });
            let solid = Answer::Solid { count: 3, block: vec![1; 77] };
            let mut b = Vec::new();
            for a in [&f, &Answer::Absent, &solid] {
                write_answer(&mut b, a).await.unwrap();
            }
            let mut r = b.as_slice();
            assert_eq!(read_answer(&mut r).await.unwrap(), f);
            assert_eq!(read_answer(&mut r).await.unwrap(), Answer::Absent);
            assert_eq!(read_answer(&mut r).await.unwrap(), solid);
            assert!(matches!(read_answer(&mut r).await, Err(WireError::Truncated(_))));

            let frame = |status: u8, enc: u8, plain: u32, stored: u32| {
                let mut b = vec![status, enc];
                b.extend_from_slice(&plain.to_le_bytes());
                b.extend_from_slice(&stored.to_le_bytes());
                b
            };
            for (bytes, why) in [
                (frame(0, 1, u32::MAX, 10), "more than"),
                (frame(0, 1, 10, u32::MAX), "stores"),
                (frame(0, 0, 10, 9), "stores"),
                (frame(0, 9, 10, 9), "unknown encoding"),
                (frame(0, 2, 10, 9), "unknown encoding"),
                (frame(5, 0, 0, 0), "unknown frame status"),
                ([&[2u8, 0, 0][..], &[1, 0, 0, 0]].concat(), "outside"),
                ([&[2u8, 1, 5][..], &[1, 0, 0, 0]].concat(), "outside"),
                ([&[2u8, 1, 0][..], &u32::MAX.to_le_bytes()].concat(), "exceeds"),
            ] {
                let e = read_answer(&mut bytes.as_slice()).await.unwrap_err().to_string();
                assert!(e.contains(why), "{e}");
            }
            // A plausible header with its payload cut short.
            let mut cut = frame(0, 0, 10, 10);
            cut.extend_from_slice(&[1; 5]);
            assert!(matches!(read_answer(&mut cut.as_slice()).await, Err(WireError::Truncated(_))));

            let huge = (MAX_NAMES + 1).to_le_bytes();
            assert!(read_names(&mut huge.as_slice()).await.unwrap_err().to_string().contains("exceeds"));

            // A refusal carries its reason, cut to MAX_REFUSAL bytes on a
            // character boundary; a longer claimed length is refused.
            let mut b = Vec::new();
            write_refusal(&mut b, "dense level 17 is outside 1..=16").await.unwrap();
            let e = read_answer(&mut b.as_slice()).await.unwrap_err();
            assert!(matches!(&e, WireError::Refused(w) if w == "dense level 17 is outside 1..=16"), "{e}");
            let mut b = Vec::new();
            write_refusal(&mut b, &"é".repeat(MAX_REFUSAL)).await.unwrap();
            let Err(WireError::Refused(w)) = read_answer(&mut b.as_slice()).await else { panic!("not a refusal") };
            assert_eq!(w, "é".repeat(MAX_REFUSAL / 2));
            let long = [&[3u8][..], &((MAX_REFUSAL + 1) as u16).to_le_bytes()].concat();
            assert!(read_answer(&mut long.as_slice()).await.unwrap_err().to_string().contains("exceeds"));
        });
    }
}

//! Cutting byte streams into chunks.
//!
//! Two ways, both pinned by [`crate::FORMAT_VERSION`]:
//!
//! * **content-defined** (FastCDC 2020, normalisation level 1, min/avg/max
//!   16/64/256 KiB) for regular files and manifests: an insertion moves only
//!   the cut points next to it;
//! * **fixed** 64 KiB blocks, aligned to the start of the file, for disk
//!   images: a block write inside the guest changes exactly one chunk and
//!   never shifts the others.
//!
//! [`Batcher`] reads a stream in large batches and returns the cut points of
//! every chunk in it, so callers can hash and compress a batch in parallel
//! while memory stays bounded by the batch size.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

pub const CDC_MIN: usize = 16 * 1024;
pub const CDC_AVG: usize = 64 * 1024;
pub const CDC_MAX: usize = 256 * 1024;
/// Block size of fixed chunking, and of cowfs's block copy-up.
pub const BLOCK: usize = 64 * 1024;
/// Bytes read per batch.
pub const BATCH: usize = 8 * 1024 * 1024;

/// How a file's contents were cut; recorded per file in the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Chunking {
    /// Content-defined (FastCDC).
    Cdc,
    /// Fixed, aligned [`BLOCK`]-sized blocks.
    Fixed,
}

/// The FastCDC cut-point finder with the pinned parameters.
#[derive(Clone, Copy, Debug)]
pub struct Cdc {
    mask_s: u64,
    mask_l: u64,
}

impl Default for Cdc {
    fn default() -> Self {
        let (mask_s, mask_l) = fastcdc::v2020::select_masks(CDC_AVG, fastcdc::v2020::Normalization::Level1);
        Self { mask_s, mask_l }
    }
}

impl Cdc {
    /// Length of the first chunk of `data`, or `None` if `data` might extend
    /// past it (fewer than [`CDC_MAX`] bytes and not at the end of input).
    pub fn cut(&self, data: &[u8], eof: bool) -> Option<usize> {
        if data.is_empty() || (!eof && data.len() < CDC_MAX) {
            return None;
        }
        let (_, n) = fastcdc::v2020::cut(
            data,
            CDC_MIN,
            CDC_AVG,
            CDC_MAX,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        Some(n)
    }

    /// Cut points of all of `data`, which is a whole stream.
    pub fn cuts(&self, data: &[u8]) -> Vec<usize> {
        let mut cuts = Vec::new();
        let mut pos = 0;
        while let Some(n) = self.cut(&data[pos..], true) {
            pos += n;
            cuts.push(pos);
        }
        cuts
    }
}

/// One batch of a stream: its bytes and the end offset of each chunk in it.
#[derive(Debug, Default)]
pub struct Batch {
    pub data: Vec<u8>,
    pub ends: Vec<usize>,
}

impl Batch {
    /// The chunks of this batch, in order.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let c = &self.data[start..end];
            start = end;
            c
        })
    }
}

/// Reads a stream and hands out [`Batch`]es of whole chunks.
pub struct Batcher<R> {
    reader: R,
    chunking: Chunking,
    cdc: Cdc,
    carry: Vec<u8>,
    eof: bool,
    cap: usize,
}

impl<R: Read> Batcher<R> {
    pub fn new(reader: R, chunking: Chunking) -> Self {
        Self::with_capacity(reader, chunking, BATCH)
    }

    /// A batcher reading at most `cap` bytes per batch (at least one
    /// maximal chunk); a small file is read with one small buffer.
    pub fn with_capacity(reader: R, chunking: Chunking, cap: usize) -> Self {
        let cap = cap.clamp(1, BATCH);
        Self { reader, chunking, cdc: Cdc::default(), carry: Vec::new(), eof: false, cap }
    }

    /// The next batch, or `None` at the end of the stream.
    pub fn next_batch(&mut self) -> io::Result<Option<Batch>> {
        let mut data = std::mem::take(&mut self.carry);
        let cap = if data.is_empty() { self.cap } else { self.cap.max(data.len() + CDC_MAX) };
        data.reserve(cap.saturating_sub(data.len()));
        while !self.eof && data.len() < cap {
            let start = data.len();
            data.resize(cap, 0);
            match self.reader.read(&mut data[start..]) {
                Ok(0) => {
                    data.truncate(start);
                    self.eof = true;
                }
                Ok(n) => data.truncate(start + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => data.truncate(start),
                Err(e) => return Err(e),
            }
        }
        if data.is_empty() {
            return Ok(None);
        }
        let mut ends = Vec::new();
        let mut pos = 0;
        loop {
            let rest = &data[pos..];
            let n = match self.chunking {
                Chunking::Fixed if rest.len() >= BLOCK => Some(BLOCK),
                Chunking::Fixed if self.eof && !rest.is_empty() => Some(rest.len()),
                Chunking::Fixed => None,
                Chunking::Cdc => self.cdc.cut(rest, self.eof),
            };
            match n {
                Some(n) => {
                    pos += n;
                    ends.push(pos);
                }
                None => break,
            }
        }
        self.carry = data[pos..].to_vec();
        data.truncate(pos);
        Ok(Some(Batch { data, ends }))
    }
}

/// Whether every byte of `data` is zero: such a chunk is stored as a hole.
pub fn is_zero(data: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(data: &[u8], chunking: Chunking) -> Vec<usize> {
        let mut b = Batcher::new(data, chunking);
        let mut lens = Vec::new();
        while let Some(batch) = b.next_batch().unwrap() {
            lens.extend(batch.chunks().map(<[u8]>::len));
        }
        lens
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn batches_agree_with_whole_stream_cuts() {
        let data = noise(3 * BATCH + 12345, 7);
        let whole = Cdc::default().cuts(&data);
        let mut ends = Vec::new();
        let mut total = 0;
        for len in batches(&data, Chunking::Cdc) {
            total += len;
            ends.push(total);
        }
        assert_eq!(ends, whole);
        assert!(ends.len() > 100);
    }

    #[test]
    fn sizes_respect_bounds() {
        let data = noise(4 * BATCH, 9);
        let lens = batches(&data, Chunking::Cdc);
        let (last, body) = lens.split_last().unwrap();
        assert!(body.iter().all(|&l| (CDC_MIN..=CDC_MAX).contains(&l)));
        assert!(*last <= CDC_MAX);
        for (n, want) in [(0, vec![]), (1, vec![1]), (BLOCK, vec![BLOCK]), (BLOCK + 1, vec![BLOCK, 1])] {
            assert_eq!(batches(&data[..n], Chunking::Fixed), want, "fixed, {n} bytes");
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 1000]));
        assert!(is_zero(&[]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v[1..]));
    }
}

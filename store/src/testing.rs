//! Helpers for tests of this crate and the crates above it; not part of
//! the store's interface.

/// `n` bytes of seeded pseudo-random noise (xorshift64*): incompressible,
/// and the same for the same seed on every machine.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// `n` bytes of a seeded web-server log: fixed words around random
/// numbers, the kind of text a context model compresses better than zstd.
pub fn log_text(n: usize, seed: u64) -> Vec<u8> {
    let r = noise(n / 4 + 64, seed);
    let mut out = Vec::with_capacity(n + 128);
    for (i, w) in r.chunks_exact(8).enumerate() {
        if out.len() >= n {
            break;
        }
        let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        let line = format!(
            "2026-11-22T07:{:02}:{:02}.{:03} web[{}]: GET /shop/item/{}?ref={:x} 200 {} bytes\n",
            i / 3000 % 60,
            i / 50 % 60,
            i % 1000,
            4000 + v % 64,
            (v >> 6) % 100_000,
            (v >> 23) % 0x100_0000,
            (v >> 47) % 90_000
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(n);
    out
}

/// A tmpfs of `size` (as mount's `size=` option takes it) mounted on
/// `dir`, lazily unmounted on drop: a small disk for tests of a full one.
/// Needs root.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path, size: &str) -> Self {
        let fs = Self(dir.to_path_buf());
        fs.run(&format!("size={size}"));
        fs
    }

    /// Gives it another size; its files stay.
    pub fn resize(&self, size: &str) {
        self.run(&format!("remount,size={size}"));
    }

    fn run(&self, opts: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount -o {opts} of a tmpfs on {} failed", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Whether `e` or an error under it is the OS's "no space left on device".
pub fn says_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source())
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()))
}

/// Whether the solid block payload `block` (as [`crate::Store::whole_block`]
/// returns it) holds a PPMd stream, which a store must never keep at rest.
pub fn block_is_ppmd(block: &[u8]) -> bool {
    crate::store::block_level(block) == crate::codec::PPMD_TAG
}

/// Every chunk id `store`'s index holds.
pub fn indexed_chunks(store: &crate::Store) -> crate::Result<Vec<crate::ChunkId>> {
    Ok(store.index_entries()?.into_iter().map(|(id, _)| id).collect())
}

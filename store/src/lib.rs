//! xenod's content-addressed store.
//!
//! | module | what it holds |
//! |---|---|
//! | `id` | [`ChunkId`]: BLAKE3 of a chunk's plaintext |
//! | `chunker` | FastCDC and fixed 64 KiB cutting, batched for parallel work |
//! | `codec` | zstd-or-raw encoding, decode-and-verify |
//! | `store` | [`Store`]: pack files, the redb index, crash-safe sealing |
//! | `manifest` | [`Entry`], [`LayerRoot`]: the canonical layer format |
//! | `layer` | [`LayerWriter`], [`LayerReader`]: layers as chunked streams |
//! | `merge` | [`Merged`] (union of a stack) and [`diff()`] (overlay of a tree) |
//! | `import` | directories, tar streams and disk images into entries |
//! | `export` | entries out to a directory or a tar stream |
//! | `names` | signed `template://` names, pins, reference resolution |
//! | `order` | [`Order`]: a stack's prefetch order (first reads of a boot), kept per top layer; its record format and checks |
//! | `mounts` | `.mount` files: layer references inside a layer ([`MOUNT_FILE`]) |
//! | `gc`, `verify` | mark-and-sweep from roots (`.mount` references included); rehash and reference checks; damage marks and pack rewrites for repair |
//! | `exit` | [`Exit`]: the documented exit codes, one table; each crate's error knows its code |
//! | `digest` | a metadata-complete digest of a directory tree |

mod chunker;
mod codec;
mod digest;
mod error;
mod exit;
mod export;
mod gc;
mod id;
mod import;
mod layer;
mod manifest;
mod merge;
mod mounts;
mod names;
mod order;
mod spill;
mod store;
#[doc(hidden)]
pub mod testing;
mod verify;

pub use chunker::{BATCH, BLOCK, Batch, Batcher, CDC_AVG, CDC_MAX, CDC_MIN, Cdc, Chunking, is_zero};
pub use codec::{Dense, DenseFault, Encoding, MAX_DENSE_LEVEL, ZSTD_LEVEL, decode, dense_frame, encode, zstd_level};
pub use digest::{tree_digest, tree_listing};
pub use error::{Error, Result};
pub use exit::Exit;
pub use export::{ExportStats, FileReader, export_dir, export_tar, export_tar_with};
pub use gc::{GcPhase, GcPlan, GcProgress, GcStats, GcStep};
pub use id::{ChunkId, LayerId, ParseIdError};
pub use import::{
    IMAGE_MIN_SIZE, ImportOptions, Progress, SNIFF_LEN, Sniffed, chunk_stream, import_dir, import_image, import_tar,
    sniff, special_kind,
};
pub use layer::{LayerInfo, LayerReader, LayerWriter, MAX_STACK};
pub use manifest::{
    ChunkRef, Entry, EntryFault, Extent, FORMAT_VERSION, Kind, LayerRoot, MAX_ENTRY_BYTES, ManifestFault, OrderCheck,
    PathFault, Timestamp, Xattr, cmp_paths, display_path, encode_entry, file_name, is_below, parent,
};
pub use merge::{Diff, Merged, Source, diff};
pub use mounts::{MOUNT_FILE, MOUNT_FILE_MAX, is_mount_file, mount_refs};
pub use names::{
    MAX_SUCCESSION, NameRecord, SCHEME, Succession, Trust, check_name, check_pattern, generate_key, hex, publisher,
};
pub use order::{MAX_ORDER, MAX_ORDER_BYTES, Order, OrderFault};
pub use store::{
    BLOCK_MAX_PLAIN, BLOCK_TARGET, BlockBuf, Location, Members, PackRewrite, Store, WriteLock, WriteStats,
};
pub use verify::{Damage, VerifyReport};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

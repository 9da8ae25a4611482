//! cowfs: the FUSE union copy-on-write filesystem over store layers.
//!
//! Modules, lowest first. The rule: no module imports one above it (each
//! uses only those listed before it), so each can be read, and tested,
//! knowing only what is above it in this list.
//!
//! | module | what it holds | uses |
//! |---|---|---|
//! | `error` | [`Error`], and the errno results of filesystem operations | |
//! | `stats` | [`MountStats`]: this process's FUSE requests by opcode, cache hits, lazy fetches; served on a Unix socket for the daemon's metrics | error |
//! | `overlay` | overlayfs's on-disk conventions: the xattrs marking opaque, moved and partial objects, whiteouts, reading a path's xattrs | error |
//! | `lower` | [`LowerTree`]: the union of a layer stack (with the layers `.mount` files add, and read-only host directories), in memory for the mount's life; reading a lower file's extents | error, overlay |
//! | `cache` | a bounded LRU of decoded chunks; lower reads through it; the chunks first read, in order, when recorded (a lazy deploy's prefetch order) | lower, stats |
//! | `filecache` | whole lower files materialised on local disk (shared by every mount of a store, bounded), for passthrough (and for reads on mounts without opens): on a file's first read, or a whole stack's at once ([`warm`]) | error, lower, stats |
//! | `partial` | block-granular copy-up of large files and its crash-safe [`DirtyMap`] | error, lower |
//! | `readahead` | decodes the lower files after one being read, in walk (and pack) order, for tar-like walks; and the next chunks of a big file read in order, its pack bytes asked of the kernel first | lower, cache |
//! | `track` | [`DirtySet`]: blocks and paths written since the last drain, and the first reads recorded, over a control socket | error |
//! | `union` | [`Union`]: lookup, readdir merge, copy-up, whiteouts, rename, xattrs (a directory module, its files mapped in its doc) | all of the above |
//! | `upper` | what an upper directory says of its use: the lock its writable mount holds, the stack it was made on | error, union |
//! | `fs` | [`CowFs`]: the fuser callbacks, thin wrappers over `Union`; kernel caching, FUSE passthrough, read-only mounts without OPEN requests ([`CowFs::no_open`]), and FUSE over io_uring (the transport itself is in `vendor/fuser`) | filecache, union |
//! | `mount` | [`mount`], [`serve`], [`unmount`]: sessions on a mountpoint | error, lower, filecache, track, union, upper, fs, stats |
//! | `flatten` | [`flatten`]: partial files made whole, so the kernel's overlayfs can mount an upper | error, overlay, lower, union, upper |
//! | `commit` | [`commit`]: an upper directory over a stack becomes a new layer | error, lower, partial, track, union, upper |
//!
//! Semantics follow Linux overlayfs (with `redirect_dir=on`), and the upper
//! directory uses its on-disk conventions, so the same upper can be mounted
//! by the kernel unless it holds partial files (see `partial`). Memory: the
//! lower tree is held whole, O(entries) of the stack (not of file data),
//! plus the chunk cache, plus one inode per name looked up in the upper; the
//! file cache is on disk, bounded by its own cap.

mod cache;
mod commit;
mod error;
mod filecache;
mod flatten;
mod fs;
mod lower;
mod mount;
mod overlay;
mod partial;
mod quota;
mod readahead;
mod stats;
mod track;
mod union;
mod upper;

pub use cache::Fetcher;
pub use commit::{CommitCache, CommitStats, commit, commit_live, union_entries};
pub use error::{Error, Result};
pub use filecache::{CacheUsage, MATERIALISE_MIN, WarmReport, WriteFault, cache_dir, cache_usage, warm};
pub use flatten::{FlattenStats, flatten};
pub use fs::CowFs;
pub use lower::{LowerTree, MOUNT_FILE, MOUNT_ROUNDS};
pub use mount::{
    DEFAULT_FILE_CACHE, MountOptions, Mounted, is_mounted, mount, process_runs, serve, serving_pid, unmount,
    unmount_and_wait,
};
pub use partial::DirtyMap;
pub use quota::Quota;
pub use stats::{LATENCY_BOUNDS_NS, MountStats, OpStats, read_stats, snapshot as stats_snapshot};
pub use track::{AnswerFault, DirtySet, control_socket_for, drain_dirty, first_touches};
pub use union::{Attr, BLOCK_COPY_MIN, FType, Union, WORK_DIR};
pub use upper::recorded_stack;

/// Requests this process's mounts served over FUSE's io_uring transport
/// (0 where the kernel does not offer it, or with `uring: false`).
pub fn uring_requests_served() -> u64 {
    fuser::uring_requests_served()
}

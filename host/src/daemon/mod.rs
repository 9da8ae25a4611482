//! The daemon: its context ([`Daemon`]), the features that run inside it,
//! and (above [`crate::migrate`] in the crate's order) its server.

pub mod announce;
pub mod context;
pub mod events;
pub mod lazy;
pub mod metrics;
pub mod repair;
pub mod replicate;
pub mod reply;
pub mod server;
pub mod usage;
pub mod warm;

pub use context::{Daemon, State, state_path, throttled};
pub use reply::KnownPeer;

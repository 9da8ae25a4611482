//! xenod's per-host engine, as a library: a host's instances and their
//! lifecycle, its daemon (context, typed local API, socket server) and
//! migration between hosts. The `xenod` binary parses arguments and renders
//! what this crate returns; nothing here prints to stdout or exits.
//!
//! Modules, lowest first. A module imports only modules above it in this
//! list, never one below:
//!
//! | module | what it holds |
//! |---|---|
//! | `error` | [`Error`]: one enum; each error knows its exit code |
//! | `hooks` | fault injection for tests (`XENOD_TEST_*`), behind the `test-hooks` feature |
//! | `notes` | [`note`]: what a long operation is doing, to its client |
//! | `filter` | filter expressions over host attributes (`xenod hosts --where`) |
//! | `place` | placement: filters, then weights (bytes a host lacks, capacity, spread) |
//! | `config` | `DATA_DIR/config.toml`, the publisher key, the node secret, signing names |
//! | `admission` | what this host offers guests, and whether a guest's ask fits what is free |
//! | `net` | environments: naming, addresses, devices (iproute2), the socket call that attaches a guest; `net::host`, the daemon's side, sits with the daemon's features below |
//! | `usage` | accounting: the ledger of what each instance used (`DATA_DIR/usage.redb`), minutes and hours, carried on migration; `usage::net`: the kernel's byte counters of forwarded ports |
//! | `api` | the local API's wire: [`Request`] in a versioned [`Envelope`], reply lines, the socket |
//! | `instance` | [`Instance`]: the instance model and its lifecycle (deploy, stop, start, destroy, suspend, resume, commit); `instance::mount`: the one mount spawner and `xenod mount` |
//! | `daemon::reply` | the daemon's typed replies, one per request |
//! | `daemon::context` | [`Daemon`]: the store, the peer endpoint, the daemon's state |
//! | `daemon::{events, lazy, replicate, announce, repair, metrics}` | features that run inside the daemon; `events` publishes this host's and streams the known ones; `announce` also makes this host's advertisement and answers `hosts` and `services`; `metrics` serves Prometheus text on `metrics = ADDR` |
//! | `migrate::{statepages, record, state, report, policy, wire, local, stage, target}` | migration: the state's page delta; the instance's record and its arrival; the state as a layer; typed reports; the phases and their one failure policy; the typed wire and the remote target; the source's files and state; staging; the target's side |
//! | `migrate` | `xenod migrate`, checkpoint and restore |
//! | `placement` | `xenod deploy --place`: placement over the hosts known, then the deploy on each host chosen |
//! | `daemon::server` | request dispatch, the socket server, `xenod serve` |
//! | `client` | the socket client with the embedded-daemon fallback; tickets made local |
//!
//! Inside `migrate`, its submodules keep the order of that row; the
//! module's own file (`migrate/mod.rs`) sits above them all.

mod error;
mod hooks;

pub mod admission;
pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod filter;
pub mod instance;
pub mod migrate;
pub mod net;
mod notes;
pub mod place;
pub mod placement;
pub mod usage;

pub use api::{Envelope, Request};
pub use daemon::Daemon;
pub use error::{Context, Error, Phase, Result};
pub use instance::Instance;
pub use notes::note;
pub use xenod_store::Exit;

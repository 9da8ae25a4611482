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
//! | `config` | `DATA_DIR/config.toml`, the publisher key, the node secret, signing names |
//! | `api` | the typed, versioned local API: [`Request`], its replies, [`Envelope`] |
//! | `instance` | [`Instance`]: the instance model, its lifecycle (deploy, stop, start, destroy, suspend, resume, commit); `instance::mount`: the one mount spawner and `xenod mount` |
//! | `daemon::context` | [`Daemon`]: the store, the peer endpoint, the daemon's state |
//! | `daemon::{lazy, replicate, announce}` | features that run inside the daemon |
//! | `migrate` | migration in phases, staging, the state's page delta, checkpoint and restore |
//! | `daemon::server` | request dispatch, the socket server, `xenod serve` |
//! | `client` | the socket client with the embedded-daemon fallback; tickets made local |

mod error;
mod hooks;

pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod instance;
pub mod migrate;
mod notes;

pub use api::{Envelope, Request};
pub use daemon::Daemon;
pub use error::{Context, Error, Phase, Result};
pub use instance::Instance;
pub use notes::note;
pub use xenod_store::Exit;

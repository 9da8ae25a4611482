//! The `xenod` command line.
//!
//! Exit codes (also in `xenod --help`):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other failure (I/O, database, ...) |
//! | 2 | usage error |
//! | 3 | a reference (name, id, prefix) matches no layer |
//! | 4 | the store is damaged (`verify` found bad or missing chunks) |
//! | 5 | a name record was refused (bad signature, untrusted key, older sequence) |
//! | 6 | bad input: a tree, tar stream or manifest that cannot be stored or exported as given |
//! | 7 | no provider could supply a layer: every peer given (by a ticket, `--from` or the config) is unreachable, was dropped, or lacks it |

mod announce;
mod cli;
mod config;
mod deploy;
mod lazy;
mod migrate;
mod mount;
mod peer_cmds;
mod progress;
mod remote;
mod replicate;
mod serve;
mod stage;
mod statepages;

use std::process::ExitCode;

use clap::Parser;

/// Documented exit codes.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum Exit {
    Failure = 1,
    NotFound = 3,
    Damaged = 4,
    NameRefused = 5,
    BadInput = 6,
    NoProvider = 7,
}

/// An error that carries its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Coded {
    pub code: Exit,
    pub msg: String,
}

fn exit_code(e: &anyhow::Error) -> Exit {
    if let Some(c) = e.downcast_ref::<Coded>() {
        return c.code;
    }
    for cause in e.chain() {
        if let Some(se) = cause.downcast_ref::<xenod_store::Error>() {
            use xenod_store::Error as E;
            return match se {
                E::UnknownRef(_) => Exit::NotFound,
                E::ChunkCorrupt { .. } | E::ChunkMissing { .. } => Exit::Damaged,
                E::Name { .. } => Exit::NameRefused,
                E::BadInput { .. } | E::Manifest { .. } | E::Export { .. } => Exit::BadInput,
                _ => Exit::Failure,
            };
        }
    }
    Exit::Failure
}

fn main() -> ExitCode {
    let args = cli::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("XENOD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenod: error: {e:#}");
            ExitCode::from(exit_code(&e) as u8)
        }
    }
}

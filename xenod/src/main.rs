//! The `xenod` command line: arguments, output (text and `--json`),
//! progress and exit codes. The engine is the `xenod-host` library; the
//! exit codes are its one table ([`xenod_host::Exit`]), shown by `--help`.

mod cli;
mod names_cmds;
mod peer_cmds;
mod progress;
mod repair;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    let cmd = cli::Args::command().after_help(cli::after_help());
    let args = match cli::Args::from_arg_matches(&cmd.get_matches()) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("XENOD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenod: error: {e:#}");
            ExitCode::from(e.exit_code().code())
        }
    }
}

//! The `xenod` command line: arguments, output (text and `--json`),
//! progress and exit codes. The engine is the `xenod-host` library; the
//! exit codes are its one table ([`xenod_host::Exit`]), shown by `--help`.

mod cache_cmds;
mod cli;
mod fed_cmds;
mod generate;
mod names_cmds;
mod net_cmds;
mod peer_cmds;
mod prefetch_cmds;
mod progress;
mod repair;
mod usage_cmds;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, CommandFactory, FromArgMatches};
use xenod_host::Error;

/// The whole command line: the subcommands and options of [`cli::Args`],
/// the exit codes after the help, and the log format, which only this
/// file reads. Completions and man pages are made from it too.
pub(crate) fn command() -> clap::Command {
    cli::Args::command().after_help(cli::after_help()).arg(
        Arg::new(LOG_FORMAT)
            .long("log-format")
            .value_name("FORMAT")
            .value_parser(["text", "json"])
            .default_value("text")
            .env("XENOD_LOG_FORMAT")
            .global(true)
            .help("Logs on stderr (level: $XENOD_LOG): text, coloured only on a terminal, or one JSON object a line"),
    )
}

const LOG_FORMAT: &str = "log_format";

fn main() -> ExitCode {
    let matches = command().get_matches();
    let args = match cli::Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    init_logs(matches.get_one::<String>(LOG_FORMAT).is_some_and(|f| f == "json"));
    let json = args.json;
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            if json {
                eprintln!("{}", error_json(&e));
            } else {
                eprintln!("xenod: error: {e:#}");
            }
            ExitCode::from(code.code())
        }
    }
}

/// Logs to stderr, filtered by `XENOD_LOG` (default `warn`): as JSON
/// lines, or as text with colour only where stderr is a terminal (a
/// journal or a log file gets no escape codes).
fn init_logs(json: bool) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("XENOD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr);
    if json {
        logs.json().flatten_event(true).init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// A failure under `--json`: one object on stderr (stdout keeps only
/// results), with the message, the exit code and, where the error is
/// about one, the file (`path`) or the chunk (`chunk`).
fn error_json(e: &Error) -> serde_json::Value {
    let mut v = serde_json::json!({ "error": e.chain(), "code": e.exit_code().code() });
    if let Some(p) = path(e) {
        v["path"] = p.display().to_string().into();
    }
    if let Some(c) = store_error(e).and_then(xenod_store::Error::chunk) {
        v["chunk"] = c.to_string().into();
    }
    v
}

/// The store's error inside `e`, if that is what it comes down to.
fn store_error(e: &Error) -> Option<&xenod_store::Error> {
    use xenod_cowfs::Error as C;
    match e {
        Error::Store(s) | Error::Cowfs(C::Store(s) | C::MountRef { source: s, .. }) => Some(s),
        Error::Peer(xenod_peer::PeerError::Store(s)) => Some(s),
        Error::Context { source, .. } | Error::Migration { source, .. } => store_error(source),
        _ => None,
    }
}

/// The file or directory `e` is about, if one.
fn path(e: &Error) -> Option<PathBuf> {
    use xenod_cowfs::Error as C;
    match e {
        Error::Cowfs(C::Io { path, .. } | C::BadLower { path, .. } | C::BadUpper { path, .. }) => Some(path.clone()),
        Error::Context { source, .. } | Error::Migration { source, .. } => path(source),
        e => store_error(e).and_then(xenod_store::Error::path),
    }
}

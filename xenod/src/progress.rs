//! Progress on stderr for long work; silent when stderr is not a terminal
//! or output is JSON.

use std::io::IsTerminal;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

pub fn bytes(msg: &str, total: Option<u64>, quiet: bool) -> ProgressBar {
    let pb = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    if quiet || !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
    } else {
        "{spinner} {msg} {bytes} {binary_bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg.to_owned());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

pub fn callback(pb: &ProgressBar) -> xenod_store::Progress {
    let pb = pb.clone();
    Arc::new(move |n| pb.inc(n))
}

/// Draws a request's notes (always, on stderr: JSON goes to stdout) and its
/// fetch progress (a bar, on a terminal and without `--json`).
pub struct Watcher {
    pb: ProgressBar,
    what: String,
}

impl Watcher {
    pub fn new(what: &str, quiet: bool) -> Self {
        Self { pb: bytes(what, None, quiet), what: what.to_owned() }
    }
}

impl xenod_host::client::Watch for Watcher {
    fn note(&self, msg: &str) {
        self.pb.suspend(|| eprintln!("xenod: {msg}"));
    }

    fn progress(&self, p: &Value) {
        self.pb.set_position(p["bytes"].as_u64().unwrap_or(0));
        self.pb.set_message(format!(
            "{} {} {}/{} chunks",
            self.what,
            p["phase"].as_str().unwrap_or(""),
            p["chunks_done"],
            p["chunks_total"]
        ));
    }

    fn done(&self) {
        self.pb.finish_and_clear();
    }
}

//! Progress on stderr for long work: the total, the percentage, the rate
//! and the time left where the total is known. Drawn on a terminal only,
//! unless asked (`--progress`, `XENOD_PROGRESS=1`): then, on a pipe or a
//! log, one plain line a second and the last state when done. Never under
//! `--json` unless asked.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use serde_json::Value;

/// Where progress goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Draw {
    /// Nowhere.
    Off,
    /// On stderr if it is a terminal.
    Terminal,
    /// On stderr whatever it is (`--progress`).
    Forced,
}

impl Draw {
    pub fn new(quiet: bool, forced: bool) -> Self {
        match (forced, quiet) {
            (true, _) => Draw::Forced,
            (false, true) => Draw::Off,
            (false, false) => Draw::Terminal,
        }
    }

    /// Whether progress goes out as plain lines (asked for, not a terminal).
    fn lines(self) -> bool {
        self == Draw::Forced && !std::io::stderr().is_terminal()
    }

    fn target(self) -> ProgressDrawTarget {
        match self {
            Draw::Forced if !std::io::stderr().is_terminal() => {
                ProgressDrawTarget::term_like_with_hz(Box::new(Lines), 1)
            }
            Draw::Forced => ProgressDrawTarget::stderr(),
            Draw::Terminal if std::io::stderr().is_terminal() => ProgressDrawTarget::stderr(),
            _ => ProgressDrawTarget::hidden(),
        }
    }
}

/// A terminal that is not one: each redraw a line of its own.
#[derive(Debug)]
struct Lines;

impl TermLike for Lines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        if s.trim().is_empty() { Ok(()) } else { writeln!(std::io::stderr(), "{s}") }
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.write_line(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

const KNOWN: &str = "{msg} [{bar:30}] {bytes}/{total_bytes} {percent}% {binary_bytes_per_sec} eta {eta}";
const UNKNOWN: &str = "{spinner} {msg} {bytes} {binary_bytes_per_sec}";

pub fn bytes(msg: &str, total: Option<u64>, draw: Draw) -> ProgressBar {
    let pb = match total {
        Some(t) => ProgressBar::with_draw_target(Some(t), draw.target()),
        None => ProgressBar::with_draw_target(None, draw.target()),
    };
    let template = if total.is_some() { KNOWN } else { UNKNOWN };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg.to_owned());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// A bar of a count of `unit` (entries, chunks) with a known total.
pub fn counted(msg: &str, unit: &str, total: u64, draw: Draw) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), draw.target());
    let t = format!("{{msg}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} {{percent}}% {{rate}}/s eta {{eta}}");
    if let Ok(style) = ProgressStyle::with_template(&t) {
        let rate = |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{}", indicatif::HumanCount(s.per_sec() as u64));
        };
        pb.set_style(style.progress_chars("=> ").with_key("rate", rate));
    }
    pb.set_message(msg.to_owned());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// Ends a bar: a terminal's is cleared; as plain lines, the last state
/// (100% when the work is done) is the last line.
pub fn finish(pb: &ProgressBar, draw: Draw) {
    if draw.lines() { pb.finish() } else { pb.finish_and_clear() }
}

/// Progress of work in phases, each with its own total (gc): one bar per
/// phase, ended when the next begins.
pub struct Phases {
    what: String,
    draw: Draw,
    bar: Mutex<Option<ProgressBar>>,
}

impl Phases {
    pub fn new(what: &str, draw: Draw) -> Self {
        Self { what: what.to_owned(), draw, bar: Mutex::new(None) }
    }

    pub fn step(&self, step: xenod_store::GcStep) {
        use xenod_store::{GcPhase, GcStep};
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match step {
            GcStep::Begin(phase, total) => {
                if let Some(pb) = bar.take() {
                    finish(&pb, self.draw);
                }
                let w = &self.what;
                *bar = Some(match phase {
                    GcPhase::Mark => counted(&format!("{w}: marking"), "entries", total, self.draw),
                    GcPhase::Sweep => counted(&format!("{w}: sweeping"), "chunks", total, self.draw),
                    GcPhase::Packs => bytes(&format!("{w}: packs"), Some(total), self.draw),
                });
            }
            GcStep::Done(n) => {
                if let Some(pb) = bar.as_ref() {
                    pb.inc(n);
                }
            }
        }
    }

    /// Ends the last phase's bar.
    pub fn finish(&self) {
        if let Some(pb) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            finish(&pb, self.draw);
        }
    }
}

pub fn callback(pb: &ProgressBar) -> xenod_store::Progress {
    let pb = pb.clone();
    Arc::new(move |n| pb.inc(n))
}

/// Draws a request's notes (always, on stderr: JSON goes to stdout) and its
/// progress (fetches: chunks of the phase done of those wanted, bytes).
pub struct Watcher {
    pb: ProgressBar,
    what: String,
}

impl Watcher {
    pub fn new(what: &str, draw: Draw) -> Self {
        let pb = bytes(what, None, draw);
        Self { pb, what: what.to_owned() }
    }
}

impl xenod_host::client::Watch for Watcher {
    fn note(&self, msg: &str) {
        self.pb.suspend(|| eprintln!("xenod: {msg}"));
    }

    fn progress(&self, p: &Value) {
        let total = p["chunks_total"].as_u64().unwrap_or(0);
        if total > 0 && self.pb.length() != Some(total) {
            // The total is known: chunks done of those wanted, with the rate and ETA.
            self.pb.set_length(total);
            let t = "{msg} [{bar:30}] {pos}/{len} chunks {percent}% {per_sec} eta {eta}";
            if let Ok(style) = ProgressStyle::with_template(t) {
                self.pb.set_style(style.progress_chars("=> "));
            }
            self.pb.reset_eta();
        }
        self.pb.set_position(p["chunks_done"].as_u64().unwrap_or(0));
        let mib = p["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
        self.pb.set_message(format!("{} {} {mib:.1} MiB", self.what, p["phase"].as_str().unwrap_or("")));
    }

    fn done(&self) {
        self.pb.finish_and_clear();
    }
}

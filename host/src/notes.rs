//! What a long operation is doing, told to the client that asked for it.
//!
//! The daemon runs each request inside [`with_notes`]; anything below it
//! calls [`note`] without knowing whether a client listens. Outside a
//! request (an engine embedded in a command) notes go to stderr.

use std::future::Future;

tokio::task_local! {
    /// Where the current request's notes go.
    static NOTES: tokio::sync::mpsc::UnboundedSender<String>;
}

/// Tells the client of the current request what a long operation is
/// doing; on stderr where there is no client (an embedded engine).
pub fn note(msg: impl Into<String>) {
    let msg = msg.into();
    if NOTES.try_with(|tx| tx.send(msg.clone())).is_err() {
        eprintln!("xenod: {msg}");
    }
}

/// Runs `f` with its notes sent to `tx`.
pub async fn with_notes<F: Future>(tx: tokio::sync::mpsc::UnboundedSender<String>, f: F) -> F::Output {
    NOTES.scope(tx, f).await
}

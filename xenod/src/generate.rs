//! `xenod generate` (hidden from `--help`): shell completions and man
//! pages made from the command line's own definition ([`crate::command`]),
//! so they cannot drift from it. `scripts/build-deb.sh` puts them in the
//! Debian package; people installing by hand can run it too:
//!
//! ```text
//! xenod generate completions bash > /usr/share/bash-completion/completions/xenod
//! xenod generate man /usr/local/share/man/man1    # xenod.1, xenod-deploy.1, ...
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::json;
use xenod_host::{Context, Result};

use crate::cli::Ctx;

#[derive(Debug, Subcommand)]
pub enum GenerateCmd {
    /// Print the completion script for SHELL on stdout.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages into DIR: xenod.1 and one page per subcommand
    /// (xenod-deploy.1, xenod-overlay-create.1, ...).
    Man { dir: PathBuf },
}

pub fn run(ctx: &Ctx, cmd: GenerateCmd) -> Result<()> {
    match cmd {
        GenerateCmd::Completions { shell } => {
            let mut cmd = crate::command();
            clap_complete::generate(shell, &mut cmd, "xenod", &mut io::stdout().lock());
            Ok(())
        }
        GenerateCmd::Man { dir } => {
            let pages = man_pages(&dir)?;
            ctx.out(json!({ "dir": dir, "pages": pages }), || pages.join("\n"))
        }
    }
}

/// Writes the man pages into `dir` (created if missing); their file names, sorted.
fn man_pages(dir: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(crate::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut pages: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("xenod") && n.ends_with(".1"))
        .collect();
    pages.sort();
    Ok(pages)
}

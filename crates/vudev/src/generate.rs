//! `vudev completions SHELL` and `vudev man DIR`: shell completions and man pages, generated
//! from the command line's own definition, so that they cannot say other than `--help`.

use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Result<(), String> {
    clap_complete::generate(shell, &mut Cli::command(), "vudev", &mut std::io::stdout());
    Ok(())
}

/// Writes `vudev.1` and a page per subcommand (`vudev-serve.1`, …) into `dir`.
pub fn man(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .map_err(|e| format!("cannot write the man pages into {}: {e}", dir.display()))
}

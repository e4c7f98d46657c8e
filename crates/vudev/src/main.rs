//! vudev: virtio devices in userspace, exported through VDUSE.
//!
//! This file only parses the command line and hands over; see `docs/ARCHITECTURE.md`.

mod backend;
mod cli;
mod export;
mod signals;
mod size;
mod vdpa;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let default = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VUDEV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr closed, a log shipper gone) is dropped:
        // reporting it would write to stderr again, and panic there.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .init();
    let result = match cli.command {
        cli::Command::Export(cli::Export::Vduse(opts)) => export::run_vduse(opts),
        cli::Command::Export(cli::Export::VhostUser(opts)) => export::run_vhost_user(opts),
        cli::Command::Vdpa(cmd) => vdpa::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!, which panics when stderr is gone.
            let _ = writeln!(std::io::stderr(), "vudev: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! vudev: virtio devices in userspace, exported through VDUSE.
//!
//! This file only parses the command line and hands over; see `docs/ARCHITECTURE.md`.

mod backend;
mod cli;
mod ctl;
mod device;
mod durable;
mod export;
mod generate;
mod notify;
mod rpc;
mod sandbox;
mod serve;
mod serving;
mod signals;
mod size;
mod vdpa;
mod vduse;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    let matches = cli::Cli::command().get_matches();
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let default = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VUDEV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr closed, a log shipper gone) is dropped:
        // reporting it would write to stderr again, and panic there.
        .log_internal_errors(false)
        .with_target(false);
    match cli.log_format {
        cli::LogFormat::Json => logs.json().init(),
        cli::LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
    }
    let result = match cli.command {
        cli::Command::Export(cli::ExportCommand::Vduse {
            args,
            device_fd,
            sandbox,
        }) => export::run_vduse(args, device_fd, sandbox),
        cli::Command::Export(cli::ExportCommand::VhostUser { args, sandbox }) => {
            export::run_vhost_user(args, sandbox)
        }
        cli::Command::Vduse(cmd) => vduse::run(cmd),
        cli::Command::Serve(args) => serve::run(args),
        cli::Command::Ctl(args) => {
            // `ctl add TRANSPORT …`: the options as given, which are what the daemon is sent.
            let add = matches
                .subcommand_matches("ctl")
                .and_then(|m| m.subcommand_matches("add"))
                .and_then(|m| m.subcommand())
                .map(|(_, m)| m);
            ctl::run(args, add)
        }
        cli::Command::Vdpa(cmd) => vdpa::run(cmd),
        cli::Command::Completions { shell } => generate::completions(shell),
        cli::Command::Man { dir } => generate::man(&dir),
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

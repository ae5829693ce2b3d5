//! The `mkt` binary: parse, set up logging, run, print the error chain.

use clap::Parser;
use mkt::cli::{self, Cli};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

fn main() {
    mkt::util::signal::default_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version exit 0; usage errors exit 2.
        Err(e) => e.exit(),
    };
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person's terminal, never into a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();

    let code = match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain, one cause a line.
            eprintln!("mkt: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            // 130 after Ctrl-C, 143 after SIGTERM, as shells report them.
            mkt::util::signal::failure_status()
        }
    };
    std::process::exit(code);
}

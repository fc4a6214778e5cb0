//! The `moai` binary: command-line parsing and wiring. Everything with logic lives in the
//! library crates; this file decides which command runs and turns errors into exit codes.

mod cli;
mod logging;
mod serve;
mod token;
mod units;
mod wait_ready;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

/// See `ServeArgs::worker_threads`.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let workers = match &cli.command {
        None => cli.serve.worker_threads.map(usize::from),
        Some(Command::Serve(args)) => args.worker_threads.map(usize::from),
        Some(_) => Some(1), // the client commands make one request at a time
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers.unwrap_or_else(default_worker_threads));
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moai: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None => serve::run(cli.serve).await,
            Some(Command::Serve(args)) => serve::run(args).await,
            Some(Command::WaitReady(args)) => wait_ready::run(args).await,
            Some(Command::Token(args)) => token::run(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moai: {e:#}");
            ExitCode::FAILURE
        }
    }
}

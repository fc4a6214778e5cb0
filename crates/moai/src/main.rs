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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
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

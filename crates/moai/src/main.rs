//! The `moai` binary: command-line parsing and wiring. Everything with logic lives in the
//! library crates; this file decides which command runs and turns errors into exit codes.

mod agent;
mod backup;
mod cli;
mod doc;
mod llm;
mod logging;
mod migrate;
mod progress;
mod running;
mod serve;
mod storage;
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

/// Panics the Yjs engine contains (yrs on hostile input: the document is closed and reloaded
/// from storage) are logged as a warning with their message; any other panic is reported as
/// the default hook reports it.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if moai_yjs::apply::panic_is_contained() {
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned());
            tracing::warn!(%location, message = message.as_deref().unwrap_or("?"), "the Yjs library failed on a document; it is closed and reloaded from storage");
        } else {
            default(info);
        }
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
    let cli = Cli::parse();
    let workers = match &cli.command {
        None => cli.serve.worker_threads.map(usize::from),
        Some(Command::Serve(args)) => args.worker_threads.map(usize::from),
        // migrate: several storage reads and writes at once, and yrs work.
        Some(Command::Migrate(_)) | Some(Command::Doc(_)) => None,
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
            Some(Command::Migrate(args)) => migrate::run(args).await,
            Some(Command::Backup(args)) => tokio::task::spawn_blocking(move || backup::backup(args)).await?,
            Some(Command::Restore(args)) => tokio::task::spawn_blocking(move || backup::restore(args)).await?,
            Some(Command::Doc(args)) => doc::run(args).await,
            Some(Command::Agent(args)) => agent::run(args),
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

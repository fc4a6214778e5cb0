//! yjs-load: load generator, bare relay and report tool of moai's Yjs benchmark
//! (bench/run-yjs.sh drives it; see bench/README.md).
//!
//! Every scenario prints one JSON report on stdout (progress goes to stderr). All traffic goes
//! to loopback addresses only, and every loop is bounded in count and time.

mod bigdoc;
mod client;
mod cojson_floor;
mod common;
mod fanout;
mod idle;
mod probe;
mod procfs;
mod proto;
mod relay;
mod report;
mod stats;
mod track;
mod ydoc;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "yjs-load", about = "Yjs (y-websocket / Hocuspocus) benchmark load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Tokio worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Case name copied into the report (e.g. fanout-paced vs fanout-max); default: the scenario.
    #[arg(long, global = true)]
    case: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// N docs × M clients, W writers per doc: deliveries/s and latency.
    Fanout(fanout::FanoutArgs),
    /// Single-character edit latency on a large (default 10 MiB) document.
    BigDoc(bigdoc::BigDocArgs),
    /// Server RSS per idle connection (needs --server-pid).
    Idle(idle::IdleArgs),
    /// Bare broadcast relay (no CRDT, no storage): the ceiling.
    Relay(relay::RelayArgs),
    /// Bare CoJSON-shaped fan-out relay (bench/cojson/floor.sh): the per-delivery I/O floor.
    CojsonFloor(cojson_floor::FloorArgs),
    /// Exit 0 once one client can connect and sync (retries until --wait-s).
    Probe(probe::ProbeArgs),
    /// Markdown table of medians from a directory of JSON reports.
    Report(report::ReportArgs),
}

fn main() {
    let cli = Cli::parse();
    // cojson-floor --current-thread: the same relay without cross-thread wakeups.
    let current = matches!(&cli.command, Command::CojsonFloor(a) if a.current_thread);
    let mut rt = if current {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    rt.enable_all();
    if let (Some(n), false) = (cli.threads, current) {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("yjs-load: cannot start runtime: {e}");
            std::process::exit(2);
        }
    };
    let case = cli.case.clone();
    let result = rt.block_on(async move {
        let report = match cli.command {
            Command::Fanout(a) => fanout::run(a).await?,
            Command::BigDoc(a) => bigdoc::run(a).await?,
            Command::Idle(a) => idle::run(a).await?,
            Command::Relay(a) => return relay::run(a).await,
            Command::CojsonFloor(a) => return cojson_floor::run(a).await,
            Command::Probe(a) => return probe::run(a).await,
            Command::Report(a) => return report::run(a),
        };
        let mut report = report;
        let name = case.unwrap_or_else(|| report["scenario"].as_str().unwrap_or("").to_owned());
        fanout::merge(&mut report, serde_json::json!({ "case": name }));
        println!("{}", serde_json::to_string_pretty(&report)?);
        anyhow::Ok(())
    });
    // Do not wait for lingering socket tasks on the way out.
    rt.shutdown_background();
    if let Err(e) = result {
        eprintln!("yjs-load: {e:#}");
        std::process::exit(1);
    }
}

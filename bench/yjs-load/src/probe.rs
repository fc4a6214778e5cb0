//! `probe`: is a Yjs server up and speaking the protocol? One client connects to a throwaway
//! document and waits for SyncStep2. Retries until `--wait-s` (servers start asynchronously).

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::client::Handler;
use crate::common::{Run, Target};

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value_t = 15)]
    pub wait_s: u64,
}

struct Nothing;

impl Handler for Nothing {
    fn on_update(&mut self, _u: &[u8], _at: Instant) {}
}

pub async fn run(mut a: ProbeArgs) -> Result<()> {
    a.target.connect_timeout_s = a.target.connect_timeout_s.min(3);
    let run = Run::new(&a.target, None).await?;
    let deadline = Instant::now() + Duration::from_secs(a.wait_s);
    let doc = format!("{}-probe", a.target.doc_prefix());
    loop {
        match run.open_synced(&doc, Nothing).await {
            Ok((session, took)) => {
                eprintln!("[yjs-load] probe: synced with {} in {took:?}", a.target.url);
                run.stop();
                drop(session.out);
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => return Err(e.context("probe failed")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

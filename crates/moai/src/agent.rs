//! `moai agent generate`: a new identity for participant mode (docs/participant.md): an agent
//! secret from the operating system's CSPRNG and the account id derived from it. Printed as
//! `PEER_ID=…` and `PEER_SECRET=…` lines, or with `--write-env FILE` written into a .env file
//! (earlier `PEER_ID`/`PEER_SECRET` lines replaced, other lines kept, the secret never printed).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use moai_cojson::AgentIdentity;

#[derive(Args, Debug)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Make a new agent secret and its account id: `moai agent generate --write-env .env`.
    Generate {
        /// Write PEER_ID and PEER_SECRET into this .env file (created if missing; earlier
        /// PEER_ID/PEER_SECRET lines are replaced, other lines kept) instead of printing the secret.
        #[arg(long)]
        write_env: Option<PathBuf>,
    },
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AgentCommand::Generate { write_env } => {
            let mut bytes = [0u8; 64];
            getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness from the operating system: {e}"))?;
            let identity = AgentIdentity::from_random(&bytes);
            match write_env {
                None => {
                    println!("PEER_ID={}", identity.account_id());
                    println!("PEER_SECRET={}", identity.secret_string());
                }
                Some(path) => {
                    write_env_file(&path, identity.account_id(), &identity.secret_string())?;
                    println!("PEER_ID={}", identity.account_id());
                    eprintln!("moai agent generate: PEER_ID and PEER_SECRET written to {}", path.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Replaces the PEER_ID and PEER_SECRET lines of a .env file (keeping every other line), written
/// to a temporary file and renamed, readable by its owner only.
fn write_env_file(path: &Path, peer_id: &str, peer_secret: &str) -> anyhow::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let ours = |line: &str| {
        let l = line.trim_start().trim_start_matches("export ").trim_start();
        l.starts_with("PEER_ID=") || l.starts_with("PEER_SECRET=")
    };
    let mut text: String = old.lines().filter(|l| !ours(l)).map(|l| format!("{l}\n")).collect();
    text.push_str(&format!("PEER_ID={peer_id}\nPEER_SECRET={peer_secret}\n"));
    let tmp = PathBuf::from(format!("{}.tmp-{}", path.display(), std::process::id()));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

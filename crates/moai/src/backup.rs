//! `moai backup PATH` and `moai restore BACKUP`: a consistent copy of the embedded SQLite
//! database taken while moai serves, and putting one back (docs/operations.md). PostgreSQL and
//! S3 have their own tools (pg_dump, bucket versioning); these commands say so instead of
//! pretending.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

use crate::cli::StoreArgs;
use crate::progress::ByteProgress;
use crate::running::moai_answers;
use crate::storage::StorageUrl;

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Where to write the backup (a new file: an existing one is never overwritten).
    pub path: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Database pages copied per step (tests use 1 to make a backup take many steps while
    /// writes go on).
    #[arg(long, hide = true, default_value_t = moai_storage::BACKUP_PAGES_PER_STEP)]
    pub pages_per_step: i32,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The backup to put back (made by `moai backup`); it is checked before anything changes.
    pub backup: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Where the server that uses this database listens: restore refuses while a moai answers
    /// there (it holds documents in memory and would not see the restored data).
    #[arg(long, env = "HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "PORT", default_value_t = 4201)]
    pub port: u16,
}

fn sqlite_path(store: &StoreArgs, command: &str) -> anyhow::Result<PathBuf> {
    match store.storage_url()? {
        StorageUrl::Sqlite(path) => Ok(path),
        StorageUrl::Postgres(_) => bail!(
            "moai {command} copies the embedded SQLite database; for PostgreSQL storage use pg_dump/pg_restore \
             of the schema moai_storage (and keep S3 snapshots with bucket versioning), see docs/operations.md"
        ),
    }
}

pub fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let source = sqlite_path(&args.store, "backup")?;
    let mut progress = ByteProgress::new("backup", "pages");
    let info =
        moai_storage::backup_sqlite(&source, &args.path, args.pages_per_step, |p| progress.update(p.done, p.total))
            .with_context(|| format!("backing up {} to {}", source.display(), args.path.display()))?;
    progress.finish();
    eprintln!(
        "moai backup: {} → {} ({} documents, {} CoValues, {} bytes, schema {}); checked",
        source.display(),
        args.path.display(),
        info.documents,
        info.covalues,
        info.bytes,
        info.schema_version
    );
    Ok(ExitCode::SUCCESS)
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let target = sqlite_path(&args.store, "restore")?;
    if moai_answers(&args.host, args.port) {
        bail!(
            "a moai answers on {}:{}; stop it first (it holds documents in memory and would not see the restored data)",
            args.host,
            args.port
        );
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut progress = ByteProgress::new("restore", "bytes");
    let (info, kept) = moai_storage::restore_sqlite(&args.backup, &target, now, |p| progress.update(p.done, p.total))
        .with_context(|| format!("restoring {} into {}", args.backup.display(), target.display()))?;
    progress.finish();
    eprintln!(
        "moai restore: {} → {} ({} documents, {} CoValues, schema {})",
        args.backup.display(),
        target.display(),
        info.documents,
        info.covalues,
        info.schema_version
    );
    if let Some(kept) = kept {
        eprintln!("moai restore: the database it replaced is kept as {}", kept.display());
    }
    Ok(ExitCode::SUCCESS)
}

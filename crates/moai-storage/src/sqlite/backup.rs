//! Backing up and restoring the embedded database (`moai backup`, `moai restore`).
//!
//! Why SQLite's online backup API and not a file copy: copying `local-sync.db` while moai writes
//! it can mix pages of different transactions, and misses what is still in the WAL file. The
//! backup reads one consistent snapshot through SQLite itself, in steps (so it can report
//! progress), while moai keeps serving: the source is opened read-only and a read transaction is
//! held for the whole copy, which in WAL mode never blocks moai's writer, and pins the snapshot
//! so the copy does not restart when moai commits meanwhile. The copy is written to a temporary
//! file, checked (`PRAGMA integrity_check`), synced and only then renamed into place: a failed
//! backup never leaves a half-written file under the requested name.
//!
//! Restoring replaces a database file with a checked backup. It keeps the replaced file beside
//! it (`<db>.before-restore-<unix seconds>`) and removes the old file's `-wal` and `-shm`, which
//! belong to the old database and would corrupt the new one if SQLite replayed them.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::migrations::SCHEMA_VERSION;
use crate::StorageError;

/// How far a backup or restore is, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyProgress {
    pub done: u64,
    pub total: u64,
}

/// What a backup file holds, as checked before it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub schema_version: i64,
    pub documents: u64,
    pub covalues: u64,
    pub bytes: u64,
}

/// Pages copied per backup step by default (4 KiB pages: 4 MiB a step).
pub const PAGES_PER_STEP: i32 = 1024;

fn open_error(path: &Path) -> impl FnOnce(rusqlite::Error) -> StorageError + '_ {
    move |source| StorageError::Open { path: path.display().to_string(), source }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::CommitFailed(format!("{what} {}: {e}", path.display()))
}

/// Copies the database at `source` (which moai may be serving) to `dest`, consistently, in steps
/// of `pages_per_step` pages ([`PAGES_PER_STEP`]). `dest` must not exist.
pub fn backup_sqlite(
    source: &Path,
    dest: &Path,
    pages_per_step: i32,
    mut progress: impl FnMut(CopyProgress),
) -> Result<BackupInfo, StorageError> {
    if !source.exists() {
        return Err(StorageError::CommitFailed(format!("no database at {}", source.display())));
    }
    if dest.exists() {
        return Err(StorageError::CommitFailed(format!("{} exists; choose a new file", dest.display())));
    }
    let tmp = temporary_beside(dest);
    let result = (|| {
        let src =
            Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(open_error(source))?;
        src.busy_timeout(Duration::from_secs(30))?;
        // Pin one snapshot for the whole copy (see the module docs).
        src.execute_batch("BEGIN")?;
        src.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))?;
        let mut dst = Connection::open(&tmp).map_err(open_error(&tmp))?;
        {
            let backup = Backup::new(&src, &mut dst)?;
            loop {
                let step = backup.step(pages_per_step.max(1))?;
                let p = backup.progress();
                let total = p.pagecount.max(0) as u64;
                progress(CopyProgress { done: total.saturating_sub(p.remaining.max(0) as u64), total });
                match step {
                    StepResult::Done => break,
                    StepResult::More => {}
                    // Another connection holds a lock the copy needs for a moment.
                    StepResult::Busy | StepResult::Locked => std::thread::sleep(Duration::from_millis(20)),
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        src.execute_batch("COMMIT")?;
        // A single file with no WAL beside it: what a backup should be.
        dst.pragma_update(None, "journal_mode", "DELETE")?;
        drop(dst);
        let info = check_sqlite_backup(&tmp)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io_error("syncing", &tmp, e))?;
        fs::rename(&tmp, dest).map_err(|e| io_error("renaming the backup to", dest, e))?;
        sync_parent(dest);
        Ok(info)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Opens `path` read-only and checks it is a whole moai database this binary can open.
pub fn check_sqlite_backup(path: &Path) -> Result<BackupInfo, StorageError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(open_error(path))?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(StorageError::CommitFailed(format!("{} fails its integrity check: {check}", path.display())));
    }
    let schema_version: i64 = conn
        .query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0))
        .map_err(|_| StorageError::CommitFailed(format!("{} is not a moai database", path.display())))?;
    if schema_version > SCHEMA_VERSION {
        return Err(StorageError::SchemaTooNew { found: schema_version, supported: SCHEMA_VERSION });
    }
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).map(|n| n.max(0) as u64);
    let documents = count("SELECT count(*) FROM (SELECT doc FROM doc_snapshots UNION SELECT doc FROM doc_updates)")?;
    let covalues = if schema_version >= 2 { count("SELECT count(*) FROM cojson_covalues")? } else { 0 };
    let bytes = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(BackupInfo { schema_version, documents, covalues, bytes })
}

/// Replaces the database at `target` with the backup at `backup` (checked first). moai must not
/// be serving `target`. Returns where the replaced database was kept, if there was one.
pub fn restore_sqlite(
    backup: &Path,
    target: &Path,
    now_unix: u64,
    mut progress: impl FnMut(CopyProgress),
) -> Result<(BackupInfo, Option<PathBuf>), StorageError> {
    let info = check_sqlite_backup(backup)?;
    let tmp = temporary_beside(target);
    let copied = (|| {
        let mut from = File::open(backup).map_err(|e| io_error("opening", backup, e))?;
        let mut to = File::create(&tmp).map_err(|e| io_error("creating", &tmp, e))?;
        let total = from.metadata().map(|m| m.len()).unwrap_or(0);
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = from.read(&mut buf).map_err(|e| io_error("reading", backup, e))?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n]).map_err(|e| io_error("writing", &tmp, e))?;
            done += n as u64;
            progress(CopyProgress { done, total });
        }
        to.sync_all().map_err(|e| io_error("syncing", &tmp, e))
    })();
    if let Err(e) = copied {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let kept = if target.exists() {
        let kept = PathBuf::from(format!("{}.before-restore-{now_unix}", target.display()));
        fs::rename(target, &kept).map_err(|e| io_error("keeping the replaced database as", &kept, e))?;
        Some(kept)
    } else {
        None
    };
    for suffix in ["-wal", "-shm"] {
        let stale = PathBuf::from(format!("{}{suffix}", target.display()));
        if stale.exists() {
            match &kept {
                // Keep the old WAL with the old database: together they are the old state.
                Some(kept) => {
                    let to = PathBuf::from(format!("{}{suffix}", kept.display()));
                    fs::rename(&stale, &to).map_err(|e| io_error("moving aside", &stale, e))?;
                }
                None => fs::remove_file(&stale).map_err(|e| io_error("removing", &stale, e))?,
            }
        }
    }
    fs::rename(&tmp, target).map_err(|e| io_error("renaming the restored database to", target, e))?;
    sync_parent(target);
    Ok((info, kept))
}

fn temporary_beside(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial-{}", path.display(), std::process::id()))
}

/// Makes a rename durable (best effort: not every filesystem lets a directory be synced).
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
}

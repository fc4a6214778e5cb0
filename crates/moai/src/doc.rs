//! `moai doc export|import|list|stats`: Yjs documents in and out of moai's storage, as v1 updates
//! any Yjs tool reads (`Y.applyUpdate(doc, bytes)`), on any backend (SQLite, PostgreSQL, with
//! snapshots in S3). Export, list and stats read and may run while moai serves; import writes
//! the journal directly, so it refuses while a moai answers (use `POST /api/v1/docs/{id}/update`
//! on a running server, which connected clients see at once).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use moai_storage::{DocJournal, Inventory, NoopObserver, SnapshotObjects, StoredDoc};
use moai_yjs::yrs::updates::encoder::Encode;
use moai_yjs::yrs::{ReadTxn, StateVector, Transact};
use moai_yjs::{Action, Room, RoomError};

use crate::cli::StoreArgs;
use crate::progress::ByteProgress;
use crate::running::moai_answers;
use crate::storage::{self, Storage, StorageUrl};

#[derive(Args, Debug)]
pub struct DocArgs {
    #[command(subcommand)]
    pub command: DocCommand,
}

#[derive(Subcommand, Debug)]
pub enum DocCommand {
    /// Write a document's whole state as one Yjs v1 update to stdout: `moai doc export notes > notes.bin`.
    Export {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Merge a Yjs v1 update from stdin into a document (created if missing): `moai doc import notes < notes.bin`.
    /// Refused while a moai answers on --host/--port.
    Import {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, env = "HOST", default_value = "127.0.0.1")]
        host: String,
        #[arg(long, env = "PORT", default_value_t = 4201)]
        port: u16,
    },
    /// Every stored document id, one per line.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Sizes of one document (or, without an id, of all of them) as JSON.
    Stats {
        id: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Largest update `doc import` reads (a document's full state).
const MAX_IMPORT_BYTES: u64 = 1 << 30;

struct Opened {
    storage: Storage,
    journal: Arc<dyn DocJournal>,
}

async fn open(store: &StoreArgs) -> anyhow::Result<Opened> {
    let url = store.storage_url()?;
    if let StorageUrl::Sqlite(path) = &url {
        if !path.exists() {
            bail!("no database at {} (set --db-path or --storage)", path.display());
        }
    }
    let storage = Storage::open(&url, true, Arc::new(NoopObserver)).await?;
    let journal = match storage::object_storage(store)? {
        None => storage.journal(),
        Some(options) => {
            let target = options.target();
            let objects = SnapshotObjects::open(options).await.with_context(|| format!("opening {target}"))?;
            storage.journal_with_snapshots_in(objects)
        }
    };
    Ok(Opened { storage, journal })
}

fn inventory(storage: &Storage) -> &dyn Inventory {
    match storage {
        Storage::Sqlite(s) => s,
        Storage::Postgres(s) => s,
    }
}

fn exists(stored: &StoredDoc) -> bool {
    stored.snapshot.is_some() || !stored.updates.is_empty()
}

fn merged(id: &str, stored: &StoredDoc) -> anyhow::Result<moai_yjs::yrs::Doc> {
    moai_yjs::load_doc(stored.snapshot.as_deref(), stored.updates.iter().map(|(_, u)| u.as_slice()))
        .with_context(|| format!("document {id} does not load"))
}

pub async fn run(args: DocArgs) -> anyhow::Result<ExitCode> {
    if let DocCommand::Import { host, port, .. } = &args.command {
        if moai_answers(host, *port) {
            bail!(
                "a moai answers on {host}:{port}; import through it instead, so connected clients see it: \
                 curl -X POST --data-binary @doc.bin http://{host}:{port}/api/v1/docs/<id>/update"
            );
        }
    }
    let store = match &args.command {
        DocCommand::Export { store, .. }
        | DocCommand::Import { store, .. }
        | DocCommand::List { store }
        | DocCommand::Stats { store, .. } => store,
    };
    let opened = open(store).await?;
    let result = command(&args.command, &opened).await;
    opened.storage.close().await.context("closing storage")?;
    result
}

async fn command(command: &DocCommand, opened: &Opened) -> anyhow::Result<ExitCode> {
    match command {
        DocCommand::Export { id, .. } => {
            let stored = opened.journal.load(id).await?;
            if !exists(&stored) {
                bail!("no document {id}");
            }
            let doc = merged(id, &stored)?;
            let update = doc.transact().encode_state_as_update_v1(&StateVector::default());
            let mut out = std::io::stdout().lock();
            out.write_all(&update).context("writing to stdout")?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        DocCommand::Import { id, .. } => {
            let update = read_stdin()?;
            // The server's own checks (plausibility, the Yjs decoder) decide what is accepted.
            let mut room = Room::new(id.as_str());
            let persisted: Vec<Vec<u8>> = match room.apply_http_update(&update) {
                Ok(actions) => persists(actions),
                Err(RoomError::InvalidUpdate { reason, .. }) => bail!("not a valid Yjs v1 update: {reason}"),
                Err(RoomError::MissingDependencies { .. }) => {
                    bail!("the update builds on changes it does not carry; export the full state and import that")
                }
                Err(e) => bail!("the update could not be applied: {e}"),
            };
            if persisted.is_empty() {
                eprintln!("moai doc import: the update is empty; nothing written");
                return Ok(ExitCode::SUCCESS);
            }
            let existed = exists(&opened.journal.load(id).await?);
            opened.journal.append_many(id, persisted).await.context("writing the update")?;
            eprintln!(
                "moai doc import: {} bytes merged into {} document {id}",
                update.len(),
                if existed { "the existing" } else { "the new" }
            );
            Ok(ExitCode::SUCCESS)
        }
        DocCommand::List { .. } => {
            let mut out = std::io::stdout().lock();
            let mut after: Option<String> = None;
            loop {
                let page = inventory(&opened.storage).list_docs(after.as_deref(), 1000).await?;
                for id in &page {
                    writeln!(out, "{id}")?;
                }
                match page.last() {
                    Some(last) if page.len() == 1000 => after = Some(last.clone()),
                    _ => break,
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DocCommand::Stats { id: Some(id), .. } => {
            let stored = opened.journal.load(id).await?;
            if !exists(&stored) {
                bail!("no document {id}");
            }
            println!("{}", serde_json::to_string_pretty(&stats(id, &stored)?)?);
            Ok(ExitCode::SUCCESS)
        }
        DocCommand::Stats { id: None, .. } => {
            let (mut documents, mut snapshot_bytes, mut journal_bytes, mut entries) = (0u64, 0u64, 0u64, 0u64);
            let mut after: Option<String> = None;
            loop {
                let page = inventory(&opened.storage).list_docs(after.as_deref(), 1000).await?;
                for id in &page {
                    let stored = opened.journal.load(id).await?;
                    documents += 1;
                    snapshot_bytes += stored.snapshot.as_ref().map_or(0, |s| s.len() as u64);
                    journal_bytes += stored.journal_bytes() as u64;
                    entries += stored.updates.len() as u64;
                }
                match page.last() {
                    Some(last) if page.len() == 1000 => after = Some(last.clone()),
                    _ => break,
                }
            }
            let v = serde_json::json!({
                "documents": documents,
                "snapshot_bytes": snapshot_bytes,
                "journal_entries": entries,
                "journal_bytes": journal_bytes,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn persists(actions: Vec<Action>) -> Vec<Vec<u8>> {
    actions
        .into_iter()
        .filter_map(|a| match a {
            Action::Persist { update } => Some(update),
            _ => None,
        })
        .collect()
}

fn stats(id: &str, stored: &StoredDoc) -> anyhow::Result<serde_json::Value> {
    let doc = merged(id, stored)?;
    let txn = doc.transact();
    let full = txn.encode_state_as_update_v1(&StateVector::default());
    let sv = txn.state_vector();
    Ok(serde_json::json!({
        "id": id,
        "snapshot_bytes": stored.snapshot.as_ref().map_or(0, Vec::len),
        "journal_entries": stored.updates.len(),
        "journal_bytes": stored.journal_bytes(),
        "state_bytes": full.len(),
        "clients": sv.len(),
        "state_vector_bytes": sv.encode_v1().len(),
    }))
}

/// Reads stdin whole (bounded), with progress for large inputs.
fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut input = std::io::stdin().lock().take(MAX_IMPORT_BYTES + 1);
    let mut bytes = Vec::new();
    let mut progress = ByteProgress::new("doc import", "bytes read");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf).context("reading stdin")?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
        progress.update(bytes.len() as u64, bytes.len() as u64);
    }
    progress.finish();
    if bytes.len() as u64 > MAX_IMPORT_BYTES {
        bail!("the update is larger than {MAX_IMPORT_BYTES} bytes");
    }
    Ok(bytes)
}

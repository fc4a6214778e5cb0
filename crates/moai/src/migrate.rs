//! `moai migrate --from URL --to URL`: copies everything a moai database holds into another one,
//! e.g. from the embedded SQLite file to PostgreSQL when one machine is no longer enough (or
//! back): Yjs documents (the snapshot and the journal after it) and CoJSON CoValues (header,
//! sessions with their transactions, last and checkpoint signatures, the deleted flag).
//!
//! It goes through the storage traits only (`Inventory` to list, `DocJournal` and `CoValueStore`
//! to read and write), so every pair of backends works, in either direction. The decisions
//! (docs/storage.md, "Moving to PostgreSQL"):
//!
//! - **A target with other data is refused** before anything is written: the target may be empty
//!   or hold only what an earlier run of this migration wrote (every document and CoValue in it
//!   is contained in the source's). `--merge` writes into any target: Yjs documents are merged
//!   (their union, as CRDTs merge), CoValue sessions are extended; a CoValue whose history
//!   diverges is reported and left as it is.
//! - **Re-running is safe and resumes**: an item already equal is skipped, an item the target
//!   holds part of gets only what it lacks (a Yjs diff against the target's state vector, the
//!   missing tail of each CoValue session). Nothing is ever written twice or overwritten.
//! - **It verifies at the end**: the id lists of both sides, and every item: each Yjs document's
//!   merged state (state vector, delete set and pending structs, through yrs) equals the
//!   source's, each CoValue equals the source's field by field.
//! - **The source may be served meanwhile, but stop it for the final run**: each item is read in
//!   one consistent read, the whole source is not. A write that lands in the source after its
//!   item was copied is not in the target; verification then fails and says so, and a second run
//!   with moai stopped copies just the difference.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use moai_storage::{
    BytesSinceSignature, CoValueAppend, CoValueRecord, CoValueStore, DocJournal, Folded, Inventory, NoopObserver,
    SessionAppendRecord, SessionRecord, StoredDoc,
};
use moai_yjs::yrs::updates::encoder::Encode;
use moai_yjs::yrs::{Doc, ReadTxn, Snapshot, StateVector, Transact};
use tokio::task::JoinSet;

use crate::storage::{self, Storage, StorageUrl};

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The database to copy from: `sqlite:PATH` or `postgres://user:password@host:port/database`.
    /// Stop the moai serving it before the final run (see docs/storage.md).
    #[arg(long, env = "MOAI_MIGRATE_FROM", hide_env_values = true)]
    pub from: String,
    /// The database to copy into, same forms; created and migrated if needed. It must be empty
    /// or hold only what an earlier run of this migration wrote, unless --merge.
    #[arg(long, env = "MOAI_MIGRATE_TO", hide_env_values = true)]
    pub to: String,
    /// Also write into a target that holds other data: documents on both sides are merged (the
    /// union of their edits), CoValue sessions are extended. A CoValue whose history differs
    /// (another header, a diverging session) is reported and left as it is.
    #[arg(long)]
    pub merge: bool,
    /// Documents and CoValues copied at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Progress on stderr: a bar on a terminal, else a line at most once a second (auto), always
    /// lines, or nothing.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Lines,
    None,
}

/// Ids are listed this many at a time.
const PAGE: usize = 1000;
/// A document's journal is copied in appends of at most this many entries or bytes.
const APPEND_ENTRIES: usize = 1000;
const APPEND_BYTES: usize = 8 << 20;
/// Ids shown when a check fails.
const EXAMPLES: usize = 5;

pub async fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let from = storage::parse_url(&args.from).map_err(|why| anyhow::anyhow!("--from: {why}"))?;
    let to = storage::parse_url(&args.to).map_err(|why| anyhow::anyhow!("--to: {why}"))?;
    if same_place(&from, &to) {
        bail!("--from and --to name the same database ({from})");
    }
    if let StorageUrl::Sqlite(path) = &from {
        // Opening creates a missing file: a typo would "migrate" an empty new database.
        if !path.is_file() {
            bail!("--from: there is no database file at {}", path.display());
        }
    }
    let source = Side::open(&from).await.context("opening the source")?;
    let target = Side::open(&to).await.context("opening the target")?;
    let mut progress = Progress::new(args.progress);
    let result = migrate(&source, &target, &args, &mut progress).await;
    progress.clear();
    // Close both whatever happened: the target's queued writes are committed (they are
    // acknowledged only then), and a re-run resumes from whatever is in it.
    let closed = (source.storage.close().await, target.storage.close().await);
    let report = result?;
    closed.0.context("closing the source")?;
    closed.1.context("closing the target")?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{report}");
    Ok(ExitCode::SUCCESS)
}

/// Storage logs (a migration applied to the target's schema, a failing backend) at warn and up
/// unless RUST_LOG says otherwise; progress and the report are this command's own output.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn same_place(a: &StorageUrl, b: &StorageUrl) -> bool {
    match (a, b) {
        (StorageUrl::Sqlite(a), StorageUrl::Sqlite(b)) => {
            // The target may not exist yet: compare canonical directories and file names.
            let canonical = |p: &std::path::Path| {
                let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
                dir.canonicalize().ok().map(|d| d.join(p.file_name().unwrap_or_default()))
            };
            a == b || (canonical(a).is_some() && canonical(a) == canonical(b))
        }
        (StorageUrl::Postgres(a), StorageUrl::Postgres(b)) => a == b,
        _ => false,
    }
}

/// One open database with the three views the migration uses.
struct Side {
    url: StorageUrl,
    storage: Storage,
    journal: Arc<dyn DocJournal>,
    covalues: Arc<dyn CoValueStore>,
    inventory: Arc<dyn Inventory>,
}

impl Side {
    async fn open(url: &StorageUrl) -> anyhow::Result<Side> {
        let storage = Storage::open(url, true, Arc::new(NoopObserver)).await?;
        let inventory: Arc<dyn Inventory> = match &storage {
            Storage::Sqlite(s) => Arc::new(s.clone()),
            Storage::Postgres(s) => Arc::new(s.clone()),
        };
        Ok(Side { url: url.clone(), journal: storage.journal(), covalues: storage.covalues(), inventory, storage })
    }

    async fn ids(&self, kind: Kind) -> anyhow::Result<Vec<String>> {
        let mut all: Vec<String> = Vec::new();
        loop {
            let after = all.last().map(String::as_str);
            let page = match kind {
                Kind::Doc => self.inventory.list_docs(after, PAGE).await,
                Kind::CoValue => self.inventory.list_covalues(after, PAGE).await,
            }
            .with_context(|| format!("listing the {}s of {}", kind.noun(), self.url))?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Doc,
    CoValue,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Doc => "document",
            Kind::CoValue => "CoValue",
        }
    }
}

/// What copying one item did.
#[derive(Debug)]
enum Outcome {
    /// The target did not have it: copied as stored (same snapshot, same journal entries).
    Copied,
    /// The target had part of it (an earlier run, or the source changed since): completed.
    CaughtUp,
    /// --merge: the target had other data too; the source's was added.
    Merged,
    /// Already equal.
    Unchanged,
    /// Left as it is (--merge, CoValue histories that cannot be merged), with the reason.
    Conflict(String),
}

#[derive(Default)]
struct Tally {
    copied: usize,
    caught_up: usize,
    merged: usize,
    unchanged: usize,
    conflicts: Vec<(String, String)>,
}

impl Tally {
    fn add(&mut self, id: String, outcome: Outcome) {
        match outcome {
            Outcome::Copied => self.copied += 1,
            Outcome::CaughtUp => self.caught_up += 1,
            Outcome::Merged => self.merged += 1,
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Conflict(why) => self.conflicts.push((id, why)),
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} copied, {} completed, {} already there", self.copied, self.caught_up, self.unchanged)?;
        if self.merged > 0 {
            write!(f, ", {} merged", self.merged)?;
        }
        if !self.conflicts.is_empty() {
            write!(f, ", {} left as they were (conflicts)", self.conflicts.len())?;
        }
        Ok(())
    }
}

struct Report {
    from: String,
    to: String,
    docs: Tally,
    covalues: Tally,
    verified_docs: usize,
    verified_covalues: usize,
    merge: bool,
    bytes: u64,
    elapsed: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "migrated {} -> {} in {:.1} s ({})",
            self.from,
            self.to,
            self.elapsed.as_secs_f64(),
            human_bytes(self.bytes)
        )?;
        writeln!(f, "documents: {}", self.docs)?;
        writeln!(f, "CoValues: {}", self.covalues)?;
        let how = if self.merge { "contains" } else { "equals" };
        write!(
            f,
            "verified: the target {how} the source: {} documents (merged Yjs state) and {} CoValues (every field)",
            self.verified_docs, self.verified_covalues
        )
    }
}

/// `512 B`, `3.4 KiB`, `12.0 MiB`, `1.2 GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

async fn migrate(source: &Side, target: &Side, args: &MigrateArgs, progress: &mut Progress) -> anyhow::Result<Report> {
    let started = Instant::now();
    let src_docs = source.ids(Kind::Doc).await?;
    let src_covalues = source.ids(Kind::CoValue).await?;
    if src_docs.is_empty() && src_covalues.is_empty() {
        bail!("the source {} holds no documents and no CoValues; nothing to migrate (is --from right?)", source.url);
    }
    progress.say(&format!(
        "moai migrate: {} documents and {} CoValues from {} to {}",
        src_docs.len(),
        src_covalues.len(),
        source.url,
        target.url
    ));
    check_target(source, target, &src_docs, &src_covalues, args, progress).await?;

    let items = both(&src_docs, &src_covalues);
    progress.phase("copying", items.len() as u64);
    let merge = args.merge;
    let (copied, bytes) =
        run_all(source, target, items, args.concurrency, progress, move |s, t, kind, id| async move {
            match kind {
                Kind::Doc => copy_doc(&s, &t, &id, merge).await,
                Kind::CoValue => copy_covalue(&s, &t, &id, merge).await,
            }
        })
        .await?;
    let mut report = Report {
        from: source.url.to_string(),
        to: target.url.to_string(),
        docs: Tally::default(),
        covalues: Tally::default(),
        verified_docs: 0,
        verified_covalues: 0,
        merge,
        bytes,
        elapsed: Duration::ZERO,
    };
    for (kind, id, outcome) in copied {
        match kind {
            Kind::Doc => report.docs.add(id, outcome),
            Kind::CoValue => report.covalues.add(id, outcome),
        }
    }

    (report.verified_docs, report.verified_covalues) =
        verify(source, target, &report.covalues.conflicts, args, progress).await?;
    if !report.covalues.conflicts.is_empty() {
        bail!(
            "{report}\n{} CoValues were left as they were in the target because their histories differ:\n  {}",
            report.covalues.conflicts.len(),
            examples(report.covalues.conflicts.iter().map(|(id, why)| format!("{id}: {why}")))
        );
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn both(docs: &[String], covalues: &[String]) -> Vec<(Kind, String)> {
    docs.iter().map(|id| (Kind::Doc, id.clone())).chain(covalues.iter().map(|id| (Kind::CoValue, id.clone()))).collect()
}

/// The first few of `lines`, one per line, for an error message.
fn examples(lines: impl Iterator<Item = String>) -> String {
    lines.take(EXAMPLES).collect::<Vec<_>>().join("\n  ")
}

/// The target must be empty or hold only what an earlier run of this migration wrote (every
/// item also in the source, and contained in the source's copy); otherwise this fails before
/// anything is written. `--merge` skips the check.
async fn check_target(
    source: &Side,
    target: &Side,
    src_docs: &[String],
    src_covalues: &[String],
    args: &MigrateArgs,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let dst_docs = target.ids(Kind::Doc).await?;
    let dst_covalues = target.ids(Kind::CoValue).await?;
    if dst_docs.is_empty() && dst_covalues.is_empty() {
        return Ok(());
    }
    if args.merge {
        progress.say(&format!(
            "the target holds {} documents and {} CoValues; merging the source into them (--merge)",
            dst_docs.len(),
            dst_covalues.len()
        ));
        return Ok(());
    }
    let held: HashMap<Kind, HashSet<&str>> = HashMap::from([
        (Kind::Doc, src_docs.iter().map(String::as_str).collect()),
        (Kind::CoValue, src_covalues.iter().map(String::as_str).collect()),
    ]);
    let (in_source, not_in_source): (Vec<_>, Vec<_>) =
        both(&dst_docs, &dst_covalues).into_iter().partition(|(kind, id)| held[kind].contains(id.as_str()));
    let mut foreign: Vec<String> =
        not_in_source.iter().map(|(kind, id)| format!("{} {id:?}: not in the source", kind.noun())).collect();
    if !in_source.is_empty() {
        progress.phase("checking the target", in_source.len() as u64);
    }
    let (checks, _) = run_all(source, target, in_source, args.concurrency, progress, |s, t, kind, id| async move {
        let why = match kind {
            Kind::Doc => doc_relation(&s, &t, &id).await?.foreign_reason(),
            Kind::CoValue => match covalue_pair(&s, &t, &id).await? {
                Some((src, dst)) => relate_covalues(&src, &dst).foreign_reason(),
                None => None,
            },
        };
        Ok((why.map(|why| format!("{} {id:?}: {why}", kind.noun())), 0))
    })
    .await?;
    foreign.extend(checks.into_iter().filter_map(|(_, _, why)| why));
    progress.clear();
    if !foreign.is_empty() {
        bail!(
            "the target {} already holds data that is not from this source ({} items), so nothing was written. \
             Migrate into an empty database, or pass --merge to merge the source into it. For example:\n  {}",
            target.url,
            foreign.len(),
            examples(foreign.into_iter())
        );
    }
    progress.say("the target already holds (part of) this source, from an earlier run: copying what it lacks");
    Ok(())
}

/// Lists both sides again and compares every item of the source with the target's (CoValues
/// left in conflict excepted: they are reported on their own). Returns the documents and
/// CoValues verified.
async fn verify(
    source: &Side,
    target: &Side,
    conflicts: &[(String, String)],
    args: &MigrateArgs,
    progress: &mut Progress,
) -> anyhow::Result<(usize, usize)> {
    let merge = args.merge;
    let src_docs = source.ids(Kind::Doc).await?;
    let src_covalues = source.ids(Kind::CoValue).await?;
    let dst_docs = target.ids(Kind::Doc).await?;
    let dst_covalues = target.ids(Kind::CoValue).await?;
    let mut mismatches: Vec<String> = Vec::new();
    for (kind, src, dst) in [(Kind::Doc, &src_docs, &dst_docs), (Kind::CoValue, &src_covalues, &dst_covalues)] {
        let (src, dst): (HashSet<&String>, HashSet<&String>) = (src.iter().collect(), dst.iter().collect());
        let missing = src.difference(&dst).map(|id| format!("{} {id:?}: not in the target", kind.noun()));
        mismatches.extend(missing);
        if !merge {
            let extra = dst.difference(&src).map(|id| format!("{} {id:?}: in the target only", kind.noun()));
            mismatches.extend(extra);
        }
    }
    let conflicted: HashSet<&String> = conflicts.iter().map(|(id, _)| id).collect();
    let src_covalues: Vec<String> = src_covalues.into_iter().filter(|id| !conflicted.contains(id)).collect();
    let items = both(&src_docs, &src_covalues);
    progress.phase("verifying", items.len() as u64);
    let (verified, _) = run_all(source, target, items, args.concurrency, progress, move |s, t, kind, id| async move {
        let why = match kind {
            Kind::Doc => verify_doc(&s, &t, &id, merge).await?,
            Kind::CoValue => verify_covalue(&s, &t, &id, merge).await?,
        };
        Ok((why, 0))
    })
    .await?;
    progress.clear();
    let mut counts = (0, 0);
    for (kind, id, why) in verified {
        match why {
            Some(why) => mismatches.push(format!("{} {id:?}: {why}", kind.noun())),
            None if kind == Kind::Doc => counts.0 += 1,
            None => counts.1 += 1,
        }
    }
    if !mismatches.is_empty() {
        bail!(
            "verification failed for {} items. If moai was serving the source meanwhile, these were written \
             during the migration: stop moai and run the same command again, it copies only what is missing. \
             For example:\n  {}",
            mismatches.len(),
            examples(mismatches.into_iter())
        );
    }
    Ok(counts)
}

/// One finished item: what, and its result with the bytes it wrote.
type Done<T> = (Kind, String, anyhow::Result<(T, u64)>);

/// Runs `work` for every item, `concurrency` at a time, counting progress; the first error stops
/// everything (a re-run resumes). Returns each item with its result, in completion order, and
/// the bytes written.
async fn run_all<T, F, Fut>(
    source: &Side,
    target: &Side,
    items: Vec<(Kind, String)>,
    concurrency: u16,
    progress: &mut Progress,
    work: F,
) -> anyhow::Result<(Vec<(Kind, String, T)>, u64)>
where
    T: Send + 'static,
    F: Fn(Stores, Stores, Kind, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(T, u64)>> + Send + 'static,
{
    let (src, dst) = (Stores::of(source), Stores::of(target));
    let mut running: JoinSet<Done<T>> = JoinSet::new();
    let mut results = Vec::with_capacity(items.len());
    let mut written = 0;
    let mut items = items.into_iter();
    loop {
        while running.len() < usize::from(concurrency) {
            let Some((kind, id)) = items.next() else { break };
            let job = work(src.clone(), dst.clone(), kind, id.clone());
            running.spawn(async move { (kind, id, job.await) });
        }
        let Some(done) = running.join_next().await else { break };
        let (kind, id, result) = done.context("a migration task failed")?;
        let (value, bytes) = result.with_context(|| format!("{} {id:?}", kind.noun()))?;
        progress.advance(bytes);
        written += bytes;
        results.push((kind, id, value));
    }
    Ok((results, written))
}

/// The traits of one side, cheap to clone into tasks.
#[derive(Clone)]
struct Stores {
    journal: Arc<dyn DocJournal>,
    covalues: Arc<dyn CoValueStore>,
}

impl Stores {
    fn of(side: &Side) -> Stores {
        Stores { journal: side.journal.clone(), covalues: side.covalues.clone() }
    }
}

// ---------------------------------------------------------------------------------------------
// Yjs documents

/// How the target's copy of a document stands to the source's.
enum DocRelation {
    /// The target does not have it.
    Absent,
    Equal,
    /// The target holds part of the source's state; `diff` (what the source has beyond the
    /// target's state vector, and its delete set) completes it.
    TargetWithin {
        diff: Vec<u8>,
    },
    /// The target holds all of the source's state and more.
    SourceWithin,
    /// Each has state the other does not; `diff` adds the source's to the target.
    Diverged {
        diff: Vec<u8>,
    },
    /// A side does not load as a Yjs document; compared byte for byte instead.
    Unreadable {
        why: String,
        identical: bool,
    },
}

impl DocRelation {
    /// Why the target's copy cannot come from this source (an earlier run of this migration).
    fn foreign_reason(&self) -> Option<String> {
        match self {
            DocRelation::Absent | DocRelation::Equal | DocRelation::TargetWithin { .. } => None,
            DocRelation::SourceWithin | DocRelation::Diverged { .. } => {
                Some("the target's copy has edits the source does not have".into())
            }
            DocRelation::Unreadable { identical: true, .. } => None,
            DocRelation::Unreadable { why, .. } => Some(format!("cannot be compared: {why}")),
        }
    }
}

fn is_empty(doc: &StoredDoc) -> bool {
    doc.snapshot.is_none() && doc.updates.is_empty()
}

fn same_bytes(a: &StoredDoc, b: &StoredDoc) -> bool {
    a.snapshot == b.snapshot && a.updates.iter().map(|(_, u)| u).eq(b.updates.iter().map(|(_, u)| u))
}

async fn doc_pair(s: &Stores, t: &Stores, id: &str) -> anyhow::Result<(StoredDoc, StoredDoc)> {
    let src = s.journal.load(id).await.context("loading it from the source")?;
    let dst = t.journal.load(id).await.context("loading it from the target")?;
    Ok((src, dst))
}

async fn doc_relation(s: &Stores, t: &Stores, id: &str) -> anyhow::Result<DocRelation> {
    let (src, dst) = doc_pair(s, t, id).await?;
    relate_docs_off_thread(id, src, dst).await
}

/// yrs work is CPU work: off the async workers.
async fn relate_docs_off_thread(id: &str, src: StoredDoc, dst: StoredDoc) -> anyhow::Result<DocRelation> {
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || relate_docs(&id, &src, &dst)).await.context("comparing the document")
}

/// The state that makes two documents equal: what is integrated (state vector and delete set,
/// yrs' `Snapshot`) and what waits for missing dependencies (pending structs and deletes).
#[derive(PartialEq)]
struct YState {
    snapshot: Snapshot,
    pending: Option<Vec<u8>>,
    pending_deletes: Option<Vec<u8>>,
}

fn ystate(doc: &Doc) -> YState {
    let txn = doc.transact();
    let store = txn.store();
    YState {
        snapshot: txn.snapshot(),
        pending: store.pending_update().map(|p| p.update.encode_v1()),
        pending_deletes: store.pending_ds().map(|ds| ds.encode_v1()),
    }
}

/// Builds the document from its stored pieces, then `extra`; a panic in yrs is contained by
/// moai-yjs and reported as an error.
fn build(id: &str, doc: &StoredDoc, extra: Option<&[u8]>) -> Result<Doc, String> {
    let journal = doc.updates.iter().map(|(_, u)| u.as_slice()).chain(extra);
    moai_yjs::load_room(id, doc.snapshot.as_deref(), journal).map(|room| room.doc().clone()).map_err(|e| e.to_string())
}

fn full_state(doc: &Doc) -> Vec<u8> {
    doc.transact().encode_state_as_update_v1(&StateVector::default())
}

fn relate_docs(id: &str, src: &StoredDoc, dst: &StoredDoc) -> DocRelation {
    if is_empty(dst) {
        return DocRelation::Absent;
    }
    let compare = || -> Result<DocRelation, String> {
        let s = build(id, src, None).map_err(|e| format!("the source's copy does not load: {e}"))?;
        let t = build(id, dst, None).map_err(|e| format!("the target's copy does not load: {e}"))?;
        let (s_state, t_state) = (ystate(&s), ystate(&t));
        if s_state == t_state {
            return Ok(DocRelation::Equal);
        }
        // A is within B when adding A to B changes nothing.
        let t_within_s = ystate(&build(id, src, Some(&full_state(&t)))?) == s_state;
        let diff = s.transact().encode_state_as_update_v1(&t.transact().state_vector());
        if t_within_s {
            return Ok(DocRelation::TargetWithin { diff });
        }
        let s_within_t = ystate(&build(id, dst, Some(&full_state(&s)))?) == t_state;
        Ok(if s_within_t { DocRelation::SourceWithin } else { DocRelation::Diverged { diff } })
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(compare)) {
        Ok(Ok(relation)) => relation,
        Ok(Err(why)) => DocRelation::Unreadable { why, identical: same_bytes(src, dst) },
        Err(_) => {
            DocRelation::Unreadable { why: "the Yjs library failed on it".into(), identical: same_bytes(src, dst) }
        }
    }
}

async fn copy_doc(s: &Stores, t: &Stores, id: &str, merge: bool) -> anyhow::Result<(Outcome, u64)> {
    let (src, dst) = doc_pair(s, t, id).await?;
    if is_empty(&src) {
        // Listed but empty now: a document's data is never deleted, so not reachable.
        return Ok((Outcome::Unchanged, 0));
    }
    if is_empty(&dst) {
        // A copy as stored: the same snapshot, then the same journal entries in order. Not one
        // transaction: a run interrupted in between leaves part of the document, which the next
        // run completes like any partial copy.
        let mut bytes = 0u64;
        if let Some(snapshot) = src.snapshot {
            bytes += snapshot.len() as u64;
            t.journal.compact(id, snapshot, Folded::default()).await.context("writing the snapshot")?;
        }
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut batch_bytes = 0;
        for (_, update) in src.updates {
            if !batch.is_empty() && (batch.len() >= APPEND_ENTRIES || batch_bytes + update.len() > APPEND_BYTES) {
                t.journal.append_many(id, std::mem::take(&mut batch)).await.context("appending the journal")?;
                batch_bytes = 0;
            }
            bytes += update.len() as u64;
            batch_bytes += update.len();
            batch.push(update);
        }
        t.journal.append_many(id, batch).await.context("appending the journal")?;
        return Ok((Outcome::Copied, bytes));
    }
    let (diff, outcome) = match relate_docs_off_thread(id, src, dst).await? {
        DocRelation::Absent | DocRelation::Equal => return Ok((Outcome::Unchanged, 0)),
        DocRelation::Unreadable { identical: true, .. } => return Ok((Outcome::Unchanged, 0)),
        DocRelation::Unreadable { why, .. } => bail!("cannot be compared with the target's copy: {why}"),
        DocRelation::TargetWithin { diff } => (diff, Outcome::CaughtUp),
        DocRelation::SourceWithin if merge => return Ok((Outcome::Unchanged, 0)),
        DocRelation::Diverged { diff } if merge => (diff, Outcome::Merged),
        // The target was checked before copying began: only a concurrent writer gets here.
        DocRelation::SourceWithin | DocRelation::Diverged { .. } => {
            bail!("the target's copy changed during the migration (is something else writing to it?)")
        }
    };
    let bytes = diff.len() as u64;
    t.journal.append(id, diff).await.context("appending the difference")?;
    Ok((outcome, bytes))
}

async fn verify_doc(s: &Stores, t: &Stores, id: &str, merge: bool) -> anyhow::Result<Option<String>> {
    Ok(match doc_relation(s, t, id).await? {
        DocRelation::Absent => Some("not in the target".into()),
        DocRelation::Equal => None,
        DocRelation::TargetWithin { .. } | DocRelation::Diverged { .. } => {
            Some("the target lacks some of the source's state".into())
        }
        // With --merge the target may hold more, as long as it contains the source.
        DocRelation::SourceWithin if merge => None,
        DocRelation::SourceWithin => Some("the target's state has more than the source's".into()),
        DocRelation::Unreadable { identical: true, why } => {
            tracing::warn!(doc = id, reason = %why, "a document that does not load as Yjs was verified byte for byte");
            None
        }
        DocRelation::Unreadable { why, .. } => Some(why),
    })
}

// ---------------------------------------------------------------------------------------------
// CoJSON CoValues

async fn covalue_pair(
    s: &Stores,
    t: &Stores,
    id: &str,
) -> anyhow::Result<Option<(CoValueRecord, Option<CoValueRecord>)>> {
    let Some(src) = s.covalues.load_covalue(id).await.context("loading it from the source")? else {
        return Ok(None);
    };
    let dst = t.covalues.load_covalue(id).await.context("loading it from the target")?;
    Ok(Some((src, dst)))
}

/// How the target's copy of a CoValue stands to the source's.
#[derive(Debug, PartialEq, Eq)]
enum CoRelation {
    Absent,
    Equal,
    /// Every session of the target is a prefix of the source's (or, the source being deleted,
    /// erased there): the source continues it.
    Within,
    /// The target has more, or something else: the reason.
    Other(String),
}

impl CoRelation {
    fn foreign_reason(self) -> Option<String> {
        match self {
            CoRelation::Other(why) => Some(why),
            _ => None,
        }
    }
}

fn session_map(record: &CoValueRecord) -> HashMap<&str, &SessionRecord> {
    record.sessions.iter().map(|s| (s.session.as_str(), s)).collect()
}

fn relate_covalues(src: &CoValueRecord, dst: &Option<CoValueRecord>) -> CoRelation {
    let Some(dst) = dst else { return CoRelation::Absent };
    if src.header != dst.header {
        return CoRelation::Other("its header differs".into());
    }
    if dst.deleted && !src.deleted {
        return CoRelation::Other("deleted in the target only".into());
    }
    let src_sessions = session_map(src);
    let mut equal = src.deleted == dst.deleted && src.sessions.len() == dst.sessions.len();
    for d in &dst.sessions {
        let Some(s) = src_sessions.get(d.session.as_str()) else {
            if src.deleted {
                // The source's delete erased it; the target's copy predates the delete.
                equal = false;
                continue;
            }
            return CoRelation::Other(format!("session {} is not in the source", d.session));
        };
        if d.transactions.len() > s.transactions.len() {
            return CoRelation::Other(format!("session {} is longer in the target", d.session));
        }
        if d.transactions[..] != s.transactions[..d.transactions.len()] {
            return CoRelation::Other(format!("session {} differs", d.session));
        }
        let n = d.transactions.len() as u64;
        let src_checkpoints: Vec<&(u64, String)> = s.checkpoints.iter().filter(|(c, _)| *c <= n).collect();
        if !d.checkpoints.iter().eq(src_checkpoints.iter().copied()) {
            return CoRelation::Other(format!("session {} has other checkpoint signatures", d.session));
        }
        if d.transactions.len() == s.transactions.len() {
            if d.last_signature != s.last_signature {
                return CoRelation::Other(format!("session {} has another signature", d.session));
            }
        } else {
            equal = false;
        }
    }
    if equal {
        CoRelation::Equal
    } else {
        CoRelation::Within
    }
}

/// cojson's payload size of a transaction (the length of `changes` or `encryptedChanges`), as
/// moai-cojson counts it for `bytesSinceLastSignature`; informational (the engine recomputes it
/// when it loads), so a transaction that does not parse counts 0.
fn payload_len(tx: &str) -> u64 {
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(tx) else { return 0 };
    let field = match obj.get("privacy").and_then(|p| p.as_str()) {
        Some("trusting") => "changes",
        Some("private") => "encryptedChanges",
        _ => return 0,
    };
    obj.get(field).and_then(|v| v.as_str()).map_or(0, |s| s.len() as u64)
}

/// The append that adds `s.transactions[after..]` to a session stored with `after` transactions.
fn session_tail(s: &SessionRecord, after: usize) -> SessionAppendRecord {
    let transactions = s.transactions[after..].to_vec();
    let checkpoints: Vec<(u64, String)> = s.checkpoints.iter().filter(|(c, _)| *c > after as u64).cloned().collect();
    let bytes_since_signature = match checkpoints.last() {
        Some((last, _)) => {
            let from = usize::try_from(*last).unwrap_or(usize::MAX).min(s.transactions.len());
            BytesSinceSignature::Reset(s.transactions[from..].iter().map(|t| payload_len(t)).sum())
        }
        None => BytesSinceSignature::Add(transactions.iter().map(|t| payload_len(t)).sum()),
    };
    SessionAppendRecord {
        session: s.session.clone(),
        after: after as u64,
        transactions,
        last_signature: s.last_signature.clone(),
        checkpoints,
        bytes_since_signature,
    }
}

fn append_bytes(append: &CoValueAppend) -> u64 {
    let header = append.header.as_ref().map_or(0, String::len);
    let sessions: usize = append.sessions.iter().flat_map(|s| &s.transactions).map(String::len).sum();
    (header + sessions) as u64
}

/// What the target lacks of `src`: sessions it does not have, the tails of those it has less
/// of, the deleted flag, and (the source being deleted) the erasure of sessions the source's
/// delete erased. `None` when a session diverges (only reachable with --merge).
fn covalue_append(id: &str, src: &CoValueRecord, dst: Option<&CoValueRecord>) -> Result<CoValueAppend, String> {
    let stored = dst.map(session_map).unwrap_or_default();
    let mut sessions = Vec::new();
    for s in &src.sessions {
        let have = match stored.get(s.session.as_str()) {
            None => 0,
            Some(d) if d.transactions.len() >= s.transactions.len() => {
                if d.transactions[..s.transactions.len()] != s.transactions[..] {
                    return Err(format!("session {} diverges", s.session));
                }
                continue;
            }
            Some(d) => {
                if d.transactions[..] != s.transactions[..d.transactions.len()] {
                    return Err(format!("session {} diverges", s.session));
                }
                d.transactions.len()
            }
        };
        sessions.push(session_tail(s, have));
    }
    let src_names: HashSet<&str> = src.sessions.iter().map(|s| s.session.as_str()).collect();
    let erase_sessions = match (src.deleted, dst) {
        (true, Some(d)) => {
            d.sessions.iter().filter(|s| !src_names.contains(s.session.as_str())).map(|s| s.session.clone()).collect()
        }
        _ => Vec::new(),
    };
    Ok(CoValueAppend {
        id: id.to_owned(),
        header: dst.is_none().then(|| src.header.clone()),
        sessions,
        deleted: src.deleted && !dst.is_some_and(|d| d.deleted),
        erase_sessions,
    })
}

async fn copy_covalue(s: &Stores, t: &Stores, id: &str, merge: bool) -> anyhow::Result<(Outcome, u64)> {
    let Some((src, dst)) = covalue_pair(s, t, id).await? else {
        // Listed but gone: storage never deletes a CoValue, so this is not reachable.
        return Ok((Outcome::Unchanged, 0));
    };
    let outcome = match relate_covalues(&src, &dst) {
        CoRelation::Equal => return Ok((Outcome::Unchanged, 0)),
        CoRelation::Absent => Outcome::Copied,
        CoRelation::Within => Outcome::CaughtUp,
        CoRelation::Other(_) if merge => Outcome::Merged,
        CoRelation::Other(why) => bail!("the target's copy changed during the migration ({why})"),
    };
    let append = match covalue_append(id, &src, dst.as_ref()) {
        Ok(append) => append,
        Err(why) => return Ok((Outcome::Conflict(why), 0)),
    };
    if append.sessions.is_empty() && !append.deleted && append.erase_sessions.is_empty() && append.header.is_none() {
        // --merge: the target already has everything the source has.
        return Ok((Outcome::Unchanged, 0));
    }
    let bytes = append_bytes(&append);
    t.covalues.append_covalue(append).await.context("writing it to the target")?;
    Ok((outcome, bytes))
}

async fn verify_covalue(s: &Stores, t: &Stores, id: &str, merge: bool) -> anyhow::Result<Option<String>> {
    let Some((src, dst)) = covalue_pair(s, t, id).await? else {
        return Ok(Some("no longer in the source".into()));
    };
    Ok(match relate_covalues(&src, &dst) {
        CoRelation::Equal => None,
        CoRelation::Absent => Some("not in the target".into()),
        CoRelation::Within => Some("the target lacks some of its transactions".into()),
        CoRelation::Other(_) if merge => {
            // With --merge the target may hold more; it must contain every source transaction.
            match covalue_append(id, &src, dst.as_ref()) {
                Ok(a) if a.sessions.is_empty() && !a.deleted => None,
                Ok(_) => Some("the target lacks some of its transactions".into()),
                Err(why) => Some(why),
            }
        }
        CoRelation::Other(why) => Some(why),
    })
}

// ---------------------------------------------------------------------------------------------
// Progress

/// Progress on stderr: an indicatif bar on a terminal; otherwise a plain line at most once a
/// second (logs and CI keep a readable record without a flood of carriage returns).
struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    phase: &'static str,
    total: u64,
    done: u64,
    bytes: u64,
    last_line: Option<Instant>,
}

const LINE_EVERY: Duration = Duration::from_secs(1);

impl Progress {
    fn new(mode: ProgressMode) -> Progress {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Auto,
            ProgressMode::Auto => ProgressMode::Lines,
            other => other,
        };
        Progress { mode, bar: None, phase: "", total: 0, done: 0, bytes: 0, last_line: None }
    }

    /// A message of its own line (above the bar on a terminal).
    fn say(&self, message: &str) {
        match (&self.bar, self.mode) {
            (_, ProgressMode::None) => {}
            (Some(bar), _) => bar.println(message),
            (None, _) => eprintln!("{message}"),
        }
    }

    fn phase(&mut self, name: &'static str, total: u64) {
        self.clear();
        (self.phase, self.total, self.done, self.bytes, self.last_line) = (name, total, 0, 0, None);
        if self.mode == ProgressMode::Auto {
            let style = ProgressStyle::with_template("{msg:>19} [{wide_bar}] {pos}/{len} {percent:>3}% eta {eta:>3}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            let bar = ProgressBar::new(total).with_style(style).with_message(name);
            bar.enable_steady_tick(Duration::from_millis(200));
            self.bar = Some(bar);
        }
    }

    fn advance(&mut self, bytes: u64) {
        self.done += 1;
        self.bytes += bytes;
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        if self.mode == ProgressMode::Lines && self.last_line.is_none_or(|at| at.elapsed() >= LINE_EVERY) {
            self.last_line = Some(Instant::now());
            self.line();
        }
    }

    fn line(&self) {
        let percent = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let bytes = if self.bytes > 0 { format!(", {} written", human_bytes(self.bytes)) } else { String::new() };
        eprintln!("moai migrate: {} {}/{} ({percent}%){bytes}", self.phase, self.done, self.total);
    }

    /// Ends the current phase: the bar disappears; in line mode the last count is always shown.
    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.mode == ProgressMode::Lines && !self.phase.is_empty() {
            self.line();
        }
        self.phase = "";
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(name: &str, n: usize, checkpoints: &[u64]) -> SessionRecord {
        SessionRecord {
            session: name.into(),
            transactions: (0..n)
                .map(|i| format!(r#"{{"privacy":"trusting","changes":"{i:03}","madeAt":{i}}}"#))
                .collect(),
            last_signature: format!("signature_z{name}{n}"),
            checkpoints: checkpoints.iter().map(|c| (*c, format!("signature_z{name}{c}"))).collect(),
        }
    }

    fn record(sessions: Vec<SessionRecord>, deleted: bool) -> CoValueRecord {
        CoValueRecord { header: r#"{"type":"comap"}"#.into(), sessions, deleted }
    }

    #[test]
    fn covalue_relations() {
        let src = record(vec![session("a", 5, &[2, 4]), session("b", 1, &[])], false);
        assert_eq!(relate_covalues(&src, &None), CoRelation::Absent);
        assert_eq!(relate_covalues(&src, &Some(src.clone())), CoRelation::Equal);
        let older = record(vec![session("a", 3, &[2])], false);
        assert_eq!(relate_covalues(&src, &Some(older.clone())), CoRelation::Within);
        assert!(matches!(relate_covalues(&older, &Some(src.clone())), CoRelation::Other(_)), "longer in the target");
        let mut forged = older.clone();
        forged.sessions[0].transactions[1] = "{}".into();
        assert!(matches!(relate_covalues(&src, &Some(forged)), CoRelation::Other(_)));
        let mut other_header = src.clone();
        other_header.header = "{}".into();
        assert!(matches!(relate_covalues(&src, &Some(other_header)), CoRelation::Other(_)));
        // The source was deleted since (its delete erased session b): the older copy is within.
        let deleted = record(vec![session("a", 5, &[2, 4]), session("x$", 1, &[])], true);
        assert_eq!(relate_covalues(&deleted, &Some(src.clone())), CoRelation::Within);
        assert!(matches!(relate_covalues(&src, &Some(deleted.clone())), CoRelation::Other(_)));
    }

    #[test]
    fn the_append_brings_an_older_copy_up_to_date() {
        let src = record(vec![session("a", 5, &[2, 4]), session("x$", 1, &[])], true);
        let older = record(vec![session("a", 3, &[2]), session("b", 2, &[])], false);
        let append = covalue_append("co_z1", &src, Some(&older)).unwrap();
        assert_eq!(append.header, None);
        assert!(append.deleted);
        assert_eq!(append.erase_sessions, ["b"]);
        assert_eq!(append.sessions.len(), 2);
        let a = &append.sessions[0];
        assert_eq!((a.session.as_str(), a.after, a.transactions.len()), ("a", 3, 2));
        assert_eq!(a.checkpoints, [(4, "signature_za4".to_owned())]);
        assert_eq!(a.last_signature, "signature_za5");
        // Payload after the last checkpoint (4): transaction 4, "004".
        assert_eq!(a.bytes_since_signature, BytesSinceSignature::Reset(3));
        assert_eq!((append.sessions[1].after, append.sessions[1].transactions.len()), (0, 1));

        let fresh = covalue_append("co_z1", &src, None).unwrap();
        assert_eq!(fresh.header.as_deref(), Some(r#"{"type":"comap"}"#));
        assert!(fresh.erase_sessions.is_empty());
        assert_eq!(fresh.sessions[0].after, 0);
        assert_eq!(fresh.sessions[0].checkpoints.len(), 2);
    }

    /// A journal tail whose structs depend on a snapshot kept elsewhere (object storage) loads
    /// as pending state, and compares as such.
    #[test]
    fn documents_compare_by_merged_state_pending_structs_included() {
        use moai_yjs::yrs::{GetString, Text};
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        let mut updates = Vec::new();
        for word in ["one ", "two ", "three"] {
            let mut txn = doc.transact_mut();
            let len = text.len(&txn);
            text.insert(&mut txn, len, word);
            updates.push(txn.encode_update_v1());
        }
        let stored = |from: usize| StoredDoc {
            snapshot: None,
            snapshot_version: None,
            updates: updates[from..].iter().cloned().enumerate().map(|(i, u)| (i as u64, u)).collect(),
        };
        let (whole, tail) = (stored(0), stored(1));
        assert!(matches!(relate_docs("d", &whole, &StoredDoc::default()), DocRelation::Absent));
        assert!(matches!(relate_docs("d", &tail, &tail), DocRelation::Equal), "pending only, on both sides");
        assert!(matches!(relate_docs("d", &whole, &stored(2)), DocRelation::TargetWithin { .. }));
        assert!(matches!(relate_docs("d", &stored(2), &whole), DocRelation::SourceWithin));
        // The same state in another layout (one snapshot) is equal.
        let snapshot = StoredDoc { snapshot: Some(full_state(&doc)), ..StoredDoc::default() };
        assert!(matches!(relate_docs("d", &whole, &snapshot), DocRelation::Equal));
        // What completes a partial copy.
        let DocRelation::TargetWithin { diff } = relate_docs("d", &whole, &stored(2)) else { unreachable!() };
        let mut completed = stored(2);
        completed.updates.push((9, diff));
        assert!(matches!(relate_docs("d", &whole, &completed), DocRelation::Equal));
        let elsewhere = Doc::new();
        let text = elsewhere.get_or_insert_text("t");
        let mut txn = elsewhere.transact_mut();
        text.insert(&mut txn, 0, "elsewhere");
        let other = StoredDoc { updates: vec![(1, txn.encode_update_v1())], ..StoredDoc::default() };
        drop(txn);
        assert!(matches!(relate_docs("d", &whole, &other), DocRelation::Diverged { .. }));
        let built = build("d", &completed, None).unwrap();
        assert_eq!(built.get_or_insert_text("t").get_string(&built.transact()), "one two three");
    }

    #[test]
    fn payload_is_the_changes_text() {
        assert_eq!(payload_len(r#"{"privacy":"trusting","changes":"[1,2]","madeAt":1}"#), 5);
        assert_eq!(
            payload_len(r#"{"privacy":"private","encryptedChanges":"encrypted_Uxyz","keyUsed":"k","madeAt":1}"#),
            14
        );
        assert_eq!(payload_len("not json"), 0);
    }
}

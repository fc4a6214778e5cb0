//! Yjs snapshots in S3-compatible object storage, the journal tail in a database.
//!
//! [`ObjectSnapshots`] wraps any journal backend ([`TrimJournal`]: SQLite, PostgreSQL, memory) and
//! is itself a [`DocJournal`]: appends go to the database as before; a compaction writes the
//! document's snapshot as one object, `<prefix>/<docId>.bin` (a full-state Yjs v1 update, readable
//! by any Yjs tool), and then deletes the journal entries it folded; a load reads the journal,
//! then the object.
//!
//! Several writers never lose data:
//!
//! - The PUT is conditional: `If-Match` on the ETag the compaction loaded (`PutMode::Update`), or
//!   `If-None-Match: *` when there was no object (`PutMode::Create`). Another compaction that
//!   wrote first makes it fail with `412`, reported as [`StorageError::CompactionConflict`], and
//!   the journal is not touched. So every object written is built from the object it replaces.
//! - Only after the PUT succeeded are exactly the folded journal entries deleted. A crash in
//!   between leaves entries that the object already contains; loading them again is harmless (a
//!   Yjs update applied twice changes nothing), and the next compaction deletes them.
//! - A load reads the journal first and the object second. A compaction that runs in between
//!   PUTs before it trims, so whatever it trimmed from the journal this load read is in the object
//!   this load reads (which is that compaction's object or a later one, built from it).
//!
//! A snapshot that the database held before object storage was configured still loads: it is
//! the document's snapshot while there is no object, and an extra journal entry (sequence number
//! [`LEGACY_SNAPSHOT_SEQ`]) once there is one. The first compaction to object storage folds it
//! into the object and deletes it from the database. The database's snapshot column is unused
//! from then on.
//!
//! An object store that is down or slow fails loads and compactions within
//! [`ObjectStoreOptions::timeout`]; appends never touch it, so live editing goes on. The Yjs
//! engine retries a failed compaction later, and refuses (never serves empty) a document whose
//! snapshot cannot be read.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};
use sha2::{Digest, Sha256};

use crate::{
    AppendError, CoValueAppend, CoValueRecord, CoValueStore, DocJournal, Folded, StorageError, StoredDoc,
    StoredKnownState, TrimJournal,
};

/// The sequence number under which a load presents a snapshot that is still in the database
/// while the document also has an object (backends number their entries from 1).
pub const LEGACY_SNAPSHOT_SEQ: u64 = 0;

/// S3 refuses keys longer than this many bytes.
const MAX_KEY_BYTES: usize = 1024;

/// Where and how to reach the bucket. Credentials left `None` come from the environment as for
/// any AWS tool (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, web identity,
/// container or instance credentials); so do `AWS_REGION`, `AWS_ENDPOINT_URL` and the other
/// `AWS_*` settings the `object_store` crate knows.
#[derive(Clone)]
pub struct ObjectStoreOptions {
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (empty: the bucket's root).
    pub prefix: String,
    pub region: Option<String>,
    /// An S3-compatible service (`http://127.0.0.1:9000`, `https://s3.example.com`). `http://` is
    /// allowed. `None`: `AWS_ENDPOINT_URL` if set, else AWS.
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Longest a load's GET or a compaction's PUT may take, retries included. Default 30 s.
    pub timeout: Duration,
}

impl std::fmt::Debug for ObjectStoreOptions {
    // Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreOptions")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreOptions {
    /// Options for `bucket` under `prefix`, everything else from the environment.
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: prefix.into().trim_matches('/').to_owned(),
            region: None,
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            timeout: Duration::from_secs(30),
        }
    }

    /// `s3://bucket/prefix`, as logs name it.
    pub fn target(&self) -> String {
        match self.prefix.as_str() {
            "" => format!("s3://{}", self.bucket),
            prefix => format!("s3://{}/{prefix}", self.bucket),
        }
    }

    /// Options for `s3://bucket/prefix` (the prefix may be empty).
    pub fn from_url(url: &str) -> Result<Self, StorageError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            StorageError::ObjectStoreConfig(format!("{url:?}: expected s3://bucket or s3://bucket/prefix"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StorageError::ObjectStoreConfig(format!("{url:?}: no bucket name")));
        }
        Ok(Self::new(bucket, prefix))
    }
}

/// The bucket and prefix that hold the snapshots. Cheap to clone.
#[derive(Clone)]
pub struct SnapshotObjects {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket/prefix`, for logs and errors.
    target: String,
    prefix: String,
    timeout: Duration,
}

/// What identifies the object a load read, for the conditional PUT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ObjectVersion {
    e_tag: Option<String>,
    version: Option<String>,
}

impl SnapshotObjects {
    /// Connects to the bucket and checks, with one listing of the prefix, that it exists and
    /// that the credentials may read it (the listing permission is needed anyway: without it S3
    /// answers 403 instead of 404 for a document that has no snapshot yet).
    pub async fn open(options: ObjectStoreOptions) -> Result<Self, StorageError> {
        install_tls_provider();
        let timeout = options.timeout.max(Duration::from_millis(1));
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&options.bucket);
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        }
        if let Some(endpoint) = &options.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = &options.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &options.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(token) = &options.session_token {
            builder = builder.with_token(token);
        }
        // A local S3-compatible server is usually plain HTTP.
        if builder.get_config_value(&AmazonS3ConfigKey::Endpoint).is_some_and(|e| e.starts_with("http://")) {
            builder = builder.with_allow_http(true);
        }
        let millis = |d: Duration| format!("{}ms", d.as_millis().max(1));
        builder = builder
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), millis(timeout))
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                millis(timeout.min(Duration::from_secs(5))),
            )
            // A few quick retries (a dropped connection, a 503): the whole operation stays within
            // `timeout` anyway, and a compaction that fails is simply tried again later.
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
                max_retries: 2,
                retry_timeout: timeout,
            });
        let store = builder.build().map_err(|e| StorageError::ObjectStoreConfig(e.to_string()))?;
        let objects = Self::new(Arc::new(store), options.target(), &options.prefix, timeout)?;
        objects.check().await?;
        Ok(objects)
    }

    /// Snapshots in any [`ObjectStore`] that implements conditional puts (`PutMode::Create` and
    /// `PutMode::Update`), under `prefix`. `target` names it in logs and errors.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        target: impl Into<String>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, StorageError> {
        let prefix = prefix.trim_matches('/').to_owned();
        if !prefix.is_empty() {
            ObjectPath::parse(&prefix)
                .map_err(|e| StorageError::ObjectStoreConfig(format!("prefix {prefix:?}: {e}")))?;
        }
        Ok(Self { store, target: target.into(), prefix, timeout })
    }

    /// `s3://bucket/prefix`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The object key of `doc`'s snapshot: `<prefix>/<docId>.bin`, the id percent-encoded except
    /// for `A-Z a-z 0-9 - _ .` (so plain ids stay plain and no id can escape the prefix or
    /// collide with another). A key that would pass S3's 1024-byte limit becomes
    /// `<prefix>/~sha256~<hex of the id's SHA-256>.bin` (`~` is never left plain by the encoding).
    pub fn key(&self, doc: &str) -> String {
        let slash = if self.prefix.is_empty() { "" } else { "/" };
        let key = format!("{}{slash}{}.bin", self.prefix, encode_doc_id(doc));
        if key.len() <= MAX_KEY_BYTES {
            return key;
        }
        let hash: String = Sha256::digest(doc.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        format!("{}{slash}~sha256~{hash}.bin", self.prefix)
    }

    /// The snapshot object of `doc` and what identifies it, or `None` if it has none.
    async fn get(&self, doc: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>, StorageError> {
        let key = self.key(doc);
        let path = ObjectPath::parse(&key).map_err(|e| self.error("GET", &key, e))?;
        let read = async {
            let result = self.store.get_opts(&path, GetOptions::default()).await?;
            let version = ObjectVersion { e_tag: result.meta.e_tag.clone(), version: result.meta.version.clone() };
            Ok::<_, object_store::Error>((result.bytes().await?.to_vec(), version))
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(found)) => Ok(Some(found)),
            // No such key: no snapshot yet. No such bucket is an error: a wrong or deleted bucket
            // must not make every document look empty.
            Ok(Err(e @ object_store::Error::NotFound { .. })) if !missing_bucket(&e) => Ok(None),
            Ok(Err(e)) => Err(self.error("GET", &key, e)),
            Err(_) => Err(self.timed_out("GET", &key)),
        }
    }

    /// Writes `doc`'s snapshot if the stored object is still `expected` (`None`: if there is no
    /// object). Returns false, having written nothing, if it is not.
    async fn put(&self, doc: &str, snapshot: Vec<u8>, expected: Option<&ObjectVersion>) -> Result<bool, StorageError> {
        let key = self.key(doc);
        let path = ObjectPath::parse(&key).map_err(|e| self.error("PUT", &key, e))?;
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(UpdateVersion { e_tag: v.e_tag.clone(), version: v.version.clone() }),
        };
        let put = self.store.put_opts(&path, PutPayload::from(snapshot), PutOptions::from(mode));
        match tokio::time::timeout(self.timeout, put).await {
            Ok(Ok(_)) => Ok(true),
            // Another compaction wrote first (412), created the object first, or the object was
            // deleted since the load (S3 answers If-Match on a missing key with 404).
            Ok(Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. })) => Ok(false),
            Ok(Err(e @ object_store::Error::NotFound { .. })) if !missing_bucket(&e) => Ok(false),
            Ok(Err(e)) => Err(self.error("PUT", &key, e)),
            // The PUT may still have landed; then the next compaction starts from it.
            Err(_) => Err(self.timed_out("PUT", &key)),
        }
    }

    /// One listing of the prefix (see [`SnapshotObjects::open`]).
    async fn check(&self) -> Result<(), StorageError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let list = async { self.store.list(prefix.as_ref()).next().await.transpose() };
        match tokio::time::timeout(self.timeout, list).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.error("LIST", &self.prefix, e)),
            Err(_) => Err(self.timed_out("LIST", &self.prefix)),
        }
    }

    fn error(&self, operation: &'static str, key: &str, e: impl std::fmt::Display) -> StorageError {
        StorageError::ObjectStore { operation, target: format!("{}/{key}", self.bucket_url()), reason: e.to_string() }
    }

    fn timed_out(&self, operation: &'static str, key: &str) -> StorageError {
        let reason = format!("no answer within {:?}", self.timeout);
        StorageError::ObjectStore { operation, target: format!("{}/{key}", self.bucket_url()), reason }
    }

    /// `s3://bucket` (the target without its prefix; keys include the prefix).
    fn bucket_url(&self) -> &str {
        match self.prefix.as_str() {
            "" => &self.target,
            prefix => self.target.strip_suffix(prefix).map_or(&self.target, |t| t.trim_end_matches('/')),
        }
    }
}

/// Makes ring the process's TLS provider, which the `object_store` S3 client needs before it is
/// built (its reqwest has no provider of its own, and panics without one). [`SnapshotObjects::open`]
/// does it; call it before building an `object_store` S3 client of your own. Idempotent.
///
/// ring rather than aws-lc-rs: a smaller C build (docs/storage.md). rustls 0.23.48 deprecated
/// ring's provider for lacking post-quantum key exchange; S3 endpoints speak classic TLS 1.2/1.3,
/// and switching is the object_store feature `aws` instead of `aws-base` + `ring`.
pub fn install_tls_provider() {
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    // Refused (harmlessly) when a provider is set already.
    let _ = provider.install_default();
}

/// S3 answers 404 for a missing bucket as for a missing key; only the error code tells them
/// apart.
fn missing_bucket(e: &object_store::Error) -> bool {
    e.to_string().contains("NoSuchBucket")
}

/// Percent-encodes every byte of `doc` except `A-Z a-z 0-9 - _ .`.
pub fn encode_doc_id(doc: &str) -> String {
    let mut out = String::with_capacity(doc.len());
    for &b in doc.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `snapshot_version` of a load: the object it read (if any) and the database snapshot it
/// read (if any). Opaque to the engine; written `s3;o;e=<ETag>;v=<version>;db=<version>`, each
/// part present only if known, `%` and `;` in values percent-encoded.
#[derive(Debug, Default, PartialEq, Eq)]
struct LoadedVersion {
    object: Option<ObjectVersion>,
    db: Option<String>,
}

impl LoadedVersion {
    fn encode(&self) -> Option<String> {
        if self.object.is_none() && self.db.is_none() {
            return None;
        }
        let mut out = String::from("s3");
        if let Some(object) = &self.object {
            out.push_str(";o");
            if let Some(e_tag) = &object.e_tag {
                out.push_str(&format!(";e={}", escape(e_tag)));
            }
            if let Some(version) = &object.version {
                out.push_str(&format!(";v={}", escape(version)));
            }
        }
        if let Some(db) = &self.db {
            out.push_str(&format!(";db={}", escape(db)));
        }
        Some(out)
    }

    /// `None` if `text` is not a version this wrapper wrote.
    fn decode(text: Option<&str>) -> Option<LoadedVersion> {
        let Some(text) = text else { return Some(LoadedVersion::default()) };
        let mut parts = text.split(';');
        if parts.next() != Some("s3") {
            return None;
        }
        let mut loaded = LoadedVersion::default();
        for part in parts {
            match part.split_once('=') {
                None if part == "o" => loaded.object = Some(ObjectVersion::default()),
                Some(("e", v)) => loaded.object.as_mut()?.e_tag = Some(unescape(v)?),
                Some(("v", v)) => loaded.object.as_mut()?.version = Some(unescape(v)?),
                Some(("db", v)) => loaded.db = Some(unescape(v)?),
                _ => return None,
            }
        }
        (loaded.object.is_some() || loaded.db.is_some()).then_some(loaded)
    }
}

fn escape(s: &str) -> String {
    s.replace('%', "%25").replace(';', "%3B")
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("%25") => out.push('%'),
            Some("%3B") => out.push(';'),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// A journal backend whose Yjs snapshots live in object storage; see the module docs. Cheap to
/// clone if `J` is.
#[derive(Clone)]
pub struct ObjectSnapshots<J> {
    journal: J,
    objects: SnapshotObjects,
}

impl<J> ObjectSnapshots<J> {
    pub fn new(journal: J, objects: SnapshotObjects) -> Self {
        Self { journal, objects }
    }

    /// The backend that holds the journal (and everything that is not a Yjs snapshot).
    pub fn journal(&self) -> &J {
        &self.journal
    }

    pub fn objects(&self) -> &SnapshotObjects {
        &self.objects
    }
}

#[async_trait]
impl<J: TrimJournal> DocJournal for ObjectSnapshots<J> {
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError> {
        self.journal.append_many(doc, updates).await
    }

    async fn load(&self, doc: &str) -> Result<StoredDoc, StorageError> {
        // The journal first, then the object: see the module docs.
        let stored = self.journal.load(doc).await?;
        let object = self.objects.get(doc).await?;
        let mut updates = stored.updates;
        let (snapshot, object) = match object {
            Some((bytes, version)) => {
                if let Some(legacy) = stored.snapshot {
                    debug_assert!(updates.first().is_none_or(|(seq, _)| *seq > LEGACY_SNAPSHOT_SEQ));
                    updates.insert(0, (LEGACY_SNAPSHOT_SEQ, legacy));
                }
                (Some(bytes), Some(version))
            }
            None => (stored.snapshot, None),
        };
        let snapshot_version = LoadedVersion { object, db: stored.snapshot_version }.encode();
        Ok(StoredDoc { snapshot, snapshot_version, updates })
    }

    async fn compact(&self, doc: &str, snapshot: Vec<u8>, folded: Folded) -> Result<(), StorageError> {
        let conflict = || StorageError::CompactionConflict { doc: doc.to_owned() };
        // A version this wrapper did not hand out matches no stored object.
        let loaded = LoadedVersion::decode(folded.snapshot_version.as_deref()).ok_or_else(conflict)?;
        if !self.objects.put(doc, snapshot, loaded.object.as_ref()).await? {
            return Err(conflict());
        }
        // The object holds everything the load held: delete it from the database (a crash before
        // this line leaves entries the object already contains).
        let seqs = folded.seqs.into_iter().filter(|&seq| seq != LEGACY_SNAPSHOT_SEQ).collect();
        self.journal.trim(doc, Folded { snapshot_version: loaded.db, seqs }).await
    }
}

/// Everything that is not a Yjs snapshot is the wrapped backend's.
#[async_trait]
impl<J: CoValueStore> CoValueStore for ObjectSnapshots<J> {
    async fn load_covalue(&self, id: &str) -> Result<Option<CoValueRecord>, StorageError> {
        self.journal.load_covalue(id).await
    }

    async fn append_covalues(&self, appends: Vec<CoValueAppend>) -> Vec<Result<(), AppendError>> {
        self.journal.append_covalues(appends).await
    }

    async fn known_states(&self, ids: Vec<String>) -> Result<Vec<Option<StoredKnownState>>, StorageError> {
        self.journal.known_states(ids).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_stay_plain_and_others_are_percent_encoded() {
        assert_eq!(encode_doc_id("notes-2024_v1.2"), "notes-2024_v1.2");
        assert_eq!(encode_doc_id("team/plan 1"), "team%2Fplan%201");
        assert_eq!(encode_doc_id("100%"), "100%25");
        assert_eq!(encode_doc_id("ümlaut~"), "%C3%BCmlaut%7E");
        assert_eq!(encode_doc_id(".."), "..");
    }

    #[test]
    fn keys_live_under_the_prefix_and_long_ones_are_hashed() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let objects = SnapshotObjects::new(store.clone(), "mem", "/snaps/yjs/", Duration::from_secs(1)).unwrap();
        assert_eq!(objects.key("doc"), "snaps/yjs/doc.bin");
        assert_eq!(objects.key("../x"), "snaps/yjs/..%2Fx.bin");
        let long = "é".repeat(256); // 512 bytes, 1536 encoded
        let key = objects.key(&long);
        assert!(key.starts_with("snaps/yjs/~sha256~") && key.ends_with(".bin") && key.len() < 200, "{key}");
        assert_ne!(objects.key(&long), objects.key(&"é".repeat(255)));
        let root = SnapshotObjects::new(store, "mem", "", Duration::from_secs(1)).unwrap();
        assert_eq!(root.key("doc"), "doc.bin");
    }

    #[test]
    fn versions_round_trip_and_foreign_ones_are_refused() {
        let cases = [
            LoadedVersion { object: None, db: Some("7".into()) },
            LoadedVersion { object: Some(ObjectVersion { e_tag: Some("\"a;b%c\"".into()), version: None }), db: None },
            LoadedVersion {
                object: Some(ObjectVersion { e_tag: Some("\"x\"".into()), version: Some("v=1".into()) }),
                db: Some("inline".into()),
            },
            LoadedVersion { object: Some(ObjectVersion::default()), db: None },
        ];
        for case in cases {
            let text = case.encode().unwrap();
            assert_eq!(LoadedVersion::decode(Some(&text)), Some(case), "{text}");
        }
        assert_eq!(LoadedVersion::default().encode(), None);
        assert_eq!(LoadedVersion::decode(None), Some(LoadedVersion::default()));
        for foreign in ["7", "no-such-version", "s3", "s3;x=1", "s3;e=\"x\"", "s3;o;e=%zz", ""] {
            assert_eq!(LoadedVersion::decode(Some(foreign)), None, "{foreign}");
        }
    }
}

//! Command-line interface. Every flag of `serve` is also an environment variable, so the same
//! binary is configured by flags on a laptop and by environment in a container.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use moai_storage::redact_url;

pub use crate::migrate::MigrateArgs;
use crate::storage::{self, StorageUrl};
use crate::units;

#[derive(Parser, Debug)]
#[command(
    name = "moai",
    version,
    about = "A self-hosted real-time sync server for local-first apps",
    long_about = "A self-hosted real-time sync server for local-first apps.\n\n\
        Speaks Yjs (y-websocket) at /sync/v1/{docId}, CoJSON (Jazz) at /sync and a Postgres \
        change feed at /api/sync. Run with no command to serve on the embedded SQLite default.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serve options, when no command is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once at start; boxing would buy nothing
pub enum Command {
    /// Run the sync server (the default when no command is given).
    Serve(ServeArgs),
    /// Wait until a moai server reports ready on /health: `moai serve & moai wait-ready && start-the-app`.
    WaitReady(WaitReadyArgs),
    /// Mint a connection token signed with SYNC_SHARED_SECRET.
    Token(TokenArgs),
    /// Copy a moai database into another backend (e.g. SQLite to PostgreSQL), resumably, and
    /// verify the copy: `moai migrate --from sqlite:./local-sync.db --to postgres://…`.
    Migrate(MigrateArgs),
    /// Copy the embedded database to PATH, consistently, while moai serves: `moai backup ./backup.db`.
    Backup(crate::backup::BackupArgs),
    /// Replace the embedded database with a backup (moai must be stopped): `moai restore ./backup.db`.
    Restore(crate::backup::RestoreArgs),
    /// Yjs documents in and out of storage: export, import, list, stats.
    Doc(crate::doc::DocArgs),
    /// Participant mode: make the server's own cojson identity (`moai agent generate`).
    Agent(crate::agent::AgentArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free port; the chosen one is logged).
    #[arg(long, env = "PORT", default_value_t = 4201)]
    pub port: u16,
    /// Where data is stored (shared with the offline commands: backup, doc).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Log format. The filter comes from RUST_LOG (default "info").
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Largest WebSocket message accepted; larger ones close the socket with 1009.
    #[arg(long, env = "MOAI_MAX_FRAME_BYTES", default_value = "16MiB", value_parser = units::bytes)]
    pub max_frame_bytes: usize,
    /// Largest HTTP request body; larger requests get 413.
    #[arg(long, env = "MOAI_MAX_BODY_BYTES", default_value = "16MiB", value_parser = units::bytes)]
    pub max_body_bytes: usize,
    /// Most open connections (WebSockets included); further ones get 503.
    #[arg(long, env = "MOAI_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Most open connections from one IP address; 0 = no limit (the default, because behind a
    /// proxy or load balancer every client has the proxy's address). Further ones get 503.
    #[arg(long, env = "MOAI_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,
    /// Most open WebSocket sessions per token subject (user); 0 = no limit. Further ones are
    /// closed with 1013 (clients retry with backoff).
    #[arg(long, env = "MOAI_MAX_SESSIONS_PER_USER", default_value_t = 0)]
    pub max_sessions_per_user: usize,
    /// Time a client has to send its request headers, WebSocket handshake included; a
    /// connection that sends nothing at all is closed after it too.
    #[arg(long, env = "MOAI_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = units::duration)]
    pub handshake_timeout: Duration,
    /// Time a plain HTTP request may take; longer ones get 408.
    #[arg(long, env = "MOAI_REQUEST_TIMEOUT", default_value = "30s", value_parser = units::duration)]
    pub request_timeout: Duration,
    /// Time a new WebSocket may stay silent before its first message; closed with 1008 after.
    #[arg(long, env = "MOAI_FIRST_MESSAGE_TIMEOUT", default_value = "30s", value_parser = units::duration)]
    pub first_message_timeout: Duration,
    /// How long shutdown waits for sessions to close before closing storage and exiting.
    #[arg(long, env = "MOAI_SHUTDOWN_GRACE", default_value = "10s", value_parser = units::duration)]
    pub shutdown_grace: Duration,
    /// Async worker threads. Default: one less than the CPU cores, at least one. The storage
    /// writer and the compactor have threads of their own, and on a 2-core machine one worker
    /// measured better than two for every load (docs/benchmarks.md: less CPU per message and
    /// lower latency, because wake-ups stay on one thread).
    #[arg(long, env = "MOAI_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,

    /// fsync every group commit (survives power loss). With false, acknowledged writes still
    /// survive a crash of moai, but the last commits may be lost if the machine loses power.
    #[arg(long, env = "MOAI_FSYNC", default_value_t = true, action = clap::ArgAction::Set)]
    pub fsync: bool,

    /// Shared secret for connection tokens (HMAC-SHA256). Unset: the server runs open, and says
    /// so in the log and in /health.
    #[arg(long, env = "SYNC_SHARED_SECRET", hide_env_values = true)]
    pub sync_shared_secret: Option<String>,

    /// Bearer token that GET /metrics requires (`Authorization: Bearer …`). Unset: /metrics is
    /// open to anyone who can reach the port.
    #[arg(long, env = "MOAI_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Token that opens the dashboard (/dashboard: live connections, documents, storage, change
    /// feed; docs/dashboard.md), by `Authorization: Bearer …` or the page's sign-in form. Unset:
    /// the dashboard is off (404).
    #[arg(long, env = "MOAI_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// WebSocket ping interval of every endpoint; a socket that misses two pongs is closed.
    /// (`--yjs-ping-interval`, its name before it applied to every endpoint, still works.)
    #[arg(long, alias = "yjs-ping-interval", env = "MOAI_PING_INTERVAL", default_value = "30s", value_parser = units::duration)]
    pub ping_interval: Duration,
    /// Yjs: send the empty awareness frame to sockets idle this long (browsers cannot see
    /// pings and drop a socket silent for 30 s).
    #[arg(long, env = "MOAI_YJS_KEEPALIVE", default_value = "15s", value_parser = units::duration)]
    pub yjs_keepalive: Duration,
    /// Yjs: evict a document from memory after it had no connections this long.
    #[arg(long, env = "MOAI_YJS_IDLE_EVICT", default_value = "30s", value_parser = units::duration)]
    pub yjs_idle_evict: Duration,
    /// Yjs: fold a document's journal into a snapshot once it holds this many bytes.
    #[arg(long, env = "MOAI_YJS_COMPACT_BYTES", default_value = "1MiB", value_parser = units::bytes)]
    pub yjs_compact_bytes: usize,
    /// Yjs: frames queued for one socket before it counts as too slow and is closed (1013).
    #[arg(long, env = "MOAI_YJS_OUTBOX_FRAMES", default_value_t = 1024)]
    pub yjs_outbox_frames: usize,
    /// Yjs: bytes queued for one socket before it counts as too slow and is closed (1013); one
    /// frame larger than this still goes to an empty queue.
    #[arg(long, env = "MOAI_YJS_OUTBOX_BYTES", default_value = "32MiB", value_parser = units::bytes)]
    pub yjs_outbox_bytes: usize,
    /// Yjs: bytes of inbound frames queued for one document; senders wait beyond it.
    #[arg(long, env = "MOAI_YJS_INBOUND_BYTES", default_value = "64MiB", value_parser = units::bytes)]
    pub yjs_inbound_bytes: usize,

    /// Accept Yjs subdocuments (documents referenced from inside another). Off by default: the
    /// Yjs library moai uses (yrs 0.28) never frees a subdocument, so each one leaks a few KiB
    /// every time a document holding it is unloaded; a client could grow memory without bound.
    #[arg(long, env = "MOAI_YJS_ALLOW_SUBDOCUMENTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub yjs_allow_subdocuments: bool,

    /// CoJSON: CoValues one connection may load or sync; a peer over it is closed with 1008.
    #[arg(long, env = "MOAI_COJSON_MAX_COVALUES_PER_PEER", default_value_t = 20_000)]
    pub cojson_max_covalues_per_peer: usize,

    /// Postgres change feed: the database to replicate from (`postgres://user@host:port/db`).
    /// The user needs the REPLICATION attribute and CREATE on the database. Unset: /api/sync
    /// answers 404.
    #[arg(long, env = "PG_URL", hide_env_values = true)]
    pub pg_url: Option<String>,
    /// Postgres change feed: tables to publish, comma-separated `schema.table`.
    #[arg(long, env = "PG_TABLES", value_delimiter = ',')]
    pub pg_tables: Vec<String>,
    /// Postgres change feed: keep change history this long (never dropping what a live client
    /// still needs); `0s` keeps everything.
    #[arg(long, env = "PG_RETENTION", default_value = "7d", value_parser = units::duration)]
    pub pg_retention: Duration,

    /// Cluster: the Redis server through which several moai instances sharing PostgreSQL
    /// storage (and S3 snapshots) serve the same documents and CoValues
    /// (`redis://[user:pass@]host:port[/db]`; docs/cluster.md). Unset: a single instance.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Cluster: how often each open document tells the other instances what it has, so that a
    /// message the bus lost is repaired.
    #[arg(long, env = "MOAI_CLUSTER_EXCHANGE", default_value = "10s", value_parser = units::duration)]
    pub cluster_exchange: Duration,
    /// Cluster: how often this instance renews its heartbeat; an instance silent for three
    /// periods is gone and its clients' presence is removed everywhere.
    #[arg(long, env = "MOAI_CLUSTER_HEARTBEAT", default_value = "1s", value_parser = units::duration)]
    pub cluster_heartbeat: Duration,

    /// The LLM proxy (off unless --llm-base-url or RED_PILL_API_KEY is set).
    #[command(flatten)]
    pub llm: crate::llm::LlmArgs,

    /// Participant mode: the server's own cojson account id (`co_z…`), checked against
    /// PEER_SECRET at start (`moai agent generate` makes both; docs/participant.md).
    #[arg(long, env = "PEER_ID")]
    pub peer_id: Option<String>,
    /// Participant mode: the agent secret (`sealerSecret_z…/signerSecret_z…`). Unset: moai is a
    /// pure relay.
    #[arg(long, env = "PEER_SECRET", hide_env_values = true)]
    pub peer_secret: Option<String>,
    /// Participant mode: the profile name the server's account gets when it is created.
    #[arg(long, env = "PEER_NAME", default_value = "moai")]
    pub peer_name: String,
    /// Participant mode: `sync` (the hub; the default) or `agent`, which also connects
    /// upstream to PEER_MOAI as a client peer and keeps the server's account and what it was
    /// given in sync with it, while still serving its own /sync (docs/participant.md).
    #[arg(long, env = "PEER_MODE", value_enum, default_value = "sync")]
    pub peer_mode: PeerMode,
    /// Agent mode: the upstream sync server, `host[:port]` (ws:// for localhost, else wss://,
    /// path /sync) or a full ws:// or wss:// URL (a Jazz sync server's `?key=` goes in it).
    #[arg(long, env = "PEER_MOAI")]
    pub peer_moai: Option<String>,
    /// Agent mode: a token of the upstream moai, sent as `Authorization: Bearer`.
    #[arg(long, env = "PEER_MOAI_TOKEN", hide_env_values = true)]
    pub peer_moai_token: Option<String>,

    /// Webhooks: POST a signed JSON event to this URL when a Yjs document or a CoValue is
    /// created or changed (debounced; retried with backoff; never blocking sync; docs/webhooks.md).
    #[arg(long, env = "MOAI_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Webhooks: the HMAC-SHA256 key of the `X-Moai-Signature` header (required with
    /// --webhook-url).
    #[arg(long, env = "MOAI_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Webhooks: quiet time after an id's last change before it is reported.
    #[arg(long, env = "MOAI_WEBHOOK_DEBOUNCE", default_value = "2s", value_parser = units::duration)]
    pub webhook_debounce: Duration,
    /// Webhooks: longest an id that keeps changing waits to be reported.
    #[arg(long, env = "MOAI_WEBHOOK_MAX_WAIT", default_value = "10s", value_parser = units::duration)]
    pub webhook_max_wait: Duration,

    /// Test hook, debug builds only: the first cluster publication containing this text is
    /// dropped, as if the bus had lost it (tests of the repair).
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    pub test_cluster_drop_marker: Option<String>,

    /// Test hook: write every inbound WebSocket data frame to a file under this directory
    /// (seeds for the fuzz targets; docs/fuzzing.md).
    #[arg(long, env = "MOAI_TEST_CAPTURE_FRAMES", hide = true)]
    pub test_capture_frames: Option<PathBuf>,

    /// Test hook, debug builds only: a Yjs update containing this text makes the Yjs library's
    /// apply panic, so tests can show that a panic costs only its document (docs/fuzzing.md).
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    pub test_yrs_panic_marker: Option<String>,

    /// Test hook: hold initialisation open until this file exists, so tests can observe the
    /// not-ready state deterministically.
    #[arg(long, env = "MOAI_TEST_HOLD_INIT_UNTIL", hide = true)]
    pub test_hold_init_until: Option<PathBuf>,
}

/// Where moai's data lives: the storage backend and, optionally, object storage for Yjs
/// snapshots. The same flags (and environment variables) for `serve` and the offline commands.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// SQLite database file of the embedded storage (created if missing). Used when --storage
    /// is not given.
    #[arg(long, env = "DB_PATH", default_value = "./local-sync.db")]
    pub db_path: PathBuf,
    /// Storage backend: `sqlite:PATH` (the embedded default, one file) or
    /// `postgres://user:password@host:port/database` (a database several instances can share;
    /// moai's tables go in the schema `moai_storage`). Unset: SQLite at --db-path.
    #[arg(long, env = "MOAI_STORAGE", hide_env_values = true)]
    pub storage: Option<String>,
    /// Keep Yjs snapshots in S3-compatible object storage at `s3://bucket/prefix`: one object
    /// per document (`<prefix>/<docId>.bin`, a full Yjs update), the journal tail stays in
    /// --storage. Credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, …). Unset (and no --s3-bucket): snapshots stay
    /// in --storage.
    #[arg(long, env = "MOAI_S3_URL")]
    pub s3_url: Option<String>,
    /// The bucket for Yjs snapshots, instead of --s3-url.
    #[arg(long, env = "S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Key prefix of the snapshots in --s3-bucket.
    #[arg(long, env = "S3_PREFIX")]
    pub s3_prefix: Option<String>,
    /// Region of the snapshot bucket (default us-east-1; AWS_DEFAULT_REGION is read too).
    #[arg(long, env = "AWS_REGION")]
    pub s3_region: Option<String>,
    /// An S3-compatible service instead of AWS, e.g. `http://127.0.0.1:9000` (plain http is
    /// allowed). AWS_ENDPOINT_URL is read too.
    #[arg(long, env = "MOAI_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Longest a snapshot read (loading a document) or write (compaction) may take in object
    /// storage; past it the load fails (the document is refused) or the compaction is retried
    /// later.
    #[arg(long, env = "MOAI_S3_TIMEOUT", default_value = "30s", value_parser = units::duration)]
    pub s3_timeout: Duration,
}

impl StoreArgs {
    /// The storage to open: `--storage`, else SQLite at `--db-path`. An error never shows the
    /// value's password.
    pub fn storage_url(&self) -> anyhow::Result<StorageUrl> {
        match &self.storage {
            None => Ok(StorageUrl::Sqlite(self.db_path.clone())),
            Some(raw) => storage::parse_url(raw).map_err(|why| anyhow::anyhow!("--storage {}: {why}", redact_url(raw))),
        }
    }

    /// The storage as the start-up log line names it (no password).
    pub fn storage_description(&self) -> String {
        match (self.storage_url(), &self.storage) {
            (Ok(url), _) => url.to_string(),
            (Err(_), Some(raw)) => redact_url(raw),
            (Err(_), None) => String::new(),
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct WaitReadyArgs {
    /// The server's base URL or its /health URL.
    #[arg(default_value = "http://127.0.0.1:4201/health")]
    pub url: String,
    /// Give up after this long.
    #[arg(long, default_value = "30s", value_parser = units::duration)]
    pub timeout: Duration,
    /// Pause between attempts.
    #[arg(long, default_value = "300ms", value_parser = units::duration)]
    pub interval: Duration,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The user id the token speaks for.
    pub user: String,
    /// Limit the token to this Yjs document (repeatable; a trailing `*` matches a prefix).
    #[arg(long = "doc")]
    pub docs: Vec<String>,
    /// Limit the change feed to this table (repeatable): `schema.table`, or
    /// `"schema.table WHERE predicate"` to also limit its rows (shape syntax, e.g.
    /// `"public.todos WHERE owner_id = 'u1'"`).
    #[arg(long = "table")]
    pub tables: Vec<String>,
    /// Open the CoJSON endpoint (/sync). Needed when the token also names documents or tables:
    /// a token that names any resource opens only what it names.
    #[arg(long)]
    pub cojson: bool,
    /// Allow calls to the LLM proxy; the user id is the account its limits count against.
    /// Needed when the token also names other resources.
    #[arg(long)]
    pub llm: bool,
    /// Read-only: the session loads and receives updates and presence, but its writes are
    /// dropped (Yjs updates, HTTP POST, CoJSON content).
    #[arg(long)]
    pub read_only: bool,
    /// Make the token expire after this long (e.g. 1h, 30m).
    #[arg(long, value_parser = units::duration)]
    pub ttl: Option<Duration>,
    /// The shared secret (the same value the server has).
    #[arg(long, env = "SYNC_SHARED_SECRET", hide_env_values = true)]
    pub secret: String,
}

/// What the server is in participant mode (`PEER_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerMode {
    /// The hub: no upstream.
    Sync,
    /// Also a client of the upstream sync server named by PEER_MOAI.
    Agent,
}

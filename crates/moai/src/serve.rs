//! `moai serve`: listen first, initialise in the background, serve until a signal, then shut
//! down in order (stop accepting → close sessions with 1001 → flush and close storage → exit 0).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use moai_cojson::{CojsonConfig, CojsonService};
use moai_pgsync::{PgSync, PgSyncConfig};
use moai_server::quota::Quota;
use moai_server::{AppState, Auth, Engines, Heartbeat, Limits, Metrics, Readiness, Shutdown, StorageHealth};
use moai_storage::SnapshotObjects;
use moai_yjs::service::{YjsConfig, YjsService};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::cli::{PeerMode, ServeArgs};
use crate::logging;
use crate::storage::{self, Storage};
use moai_server::uplink::{UplinkService, UplinkSettings};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a failed start keeps serving /health (with the error) before exiting 1.
const FAILED_INIT_LINGER: Duration = Duration::from_secs(2);

/// What initialisation produces and shutdown must close.
struct Running {
    engines: Engines,
    storage: Storage,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    logging::init(args.log_format);
    #[cfg(debug_assertions)]
    if let Some(marker) = args.test_yrs_panic_marker.clone() {
        tracing::warn!("test hook: Yjs updates containing the marker make the Yjs library panic");
        moai_yjs::set_test_panic_marker(marker.into_bytes());
    }
    let started = Instant::now();
    let identity = participant_identity(&args)?;
    let upstream = upstream_settings(&args, identity.is_some())?;
    let metrics = Metrics::new(VERSION);
    let readiness = Readiness::new();
    let shutdown = Shutdown::new();
    let limits = Limits {
        max_frame_bytes: args.max_frame_bytes,
        max_body_bytes: args.max_body_bytes,
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        max_sessions_per_user: args.max_sessions_per_user,
        handshake_timeout: args.handshake_timeout,
        request_timeout: args.request_timeout,
    };
    let mut signals = Signals::new()?;

    let addr = format!("{}:{}", args.host, args.port);
    let listener = TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(version = VERSION, addr = %local, storage = %args.store.storage_description(), "moai listening; initialising");

    let auth = match args.sync_shared_secret.as_deref().filter(|s| !s.is_empty()) {
        Some(secret) => {
            tracing::info!("connection tokens required (SYNC_SHARED_SECRET is set)");
            Auth::with_secret(secret)
        }
        None => {
            tracing::warn!("SYNC_SHARED_SECRET is not set: running OPEN, any client may read and write any document");
            Auth::open()
        }
    };
    let cluster = start_cluster(&args)?;
    if let Some(bus) = &cluster {
        metrics.watch_cluster(bus.clone());
    }
    let storage_health = StorageHealth::new(metrics.clone());
    let llm = moai_server::llm::LlmService::start(args.llm.settings(), &auth, metrics.clone())
        .context("the LLM proxy cannot start")?;
    let dashboard = moai_server::Dashboard::new(moai_server::AdminToken::new(args.admin_token.as_deref()));
    let state = AppState {
        readiness: readiness.clone(),
        metrics: metrics.clone(),
        limits: limits.clone(),
        shutdown: shutdown.clone(),
        version: VERSION,
        auth,
        heartbeat: Heartbeat {
            ping_interval: args.ping_interval,
            idle_keepalive: args.yjs_keepalive,
            first_message_timeout: args.first_message_timeout,
            ..Heartbeat::default()
        },
        metrics_token: args.metrics_token.clone().filter(|t| !t.is_empty()),
        sessions_per_user: Arc::new(Quota::new(limits.max_sessions_per_user)),
        storage_health: storage_health.clone(),
        capture: args.test_capture_frames.clone().map(|dir| {
            tracing::warn!(dir = %dir.display(), "test hook: recording inbound frames");
            Arc::new(moai_server::capture::FrameCapture::new(dir))
        }),
        cluster: cluster.clone(),
        dashboard: dashboard.clone(),
        llm,
    };
    let app = moai_server::router(state);
    let server = tokio::spawn(moai_server::serve(listener, app, limits, metrics.clone(), shutdown.clone()));

    let changes = start_webhooks(&args, &metrics, &shutdown, cluster.as_ref())?;
    let init = initialise(&args, storage_health.clone(), cluster.clone(), changes, identity, upstream, &shutdown);
    let running = tokio::select! {
        result = init => match result {
            Ok(running) => running,
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(error = %reason, "initialisation failed; exiting");
                readiness.set_failed(reason);
                metrics.set_ready(false);
                // Keep answering for a moment, so /health shows `"status":"error"` with the
                // reason and `moai wait-ready` exits at once instead of at its timeout.
                tokio::select! {
                    _ = tokio::time::sleep(FAILED_INIT_LINGER) => {}
                    _ = signals.next() => {}
                }
                shutdown.trigger();
                shutdown.stop_accepting();
                let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
                return Ok(ExitCode::FAILURE);
            }
        },
        name = signals.next() => {
            tracing::info!(signal = name, "signal during initialisation; exiting");
            shutdown.trigger();
            shutdown.stop_accepting();
            return Ok(ExitCode::SUCCESS);
        }
    };
    let Running { engines, storage } = running;
    if let Ok(url) = args.store.storage_url() {
        let objects = matches!(storage::object_storage(&args.store), Ok(Some(_)));
        dashboard.set_storage_size(storage.size_probe(&url, objects));
    }
    tokio::spawn(probe_failing_storage(storage.clone(), storage_health.clone(), shutdown.clone()));
    let pgsync = engines.pgsync.clone();
    readiness.set_ready(engines);
    metrics.set_ready(true);
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");

    let name = signals.next().await;
    tracing::info!(signal = name, grace = ?args.shutdown_grace, "shutting down");
    readiness.set_draining();
    metrics.set_ready(false);
    shutdown.trigger();
    tokio::select! {
        code = drain(&shutdown, server, storage, pgsync, cluster, args.shutdown_grace) => Ok(code),
        name = signals.next() => {
            tracing::warn!(signal = name, "second signal: exiting now");
            Ok(ExitCode::from(130))
        }
    }
}

/// The server's own cojson identity when PEER_SECRET is set (participant mode). A PEER_ID that is
/// not the secret's account refuses the start: serving under the wrong identity would write
/// content nobody can verify. The secret is never echoed.
fn participant_identity(args: &ServeArgs) -> anyhow::Result<Option<moai_cojson::AgentIdentity>> {
    let given = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
    let Some(secret) = given(&args.peer_secret) else {
        if given(&args.peer_id).is_some() {
            anyhow::bail!("PEER_ID is set without PEER_SECRET; set both (moai agent generate) or neither");
        }
        return Ok(None);
    };
    let identity = match given(&args.peer_id) {
        Some(id) => moai_cojson::AgentIdentity::from_env(&id, &secret),
        None => moai_cojson::AgentIdentity::from_secret(&secret),
    }
    .map_err(|e| anyhow::anyhow!("participant identity (PEER_ID/PEER_SECRET): {e}"))?;
    tracing::info!(account = identity.account_id(), "participant identity checked");
    Ok(Some(identity))
}

/// Agent mode's upstream (`PEER_MODE=agent`, `PEER_MOAI`), checked before anything starts: agent
/// mode needs the server's own account and an upstream, and an upstream without agent mode is a
/// mistake worth stopping for rather than a setting silently ignored.
fn upstream_settings(args: &ServeArgs, has_identity: bool) -> anyhow::Result<Option<UplinkSettings>> {
    let peer_moai = args.peer_moai.as_deref().map(str::trim).filter(|v| !v.is_empty());
    match (args.peer_mode, peer_moai) {
        (PeerMode::Sync, None) => Ok(None),
        (PeerMode::Sync, Some(_)) => {
            anyhow::bail!("PEER_MOAI is set but PEER_MODE is sync; set PEER_MODE=agent to connect upstream")
        }
        (PeerMode::Agent, None) => anyhow::bail!("PEER_MODE=agent needs PEER_MOAI (the upstream sync server)"),
        (PeerMode::Agent, Some(given)) => {
            if !has_identity {
                anyhow::bail!("PEER_MODE=agent needs the server's own account: set PEER_SECRET (moai agent generate)");
            }
            let url = moai_server::uplink::upstream_url(given)?;
            let token = args.peer_moai_token.clone().filter(|t| !t.is_empty());
            Ok(Some(UplinkSettings { url, token, max_frame_bytes: args.max_frame_bytes }))
        }
    }
}

/// What agent mode keeps in sync from the start: the server's account, its profile, the
/// registry, and every CoValue it was given (their groups and accounts follow as dependencies).
async fn own_covalues(participant: &moai_cojson::ParticipantService) -> anyhow::Result<Vec<moai_cojson::CoId>> {
    let profile = participant.profile().await.context("reading the server's profile")?;
    let ids = [Some(profile.account_id), profile.profile_id, profile.registry_id]
        .into_iter()
        .flatten()
        .chain(profile.given.keys().cloned());
    Ok(ids.filter_map(|id| moai_cojson::CoId::parse(&id).ok()).collect())
}

/// Starts the cluster bus when `--redis-url` is set. Several instances must share storage, so
/// the embedded SQLite database is refused: what one instance stores must be there for all.
fn start_cluster(args: &ServeArgs) -> anyhow::Result<Option<moai_cluster::Bus>> {
    let Some(url) = args.redis_url.as_deref().filter(|u| !u.is_empty()) else { return Ok(None) };
    if !matches!(args.store.storage_url()?, storage::StorageUrl::Postgres(_)) {
        anyhow::bail!(
            "--redis-url (REDIS_URL) makes this instance one of several serving the same documents; \
             they must share storage: use --storage postgres://… (the embedded SQLite database is per machine)"
        );
    }
    let mut config = moai_cluster::BusConfig::new(url);
    config.heartbeat_interval = args.cluster_heartbeat.max(Duration::from_millis(50));
    config.instance_ttl = config.heartbeat_interval * 3;
    #[cfg(debug_assertions)]
    if let Some(marker) = &args.test_cluster_drop_marker {
        tracing::warn!("test hook: the first cluster publication containing the marker is dropped");
        config.drop_marker = Some(marker.clone().into_bytes());
    }
    let bus = moai_cluster::Bus::start(config).context("starting the cluster bus")?;
    tracing::info!(instance = %bus.instance(), redis = %moai_storage::redact_url(url), "cluster bus starting");
    Ok(Some(bus))
}

/// Starts webhooks when `--webhook-url` is set (a secret is required: unsigned webhooks could be
/// forged by anyone who can reach the receiver).
fn start_webhooks(
    args: &ServeArgs,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
    cluster: Option<&moai_cluster::Bus>,
) -> anyhow::Result<Option<moai_storage::ChangeSink>> {
    let Some(url) = args.webhook_url.as_deref().filter(|u| !u.is_empty()) else { return Ok(None) };
    let Some(secret) = args.webhook_secret.as_deref().filter(|s| !s.is_empty()) else {
        anyhow::bail!("--webhook-url needs --webhook-secret (MOAI_WEBHOOK_SECRET): webhooks are always signed");
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        anyhow::bail!("--webhook-url must be an http:// or https:// URL");
    }
    let mut config = moai_server::webhooks::WebhookConfig::new(url, secret);
    config.debounce = args.webhook_debounce;
    config.max_wait = args.webhook_max_wait.max(args.webhook_debounce);
    config.instance = cluster.map(|b| b.instance().to_string()).unwrap_or_default();
    let hooks = moai_server::webhooks::Webhooks::start(config, metrics.clone(), shutdown.clone());
    tracing::info!("webhooks on: every created or changed document and CoValue is reported (signed)");
    Ok(Some(moai_storage::ChangeSink(hooks)))
}

/// Opens storage and starts the engines. Nothing is served until this returns Ok.
async fn initialise(
    args: &ServeArgs,
    observer: Arc<StorageHealth>,
    cluster: Option<moai_cluster::Bus>,
    changes: Option<moai_storage::ChangeSink>,
    identity: Option<moai_cojson::AgentIdentity>,
    upstream: Option<UplinkSettings>,
    shutdown: &Shutdown,
) -> anyhow::Result<Running> {
    if let Some(gate) = &args.test_hold_init_until {
        wait_for_file(gate).await;
    }
    let url = args.store.storage_url()?;
    let object_storage = storage::object_storage(&args.store)?;
    let storage = Storage::open(&url, args.fsync, observer).await?;
    tracing::info!(storage = %url, "storage open");
    let journal = match object_storage {
        None => storage.journal(),
        Some(options) => {
            let target = options.target();
            let objects = SnapshotObjects::open(options)
                .await
                .with_context(|| format!("opening object storage for Yjs snapshots at {target}"))?;
            tracing::info!(snapshots = %target, "Yjs snapshots in object storage; the journal stays in storage");
            storage.journal_with_snapshots_in(objects)
        }
    };
    let yjs_config = YjsConfig {
        outbox_frames: args.yjs_outbox_frames.max(1),
        outbox_bytes: args.yjs_outbox_bytes.max(1),
        inbound_bytes: args.yjs_inbound_bytes.max(1),
        idle_evict: args.yjs_idle_evict,
        compact_journal_bytes: args.yjs_compact_bytes,
        policy: moai_yjs::Policy { allow_subdocuments: args.yjs_allow_subdocuments },
        cluster_exchange: args.cluster_exchange.max(Duration::from_millis(50)),
        changes: changes.clone(),
        ..YjsConfig::default()
    };
    let yjs = match &cluster {
        Some(bus) => YjsService::clustered(journal, yjs_config, bus.clone()),
        None => YjsService::new(journal, yjs_config),
    };
    let pgsync = match &args.pg_url {
        Some(url) => Some(start_pgsync(url, args).await?),
        None => {
            if !args.pg_tables.is_empty() {
                anyhow::bail!("--pg-tables given without --pg-url");
            }
            None
        }
    };
    let mut cojson_config = CojsonConfig::default();
    cojson_config.relay.max_covalues_per_peer = args.cojson_max_covalues_per_peer.max(1);
    cojson_config.cluster_exchange = args.cluster_exchange.max(Duration::from_millis(50));
    cojson_config.changes = changes;
    let cojson = match &cluster {
        Some(bus) => CojsonService::clustered(storage.covalues(), cojson_config, bus.clone()),
        None => CojsonService::new(storage.covalues(), cojson_config),
    };
    let participant = match identity {
        Some(identity) => {
            let p = moai_cojson::ParticipantService::start(&cojson, identity, &args.peer_name)
                .await
                .context("loading or creating the server's own account (PEER_ID/PEER_SECRET)")?;
            tracing::info!(account = p.account_id(), "participant mode: the server's account is ready");
            Some(p)
        }
        None => None,
    };
    let uplink = match (upstream, &participant) {
        (Some(settings), Some(p)) => {
            let follow = own_covalues(p).await?;
            tracing::info!(upstream = %settings.url.split('?').next().unwrap_or_default(), following = follow.len(), "agent mode: linking to the upstream sync server");
            Some(UplinkService::start(cojson.clone(), settings, follow, shutdown.token().clone())?)
        }
        _ => None,
    };
    let engines = Engines { yjs: Some(yjs), pgsync, cojson: Some(cojson), participant, uplink };
    Ok(Running { engines, storage })
}

/// Starts the change feed and waits until it has caught up with the WAL that existed at start,
/// so a client that connects once /health is ready sees every change committed before.
async fn start_pgsync(url: &str, args: &ServeArgs) -> anyhow::Result<PgSync> {
    if args.pg_tables.is_empty() {
        anyhow::bail!("--pg-url needs --pg-tables (comma-separated schema.table)");
    }
    let mut config = PgSyncConfig::new(url, args.pg_tables.clone());
    config.retention = (!args.pg_retention.is_zero()).then_some(args.pg_retention);
    let pgsync = PgSync::start(config).await.context("starting the Postgres change feed")?;
    tracing::info!(tables = ?args.pg_tables, "Postgres change feed started; catching up with the WAL");
    pgsync.wait_caught_up().await.context("catching up with the Postgres WAL")?;
    Ok(pgsync)
}

/// While storage is failing, tries a small write every second, so /health turns ready again
/// once the disk has room (or is writable, or the database server is back) even if no client
/// writes. A backend on another server is also probed while healthy, less often, so an idle
/// instance notices that server going away.
async fn probe_failing_storage(storage: Storage, health: Arc<StorageHealth>, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let healthy_every = storage.probe_when_healthy();
    let mut last_probe = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.token().cancelled() => return,
            _ = tick.tick() => {}
        }
        let due = healthy_every.is_some_and(|every| last_probe.elapsed() >= every);
        if health.failure().is_some() || due {
            last_probe = Instant::now();
            if let Err(e) = storage.probe().await {
                tracing::debug!(error = %e, "storage probe failed");
            }
        }
    }
}

async fn wait_for_file(path: &Path) {
    tracing::warn!(path = %path.display(), "test hook: holding initialisation until this file exists");
    while !path.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn drain(
    shutdown: &Shutdown,
    server: tokio::task::JoinHandle<()>,
    storage: Storage,
    pgsync: Option<PgSync>,
    cluster: Option<moai_cluster::Bus>,
    grace: Duration,
) -> ExitCode {
    let deadline = Instant::now() + grace;
    if !shutdown.drained(grace).await {
        tracing::warn!(sessions = shutdown.active(), "grace period over; closing storage with sessions still open");
    }
    // Only now does the listener stop: until here /health answered 503 "draining", which is
    // what a load balancer needs to see to take this instance out.
    shutdown.stop_accepting();
    let left = deadline.saturating_duration_since(Instant::now());
    if tokio::time::timeout(left, server).await.is_err() {
        tracing::warn!("HTTP requests still in flight at the end of the grace period");
    }
    if let Some(bus) = cluster {
        // Sessions are closed (their presence removals published): leave the cluster now
        // rather than when the heartbeat expires.
        bus.shutdown().await;
    }
    if let Some(pg) = pgsync {
        // Stops the replicator after its last committed batch; the slot keeps the rest.
        pg.shutdown().await;
    }
    match storage.close().await {
        Ok(()) => {
            tracing::info!("storage flushed and closed; bye");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "closing storage failed");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT as one stream.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

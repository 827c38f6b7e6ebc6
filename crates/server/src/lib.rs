//! The Tributary server: the Tracking API, ActiveCampaign webhooks, the admin API and
//! operations endpoints on one port, wired to the event log and the consumers behind
//! it.
//!
//! The library owns the server: [`serve`] takes a configuration, a bound listener and
//! a shutdown future; `main` only parses arguments and binds. On shutdown (one
//! [`shutdown::Shutdown`] token for the accept loop and every stage) the server
//! stops accepting connections, lets in-flight requests finish (their appends
//! complete), stops the destination engine and the warehouse loader, flushes control
//! state and only then closes the log — so every request that got a 200 is durable,
//! and no request is cut off between append and answer.
//!
//! [`AppState`] is always complete: router tests build it with [`open_state_with`]
//! (injecting a log or a [`clock::Clock`]) instead of a partial test-only state.

pub mod accept;
pub mod admin;
pub mod body;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod console;
pub mod control;
pub mod destinations_api;
pub mod error;
pub mod fate;
pub mod files;
pub mod ingest;
pub mod live;
pub mod ops;
pub mod report;
pub mod settings;
pub mod shutdown;
pub mod sync;
pub mod warehouse_api;
pub mod webhook;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tributary_eventlog::{EventLog, SqliteLog};

use clock::{Clock, SystemClock};
pub use config::Config;
use control::Control;
use shutdown::Shutdown;

/// Everything a request handler can reach. Built only by [`open_state`] /
/// [`open_state_with`], so router tests run against the same full state as the
/// server.
pub struct AppState {
    /// The configuration the server runs with.
    pub config: Config,
    /// Sources, write keys, last events, identities.
    pub control: Arc<Control>,
    /// The durable event log.
    pub log: Arc<dyn EventLog>,
    /// The admin API token.
    pub admin_token: String,
    /// The destination delivery engine.
    pub destinations: Arc<tributary_destinations::Engine>,
    /// The warehouse loader and query side (`None` when the configuration turns
    /// loading off: `TRIBUTARY_WAREHOUSE=off`).
    pub warehouse: Option<Arc<tributary_warehouse::Warehouse>>,
    /// Bytes of request bodies that ingest may hold at once (see
    /// [`config::Limits::max_inflight_bytes`]); a request waits briefly for room, then
    /// gets 429. Requests whose write key was checked before their body draw on it.
    pub ingest_budget: Arc<tokio::sync::Semaphore>,
    /// The body budget of requests whose key can only be in the body: another
    /// quarter of `max_inflight_bytes` (at least one batch), kept apart so that
    /// unauthenticated bodies never take the room of authenticated ones.
    pub keyless_budget: Arc<tokio::sync::Semaphore>,
    /// Where handlers read the time.
    pub clock: Arc<dyn Clock>,
    /// The one shutdown token of the server and its stages.
    pub shutdown: Shutdown,
    /// The ActiveCampaign API sync's per-source tasks.
    pub sync: sync::Syncer,
    /// Which partitions of which consumer this node may consume: [`Sole`] (every
    /// partition) when embedded, PostgreSQL leases in cluster mode.
    ///
    /// [`Sole`]: tributary_eventlog::Sole
    pub ownership: Arc<dyn tributary_eventlog::Ownership>,
    /// Where destinations commit their positions in cluster mode (the control
    /// database, epoch-fenced); `None` when embedded (the log keeps them).
    pub registry: Option<Arc<dyn tributary_eventlog::ConsumerRegistry>>,
    /// The cluster's leases, when this node is part of one (shut down last, so other
    /// nodes take over at once).
    pub leases: Option<Arc<cluster::PgOwnership>>,
    /// The live event bus of the debugger (accepted, rejected and unmapped
    /// messages as they happen; nothing durable).
    pub live: Arc<live::Live>,
    /// The JetStream log itself, when `log` is one (its retention and lag run
    /// beside the consumers; see [`start_stages`]).
    pub jetstream: Option<Arc<tributary_eventlog::JetStreamLog>>,
}

/// What [`open_state_with`] takes instead of opening it from the configuration.
#[derive(Default)]
pub struct Parts {
    /// An event log to use instead of `<data_dir>/events.db` (router tests inject
    /// failing logs).
    pub log: Option<Arc<dyn EventLog>>,
    /// A clock instead of the system clock.
    pub clock: Option<Arc<dyn Clock>>,
    /// Where the JetStream log keeps consumer positions (cluster mode: the control
    /// database's registry). Without one, positions are kept in memory.
    pub registry: Option<Arc<dyn tributary_eventlog::ConsumerRegistry>>,
    /// Who owns which partition of each consumer (cluster mode: PostgreSQL
    /// leases). Without one this node owns every partition ([`tributary_eventlog::Sole`]).
    pub ownership: Option<Arc<dyn tributary_eventlog::Ownership>>,
}

/// Reads `TRIBUTARY_ADMIN_TOKEN` (via config) or `<data-dir>/admin-token`, creating
/// the file (mode 0600) with a new token when neither exists. Returns the token and
/// whether it was just generated.
pub fn admin_token(config: &Config) -> anyhow::Result<(String, bool)> {
    if let Some(t) = config.admin_token.as_ref().filter(|t| !t.is_empty()) {
        return Ok((t.clone(), false));
    }
    let path = config.data_dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok((t, false));
        }
    }
    let token = control::new_admin_token();
    write_private(&path, &token).with_context(|| format!("writing {}", path.display()))?;
    Ok((token, true))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Builds the router for a state (used by [`serve`] and by router tests).
pub fn router(state: Arc<AppState>) -> Router {
    let api = admin::routes()
        .merge(destinations_api::routes())
        .merge(warehouse_api::routes())
        .merge(sync::routes())
        .merge(report::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin,
        ));
    Router::new()
        .route("/v1/webhooks/activecampaign", post(webhook::activecampaign))
        .route(
            "/v1/webhooks/activecampaign/{key}",
            post(webhook::activecampaign_keyed),
        )
        .route(
            "/v1/projects/{key}/settings",
            get(settings::project_settings),
        )
        .route(
            "/v1/{method}",
            post(ingest::tracking).options(ops::preflight),
        )
        .nest("/api/v1", api)
        .merge(console::router())
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .layer(axum::middleware::from_fn(ops::observe))
        .with_state(state)
}

/// Opens every store under the configured data dir and returns the shared state.
pub async fn open_state(config: Config) -> anyhow::Result<Arc<AppState>> {
    open_state_with(config, Parts::default()).await
}

/// [`open_state`], with some parts given instead of opened.
pub async fn open_state_with(config: Config, parts: Parts) -> anyhow::Result<Arc<AppState>> {
    // First: the control plane's and the leases' gauges are set from the start.
    ops::install_metrics();
    // Files 0600, dirs 0700 from here on, and what exists already narrowed.
    let warehouse_dir = config
        .warehouse_url()
        .and_then(|u| u.strip_prefix("sqlite://").map(std::path::PathBuf::from));
    let extra: Vec<&Path> = warehouse_dir.as_deref().into_iter().collect();
    files::make_private(&config.data_dir, &extra)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let (control, cluster) = if config.is_cluster() {
        let (control, cluster) = cluster::open(&config).await?;
        (control, Some(cluster))
    } else {
        let control = Arc::new(
            Control::open(&config.data_dir)
                .map_err(|e| anyhow::anyhow!("opening control state: {e:?}"))?,
        );
        (control, None)
    };
    let definitions = cluster.as_ref().map(|c| c.definitions.clone());
    let ledger = cluster.as_ref().map(|c| c.ledger.clone());
    let (ownership, registry, leases): (
        Arc<dyn tributary_eventlog::Ownership>,
        Option<Arc<dyn tributary_eventlog::ConsumerRegistry>>,
        _,
    ) = match cluster {
        Some(c) => (c.leases.clone(), Some(c.registry), Some(c.leases)),
        None => (Arc::new(tributary_eventlog::Sole), None, None),
    };
    let mut jetstream = None;
    let log: Arc<dyn EventLog> = if let Some(log) = parts.log {
        log
    } else if config.bench_null_log {
        tracing::warn!("bench mode: the no-op event log keeps nothing");
        tributary_eventlog::bench_log().context(
            "TRIBUTARY_BENCH_NULL_LOG: this build has no bench log (build it with the bench crate)",
        )?
    } else if config.log.is_jetstream() {
        let registry = parts.registry.clone().or_else(|| registry.clone()).unwrap_or_else(|| {
            tracing::warn!("jetstream log without a control database: consumer positions are kept in memory only");
            Arc::new(tributary_eventlog::MemoryRegistry::default())
        });
        let js = Arc::new(
            tributary_eventlog::JetStreamLog::open(
                tributary_eventlog::LogConfig {
                    // The same pruning cadence rule as the embedded log's.
                    prune_interval: config.log_config().prune_interval,
                    ..config.log.clone()
                },
                registry,
            )
            .await
            .context("opening the JetStream event log (log.url)")?,
        );
        jetstream = Some(js.clone());
        js
    } else {
        Arc::new(
            SqliteLog::open(config.log_config())
                .await
                .context("opening the event log")?,
        )
    };
    ops::install_metrics();
    // Who consumes which partition. Cluster leases apply to a shared (JetStream)
    // log only: nodes with an embedded log each consume their own. A partitioned log
    // without leases is consumed whole by this node (`Sole`, epoch 0). The embedded
    // log has one partition and keeps the unpartitioned consumers.
    let consumer_ownership: Option<Arc<dyn tributary_eventlog::Ownership>> =
        parts.ownership.clone().or_else(|| {
            if leases.is_some() && config.log.is_jetstream() {
                Some(ownership.clone())
            } else if log.partitions() > 1 {
                Some(Arc::new(tributary_eventlog::Sole) as Arc<dyn tributary_eventlog::Ownership>)
            } else {
                None
            }
        });
    let destinations = tributary_destinations::Engine::open_owned_with(
        config.data_dir.join("destinations.db"),
        log.clone(),
        config.destinations.clone(),
        definitions,
        consumer_ownership
            .clone()
            .map(|o| (o, config.log.retention)),
        // The shared ledger only where partitions are leased (a JetStream log).
        ledger.filter(|_| leases.is_some() && config.log.is_jetstream()),
    )
    .await
    .map_err(|e| anyhow::anyhow!("starting destinations: {}", e.detail()))?;
    let warehouse = match config.warehouse_config() {
        None => {
            // Loading is off: the warehouse's old position must not hold the log.
            if let Err(e) = log.unpin("warehouse").await {
                tracing::warn!(error = %e, "cannot release the warehouse's log position");
            }
            None
        }
        Some(wc) => {
            let catalog = {
                let control = control.clone();
                move |id: &str| control.schema_of(id)
            };
            let warehouse = match consumer_ownership.clone() {
                None => {
                    tributary_warehouse::Warehouse::open(wc, log.clone(), Arc::new(catalog)).await
                }
                Some(ownership) => {
                    tributary_warehouse::Warehouse::open_owned(
                        wc,
                        log.clone(),
                        Arc::new(catalog),
                        ownership,
                    )
                    .await
                }
            };
            Some(Arc::new(warehouse.context("opening the warehouse")?))
        }
    };
    // Last, so a configuration that fails to open (e.g. a bad TRIBUTARY_WAREHOUSE)
    // never leaves a token behind or prints one.
    let (token, generated) = admin_token(&config)?;
    if generated {
        let path = config.data_dir.join("admin-token");
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "tributary: generated an admin token (saved to {}):\n\n    {token}\n",
            path.display()
        );
    }
    let budget = config
        .limits
        .max_inflight_bytes
        .min(tokio::sync::Semaphore::MAX_PERMITS);
    let keyless = (budget / 4).max(config.limits.max_batch_bytes.min(budget));
    Ok(Arc::new(AppState {
        config,
        control,
        log,
        admin_token: token,
        destinations: Arc::new(destinations),
        warehouse,
        ingest_budget: Arc::new(tokio::sync::Semaphore::new(budget)),
        keyless_budget: Arc::new(tokio::sync::Semaphore::new(keyless)),
        clock: parts.clock.unwrap_or_else(|| Arc::new(SystemClock)),
        shutdown: Shutdown::new(),
        sync: sync::Syncer::default(),
        ownership,
        registry,
        leases,
        live: Arc::new(live::Live::new()),
        jetstream,
    }))
}

/// The control flusher: writes display state once a second until the token
/// triggers, then once more.
fn spawn_control_flusher(state: &AppState) -> tokio::task::JoinHandle<()> {
    let control = state.control.clone();
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => break,
            }
            let c = control.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || c.flush()).await {
                tracing::warn!(error = ?e, "flushing control state failed (kept for the next flush)");
            }
        }
        let c = control.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || c.flush()).await {
            tracing::warn!(error = ?e, "final flush of control state failed");
        }
    })
}

/// Cluster mode: follows destination changes made on other nodes — at once when
/// the control database notifies, and every `control.reload_interval` anyway.
fn spawn_destination_sync(state: &Arc<AppState>) {
    let state = state.clone();
    tokio::spawn(async move {
        let mut changes = state.control.destination_changes();
        let mut tick = tokio::time::interval(state.config.control.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = state.shutdown.wait() => return,
                _ = tick.tick() => {}
                r = changes.changed() => if r.is_err() { return },
            }
            if let Err(e) = state.destinations.sync_definitions().await {
                tracing::debug!(error = %e.detail(), "cannot follow destination changes yet");
            }
        }
    });
}

/// Starts the background stages on the state's shutdown token; the returned task
/// finishes once every stage has stopped after the token triggered.
pub fn start_stages(state: &Arc<AppState>) -> tokio::task::JoinHandle<()> {
    let flusher = spawn_control_flusher(state);
    if state.config.is_cluster() {
        spawn_destination_sync(state);
    }
    let (stop_log_tasks, log_tasks_stop) = tokio::sync::watch::channel(false);
    let retention = state.jetstream.clone().map(|js| {
        ops::spawn_lag_metrics(js.clone(), log_tasks_stop.clone());
        tokio::spawn(tributary_eventlog::jetstream::run_retention(
            js,
            state.ownership.clone(),
            log_tasks_stop,
        ))
    });
    let state = state.clone();
    tokio::spawn(async move {
        sync::start(&state).await;
        state.shutdown.wait().await;
        let _ = stop_log_tasks.send(true);
        if let Some(r) = retention {
            let _ = r.await;
        }
        state.sync.join().await;
        let destinations = state.destinations.shutdown();
        let warehouse = async {
            if let Some(w) = &state.warehouse {
                w.shutdown().await;
            }
        };
        tokio::join!(destinations, warehouse);
        let _ = flusher.await;
        // Consumers have stopped and committed: hand their partitions over now
        // rather than after the lease TTL.
        if let Some(leases) = &state.leases {
            leases.shutdown().await;
        }
    })
}

/// Runs the server on `listener` until `shutdown` resolves, then drains and flushes.
///
/// Order on shutdown: the token triggers; the accept loop stops and in-flight
/// requests finish (their appends complete); the destination engine and the
/// warehouse loader stop and commit their positions; control state is flushed; only
/// then is the log closed.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = open_state(config).await?;
    let stages = start_stages(&state);
    {
        let token = state.shutdown.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.trigger();
        });
    }
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %state.config.data_dir.display(), "tributary listening");
    let app = router(state.clone());
    let served = conn::serve_http(
        listener,
        app,
        state.config.http.clone(),
        state.shutdown.clone().wait_owned(),
    )
    .await
    .context("serving");
    tracing::info!("shutting down: stopping stages, flushing state, closing the event log");
    state.shutdown.trigger();
    let _ = stages.await;
    state.log.close().await;
    served
}

//! The `cluster` bench (issue #13): `/v1/batch` throughput of cluster mode — 1, 2 and
//! 3 `tributary serve` nodes on NATS JetStream (R1: one NATS server; R3: a 3-server
//! cluster), with NATS's default fsync (every 2 minutes) and with `sync_interval:
//! always` — against the embedded durable log (one server, SQLite) and the
//! parse-only reference measured in the same run, on the same machine.
//!
//! Per setup (replicas × fsync) it starts fresh NATS server(s) (own free ports and
//! store dirs under `--tmp-dir`) and a fresh PostgreSQL control database
//! (`tributary_bench_cluster_…`, dropped afterwards), then adds nodes one at a time
//! (`TRIBUTARY_LOG=nats://…`, `TRIBUTARY_CONTROL=postgres://…`,
//! `TRIBUTARY_WAREHOUSE=off`, so the figure is ingest alone, as in `ingest`); at each
//! node count the bench — a separate process — drives `/v1/batch` (the `ingest`
//! bench's payload: 100 track events of ~500 B, random `messageId`s) over
//! `--connections` keep-alive connections spread round-robin over the nodes:
//!
//! 1. closed loop at full speed: events/s, and the CPU time (`/proc/<pid>/stat`) of
//!    every node, every nats-server and PostgreSQL over the measured window ÷ the
//!    events acknowledged in it (µs of CPU per event);
//! 2. open loop at half that request rate: acknowledgement latency p50 / p99.
//!
//! At the end of a setup it checks that the stream holds what was acknowledged
//! (`/ready`'s `log.records`, the stream's message count: acknowledged ≤ stored ≤
//! acknowledged + requests that failed in flight). All nodes, NATS servers, PostgreSQL
//! and the load generator share the machine's cores: more nodes on one machine add
//! no CPU, so the node-count columns show what the extra processes cost, not what more
//! machines would give.
//!
//! With `--warehouse` a last setup (the largest node count, R3 if asked for, else R1,
//! `sync_interval: always` if asked for) runs with `TRIBUTARY_WAREHOUSE` on a fresh
//! PostgreSQL database: an open-loop load at half the measured maximum of that setup,
//! then the time until the warehouse holds every acknowledged event.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::ingest::{now_rfc3339, revision, run_id, wait_quiet};
use crate::load::{self, LoadResult, Shape};
use crate::machine::{self, Machine};
use crate::nats::{self, NatsCluster};
use crate::payload::{self, base64_encode};
use crate::pipeline::{PgDatabase, pg_connect, postgres_cpu_secs};
use crate::server::{LogMode, Server};

/// Options of the `cluster` bench.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Node counts, comma-separated (nodes are added in increasing order).
    #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
    pub nodes: Vec<usize>,
    /// Stream replicas, comma-separated: 1 (one NATS server) and/or 3 (a 3-server
    /// cluster).
    #[arg(long, default_value = "1,3", value_delimiter = ',')]
    pub replicas: Vec<usize>,
    /// NATS fsync, comma-separated: `default` (NATS syncs every 2 minutes) and/or
    /// `always` (`sync_interval: always`, the documented production setting).
    #[arg(long, default_value = "default,always", value_delimiter = ',')]
    pub sync: Vec<String>,
    /// Concurrent keep-alive connections (spread over the nodes).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 6.0)]
    pub duration: f64,
    /// Unmeasured warm-up seconds before each phase's window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Events per `/v1/batch` request.
    #[arg(long, default_value_t = 100)]
    pub batch_events: u64,
    /// Approximate JSON size of one event, bytes.
    #[arg(long, default_value_t = 500)]
    pub event_bytes: usize,
    /// `TRIBUTARY_LOG_PARTITIONS` of the stream (the product's default when absent).
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Skip the open-loop latency phases at half load.
    #[arg(long)]
    pub no_latency: bool,
    /// Skip the parse-only reference server.
    #[arg(long)]
    pub no_reference: bool,
    /// Also measure whether the PostgreSQL warehouse keeps up (see the module docs).
    #[arg(long)]
    pub warehouse: bool,
    /// Smoke run: nodes 1,2; R1 and R3; `sync_interval: always` only; 2 s phases;
    /// no reference (overrides --nodes, --replicas, --sync, --duration, --warmup).
    #[arg(long)]
    pub quick: bool,
    /// The `tributary` binary (default: next to this executable).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// The nats-server binary (default: `TRIBUTARY_TEST_NATS_SERVER`, else
    /// `~/.cache/tributary-nats/bin/nats-server`).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// Directory for data dirs and NATS stores (must be on a real disk).
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// A URL of an existing database on the PostgreSQL server (for CREATE DATABASE).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub pg_admin_url: String,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub timeout: f64,
    /// Before each throughput phase, wait up to this many seconds for other processes
    /// to stop using the CPUs (0: do not wait).
    #[arg(long, default_value_t = 8.0)]
    pub quiet_wait: f64,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[cluster] {}", msg.as_ref());
}

/// CPU seconds over a measured window.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    wall: f64,
    nodes: f64,
    nats: f64,
    postgres: f64,
    bench: f64,
    /// Every other process on the machine.
    other: f64,
}

#[derive(Debug, Clone, Copy)]
struct Snap {
    at: Instant,
    nodes: f64,
    nats: f64,
    postgres: f64,
    bench: f64,
    machine: f64,
}

fn snap(nodes: &[String], nats: &[String]) -> Snap {
    Snap {
        at: Instant::now(),
        nodes: nodes.iter().map(|p| machine::process_cpu_secs(p)).sum(),
        nats: nats.iter().map(|p| machine::process_cpu_secs(p)).sum(),
        postgres: postgres_cpu_secs(),
        bench: machine::process_cpu_secs("self"),
        machine: {
            let (busy, steal) = machine::machine_cpu_secs();
            busy - steal
        },
    }
}

impl Snap {
    fn until(&self, b: &Snap) -> Cpu {
        let d = |x: f64, y: f64| (y - x).max(0.0);
        let nodes = d(self.nodes, b.nodes);
        let nats = d(self.nats, b.nats);
        let postgres = d(self.postgres, b.postgres);
        let bench = d(self.bench, b.bench);
        Cpu {
            wall: b.at.duration_since(self.at).as_secs_f64().max(1e-3),
            nodes,
            nats,
            postgres,
            bench,
            other: (d(self.machine, b.machine) - nodes - nats - postgres - bench).max(0.0),
        }
    }
}

/// CPU over the measured window of a phase that starts now.
async fn sample(nodes: Vec<String>, nats: Vec<String>, warmup: Duration, window: Duration) -> Cpu {
    tokio::time::sleep(warmup).await;
    let a = snap(&nodes, &nats);
    tokio::time::sleep(window).await;
    a.until(&snap(&nodes, &nats))
}

/// Which log a row measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Embedded,
    Reference,
    JetStream { replicas: usize, sync_always: bool },
}

impl Kind {
    fn label(self) -> String {
        match self {
            Kind::Embedded => "embedded durable log (SQLite)".into(),
            Kind::Reference => "parse-only reference".into(),
            Kind::JetStream {
                replicas,
                sync_always,
            } => format!(
                "JetStream R{replicas} ({} NATS server{}), {}",
                replicas,
                if replicas == 1 { "" } else { "s" },
                if sync_always {
                    "`sync_interval: always`"
                } else {
                    "default fsync (2 min)"
                }
            ),
        }
    }
}

/// One measured configuration.
#[derive(Debug, Clone)]
struct Row {
    kind: Kind,
    nodes: usize,
    max: LoadResult,
    /// Events/s at full speed: of the measured window, or of the whole phase when
    /// the window saw too few answers (see [`whole_phase`](Row::whole_phase)).
    eps: f64,
    /// Events acknowledged over the span `cpu` covers.
    events: u64,
    /// Requests took so long (seconds) that fewer than [`MIN_ANSWERS`] per connection
    /// completed in the window: figures are over the whole phase instead (start to
    /// the last answer), which the warm-up's missing steady state distorts less.
    whole_phase: bool,
    cpu: Cpu,
    half: Option<(f64, LoadResult)>,
}

/// Answers per connection the measured window must see for its figures to be used.
const MIN_ANSWERS: usize = 4;

/// What a setup acknowledged against what its log stored.
#[derive(Debug, Clone)]
struct Check {
    kind: Kind,
    /// Where the events were counted: "the log" or "the warehouse".
    store: &'static str,
    acked: u64,
    uncertain: u64,
    stored: Option<u64>,
    accepted: u64,
    ok: bool,
}

/// The warehouse phase's figures.
#[derive(Debug, Clone)]
struct WarehouseRun {
    kind: Kind,
    nodes: usize,
    offered_events: f64,
    load: LoadResult,
    loaded_at_end: u64,
    catch_up: Option<f64>,
    cpu: Cpu,
}

struct Report {
    command: String,
    revision: Option<String>,
    machine: Machine,
    data_fs: (String, String, String),
    nats_version: String,
    args: Args,
    rows: Vec<Row>,
    checks: Vec<Check>,
    warehouse: Option<WarehouseRun>,
    elapsed: Duration,
}

/// Runs the bench and prints its markdown report; `Ok(false)` when a check failed.
pub fn main(a: Args, command: String) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run(a, command))?;
    print!("{}", markdown(&report));
    Ok(report.checks.iter().all(|c| c.ok))
}

#[derive(Clone)]
struct Ctx {
    a: Args,
    bin: PathBuf,
    nats_bin: PathBuf,
    tmp: PathBuf,
    run_id: String,
    now: String,
}

impl Ctx {
    fn shape(&self, rate: Option<f64>) -> Shape {
        Shape {
            connections: self.a.connections,
            warmup: Duration::from_secs_f64(self.a.warmup),
            duration: Duration::from_secs_f64(self.a.duration),
            timeout: Duration::from_secs_f64(self.a.timeout),
            rate,
        }
    }

    fn template(&self, addr: SocketAddr, key: &str, phase: &str) -> Arc<payload::Template> {
        let run = payload::Run {
            id: self.run_id.clone(),
            phase: phase.to_string(),
            ids: payload::Ids::Random,
            now: self.now.clone(),
        };
        Arc::new(payload::batch(
            &addr.to_string(),
            key,
            &run,
            self.a.batch_events,
            self.a.event_bytes,
        ))
    }

    /// Closed loop at full speed, then (unless `--no-latency`) open loop at half the
    /// request rate, against `addrs`.
    async fn measure(
        &self,
        kind: Kind,
        addrs: &[SocketAddr],
        key: &str,
        node_pids: Vec<String>,
        nats_pids: Vec<String>,
        tag: &str,
    ) -> anyhow::Result<Row> {
        wait_quiet(Duration::from_secs_f64(self.a.quiet_wait.max(0.0))).await;
        let shape = self.shape(None);
        progress(format!(
            "{} — {} node{}: closed loop, {} connections, {:.0?} + {:.0?}",
            kind.label(),
            addrs.len(),
            if addrs.len() == 1 { "" } else { "s" },
            shape.connections,
            shape.warmup,
            shape.duration
        ));
        let first = snap(&node_pids, &nats_pids);
        let sampler = tokio::spawn(sample(
            node_pids.clone(),
            nats_pids.clone(),
            shape.warmup,
            shape.duration,
        ));
        let max = load::run_spread(
            addrs,
            self.template(addrs[0], key, &format!("{tag}m")),
            shape,
            0,
        )
        .await;
        let whole = first.until(&snap(&node_pids, &nats_pids));
        let window = sampler.await.unwrap_or_default();
        let whole_phase = max.service.n < MIN_ANSWERS * shape.connections;
        let (eps, rps, counted, cpu) = if whole_phase {
            progress(format!(
                "  only {} answers in the window (p50 {:.0} ms): figures over the whole phase",
                max.service.n, max.service.p50
            ));
            (
                max.total.ok_events as f64 / whole.wall,
                max.total.ok as f64 / whole.wall,
                max.total.ok_events,
                whole,
            )
        } else {
            (
                max.events_per_sec(),
                max.requests_per_sec(),
                max.window_events,
                window,
            )
        };
        let events = counted.max(1) as f64;
        progress(format!(
            "  {eps:.0} events/s, p99 {:.1} ms; CPU µs/event: nodes {:.1}, NATS {:.1}, PostgreSQL {:.1}; cores: nodes {:.2}, NATS {:.2}, bench {:.2}, other {:.2}; non-200 {}, errors {}",
            max.service.p99,
            cpu.nodes / events * 1e6,
            cpu.nats / events * 1e6,
            cpu.postgres / events * 1e6,
            cpu.nodes / cpu.wall,
            cpu.nats / cpu.wall,
            cpu.bench / cpu.wall,
            cpu.other / cpu.wall,
            max.total.non_ok(),
            max.total.errors
        ));
        if let Some(p) = &max.total.first_problem {
            progress(format!("  first problem: {p}"));
        }
        if cpu.other / cpu.wall > 0.15 {
            progress(format!(
                "  WARNING: other processes used {:.2} cores; the figures are disturbed",
                cpu.other / cpu.wall
            ));
        }
        let half = if self.a.no_latency || rps <= 0.0 {
            None
        } else {
            let rate = (rps / 2.0).max(0.5);
            progress(format!("  open loop at {rate:.0} requests/s (half)"));
            let r = load::run_spread(
                addrs,
                self.template(addrs[0], key, &format!("{tag}h")),
                self.shape(Some(rate)),
                0,
            )
            .await;
            progress(format!(
                "  p50 {:.2} ms, p99 {:.2} ms (from schedule p99 {:.2} ms); non-200 {}, errors {}",
                r.service.p50,
                r.service.p99,
                r.scheduled.map_or(0.0, |s| s.p99),
                r.total.non_ok(),
                r.total.errors
            ));
            Some((rate, r))
        };
        Ok(Row {
            kind,
            nodes: addrs.len(),
            max,
            eps,
            events: counted,
            whole_phase,
            cpu,
            half,
        })
    }
}

/// `(acknowledged, uncertain)` events of a row: uncertain are those of requests that
/// failed in flight or got a 503 (a JetStream append that fails may have stored part
/// of its batch; the client's retry would be deduplicated).
fn acked_of(row: &Row, batch_events: u64) -> (u64, u64) {
    let mut acked = 0;
    let mut uncertain = 0;
    for l in std::iter::once(&row.max).chain(row.half.as_ref().map(|(_, h)| h)) {
        acked += l.total.ok_events;
        uncertain +=
            l.total.error_events + l.total.statuses.get(&503).copied().unwrap_or(0) * batch_events;
    }
    (acked, uncertain)
}

fn make_check(
    kind: Kind,
    store: &'static str,
    acked: u64,
    uncertain: u64,
    stored: Option<u64>,
    accepted: u64,
) -> Check {
    let within = |n: u64| n >= acked && n <= acked + uncertain;
    let ok = stored.is_some_and(within) && within(accepted);
    progress(format!(
        "check ({}): acknowledged {acked} events ({uncertain} in failed requests), nodes counted {accepted}, {store} holds {} → {}",
        kind.label(),
        stored.map_or("?".into(), |s| s.to_string()),
        if ok { "OK" } else { "MISMATCH" }
    ));
    Check {
        kind,
        store,
        acked,
        uncertain,
        stored,
        accepted,
        ok,
    }
}

async fn run(mut a: Args, command: String) -> anyhow::Result<Report> {
    let started = Instant::now();
    if a.quick {
        a.nodes = vec![1, 2];
        a.replicas = vec![1, 3];
        a.sync = vec!["always".into()];
        a.duration = 2.0;
        a.warmup = 0.5;
        a.no_reference = true;
        a.quiet_wait = a.quiet_wait.min(3.0);
    }
    anyhow::ensure!(a.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(a.duration > 0.0, "--duration must be positive");
    anyhow::ensure!(a.batch_events > 0, "--batch-events must be at least 1");
    let mut nodes = a.nodes.clone();
    nodes.sort_unstable();
    nodes.dedup();
    anyhow::ensure!(
        !nodes.is_empty() && nodes[0] >= 1,
        "--nodes must list counts of at least 1"
    );
    let mut replicas = a.replicas.clone();
    replicas.sort_unstable();
    replicas.dedup();
    for r in &replicas {
        anyhow::ensure!(*r == 1 || *r == 3, "--replicas takes 1 and/or 3, not {r}");
    }
    let mut syncs = Vec::new();
    for s in &a.sync {
        let always = match s.trim() {
            "default" => false,
            "always" => true,
            other => bail!("unknown --sync {other:?}: use default or always"),
        };
        if !syncs.contains(&always) {
            syncs.push(always);
        }
    }
    a.nodes = nodes.clone();
    let machine = Machine::detect();
    let bin = crate::server::locate_binary(a.server_bin.as_deref())?;
    let (nats_bin, nats_version) = nats::locate(a.nats_server.as_deref())?;
    let tmp = a.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let data_fs = machine::filesystem_of(&tmp);
    if data_fs.0 == "tmpfs" || data_fs.0 == "ramfs" {
        progress(format!(
            "WARNING: {} is on {}: fsync is free there; use --tmp-dir on a disk",
            tmp.display(),
            data_fs.0
        ));
    }
    progress(format!("machine: {}", machine.describe()));
    progress(format!("server: {}; {nats_version}", bin.display()));
    // A private copy, so a `cargo build` elsewhere cannot swap the binary mid-run.
    let bin_dir = tempfile::Builder::new()
        .prefix("tributary-bench-bin-")
        .tempdir_in(&tmp)?;
    let snapshot = bin_dir.path().join("tributary");
    std::fs::copy(&bin, &snapshot)
        .with_context(|| format!("copying {} to {}", bin.display(), snapshot.display()))?;
    let ctx = Ctx {
        a: a.clone(),
        bin: snapshot,
        nats_bin,
        tmp,
        run_id: run_id(),
        now: now_rfc3339(),
    };
    let mut rows = Vec::new();
    let mut checks = Vec::new();

    // The embedded durable log: one server, SQLite, warehouse off.
    {
        let kind = Kind::Embedded;
        progress(format!("starting the server with the {}", kind.label()));
        let server = Server::start(&ctx.bin, &ctx.tmp, LogMode::Durable, false, &[]).await?;
        let key = server.create_source("http", "bench", "bench").await?;
        let row = ctx
            .measure(
                kind,
                &[server.addr],
                &key,
                vec![server.proc_id()],
                vec![],
                "e",
            )
            .await?;
        let (acked, uncertain) = acked_of(&row, ctx.a.batch_events);
        let ready = server.ready().await?;
        let accepted = server
            .metrics()
            .await?
            .sum("tributary_events_accepted_total") as u64;
        checks.push(make_check(
            kind,
            "the log",
            acked,
            uncertain,
            ready["log"]["records"].as_u64(),
            accepted,
        ));
        rows.push(row);
        let exit = server.stop().await?;
        progress(format!("server stopped: {exit}"));
    }
    if !ctx.a.no_reference {
        let kind = Kind::Reference;
        progress("starting the parse-only reference server");
        let server = Server::start(&ctx.bin, &ctx.tmp, LogMode::Reference, false, &[]).await?;
        let key = server.create_source("http", "bench", "bench").await?;
        let mut reference = ctx.clone();
        reference.a.no_latency = true;
        let row = reference
            .measure(
                kind,
                &[server.addr],
                &key,
                vec![server.proc_id()],
                vec![],
                "r",
            )
            .await?;
        rows.push(row);
        server.stop().await?;
    }

    for &r in &replicas {
        for &always in &syncs {
            let kind = Kind::JetStream {
                replicas: r,
                sync_always: always,
            };
            let (setup_rows, check) = jetstream_setup(&ctx, kind, &nodes).await?;
            rows.extend(setup_rows);
            checks.push(check);
        }
    }

    let warehouse = if a.warehouse {
        let r = if replicas.contains(&3) { 3 } else { 1 };
        let always = syncs.contains(&true);
        let kind = Kind::JetStream {
            replicas: r,
            sync_always: always,
        };
        let n = *nodes.last().unwrap_or(&1);
        let max = rows
            .iter()
            .find(|row| row.kind == kind && row.nodes == n)
            .map(|row| row.eps)
            .unwrap_or(0.0);
        Some(warehouse_setup(&ctx, kind, n, (max / 2.0).max(1000.0), &mut checks).await?)
    } else {
        None
    };

    Ok(Report {
        command,
        revision: revision(),
        machine,
        data_fs,
        nats_version,
        args: a,
        rows,
        checks,
        warehouse,
        elapsed: started.elapsed(),
    })
}

/// A running JetStream setup: NATS servers, a control database, the nodes.
struct Setup {
    kind: Kind,
    nats: NatsCluster,
    control: Option<PgDatabase>,
    warehouse_db: Option<PgDatabase>,
    nodes: Vec<Server>,
    key: Option<String>,
    /// Events acknowledged outside the measured phases (the per-node key checks).
    acked: u64,
}

impl Setup {
    async fn start(ctx: &Ctx, kind: Kind, warehouse: bool) -> anyhow::Result<Setup> {
        let Kind::JetStream {
            replicas,
            sync_always,
        } = kind
        else {
            bail!("not a JetStream setup");
        };
        progress(format!("starting {}", kind.label()));
        let nats = NatsCluster::start(&ctx.nats_bin, replicas, sync_always, &ctx.tmp).await?;
        let control = PgDatabase::create(&ctx.a.pg_admin_url, "cluster_control").await?;
        let mut setup = Setup {
            kind,
            nats,
            control: Some(control),
            warehouse_db: None,
            nodes: Vec::new(),
            key: None,
            acked: 0,
        };
        if warehouse {
            setup.warehouse_db =
                Some(PgDatabase::create(&ctx.a.pg_admin_url, "cluster_warehouse").await?);
        }
        Ok(setup)
    }

    /// Starts one more node and waits until it accepts the source's write key.
    async fn add_node(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        let Kind::JetStream { replicas, .. } = self.kind else {
            bail!("not a JetStream setup");
        };
        let i = self.nodes.len();
        let control = self.control.as_ref().context("control database")?;
        let mut env = vec![
            ("TRIBUTARY_LOG".to_string(), self.nats.url()),
            ("TRIBUTARY_LOG_REPLICAS".to_string(), replicas.to_string()),
            ("TRIBUTARY_CONTROL".to_string(), control.url.clone()),
            (
                "TRIBUTARY_CLUSTER_NODE_ID".to_string(),
                format!("bench-{}-n{i}", control.name),
            ),
        ];
        if let Some(p) = ctx.a.partitions {
            env.push(("TRIBUTARY_LOG_PARTITIONS".to_string(), p.to_string()));
        }
        let warehouse = self.warehouse_db.as_ref().map(|db| db.url.clone());
        if let Some(url) = &warehouse {
            env.push(("TRIBUTARY_WAREHOUSE".to_string(), url.clone()));
        }
        let node = Server::start(
            &ctx.bin,
            &ctx.tmp,
            LogMode::Durable,
            warehouse.is_some(),
            &env,
        )
        .await
        .with_context(|| format!("starting node {i}:\n{}", self.nats.log_tail()))?;
        let key = match &self.key {
            Some(k) => k.clone(),
            None => {
                let k = node.create_source("http", "bench", "bench").await?;
                self.key = Some(k.clone());
                k
            }
        };
        // Every node honours a new key within a second (control-plane reload); send
        // one event until it is accepted, so the load never meets a 401.
        let deadline = Instant::now() + Duration::from_secs(15);
        let auth = format!("Basic {}", base64_encode(format!("{key}:").as_bytes()));
        let body = format!(
            r#"{{"userId":"bench","event":"Key Check","messageId":"bench-{}-key-{i}"}}"#,
            ctx.run_id
        );
        loop {
            let (status, resp) = crate::http::once(
                node.addr,
                "POST",
                "/v1/track",
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                body.as_bytes(),
            )
            .await
            .context("POST /v1/track")?;
            if status == 200 {
                self.acked += 1;
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "node {i} still answers {status} to the source's key after 15 s: {}\n{}",
                    String::from_utf8_lossy(&resp),
                    node.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.nodes.push(node);
        Ok(())
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    fn node_pids(&self) -> Vec<String> {
        self.nodes.iter().map(Server::proc_id).collect()
    }

    /// `(stream records per /ready, events the nodes counted)`.
    async fn stored(&self) -> anyhow::Result<(Option<u64>, u64)> {
        let first = self.nodes.first().context("no node")?;
        let ready = first.ready().await?;
        let mut accepted = 0;
        for n in &self.nodes {
            accepted += n.metrics().await?.sum("tributary_events_accepted_total") as u64;
        }
        Ok((ready["log"]["records"].as_u64(), accepted))
    }

    /// Stops the nodes, then the NATS servers, and drops the databases.
    async fn finish(mut self) {
        for n in self.nodes.drain(..) {
            match n.stop().await {
                Ok(exit) if exit.contains("exit status: 0") => {}
                Ok(exit) => progress(format!("  a node exited: {exit}")),
                Err(e) => progress(format!("  stopping a node: {e:#}")),
            }
        }
        drop(self.nats);
        for db in [self.control.take(), self.warehouse_db.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = db.drop_now().await {
                progress(format!("  could not drop a bench database: {e:#}"));
            }
        }
    }
}

async fn jetstream_setup(
    ctx: &Ctx,
    kind: Kind,
    counts: &[usize],
) -> anyhow::Result<(Vec<Row>, Check)> {
    let mut setup = Setup::start(ctx, kind, false).await?;
    let result = async {
        let mut rows = Vec::new();
        let mut acked = 0;
        let mut uncertain = 0;
        for &n in counts {
            while setup.nodes.len() < n {
                setup.add_node(ctx).await?;
            }
            let key = setup.key.clone().context("no write key")?;
            let row = ctx
                .measure(
                    kind,
                    &setup.addrs(),
                    &key,
                    setup.node_pids(),
                    setup.nats.proc_ids(),
                    &format!("j{n}"),
                )
                .await?;
            let (a, u) = acked_of(&row, ctx.a.batch_events);
            acked += a;
            uncertain += u;
            rows.push(row);
        }
        let (stored, accepted) = setup.stored().await?;
        let check = make_check(
            kind,
            "the log",
            acked + setup.acked,
            uncertain,
            stored,
            accepted,
        );
        anyhow::Ok((rows, check))
    }
    .await;
    setup.finish().await;
    result
}

/// Open loop at `rate` events/s with the warehouse on, then the time until the
/// warehouse holds every acknowledged event.
async fn warehouse_setup(
    ctx: &Ctx,
    kind: Kind,
    n: usize,
    rate_events: f64,
    checks: &mut Vec<Check>,
) -> anyhow::Result<WarehouseRun> {
    let mut setup = Setup::start(ctx, kind, true).await?;
    let result = async {
        while setup.nodes.len() < n {
            setup.add_node(ctx).await?;
        }
        let key = setup.key.clone().context("no write key")?;
        let url = setup
            .warehouse_db
            .as_ref()
            .map(|d| d.url.clone())
            .context("warehouse database")?;
        let pg = pg_connect(&url).await?;
        let pattern = format!("bench-{}-w-%", ctx.run_id);
        let count = || async {
            // The table appears with the first load; until then nothing is loaded.
            match pg
                .query_one(
                    "SELECT count(*) FROM \"bench\".\"tracks\" WHERE \"id\" LIKE $1",
                    &[&pattern],
                )
                .await
            {
                Ok(row) => row.get::<_, i64>(0).max(0) as u64,
                Err(_) => 0,
            }
        };
        wait_quiet(Duration::from_secs_f64(ctx.a.quiet_wait.max(0.0))).await;
        let rate = rate_events / ctx.a.batch_events as f64;
        let mut shape = ctx.shape(Some(rate));
        shape.duration = Duration::from_secs_f64(ctx.a.duration.max(2.0) * 2.0);
        progress(format!(
            "{} — {n} nodes, warehouse on PostgreSQL: open loop at {rate_events:.0} events/s for {:.0?}",
            kind.label(),
            shape.duration
        ));
        let sampler = tokio::spawn(sample(
            setup.node_pids(),
            setup.nats.proc_ids(),
            shape.warmup,
            shape.duration,
        ));
        let addrs = setup.addrs();
        let load = load::run_spread(&addrs, ctx.template(addrs[0], &key, "w"), shape, 0).await;
        let cpu = sampler.await.unwrap_or_default();
        let done = Instant::now();
        let loaded_at_end = count().await;
        let acked = load.total.ok_events;
        let limit = Duration::from_secs(120);
        let catch_up = loop {
            let loaded = count().await;
            if loaded >= acked {
                break Some(done.elapsed().as_secs_f64());
            }
            if done.elapsed() > limit {
                progress(format!(
                    "  the warehouse holds {loaded} of {acked} events after {limit:?}"
                ));
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let loaded = count().await;
        progress(format!(
            "  acknowledged {acked} ({:.0} events/s), loaded {loaded_at_end} when the load ended, all loaded after {}",
            load.events_per_sec(),
            catch_up.map_or("—".into(), |s| format!("{s:.1} s"))
        ));
        let uncertain = load.total.error_events
            + load.total.statuses.get(&503).copied().unwrap_or(0) * ctx.a.batch_events;
        let (_, accepted) = setup.stored().await?;
        // The per-node key checks are counted by the nodes but are not in `loaded`.
        checks.push(make_check(
            kind,
            "the warehouse",
            acked,
            uncertain,
            Some(loaded),
            accepted.saturating_sub(setup.acked),
        ));
        anyhow::Ok(WarehouseRun {
            kind,
            nodes: n,
            offered_events: rate_events,
            load,
            loaded_at_end,
            catch_up,
            cpu,
        })
    }
    .await;
    setup.finish().await;
    result
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    }
}

/// µs of CPU per acknowledged event of a row.
fn per_event(secs: f64, row: &Row) -> f64 {
    if row.events == 0 {
        return 0.0;
    }
    secs / row.events as f64 * 1e6
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let a = &r.args;
    let _ = writeln!(
        s,
        "## Cluster benchmark: `/v1/batch` on JetStream vs the embedded log\n"
    );
    let _ = writeln!(s, "- command: `{}`", r.command);
    if let Some(rev) = &r.revision {
        let _ = writeln!(s, "- source: commit `{rev}`");
    }
    let _ = writeln!(s, "- machine: {}", r.machine.describe());
    let _ = writeln!(
        s,
        "- data dirs and NATS stores: {} ({} on {}); {}; PostgreSQL at `{}` (a fresh control database per setup)",
        a.tmp_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
            .display(),
        r.data_fs.0,
        r.data_fs.1,
        r.nats_version,
        redact(&a.pg_admin_url)
    );
    let _ = writeln!(
        s,
        "- load: {} keep-alive connections from this process (1 thread), spread round-robin over the nodes; \
         {} track events of ~{} B per request, random `messageId`s; each phase {:.1} s warm-up + {:.1} s measured; \
         nodes with `TRIBUTARY_WAREHOUSE=off` (ingest alone); latency: open loop at half the row's maximum request rate",
        a.connections, a.batch_events, a.event_bytes, a.warmup, a.duration
    );
    let _ = writeln!(
        s,
        "- every process (nodes, NATS servers, PostgreSQL, the load generator) shares the machine's {} CPUs: \
         a second or third node on the same machine adds processes, not cores\n",
        r.machine.cpus
    );
    let embedded = r
        .rows
        .iter()
        .find(|x| x.kind == Kind::Embedded)
        .map(|x| x.eps);
    let embedded_cpu = r
        .rows
        .iter()
        .find(|x| x.kind == Kind::Embedded)
        .map(|x| per_event(x.cpu.nodes + x.cpu.nats, x));
    let reference = r
        .rows
        .iter()
        .find(|x| x.kind == Kind::Reference)
        .map(|x| x.eps);
    let _ = writeln!(
        s,
        "| log | nodes | events/s | × embedded | × reference | × 1 node | CPU µs/event: nodes + NATS = total | CPU × embedded | cores used: nodes / NATS / bench / other | p50 / p99 ms at half load (events/s) | non-200 / errors |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|");
    for row in &r.rows {
        let eps = row.eps;
        let one = r
            .rows
            .iter()
            .find(|x| x.kind == row.kind && x.nodes == 1)
            .map(|x| x.eps);
        let nodes_us = per_event(row.cpu.nodes, row);
        let nats_us = per_event(row.cpu.nats, row);
        let total_us = nodes_us + nats_us;
        let cpu_cell = match row.kind {
            Kind::JetStream { .. } => format!("{nodes_us:.1} + {nats_us:.1} = **{total_us:.1}**"),
            _ => format!("**{nodes_us:.1}**"),
        };
        let w = row.cpu.wall;
        let half = row.half.as_ref().map_or("—".into(), |(rate, h)| {
            format!(
                "{:.2} / **{:.2}** ({})",
                h.service.p50,
                h.service.p99,
                thousands(rate * a.batch_events as f64)
            )
        });
        let statuses = |l: &LoadResult| l.total.non_ok();
        let bad = statuses(&row.max) + row.half.as_ref().map_or(0, |(_, h)| statuses(h));
        let errors = row.max.total.errors + row.half.as_ref().map_or(0, |(_, h)| h.total.errors);
        let _ = writeln!(
            s,
            "| {} | {} | **{}**{} | {} | {} | {} | {} | {} | {:.2} / {:.2} / {:.2} / {:.2} | {} | {} / {} |",
            row.kind.label(),
            row.nodes,
            thousands(eps),
            if row.whole_phase { " †" } else { "" },
            if row.kind == Kind::Embedded {
                "1".into()
            } else {
                ratio(eps, embedded)
            },
            if row.kind == Kind::Reference {
                "1".into()
            } else {
                ratio(eps, reference)
            },
            match row.kind {
                Kind::JetStream { .. } => ratio(eps, one),
                _ => "—".into(),
            },
            cpu_cell,
            if row.kind == Kind::Embedded {
                "1".into()
            } else {
                ratio(total_us, embedded_cpu)
            },
            row.cpu.nodes / w,
            row.cpu.nats / w,
            row.cpu.bench / w,
            row.cpu.other / w,
            half,
            bad,
            errors
        );
    }
    if r.rows.iter().any(|x| x.whole_phase) {
        let _ = writeln!(
            s,
            "\n† Requests took seconds: fewer than {MIN_ANSWERS} answers per connection completed in the \
             measured window, so this row's events/s and CPU are over the whole phase (first request to \
             last answer) instead of the window."
        );
    }
    let _ = writeln!(
        s,
        "\nCPU µs/event: CPU time (`/proc/<pid>/stat`, user + system) of every node and every \
         nats-server over the measured window ÷ events acknowledged in it; for the embedded log and the \
         reference, the one server. PostgreSQL (the control plane: leases, key reloads) used {} cores on \
         average during the JetStream windows (every `postgres` process on the machine, others' included). \
         \"other\" is every other process on the machine: when it is not near 0 the figures are disturbed.",
        {
            let js: Vec<&Row> = r
                .rows
                .iter()
                .filter(|x| matches!(x.kind, Kind::JetStream { .. }))
                .collect();
            if js.is_empty() {
                "—".to_string()
            } else {
                format!(
                    "{:.2}",
                    js.iter().map(|x| x.cpu.postgres / x.cpu.wall).sum::<f64>() / js.len() as f64
                )
            }
        }
    );
    if let Some(w) = &r.warehouse {
        let _ = writeln!(
            s,
            "\nWarehouse on PostgreSQL, {} with {} node{}: offered {} events/s for {:.0} s, \
             acknowledged {} ({} events/s), {} loaded when the load stopped, **every acknowledged event \
             loaded {}** (nodes {:.2} cores, NATS {:.2} cores during the load). All bench events are from \
             one user, so one partition and one loading node.",
            w.kind.label(),
            w.nodes,
            if w.nodes == 1 { "" } else { "s" },
            thousands(w.offered_events),
            w.load.window.as_secs_f64(),
            thousands(w.load.total.ok_events as f64),
            thousands(w.load.events_per_sec()),
            thousands(w.loaded_at_end as f64),
            w.catch_up.map_or("— not within 120 s".into(), |c| format!(
                "{c:.1} s after it"
            )),
            w.cpu.nodes / w.cpu.wall,
            w.cpu.nats / w.cpu.wall,
        );
    }
    let _ = writeln!(s);
    for c in &r.checks {
        let _ = writeln!(
            s,
            "- check, {}: acknowledged {} events ({} in failed or 503 requests), nodes counted {}, {} holds {} {}",
            c.kind.label(),
            thousands(c.acked as f64),
            thousands(c.uncertain as f64),
            thousands(c.accepted as f64),
            c.store,
            c.stored.map_or("?".into(), |x| thousands(x as f64)),
            if c.ok { "✅" } else { "❌ MISMATCH" }
        );
    }
    for row in &r.rows {
        for (what, l) in std::iter::once(("maximum", &row.max))
            .chain(row.half.as_ref().map(|(_, h)| ("half load", h)))
        {
            if let Some(p) = &l.total.first_problem {
                let _ = writeln!(
                    s,
                    "- {}, {} node(s), {what}: first problem: `{p}`",
                    row.kind.label(),
                    row.nodes
                );
            }
        }
    }
    let _ = writeln!(s, "\nThe whole run took {:.0} s.", r.elapsed.as_secs_f64());
    s
}

/// The URL without a password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:…{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:…@h:5432/db"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1:5432/postgres"),
            "postgres://postgres@127.0.0.1:5432/postgres"
        );
    }

    fn result(events: u64, secs: u64) -> LoadResult {
        LoadResult {
            window_ok: events / 100,
            window_events: events,
            window: Duration::from_secs(secs),
            ..Default::default()
        }
    }

    fn row(kind: Kind, nodes: usize, events: u64, cpu_nodes: f64, cpu_nats: f64) -> Row {
        Row {
            kind,
            nodes,
            max: result(events, 10),
            eps: events as f64 / 10.0,
            events,
            whole_phase: false,
            cpu: Cpu {
                wall: 10.0,
                nodes: cpu_nodes,
                nats: cpu_nats,
                ..Default::default()
            },
            half: None,
        }
    }

    #[test]
    fn the_table_compares_each_row_with_the_embedded_log_and_one_node() {
        let js = Kind::JetStream {
            replicas: 3,
            sync_always: true,
        };
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: Args,
        }
        let args = Cli::try_parse_from(["cluster"]).unwrap().a;
        let report = Report {
            command: "tributary-bench cluster".into(),
            revision: None,
            machine: Machine::detect(),
            data_fs: ("ext4".into(), "/dev/x".into(), "/".into()),
            nats_version: "nats-server: v2.15.1".into(),
            args,
            rows: vec![
                // 400,000 events in 10 s on 8 CPU s: 40,000/s, 20 µs per event.
                row(Kind::Embedded, 1, 400_000, 8.0, 0.0),
                row(Kind::Reference, 1, 1_000_000, 10.0, 0.0),
                // 20,000/s; (6 + 4) CPU s / 200,000 = 30 + 20 = 50 µs per event.
                row(js, 1, 200_000, 6.0, 4.0),
                row(js, 2, 260_000, 7.8, 5.2),
            ],
            checks: vec![],
            warehouse: None,
            elapsed: Duration::from_secs(1),
        };
        let md = markdown(&report);
        let line = |prefix: &str, nodes: &str| {
            md.lines()
                .find(|l| {
                    l.starts_with(&format!("| {prefix}")) && l.contains(&format!(" | {nodes} | "))
                })
                .unwrap_or_else(|| panic!("no row {prefix} {nodes} in\n{md}"))
                .to_string()
        };
        let e = line("embedded", "1");
        assert!(e.contains("| **40,000** | 1 | 0.40 |"), "{e}");
        assert!(e.contains("| **20.0** | 1 |"), "{e}");
        let one = line("JetStream R3", "1");
        assert!(one.contains("| **20,000** | 0.50 | 0.20 | 1.00 |"), "{one}");
        assert!(one.contains("| 30.0 + 20.0 = **50.0** | 2.50 |"), "{one}");
        let two = line("JetStream R3", "2");
        assert!(two.contains("| **26,000** | 0.65 | 0.26 | 1.30 |"), "{two}");
        assert!(two.contains("| 30.0 + 20.0 = **50.0** | 2.50 |"), "{two}");
    }

    #[test]
    fn cpu_excludes_the_known_processes_from_other() {
        let t = Instant::now();
        let a = Snap {
            at: t,
            nodes: 1.0,
            nats: 1.0,
            postgres: 1.0,
            bench: 1.0,
            machine: 10.0,
        };
        let b = Snap {
            at: t + Duration::from_secs(2),
            nodes: 2.5,
            nats: 1.5,
            postgres: 1.0,
            bench: 1.5,
            machine: 13.0,
        };
        let c = a.until(&b);
        assert_eq!(c.wall, 2.0);
        assert_eq!((c.nodes, c.nats, c.bench), (1.5, 0.5, 0.5));
        assert!((c.other - 0.5).abs() < 1e-9, "{}", c.other);
    }
}

//! The `ingest` bench: starts `tributary serve` as a separate process (once with the
//! durable log, once with the no-op log), then the parse-only reference server
//! ([`crate::reference`]: same HTTP stack, key check and JSON parse, nothing stored),
//! creates sources, drives each load from this process over loopback, samples the
//! server from `/proc` and `/metrics`, and checks at the end that what the server
//! acknowledged is what it stored.
//!
//! Phases, per server: `/v1/batch` (100 events of ~500 B per request), `/v1/track`
//! (one event per request), ActiveCampaign webhooks (one event per request), each
//! closed loop at full speed; then `/v1/track` open loop at half the durable server's
//! maximum `/v1/track` rate, for acknowledgement latency and steady-state RSS. Only one
//! server runs at a time, so they never compete for the cores.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use crate::load::{self, LoadResult, Shape};
use crate::machine::{self, Machine};
use crate::payload;
use crate::server::{LogMode, Metrics, Server};

/// Options of the `ingest` bench.
#[derive(Debug, Clone)]
pub struct Options {
    /// Concurrent connections for the closed-loop phases and the latency phase.
    pub connections: usize,
    /// Measured seconds per phase.
    pub duration: Duration,
    /// Unmeasured warm-up per phase.
    pub warmup: Duration,
    /// Events per `/v1/batch` request.
    pub batch_events: u64,
    /// Approximate JSON size of one event.
    pub event_bytes: usize,
    /// Open-loop rate of the latency phase; default half the measured `/v1/track` max.
    pub latency_rate: Option<f64>,
    /// Skip the no-op-log baseline.
    pub no_baseline: bool,
    /// Skip the parse-only reference server.
    pub no_reference: bool,
    /// The `tributary` binary; default next to this executable.
    pub server_bin: Option<PathBuf>,
    /// Where the temporary data dirs go.
    pub tmp_dir: PathBuf,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Which closed-loop loads to run.
    pub loads: Vec<Load>,
    /// Run the embedded warehouse loader (default: `TRIBUTARY_WAREHOUSE=off`).
    pub warehouse: bool,
    /// `messageId` shape of the Tracking API loads.
    pub ids: payload::Ids,
    /// Extra environment for the server processes.
    pub server_env: Vec<(String, String)>,
    /// Longest wait, before each phase, for other processes to leave the CPUs alone.
    pub quiet_wait: Duration,
}

/// A kind of load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Load {
    /// `/v1/batch`, closed loop.
    Batch,
    /// `/v1/track`, closed loop.
    Track,
    /// ActiveCampaign webhook, closed loop.
    Webhook,
    /// `/v1/track`, open loop at a fixed rate.
    TrackLatency,
}

impl Load {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Load::Batch => "batch",
            Load::Track => "track",
            Load::Webhook => "webhook",
            Load::TrackLatency => "track-latency",
        }
    }

    /// Parses a short name.
    pub fn parse(s: &str) -> Option<Load> {
        Some(match s {
            "batch" => Load::Batch,
            "track" => Load::Track,
            "webhook" => Load::Webhook,
            _ => return None,
        })
    }
}

/// Group-commit figures of one phase from `/metrics` deltas.
#[derive(Debug, Clone, Copy, Default)]
pub struct Commits {
    /// Group commits.
    pub count: f64,
    /// Records committed.
    pub records: f64,
    /// Seconds the writer spent in commits (insert + fsync).
    pub seconds: f64,
    /// Seconds requests spent in `append` (queue wait + commit), summed.
    pub append_seconds: f64,
    /// Appends.
    pub appends: f64,
    /// Wall-clock seconds the deltas cover (whole phase).
    pub wall: f64,
}

/// Resource use of the server and the bench during the measured window.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// Server CPU, in cores (1.0 = one core busy).
    pub server_cores: f64,
    /// Server CPU by thread name, in cores.
    pub threads: BTreeMap<String, f64>,
    /// Bench (load generator) CPU, in cores.
    pub bench_cores: f64,
    /// CPU used by every other process on the machine (other work competing with
    /// the bench), in cores.
    pub other_cores: f64,
    /// CPU stolen by the hypervisor, in cores.
    pub steal_cores: f64,
    /// Largest server RSS seen, bytes.
    pub rss_max: u64,
    /// Server RSS at the end of the window, bytes.
    pub rss_end: u64,
    /// Bytes the server wrote to storage per second, when known.
    pub write_bytes_per_sec: Option<f64>,
}

/// One phase against one server.
#[derive(Debug, Clone)]
pub struct Phase {
    /// The load.
    pub load: Load,
    /// Which log the server ran with.
    pub mode: LogMode,
    /// Request body size.
    pub body_bytes: usize,
    /// Events per request.
    pub events_per_request: u64,
    /// Open-loop rate, when open loop.
    pub rate: Option<f64>,
    /// What the load generator saw.
    pub result: LoadResult,
    /// Resources.
    pub usage: Usage,
    /// Group commits.
    pub commits: Commits,
    /// 429 answers the server counted.
    pub server_429: f64,
}

/// The end-of-run check of one server.
#[derive(Debug, Clone, Default)]
pub struct Check {
    /// Events in 200 answers (less duplicates/rejections those answers named).
    pub acked: u64,
    /// Events in requests that failed at the transport level.
    pub uncertain: u64,
    /// `tributary_events_accepted_total`.
    pub accepted_metric: u64,
    /// `/ready` `log.records` (durable log only).
    pub log_records: Option<u64>,
    /// `/ready` `log.bytes`: the log's files on disk (durable log only).
    pub log_bytes: Option<u64>,
    /// Whether the counts agree.
    pub ok: bool,
}

/// Everything measured against one server.
#[derive(Debug, Clone)]
pub struct ServerRun {
    /// Which log.
    pub mode: LogMode,
    /// The phases in order.
    pub phases: Vec<Phase>,
    /// The end-of-run check.
    pub check: Check,
    /// Peak RSS over the server's life (`VmHWM`), bytes.
    pub rss_hwm: u64,
    /// How the server exited on SIGTERM.
    pub exit: String,
}

impl ServerRun {
    /// The phase of a load, if it ran.
    pub fn phase(&self, load: Load) -> Option<&Phase> {
        self.phases.iter().find(|p| p.load == load)
    }
}

/// The whole bench.
#[derive(Debug, Clone)]
pub struct Report {
    /// The command line.
    pub command: String,
    /// `git describe --always --dirty` of the source tree, when known.
    pub revision: Option<String>,
    /// The machine.
    pub machine: Machine,
    /// `(fstype, device, mount)` of the data dirs.
    pub data_fs: (String, String, String),
    /// The server binary.
    pub server_bin: PathBuf,
    /// The options.
    pub options: Options,
    /// Load-generator threads.
    pub client_threads: usize,
    /// One run per server.
    pub runs: Vec<ServerRun>,
}

impl Report {
    /// The run against the server with this log, if it ran.
    pub fn run(&self, mode: LogMode) -> Option<&ServerRun> {
        self.runs.iter().find(|r| r.mode == mode)
    }
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

/// Runs the bench.
pub async fn run(opts: Options, command: String, client_threads: usize) -> anyhow::Result<Report> {
    let machine = Machine::detect();
    let bin = crate::server::locate_binary(opts.server_bin.as_deref())?;
    std::fs::create_dir_all(&opts.tmp_dir)
        .with_context(|| format!("creating {}", opts.tmp_dir.display()))?;
    let data_fs = machine::filesystem_of(&opts.tmp_dir);
    if data_fs.0 == "tmpfs" || data_fs.0 == "ramfs" {
        progress(format!(
            "WARNING: {} is on {}: fsync is free there, so the durable figures are not durable; use --tmp-dir on a disk",
            opts.tmp_dir.display(),
            data_fs.0
        ));
    }
    progress(format!("machine: {}", machine.describe()));
    progress(format!("server: {}", bin.display()));
    // Run a private copy, so a `cargo build` elsewhere cannot swap the binary between
    // the durable and the no-op server.
    let bin_dir = tempfile::Builder::new()
        .prefix("tributary-bench-bin-")
        .tempdir_in(&opts.tmp_dir)?;
    let snapshot = bin_dir.path().join("tributary");
    std::fs::copy(&bin, &snapshot)
        .with_context(|| format!("copying {} to {}", bin.display(), snapshot.display()))?;
    let revision = revision();
    let mut runs = Vec::new();
    let durable = run_server(&opts, &snapshot, LogMode::Durable, None).await?;
    let rate = durable.phase(Load::TrackLatency).and_then(|p| p.rate);
    runs.push(durable);
    if !opts.no_baseline {
        runs.push(run_server(&opts, &snapshot, LogMode::Null, rate).await?);
    }
    if !opts.no_reference {
        runs.push(run_server(&opts, &snapshot, LogMode::Reference, rate).await?);
    }
    Ok(Report {
        command,
        revision,
        machine,
        data_fs,
        server_bin: bin,
        options: opts,
        client_threads,
        runs,
    })
}

/// The revision of the source tree the bench was run from (best effort: the crate's
/// directory under `cargo run`, else the current directory).
pub fn revision() -> Option<String> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let out = std::process::Command::new("git")
        .args([
            "-C",
            &dir,
            "describe",
            "--always",
            "--dirty",
            "--exclude",
            "*",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

pub fn run_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{}", ms % 100_000_000)
}

pub fn now_rfc3339() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    payload::rfc3339(ms)
}

async fn run_server(
    opts: &Options,
    bin: &std::path::Path,
    mode: LogMode,
    latency_rate: Option<f64>,
) -> anyhow::Result<ServerRun> {
    progress(format!("starting the server with the {} log", mode.name()));
    let server = Server::start(bin, &opts.tmp_dir, mode, opts.warehouse, &opts.server_env).await?;
    let http_key = server.create_source("http", "bench", "bench").await?;
    let ac_key = server
        .create_source("activecampaign", "bench-ac", "bench_ac")
        .await?;
    let addr = server.addr.to_string();
    let run_id = run_id();
    let now = now_rfc3339();
    let run = |phase: &str| payload::Run {
        id: run_id.clone(),
        phase: phase.to_string(),
        ids: opts.ids,
        now: now.clone(),
    };
    let mut phases = Vec::new();
    let mut next_conn = 0u64;
    let shape = Shape {
        connections: opts.connections,
        warmup: opts.warmup,
        duration: opts.duration,
        timeout: opts.timeout,
        rate: None,
    };
    for &load in &opts.loads {
        let template = match load {
            Load::Batch => payload::batch(
                &addr,
                &http_key,
                &run("b"),
                opts.batch_events,
                opts.event_bytes,
            ),
            Load::Track => payload::track(&addr, &http_key, &run("t"), opts.event_bytes),
            Load::Webhook => payload::webhook(&addr, &ac_key, &run_id),
            Load::TrackLatency => continue,
        };
        wait_quiet(opts.quiet_wait).await;
        let phase = measure(&server, load, mode, Arc::new(template), shape, next_conn).await?;
        next_conn += opts.connections as u64;
        phases.push(phase);
    }
    let rate = opts.latency_rate.or(latency_rate).or_else(|| {
        phases
            .iter()
            .find(|p| p.load == Load::Track)
            .map(|p| (p.result.requests_per_sec() / 2.0).max(1.0))
    });
    if let Some(rate) = rate {
        let template = payload::track(&addr, &http_key, &run("l"), opts.event_bytes);
        let shape = Shape {
            rate: Some(rate),
            ..shape
        };
        wait_quiet(opts.quiet_wait).await;
        let phase = measure(
            &server,
            Load::TrackLatency,
            mode,
            Arc::new(template),
            shape,
            next_conn,
        )
        .await?;
        phases.push(phase);
    }
    let check = check(&server, mode, &phases).await?;
    let rss_hwm = machine::status_bytes(&server.proc_id(), "VmHWM").unwrap_or(0);
    let tail = server.log_tail();
    let exit = server.stop().await?;
    progress(format!("server stopped: {exit}"));
    if !check.ok {
        progress(format!("server log tail:\n{tail}"));
    }
    Ok(ServerRun {
        mode,
        phases,
        check,
        rss_hwm,
        exit,
    })
}

async fn measure(
    server: &Server,
    load: Load,
    mode: LogMode,
    template: Arc<payload::Template>,
    shape: Shape,
    first_conn: u64,
) -> anyhow::Result<Phase> {
    progress(format!(
        "{} log: {} — {} connections, {}{:.0?} warm-up + {:.0?}",
        mode.name(),
        load.name(),
        shape.connections,
        shape
            .rate
            .map(|r| format!("{r:.0} req/s open loop, "))
            .unwrap_or_default(),
        shape.warmup,
        shape.duration
    ));
    let m0 = server.metrics().await?;
    let t0 = Instant::now();
    let sampler = tokio::spawn(sample(
        server.proc_id(),
        Instant::now() + shape.warmup,
        shape.duration,
    ));
    let result = load::run(server.addr, template.clone(), shape, first_conn).await;
    let wall = t0.elapsed().as_secs_f64();
    let usage = sampler.await.unwrap_or_default();
    let m1 = server.metrics().await?;
    let d = |name: &str| m1.sum(name) - m0.sum(name);
    let commits = Commits {
        count: d("tributary_log_group_commit_records_count"),
        records: d("tributary_log_group_commit_records_sum"),
        seconds: d("tributary_log_group_commit_seconds_sum"),
        append_seconds: d("tributary_append_seconds_sum"),
        appends: d("tributary_append_seconds_count"),
        wall,
    };
    let server_429 = status_delta(&m0, &m1, "status=\"429\"");
    let phase = Phase {
        load,
        mode,
        body_bytes: template.body_bytes,
        events_per_request: template.events,
        rate: shape.rate,
        result,
        usage,
        commits,
        server_429,
    };
    progress(format!(
        "  {:.0} req/s, {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms; server {:.2} cores, bench {:.2} cores, other processes {:.2} cores; non-200 {}, errors {}",
        phase.result.requests_per_sec(),
        phase.result.events_per_sec(),
        phase.result.service.p50,
        phase.result.service.p99,
        phase.usage.server_cores,
        phase.usage.bench_cores,
        phase.usage.other_cores,
        phase.result.total.non_ok(),
        phase.result.total.errors,
    ));
    if phase.usage.other_cores > 0.15 {
        progress(format!(
            "  WARNING: other processes used {:.2} cores during this phase; the figures are disturbed",
            phase.usage.other_cores
        ));
    }
    if let Some(p) = &phase.result.total.first_problem {
        progress(format!("  first problem: {p}"));
    }
    Ok(phase)
}

/// Waits up to `limit` until the rest of the machine is idle: less than
/// [`QUIET_CORES`] of CPU used in each of [`QUIET_SECONDS`] consecutive 1 s samples
/// (the server under test is idle between phases, and so is the bench).
pub async fn wait_quiet(limit: Duration) {
    if limit.is_zero() {
        return;
    }
    let deadline = Instant::now() + limit;
    let mut warned = false;
    let mut quiet = 0;
    loop {
        let (b0, s0) = machine::machine_cpu_secs();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (b1, s1) = machine::machine_cpu_secs();
        let busy = ((b1 - b0) - (s1 - s0)) / t0.elapsed().as_secs_f64();
        if busy < QUIET_CORES {
            quiet += 1;
            if quiet >= QUIET_SECONDS {
                return;
            }
            continue;
        }
        quiet = 0;
        if Instant::now() >= deadline {
            progress(format!(
                "  the machine is still busy ({busy:.2} cores used by other processes); going on anyway"
            ));
            return;
        }
        if !warned {
            progress(format!(
                "  waiting for other processes to leave the CPUs alone ({busy:.2} cores busy)"
            ));
            warned = true;
        }
    }
}

/// CPU use (in cores) below which the machine counts as quiet.
const QUIET_CORES: f64 = 0.15;
/// Consecutive quiet seconds needed before a phase starts.
const QUIET_SECONDS: u32 = 3;

fn status_delta(m0: &Metrics, m1: &Metrics, label: &str) -> f64 {
    m1.sum_with("tributary_http_requests_total", label)
        - m0.sum_with("tributary_http_requests_total", label)
}

/// Samples the server's CPU (by thread), RSS and I/O, and the bench's CPU, over the
/// measured window.
async fn sample(pid: String, start: Instant, duration: Duration) -> Usage {
    tokio::time::sleep_until(start.into()).await;
    let cpu0 = machine::process_cpu_secs(&pid);
    let threads0 = machine::thread_cpu_secs(&pid);
    let bench0 = machine::process_cpu_secs("self");
    let io0 = machine::write_bytes(&pid);
    let (busy0, steal0) = machine::machine_cpu_secs();
    let t0 = Instant::now();
    let mut rss_max = 0;
    let mut rss_end = 0;
    let end = start + duration;
    loop {
        if let Some(rss) = machine::status_bytes(&pid, "VmRSS") {
            rss_max = rss_max.max(rss);
            rss_end = rss;
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        tokio::time::sleep((end - now).min(Duration::from_millis(200))).await;
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-3);
    let (busy1, steal1) = machine::machine_cpu_secs();
    let server_cores = (machine::process_cpu_secs(&pid) - cpu0) / secs;
    let bench_cores = (machine::process_cpu_secs("self") - bench0) / secs;
    let threads1 = machine::thread_cpu_secs(&pid);
    let threads = threads1
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v - threads0.get(k).copied().unwrap_or(0.0)).max(0.0) / secs,
            )
        })
        .collect();
    Usage {
        server_cores,
        threads,
        bench_cores,
        other_cores: ((busy1 - busy0 - (steal1 - steal0)) / secs - server_cores - bench_cores)
            .max(0.0),
        steal_cores: (steal1 - steal0) / secs,
        rss_max,
        rss_end,
        write_bytes_per_sec: match (io0, machine::write_bytes(&pid)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / secs),
            _ => None,
        },
    }
}

async fn check(server: &Server, mode: LogMode, phases: &[Phase]) -> anyhow::Result<Check> {
    let acked: u64 = phases.iter().map(|p| p.result.total.ok_events).sum();
    let uncertain: u64 = phases.iter().map(|p| p.result.total.error_events).sum();
    let accepted_metric = server
        .metrics()
        .await?
        .sum("tributary_events_accepted_total") as u64;
    let (log_records, log_bytes) = match mode {
        LogMode::Durable => {
            let ready = server.ready().await?;
            (
                ready["log"]["records"].as_u64(),
                ready["log"]["bytes"].as_u64(),
            )
        }
        LogMode::Null | LogMode::Reference => (None, None),
    };
    let within = |n: u64| n >= acked && n <= acked + uncertain;
    let ok = within(accepted_metric) && log_records.is_none_or(|r| r == accepted_metric);
    progress(format!(
        "check ({} log): acknowledged {acked} events, server counted {accepted_metric}{}{} → {}",
        mode.name(),
        log_records
            .map(|r| format!(", log holds {r}"))
            .unwrap_or_default(),
        if uncertain > 0 {
            format!(" ({uncertain} in failed requests)")
        } else {
            String::new()
        },
        if ok { "OK" } else { "MISMATCH" }
    ));
    Ok(Check {
        acked,
        uncertain,
        accepted_metric,
        log_records,
        log_bytes,
        ok,
    })
}

//! `tributary-bench`: load benches for Tributary, run against the release server as a
//! separate process on 127.0.0.1.
//!
//! ```text
//! export CARGO_TARGET_DIR=…   # optional; the bench finds the server next to itself
//! cargo build --release -p tributary -p tributary-bench
//! cargo run --release -p tributary-bench -- ingest [--connections 64] [--duration 8] [--json]
//! ```
//!
//! `ingest` measures durable ingest throughput of `/v1/batch`, `/v1/track` and the
//! ActiveCampaign webhook, the same against a no-op log (their ratio is the cost of
//! durability), acknowledgement latency at half the maximum rate, and the server's
//! memory; it prints a markdown report (or JSON) and checks that every acknowledged
//! event was stored. Progress goes to stderr, the report to stdout.
//!
//! `ingest` also runs the parse-only reference server (the same HTTP stack, the
//! Basic-auth check and a `serde_json::Value` parse, nothing stored) and reports every
//! figure against it. `sustained` runs ingest with the default SQLite warehouse and
//! reports fully-loaded events/s and the highest offered rate the warehouse keeps up
//! with; `instructions` counts instructions per event under callgrind.
//!
//! `cluster` runs `/v1/batch` against 1, 2 and 3 nodes on NATS JetStream (R1 and R3,
//! with and without `sync_interval: always`; it starts its own nats-servers and uses
//! the local PostgreSQL for the control plane) beside the embedded log, and reports
//! events/s, CPU per event and p99 at half load.
//!
//! `live` measures what the debugger's live stream costs ingest: `/v1/batch` on a
//! server nobody watches against one with ten SSE watchers, and the ratio.
//!
//! `log` measures the embedded event log alone, in process (no HTTP): its append
//! ceiling for a given concurrency, records per append and message-id shape.

mod cluster;
mod delivery;
mod http;
mod ingest;
mod instructions;
mod live;
mod load;
mod logbench;
mod machine;
mod nats;
mod payload;
mod pipeline;
mod reference;
mod report;
mod server;
mod sustained;
mod warehouse;

/// The same allocator as the product, for the parse-only reference server it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tributary-bench", about = "Load benches for Tributary")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest throughput, durable vs no-op log, latency and RSS.
    Ingest(IngestArgs),
    /// The embedded event log alone, in process: append throughput and latency.
    Log(LogArgs),
    /// Warehouse freshness (SQLite, PostgreSQL) and PostgreSQL load throughput.
    Warehouse(warehouse::Args),
    /// Webhook delivery throughput and latency.
    Delivery(delivery::Args),
    /// Ingest and the SQLite warehouse end to end: fully-loaded events/s and the
    /// highest offered rate the warehouse keeps up with.
    Sustained(sustained::Args),
    /// Instructions per event under callgrind (repeatable on a busy machine).
    Instructions(instructions::Args),
    /// Cluster mode: `/v1/batch` on 1, 2, 3 nodes over NATS JetStream (R1/R3, with and
    /// without `sync_interval: always`) against the embedded log.
    Cluster(cluster::Args),
    /// What the debugger's live stream costs ingest: `/v1/batch` with 0 and with
    /// N SSE watchers, and their ratio.
    Live(live::Args),
    /// The parse-only reference server the benches start (not for direct use).
    #[command(hide = true)]
    ReferenceServer(ReferenceArgs),
}

#[derive(clap::Args)]
struct ReferenceArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// The one write key it accepts.
    #[arg(long)]
    write_key: String,
}

#[derive(clap::Args)]
struct LogArgs {
    /// Concurrent appending tasks.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Records per append call.
    #[arg(long, default_value_t = 1)]
    records: usize,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 700)]
    payload_bytes: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
    /// Message ids: random (SDK-like UUIDs) or sequential.
    #[arg(long, default_value = "random")]
    ids: String,
    /// Directory for the temporary log (must be on a real disk).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// First wait up to this many seconds for other processes to stop using the CPUs.
    #[arg(long, default_value_t = 30.0)]
    quiet_wait: f64,
}

#[derive(clap::Args)]
struct IngestArgs {
    /// Concurrent keep-alive connections per phase.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
    /// Unmeasured warm-up seconds before each phase's window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Events per `/v1/batch` request.
    #[arg(long, default_value_t = 100)]
    batch_events: u64,
    /// Approximate JSON size of one event, bytes.
    #[arg(long, default_value_t = 500)]
    event_bytes: usize,
    /// Requests/s of the open-loop latency phase (default: half the durable
    /// `/v1/track` maximum).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Closed-loop loads to run, comma-separated: batch,track,webhook.
    #[arg(long, default_value = "batch,track,webhook", value_delimiter = ',')]
    loads: Vec<String>,
    /// Skip the no-op-log baseline server.
    #[arg(long)]
    no_baseline: bool,
    /// Skip the parse-only reference server.
    #[arg(long)]
    no_reference: bool,
    /// The `tributary` binary (default: next to this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Directory for the servers' temporary data dirs (must be on a real disk).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Load-generator threads (1 keeps the generator's CPU share small).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print the report as JSON instead of markdown.
    #[arg(long)]
    json: bool,
    /// Leave the embedded warehouse loader on (default: `TRIBUTARY_WAREHOUSE=off`).
    #[arg(long)]
    with_warehouse: bool,
    /// `messageId`s of Tracking API loads: random (SDK-like UUIDs, the default) or
    /// sequential per connection (kinder to the log's dedupe index).
    #[arg(long, default_value = "random")]
    ids: String,
    /// Extra environment for the server, `KEY=VALUE` (repeatable), e.g.
    /// `TOKIO_WORKER_THREADS=1`.
    #[arg(long = "server-env", value_name = "KEY=VALUE")]
    server_env: Vec<String>,
    /// Before each phase, wait up to this many seconds for other processes to stop
    /// using the CPUs (0: do not wait).
    #[arg(long, default_value_t = 30.0)]
    quiet_wait: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let command = command_line();
    match args.command {
        Command::Ingest(a) => match ingest_main(a, command) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(2),
            Err(e) => {
                eprintln!("tributary-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Warehouse(a) => match warehouse::main(a, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tributary-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Delivery(a) => match delivery::main(a, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tributary-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Sustained(a) => match sustained::main(a, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tributary-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Cluster(a) => match cluster::main(a, command) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(2),
            Err(e) => {
                eprintln!("tributary-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Live(a) => match live::main(a, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tributary-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Instructions(a) => match instructions::main(a, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tributary-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::ReferenceServer(a) => match reference::serve(a.listen, a.write_key) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tributary-bench reference-server: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Log(a) => match log_main(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tributary-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Runs the log bench and prints its JSON report.
fn log_main(a: LogArgs) -> anyhow::Result<()> {
    let ids = match a.ids.as_str() {
        "random" => logbench::Ids::Random,
        "sequential" => logbench::Ids::Sequential,
        other => anyhow::bail!("unknown --ids {other:?}: use random or sequential"),
    };
    anyhow::ensure!(
        a.concurrency > 0 && a.records > 0,
        "--concurrency and --records must be at least 1"
    );
    let opts = logbench::Options {
        concurrency: a.concurrency,
        records: a.records,
        payload_bytes: a.payload_bytes,
        duration: Duration::from_secs_f64(a.duration.max(0.1)),
        ids,
        tmp_dir: a.tmp_dir.unwrap_or_else(std::env::temp_dir),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        ingest::wait_quiet(Duration::from_secs_f64(a.quiet_wait.max(0.0))).await;
        logbench::run(opts).await
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The command line as a user would retype it: under `cargo run` (which sets
/// `CARGO_PKG_NAME` for the program it runs) the cargo command, else the binary.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let under_cargo = std::env::var("CARGO_PKG_NAME").is_ok_and(|p| p == "tributary-bench");
    if under_cargo {
        let release = std::env::current_exe()
            .map(|p| p.components().any(|c| c.as_os_str() == "release"))
            .unwrap_or(true);
        format!(
            "cargo run {}-p tributary-bench -- {}",
            if release { "--release " } else { "" },
            args.join(" ")
        )
    } else {
        std::iter::once("tributary-bench".to_string())
            .chain(args)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Runs the ingest bench; `Ok(false)` when the correctness check failed.
fn ingest_main(a: IngestArgs, command: String) -> anyhow::Result<bool> {
    let mut loads = Vec::new();
    for name in &a.loads {
        let load = ingest::Load::parse(name.trim())
            .ok_or_else(|| anyhow::anyhow!("unknown load {name:?}: use batch, track, webhook"))?;
        if !loads.contains(&load) {
            loads.push(load);
        }
    }
    anyhow::ensure!(a.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(a.duration > 0.0, "--duration must be positive");
    anyhow::ensure!(a.batch_events > 0, "--batch-events must be at least 1");
    let ids = match a.ids.as_str() {
        "random" => payload::Ids::Random,
        "sequential" => payload::Ids::Sequential,
        other => anyhow::bail!("unknown --ids {other:?}: use random or sequential"),
    };
    let mut server_env = Vec::new();
    for kv in &a.server_env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--server-env {kv:?} is not KEY=VALUE"))?;
        server_env.push((k.to_string(), v.to_string()));
    }
    let opts = ingest::Options {
        connections: a.connections,
        duration: Duration::from_secs_f64(a.duration),
        warmup: Duration::from_secs_f64(a.warmup.max(0.0)),
        batch_events: a.batch_events,
        event_bytes: a.event_bytes,
        latency_rate: a.latency_rate.filter(|r| *r > 0.0),
        no_baseline: a.no_baseline,
        no_reference: a.no_reference,
        server_bin: a.server_bin,
        tmp_dir: a.tmp_dir.unwrap_or_else(std::env::temp_dir),
        timeout: Duration::from_secs_f64(a.timeout.max(0.1)),
        loads,
        warehouse: a.with_warehouse,
        ids,
        server_env,
        quiet_wait: Duration::from_secs_f64(a.quiet_wait.max(0.0)),
    };
    let threads = a.client_threads.max(1);
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let report = rt.block_on(ingest::run(opts, command, threads))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report::json(&report))?);
    } else {
        print!("{}", report::markdown(&report));
    }
    Ok(report.runs.iter().all(|r| r.check.ok))
}

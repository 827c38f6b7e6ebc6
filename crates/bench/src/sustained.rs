//! The `sustained` bench (issue #15): ingest *and* the embedded warehouse, end to
//! end, with the default configuration (SQLite warehouse loading as it goes).
//!
//! 1. **Fully loaded**: `/v1/batch` closed loop at full speed for `--load-secs`, then
//!    wait until the warehouse has loaded every acknowledged event (`/ready`'s and
//!    `/metrics`' warehouse lag at 0). Fully loaded events/s = events acknowledged ÷
//!    (load time + catch-up time): the rate at which events become queryable.
//! 2. **Sustainable rate**: open loop at an offered rate of batch events/s for
//!    `--hold` seconds on a fresh server, sampling the warehouse lag
//!    (`tributary_warehouse_lag_seconds` on `/metrics`, and `/ready`) every 500 ms; a
//!    rate passes when the lag stayed under `--lag-limit` seconds and at least 97 %
//!    of the offered events were acknowledged. A binary search between 0 and the
//!    full-speed acknowledged rate gives the highest passing rate in `--steps` steps:
//!    the number a user sizes a machine by.
//!
//! Every step runs on a fresh server and data dir, so no step inherits another's
//! backlog. Each step waits for the machine to be quiet first (like `ingest`) and
//! reports the CPU other processes used.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::ingest::wait_quiet;
use crate::load::{self, Shape};
use crate::machine::{self, Machine};
use crate::payload;
use crate::server::{LogMode, Server};

/// Options of the `sustained` bench.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds of full-speed load in the fully-loaded phase.
    #[arg(long, default_value_t = 10.0)]
    pub load_secs: f64,
    /// Seconds each offered rate is held in the search.
    #[arg(long, default_value_t = 60.0)]
    pub hold: f64,
    /// The warehouse lag (seconds) a sustainable rate must stay under.
    #[arg(long, default_value_t = 5.0)]
    pub lag_limit: f64,
    /// Binary-search steps (0: only the fully-loaded phase).
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// Events per `/v1/batch` request.
    #[arg(long, default_value_t = 100)]
    pub batch_events: u64,
    /// Approximate JSON size of one event, bytes.
    #[arg(long, default_value_t = 500)]
    pub event_bytes: usize,
    /// Longest wait for the warehouse to catch up, seconds.
    #[arg(long, default_value_t = 300.0)]
    pub catch_up_limit: f64,
    /// The `tributary` binary (default: next to this executable).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Directory for the servers' temporary data dirs (must be on a real disk).
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Extra environment for the server, `KEY=VALUE` (repeatable).
    #[arg(long = "server-env", value_name = "KEY=VALUE")]
    pub server_env: Vec<String>,
    /// Before each step, wait up to this many seconds for other processes to stop
    /// using the CPUs (0: do not wait).
    #[arg(long, default_value_t = 30.0)]
    pub quiet_wait: f64,
    /// Print JSON instead of markdown.
    #[arg(long)]
    pub json: bool,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[sustained] {}", msg.as_ref());
}

/// CPU and memory seen while a step ran.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    server_cores: f64,
    other_cores: f64,
    rss_max: u64,
}

/// Samples the server until `stop` flips; returns usage and the largest lag seen.
async fn watch(
    server: &Server,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<(Usage, f64)> {
    let pid = server.proc_id();
    let cpu0 = machine::process_cpu_secs(&pid);
    let bench0 = machine::process_cpu_secs("self");
    let (busy0, steal0) = machine::machine_cpu_secs();
    let t0 = Instant::now();
    let mut rss_max = 0;
    let mut lag_max: f64 = 0.0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Some(rss) = machine::status_bytes(&pid, "VmRSS") {
            rss_max = rss_max.max(rss);
        }
        lag_max = lag_max.max(lag(server).await?.1);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-3);
    let server_cores = (machine::process_cpu_secs(&pid) - cpu0) / secs;
    let bench_cores = (machine::process_cpu_secs("self") - bench0) / secs;
    let (busy1, steal1) = machine::machine_cpu_secs();
    Ok((
        Usage {
            server_cores,
            other_cores: ((busy1 - busy0 - (steal1 - steal0)) / secs - server_cores - bench_cores)
                .max(0.0),
            rss_max,
        },
        lag_max,
    ))
}

/// `(events, seconds)` of warehouse lag: the larger of `/metrics`' gauges (published
/// by the loader) and `/ready`'s (computed when asked).
async fn lag(server: &Server) -> anyhow::Result<(u64, f64)> {
    let m = server.metrics().await?;
    let ready = server.ready().await?;
    let wh = &ready["warehouse"];
    anyhow::ensure!(
        !wh.is_null(),
        "the server runs without a warehouse: /ready has no `warehouse`"
    );
    let events = (m.sum("tributary_warehouse_lag_events") as u64)
        .max(wh["lag_events"].as_u64().unwrap_or(0));
    let seconds = m
        .sum("tributary_warehouse_lag_seconds")
        .max(wh["lag_seconds"].as_f64().unwrap_or(0.0));
    Ok((events, seconds))
}

/// The fully-loaded phase's figures.
#[derive(Debug, Clone, Default)]
struct FullyLoaded {
    acked: u64,
    load_secs: f64,
    catch_up_secs: f64,
    acked_per_sec: f64,
    usage: Usage,
    rss_hwm: u64,
}

/// One offered rate of the search.
#[derive(Debug, Clone, Default)]
struct Step {
    offered: f64,
    acked_per_sec: f64,
    lag_max: f64,
    pass: bool,
    usage: Usage,
    p99_ms: f64,
}

struct Ctx {
    bin: PathBuf,
    tmp: PathBuf,
    env: Vec<(String, String)>,
    a: Args,
}

impl Ctx {
    async fn server(&self) -> anyhow::Result<(Server, String)> {
        let server = Server::start(&self.bin, &self.tmp, LogMode::Durable, true, &self.env).await?;
        let key = server.create_source("http", "bench", "bench").await?;
        Ok((server, key))
    }

    fn template(&self, addr: &str, key: &str, phase: &str) -> Arc<payload::Template> {
        let run = payload::Run {
            id: format!("{}", std::process::id()),
            phase: phase.to_string(),
            ids: payload::Ids::Random,
            now: payload::rfc3339(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            ),
        };
        Arc::new(payload::batch(
            addr,
            key,
            &run,
            self.a.batch_events,
            self.a.event_bytes,
        ))
    }

    async fn fully_loaded(&self) -> anyhow::Result<FullyLoaded> {
        let (server, key) = self.server().await?;
        let template = self.template(&server.addr.to_string(), &key, "f");
        let shape = Shape {
            connections: self.a.connections,
            warmup: Duration::ZERO,
            duration: Duration::from_secs_f64(self.a.load_secs),
            timeout: Duration::from_secs(10),
            rate: None,
        };
        progress(format!(
            "fully loaded: /v1/batch at full speed for {:.0} s, then the warehouse catches up",
            self.a.load_secs
        ));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t0 = Instant::now();
        let (result, watched) = tokio::join!(
            async {
                let r = load::run(server.addr, template, shape, 0).await;
                let load_secs = t0.elapsed().as_secs_f64();
                let deadline = Instant::now() + Duration::from_secs_f64(self.a.catch_up_limit);
                let caught = loop {
                    match lag(&server).await {
                        Ok((0, _)) => break Ok(t0.elapsed().as_secs_f64() - load_secs),
                        Ok(_) if Instant::now() > deadline => {
                            break Err(anyhow::anyhow!(
                                "the warehouse did not catch up within {:.0} s",
                                self.a.catch_up_limit
                            ));
                        }
                        Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        Err(e) => break Err(e),
                    }
                };
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                (r, load_secs, caught)
            },
            watch(&server, stop.clone())
        );
        let (result, load_secs, caught) = result;
        let catch_up_secs = caught?;
        let (usage, _) = watched?;
        let acked = result.total.ok_events;
        let rss_hwm = machine::status_bytes(&server.proc_id(), "VmHWM").unwrap_or(0);
        let out = FullyLoaded {
            acked,
            load_secs,
            catch_up_secs,
            acked_per_sec: acked as f64 / load_secs.max(1e-3),
            usage,
            rss_hwm,
        };
        progress(format!(
            "  acknowledged {acked} events in {load_secs:.1} s ({:.0}/s), caught up {catch_up_secs:.1} s later → fully loaded {:.0} events/s; server {:.2} cores, others {:.2} cores, RSS max {} MiB",
            out.acked_per_sec,
            acked as f64 / (load_secs + catch_up_secs),
            usage.server_cores,
            usage.other_cores,
            usage.rss_max >> 20
        ));
        server.stop().await?;
        Ok(out)
    }

    async fn step(&self, offered: f64) -> anyhow::Result<Step> {
        let (server, key) = self.server().await?;
        let template = self.template(&server.addr.to_string(), &key, "s");
        let per_request = template.events as f64;
        let shape = Shape {
            connections: self.a.connections,
            warmup: Duration::ZERO,
            duration: Duration::from_secs_f64(self.a.hold),
            timeout: Duration::from_secs(10),
            rate: Some((offered / per_request).max(0.1)),
        };
        progress(format!(
            "offered {offered:.0} events/s for {:.0} s",
            self.a.hold
        ));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (result, watched) = tokio::join!(
            async {
                let r = load::run(server.addr, template, shape, 0).await;
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                r
            },
            watch(&server, stop.clone())
        );
        let (usage, lag_max) = watched?;
        let acked_per_sec = result.events_per_sec();
        let pass = lag_max < self.a.lag_limit && acked_per_sec >= 0.97 * offered;
        let step = Step {
            offered,
            acked_per_sec,
            lag_max,
            pass,
            usage,
            p99_ms: result.service.p99,
        };
        progress(format!(
            "  acknowledged {acked_per_sec:.0} events/s, warehouse lag max {lag_max:.2} s, p99 {:.1} ms → {}; server {:.2} cores, others {:.2} cores, RSS max {} MiB",
            step.p99_ms,
            if pass { "sustained" } else { "not sustained" },
            usage.server_cores,
            usage.other_cores,
            usage.rss_max >> 20
        ));
        server.stop().await?;
        Ok(step)
    }
}

/// Runs the bench and prints its report.
pub fn main(a: Args, command: String) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(a, command))
}

async fn run(a: Args, command: String) -> anyhow::Result<()> {
    anyhow::ensure!(a.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        a.load_secs > 0.0 && a.hold > 0.0,
        "--load-secs and --hold must be positive"
    );
    let mut env = Vec::new();
    for kv in &a.server_env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--server-env {kv:?} is not KEY=VALUE"))?;
        env.push((k.to_string(), v.to_string()));
    }
    let machine = Machine::detect();
    let bin = crate::server::locate_binary(a.server_bin.as_deref())?;
    let tmp = a.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let bin_dir = tempfile::Builder::new()
        .prefix("tributary-bench-bin-")
        .tempdir_in(&tmp)?;
    let snapshot = bin_dir.path().join("tributary");
    std::fs::copy(&bin, &snapshot)
        .with_context(|| format!("copying {} to {}", bin.display(), snapshot.display()))?;
    progress(format!("machine: {}", machine.describe()));
    let quiet = Duration::from_secs_f64(a.quiet_wait.max(0.0));
    let ctx = Ctx {
        bin: snapshot,
        tmp,
        env,
        a: a.clone(),
    };
    wait_quiet(quiet).await;
    let full = ctx.fully_loaded().await?;
    let mut steps = Vec::new();
    let (mut lo, mut hi) = (0.0f64, full.acked_per_sec);
    // First guess: the fully-loaded rate, which the warehouse kept up with on average.
    let mut rate = (full.acked as f64 / (full.load_secs + full.catch_up_secs)).max(1.0);
    for _ in 0..a.steps {
        wait_quiet(quiet).await;
        let s = ctx.step(rate).await?;
        if s.pass {
            lo = rate;
        } else {
            hi = rate;
        }
        steps.push(s);
        rate = (lo + hi) / 2.0;
        if hi - lo < 0.03 * hi {
            break;
        }
    }
    let best = steps
        .iter()
        .filter(|s| s.pass)
        .map(|s| s.offered)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let fully = full.acked as f64 / (full.load_secs + full.catch_up_secs);
    if a.json {
        let doc = json!({
            "command": command,
            "machine": machine.to_json(),
            "fully_loaded": {
                "acked_events": full.acked,
                "load_secs": full.load_secs,
                "catch_up_secs": full.catch_up_secs,
                "acked_events_per_sec": full.acked_per_sec,
                "fully_loaded_events_per_sec": fully,
                "server_cores": full.usage.server_cores,
                "other_cores": full.usage.other_cores,
                "rss_max_bytes": full.usage.rss_max,
                "rss_hwm_bytes": full.rss_hwm,
            },
            "search": steps.iter().map(|s| json!({
                "offered_events_per_sec": s.offered,
                "acked_events_per_sec": s.acked_per_sec,
                "lag_max_secs": s.lag_max,
                "sustained": s.pass,
                "p99_ms": s.p99_ms,
                "server_cores": s.usage.server_cores,
                "other_cores": s.usage.other_cores,
                "rss_max_bytes": s.usage.rss_max,
            })).collect::<Vec<Value>>(),
            "highest_sustained_events_per_sec": best,
            "hold_secs": a.hold,
            "lag_limit_secs": a.lag_limit,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("## Sustained ingest + warehouse benchmark\n");
        println!("- command: `{command}`");
        println!("- machine: {}", machine.describe());
        println!(
            "- server: default configuration (embedded SQLite warehouse on), `/v1/batch` of {} events of ~{} B, {} connections\n",
            a.batch_events, a.event_bytes, a.connections
        );
        println!("| figure | value | |");
        println!("|---|---:|---|");
        println!(
            "| events acknowledged during {:.1} s at full speed | {} ({:.0}/s) | |",
            full.load_secs, full.acked, full.acked_per_sec
        );
        println!(
            "| warehouse catch-up after the load | {:.1} s | |",
            full.catch_up_secs
        );
        println!(
            "| **fully loaded** events/s = acknowledged ÷ (load + catch-up) | **{fully:.0}** | |"
        );
        println!(
            "| server RSS max during load + catch-up (VmHWM) | {} MiB ({} MiB) | ≤ 150 MiB {} |",
            full.usage.rss_max >> 20,
            full.rss_hwm >> 20,
            if full.rss_hwm <= 150 << 20 {
                "✅"
            } else {
                "❌"
            }
        );
        println!(
            "| CPU: server / other processes during that phase | {:.2} / {:.2} cores | |",
            full.usage.server_cores, full.usage.other_cores
        );
        println!(
            "| **highest offered rate with warehouse lag < {:.0} s for {:.0} s** | **{}** | |",
            a.lag_limit,
            a.hold,
            best.map(|b| format!("{b:.0} events/s"))
                .unwrap_or_else(|| "none of the tried rates".into())
        );
        println!(
            "\n| offered events/s | acknowledged/s | max warehouse lag | p99 ms | sustained | server cores | other cores | RSS max |"
        );
        println!("|---:|---:|---:|---:|---|---:|---:|---:|");
        for s in &steps {
            println!(
                "| {:.0} | {:.0} | {:.2} s | {:.1} | {} | {:.2} | {:.2} | {} MiB |",
                s.offered,
                s.acked_per_sec,
                s.lag_max,
                s.p99_ms,
                if s.pass { "yes" } else { "no" },
                s.usage.server_cores,
                s.usage.other_cores,
                s.usage.rss_max >> 20
            );
        }
    }
    Ok(())
}

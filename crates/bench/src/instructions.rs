//! The `instructions` bench: CPU cost per event as *instruction counts*, which are
//! repeatable whatever else the machine is doing (wall-clock figures on a shared
//! 2-core machine are not).
//!
//! The server (Tributary with the durable or no-op log, or the parse-only reference)
//! runs under `valgrind --tool=callgrind`. For each load the bench sends a warm-up,
//! zeroes callgrind's counters (`callgrind_control -z`), sends a fixed number of
//! requests over a few keep-alive connections, waits — with the warehouse on — until
//! the warehouse has loaded them, and dumps the counters (`callgrind_control -d`).
//! Every thread of the server is counted (HTTP workers, the log writer and its
//! checkpointer, the warehouse loader), so instructions ÷ events is the whole
//! server's cost of one event. The dumps stay in `--out-dir` for `callgrind_annotate
//! --inclusive=yes <dump>`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::http::Conn;
use crate::ingest::Load;
use crate::payload;
use crate::server::{LogMode, Server};

/// Options of the `instructions` bench.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Servers to measure, comma-separated: durable, null, reference.
    #[arg(long, default_value = "durable,null,reference", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Loads, comma-separated: batch, track, webhook.
    #[arg(long, default_value = "batch,track,webhook", value_delimiter = ',')]
    pub loads: Vec<String>,
    /// `/v1/batch` requests per measurement (100 events each by default).
    #[arg(long, default_value_t = 20)]
    pub batch_requests: u64,
    /// Single-event requests per measurement.
    #[arg(long, default_value_t = 1000)]
    pub single_requests: u64,
    /// Concurrent connections (group commits form as at saturation).
    #[arg(long, default_value_t = 8)]
    pub connections: u64,
    /// Events per `/v1/batch` request.
    #[arg(long, default_value_t = 100)]
    pub batch_events: u64,
    /// Approximate JSON size of one event, bytes.
    #[arg(long, default_value_t = 500)]
    pub event_bytes: usize,
    /// Leave the embedded warehouse on (and wait for it to load every event).
    #[arg(long)]
    pub with_warehouse: bool,
    /// Where callgrind's dumps go (default: a new directory under the temp dir).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The `tributary` binary (default: next to this executable).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Directory for the servers' temporary data dirs.
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Print JSON instead of markdown.
    #[arg(long)]
    pub json: bool,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[instructions] {}", msg.as_ref());
}

fn mode_of(name: &str) -> Option<LogMode> {
    Some(match name {
        "durable" => LogMode::Durable,
        "null" | "no-op" => LogMode::Null,
        "reference" => LogMode::Reference,
        _ => return None,
    })
}

/// One measurement.
struct Row {
    mode: LogMode,
    load: Load,
    events: u64,
    instructions: u64,
    dump: PathBuf,
}

/// Runs the bench.
pub fn main(a: Args, command: String) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(a, command))
}

async fn run(a: Args, command: String) -> anyhow::Result<()> {
    let mut modes = Vec::new();
    for s in &a.servers {
        modes.push(mode_of(s.trim()).ok_or_else(|| {
            anyhow::anyhow!("unknown server {s:?}: use durable, null, reference")
        })?);
    }
    let mut loads = Vec::new();
    for s in &a.loads {
        loads.push(
            Load::parse(s.trim())
                .ok_or_else(|| anyhow::anyhow!("unknown load {s:?}: use batch, track, webhook"))?,
        );
    }
    anyhow::ensure!(a.connections > 0, "--connections must be at least 1");
    let bin = crate::server::locate_binary(a.server_bin.as_deref())?;
    let tmp = a.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let out = match &a.out_dir {
        Some(d) => d.clone(),
        None => tempfile::Builder::new()
            .prefix("tributary-callgrind-")
            .tempdir_in(&tmp)?
            .keep(),
    };
    std::fs::create_dir_all(&out)?;
    let mut rows = Vec::new();
    for &mode in &modes {
        let dir = out.join(mode.name().replace(' ', "-"));
        std::fs::create_dir_all(&dir)?;
        let wrapper = vec![
            "valgrind".to_string(),
            "--tool=callgrind".to_string(),
            format!("--callgrind-out-file={}/callgrind.out", dir.display()),
        ];
        progress(format!(
            "starting the {} server under callgrind",
            mode.name()
        ));
        let server = Server::start_wrapped(
            &bin,
            &tmp,
            mode,
            a.with_warehouse && mode != LogMode::Reference,
            &[],
            &wrapper,
            Duration::from_secs(180),
        )
        .await?;
        let http_key = server.create_source("http", "bench", "bench").await?;
        let ac_key = server
            .create_source("activecampaign", "bench-ac", "bench_ac")
            .await?;
        let addr = server.addr.to_string();
        let run = |phase: &str| payload::Run {
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
        let mut conn_base = 0;
        for &load in &loads {
            let (template, requests) = match load {
                Load::Batch => (
                    payload::batch(&addr, &http_key, &run("b"), a.batch_events, a.event_bytes),
                    a.batch_requests,
                ),
                Load::Track => (
                    payload::track(&addr, &http_key, &run("t"), a.event_bytes),
                    a.single_requests,
                ),
                Load::Webhook => (
                    payload::webhook(&addr, &ac_key, &format!("{}", std::process::id())),
                    a.single_requests,
                ),
                Load::TrackLatency => continue,
            };
            let template = Arc::new(template);
            // Warm-up: the same load, a fifth of it, so caches and pools are sized.
            send(
                server.addr,
                &template,
                (requests / 5).max(a.connections),
                a.connections,
                conn_base,
            )
            .await?;
            conn_base += a.connections;
            wait_loaded(&server, mode, a.with_warehouse).await?;
            control(&server, &["-z"])?;
            let t0 = Instant::now();
            let events = send(server.addr, &template, requests, a.connections, conn_base).await?;
            conn_base += a.connections;
            wait_loaded(&server, mode, a.with_warehouse).await?;
            let before = dumps(&dir)?;
            control(&server, &["-d", load.name()])?;
            let dump = newest_new(&dir, &before)?;
            let instructions = total_ir(&dump)?;
            progress(format!(
                "  {}: {events} events in {:.1} s, {instructions} instructions = {:.0} per event ({})",
                load.name(),
                t0.elapsed().as_secs_f64(),
                instructions as f64 / events.max(1) as f64,
                dump.display()
            ));
            rows.push(Row {
                mode,
                load,
                events,
                instructions,
                dump,
            });
        }
        let exit = server.stop().await?;
        progress(format!("server stopped: {exit}"));
    }
    let per = |r: &Row| r.instructions as f64 / r.events.max(1) as f64;
    let ref_of = |load: Load| {
        rows.iter()
            .find(|r| r.mode == LogMode::Reference && r.load == load)
            .map(per)
    };
    if a.json {
        let doc = json!({
            "command": command,
            "warehouse": a.with_warehouse,
            "rows": rows.iter().map(|r| json!({
                "server": r.mode.name(),
                "load": r.load.name(),
                "events": r.events,
                "instructions": r.instructions,
                "instructions_per_event": per(r),
                "reference_over_this": ref_of(r.load).map(|f| f / per(r)),
                "dump": r.dump,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("## Instructions per event (callgrind)\n");
        println!("- command: `{command}`");
        println!(
            "- warehouse: {}; {} connections; every server thread counted\n",
            if a.with_warehouse {
                "on (counted until it loaded every event)"
            } else {
                "off"
            },
            a.connections
        );
        println!("| server | load | events | instructions | per event | reference ÷ this |");
        println!("|---|---|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {:.0} | {} |",
                r.mode.name(),
                r.load.name(),
                r.events,
                r.instructions,
                per(r),
                ref_of(r.load)
                    .map(|f| format!("{:.2}", f / per(r)))
                    .unwrap_or_else(|| "—".into())
            );
        }
        println!(
            "\nDumps: {} (`callgrind_annotate --inclusive=yes FILE`)",
            out.display()
        );
    }
    Ok(())
}

/// Sends `requests` requests (rounded up to a multiple of `connections`) of
/// `template`, closed loop; every one must be answered 200. Returns events sent.
async fn send(
    addr: std::net::SocketAddr,
    template: &Arc<payload::Template>,
    requests: u64,
    connections: u64,
    conn_base: u64,
) -> anyhow::Result<u64> {
    let per_conn = requests.div_ceil(connections);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mut generator = template.generator(conn_base + c);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            for _ in 0..per_conn {
                let resp = conn.roundtrip(generator.next_request()).await?;
                if resp.status != 200 {
                    bail!(
                        "answer {}: {}",
                        resp.status,
                        String::from_utf8_lossy(resp.body)
                    );
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(per_conn * connections * template.events)
}

/// With the warehouse on, waits until it has loaded everything.
async fn wait_loaded(server: &Server, mode: LogMode, warehouse: bool) -> anyhow::Result<()> {
    if !warehouse || mode == LogMode::Reference {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ready = server.ready().await?;
        if ready["warehouse"]["lag_events"].as_u64() == Some(0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the warehouse did not catch up: {ready}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn control(server: &Server, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("callgrind_control")
        .args(args)
        .arg(server.pid.to_string())
        .output()
        .context("running callgrind_control")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn dumps(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        v.push(e?.path());
    }
    Ok(v)
}

fn newest_new(dir: &Path, before: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let new: Vec<PathBuf> = dumps(dir)?
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        if let Some(p) = new.into_iter().max() {
            // The dump is complete once its `totals:` line is written.
            if total_ir(&p).is_ok() {
                return Ok(p);
            }
        }
        if Instant::now() > deadline {
            bail!("callgrind wrote no new dump in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `totals:` (or `summary:`) Ir of a callgrind dump.
fn total_ir(path: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    for line in text.lines().rev() {
        if let Some(rest) = line
            .strip_prefix("totals:")
            .or_else(|| line.strip_prefix("summary:"))
            && let Some(n) = rest.split_whitespace().next()
        {
            return Ok(n.parse()?);
        }
    }
    bail!("no totals in {}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_callgrind_totals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, "events: Ir\nfn=x\n1 5\nsummary: 1234\ntotals: 1234\n").unwrap();
        assert_eq!(total_ir(&p).unwrap(), 1234);
        std::fs::write(&p, "events: Ir\n").unwrap();
        assert!(total_ir(&p).is_err());
    }
}

//! The `live` bench (issue #12): what the debugger's live stream costs ingest.
//!
//! Two release servers run side by side, the same binary and configuration (the
//! embedded durable log, warehouse off): on one nobody ever watches; on the other
//! `--watchers` SSE clients read `GET /api/v1/sources/{id}/events/stream` the whole
//! time, as browsers with the debugger open do. They are real HTTP clients on their
//! own thread of this (second) process, each reading and counting every event it
//! is sent. `/v1/batch` is then driven closed-loop at full speed against each
//! server in turn, `--rounds` times, alternating, so both see the same machine.
//!
//! Reported per server: acknowledged events/s (median of the rounds), the server's
//! CPU time per acknowledged event (µs; steadier than throughput on a busy
//! machine), and for the watched one how many events each watcher received out of
//! those acknowledged (a watcher that lags is told so, and it shows here). The
//! ratio of the watched to the unwatched figures is the cost of the live stream.
//! Progress goes to stderr, the table to stdout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::ingest::wait_quiet;
use crate::load::{self, Shape};
use crate::machine::{self, Machine};
use crate::payload;
use crate::server::{LogMode, Server};

/// Options of the `live` bench.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// SSE watchers on the watched server.
    #[arg(long, default_value_t = 10)]
    pub watchers: usize,
    /// Rounds; each loads the unwatched and then the watched server once.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measured seconds per load.
    #[arg(long, default_value_t = 6.0)]
    pub duration: f64,
    /// Unmeasured warm-up seconds before each load's window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Concurrent keep-alive connections of the load.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Events per `/v1/batch` request.
    #[arg(long, default_value_t = 100)]
    pub batch_events: u64,
    /// Approximate JSON size of one event, bytes.
    #[arg(long, default_value_t = 500)]
    pub event_bytes: usize,
    /// The `tributary` binary (default: next to this executable).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Directory for the servers' temporary data dirs (must be on a real disk).
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Before each load, wait up to this many seconds for other processes to stop
    /// using the CPUs (0: do not wait).
    #[arg(long, default_value_t = 20.0)]
    pub quiet_wait: f64,
    /// Print JSON instead of markdown.
    #[arg(long)]
    pub json: bool,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[live] {}", msg.as_ref());
}

/// What the watchers have read so far (shared with their thread).
#[derive(Default)]
struct Seen {
    /// `data:` lines (events) per watcher.
    events: Vec<AtomicU64>,
    /// Bytes read, all watchers.
    bytes: AtomicU64,
    /// "missed … batches" comments, all watchers.
    missed: AtomicU64,
    /// Watchers whose stream ended or failed.
    ended: AtomicU64,
}

/// Counts `needle`'s occurrences in the stream read so far, one chunk at a time:
/// `carry` keeps the last `needle.len() - 1` bytes for matches that straddle
/// chunks.
fn count_across(carry: &mut Vec<u8>, chunk: &[u8], needle: &[u8]) -> u64 {
    let keep = needle.len() - 1;
    let mut joined = std::mem::take(carry);
    let head = joined.len();
    joined.extend_from_slice(&chunk[..chunk.len().min(keep)]);
    // Matches that start in the carried bytes and end in this chunk.
    let mut n = (0..head)
        .filter(|&i| joined[i..].starts_with(needle))
        .count() as u64;
    n += chunk.windows(needle.len()).filter(|w| w == &needle).count() as u64;
    *carry = if chunk.len() >= keep {
        chunk[chunk.len() - keep..].to_vec()
    } else {
        // `joined` is the old carry and the whole (short) chunk.
        joined[joined.len().saturating_sub(keep)..].to_vec()
    };
    n
}

/// One watcher: a keep-alive HTTP/1.1 GET of the stream, read until the server
/// goes away, counting events (`\ndata: `) and "missed" comments.
async fn watch(
    addr: SocketAddr,
    path: String,
    token: String,
    i: usize,
    seen: Arc<Seen>,
) -> anyhow::Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut data, mut missed) = (Vec::new(), Vec::new());
    let mut head = Vec::new();
    let mut in_head = true;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        seen.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let chunk = &buf[..n];
        if in_head {
            head.extend_from_slice(chunk);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let status = String::from_utf8_lossy(&head[..head.len().min(12)]).to_string();
            anyhow::ensure!(
                status.starts_with("HTTP/1.1 200"),
                "the stream answered {status}"
            );
            in_head = false;
            let rest = head[end + 4..].to_vec();
            seen.events[i].fetch_add(
                count_across(&mut data, &rest, b"\ndata: "),
                Ordering::Relaxed,
            );
            seen.missed.fetch_add(
                count_across(&mut missed, &rest, b": missed "),
                Ordering::Relaxed,
            );
            continue;
        }
        // Chunked transfer framing passes through the counting untouched: its
        // size lines never contain the needles.
        seen.events[i].fetch_add(
            count_across(&mut data, chunk, b"\ndata: "),
            Ordering::Relaxed,
        );
        seen.missed.fetch_add(
            count_across(&mut missed, chunk, b": missed "),
            Ordering::Relaxed,
        );
    }
}

/// One measured load.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    events_per_sec: f64,
    cpu_us_per_event: f64,
    server_cores: f64,
    other_cores: f64,
    acked: u64,
    /// Smallest share of the acknowledged events a watcher received (watched only).
    received_min: f64,
    missed: u64,
    watcher_mib: f64,
}

async fn load_once(
    server: &Server,
    key: &str,
    a: &Args,
    phase: &str,
    first_conn: u64,
    seen: Option<&Seen>,
) -> Run {
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
    let template = Arc::new(payload::batch(
        &server.addr.to_string(),
        key,
        &run,
        a.batch_events,
        a.event_bytes,
    ));
    let shape = Shape {
        connections: a.connections,
        warmup: Duration::from_secs_f64(a.warmup),
        duration: Duration::from_secs_f64(a.duration),
        timeout: Duration::from_secs(10),
        rate: None,
    };
    let pid = server.proc_id();
    let events0: Vec<u64> = seen
        .map(|s| s.events.iter().map(|e| e.load(Ordering::Relaxed)).collect())
        .unwrap_or_default();
    let (missed0, bytes0) = seen
        .map(|s| {
            (
                s.missed.load(Ordering::Relaxed),
                s.bytes.load(Ordering::Relaxed),
            )
        })
        .unwrap_or_default();
    let cpu0 = machine::process_cpu_secs(&pid);
    let me0 = machine::process_cpu_secs("self");
    let (busy0, steal0) = machine::machine_cpu_secs();
    let t0 = std::time::Instant::now();
    let result = load::run(server.addr, template, shape, first_conn).await;
    // Let the watchers read the tail of what was acknowledged.
    if seen.is_some() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-3);
    let cpu = machine::process_cpu_secs(&pid) - cpu0;
    let me = machine::process_cpu_secs("self") - me0;
    let (busy1, steal1) = machine::machine_cpu_secs();
    let acked = result.total.ok_events;
    let mut out = Run {
        events_per_sec: result.events_per_sec(),
        cpu_us_per_event: cpu * 1e6 / acked.max(1) as f64,
        server_cores: cpu / secs,
        other_cores: ((busy1 - busy0 - (steal1 - steal0) - cpu - me) / secs).max(0.0),
        acked,
        ..Default::default()
    };
    if let Some(s) = seen {
        out.received_min = s
            .events
            .iter()
            .zip(&events0)
            .map(|(e, e0)| (e.load(Ordering::Relaxed) - e0) as f64 / acked.max(1) as f64)
            .fold(f64::INFINITY, f64::min);
        out.missed = s.missed.load(Ordering::Relaxed) - missed0;
        out.watcher_mib = (s.bytes.load(Ordering::Relaxed) - bytes0) as f64
            / (1 << 20) as f64
            / a.watchers.max(1) as f64;
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
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
    anyhow::ensure!(
        a.rounds > 0 && a.connections > 0,
        "--rounds and --connections must be at least 1"
    );
    let machine = Machine::detect();
    let bin = crate::server::locate_binary(a.server_bin.as_deref())?;
    let tmp = a.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    progress(format!("machine: {}", machine.describe()));
    let quiet = Duration::from_secs_f64(a.quiet_wait.max(0.0));

    let idle = Server::start(&bin, &tmp, LogMode::Durable, false, &[]).await?;
    let idle_key = idle.create_source("http", "bench", "bench").await?;
    let watched = Server::start(&bin, &tmp, LogMode::Durable, false, &[]).await?;
    let (source_id, watched_key) = watched
        .create_source_with_id("http", "bench", "bench")
        .await?;

    // The watchers: their own thread and runtime, like browsers elsewhere.
    let seen = Arc::new(Seen {
        events: (0..a.watchers).map(|_| AtomicU64::new(0)).collect(),
        ..Default::default()
    });
    let path = format!("/api/v1/sources/{source_id}/events/stream");
    let (addr, token) = (watched.addr, watched.token.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watchers = {
        let seen = seen.clone();
        let n = a.watchers;
        std::thread::Builder::new().name("watchers".into()).spawn(
            move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    for i in 0..n {
                        let (path, token, seen) = (path.clone(), token.clone(), seen.clone());
                        tasks.push(tokio::spawn(async move {
                            if let Err(e) = watch(addr, path, token, i, seen.clone()).await {
                                eprintln!("[live] watcher {i}: {e:#}");
                            }
                            seen.ended.fetch_add(1, Ordering::Relaxed);
                        }));
                    }
                    let _ = stop_rx.await;
                    for t in tasks {
                        t.abort();
                    }
                });
                Ok(())
            },
        )?
    };
    // Every watcher is subscribed before the first load: the server counts them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = watched.metrics().await?;
        let n = m.sum("tributary_live_watchers");
        if n as usize >= a.watchers {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {n} of {} watchers subscribed after 10 s",
            a.watchers
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress(format!(
        "{} watchers reading the watched server's stream; {} rounds of {:.0} s /v1/batch loads ({} events × ~{} B per request, {} connections)",
        a.watchers, a.rounds, a.duration, a.batch_events, a.event_bytes, a.connections
    ));

    let (mut idle_runs, mut watched_runs) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        wait_quiet(quiet).await;
        let r = load_once(
            &idle,
            &idle_key,
            &a,
            &format!("i{round}"),
            round as u64 * 10_000,
            None,
        )
        .await;
        progress(format!(
            "round {}: 0 watchers   {:>9.0} events/s ({} acknowledged), {:.2} µs CPU/event, server {:.2} cores, others {:.2} cores",
            round + 1,
            r.events_per_sec,
            r.acked,
            r.cpu_us_per_event,
            r.server_cores,
            r.other_cores
        ));
        idle_runs.push(r);
        wait_quiet(quiet).await;
        let r = load_once(
            &watched,
            &watched_key,
            &a,
            &format!("w{round}"),
            round as u64 * 10_000,
            Some(&seen),
        )
        .await;
        progress(format!(
            "round {}: {} watchers  {:>9.0} events/s, {:.2} µs CPU/event, server {:.2} cores, others {:.2} cores; each watcher got ≥ {:.1} % of the events ({:.0} MiB), {} missed-batch notices",
            round + 1,
            a.watchers,
            r.events_per_sec,
            r.cpu_us_per_event,
            r.server_cores,
            r.other_cores,
            r.received_min * 100.0,
            r.watcher_mib,
            r.missed
        ));
        watched_runs.push(r);
    }
    let ended = seen.ended.load(Ordering::Relaxed);
    let _ = stop_tx.send(());
    let _ = watchers.join();
    idle.stop().await?;
    watched.stop().await?;
    anyhow::ensure!(
        ended == 0,
        "{ended} watchers lost their stream during the bench"
    );

    let med = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    let (ie, we) = (
        med(&idle_runs, |r| r.events_per_sec),
        med(&watched_runs, |r| r.events_per_sec),
    );
    let (ic, wc) = (
        med(&idle_runs, |r| r.cpu_us_per_event),
        med(&watched_runs, |r| r.cpu_us_per_event),
    );
    let received = watched_runs
        .iter()
        .map(|r| r.received_min)
        .fold(f64::INFINITY, f64::min);
    let other = med(&idle_runs, |r| r.other_cores).max(med(&watched_runs, |r| r.other_cores));
    if a.json {
        let doc = json!({
            "command": command,
            "machine": machine.to_json(),
            "watchers": a.watchers,
            "unwatched": {"events_per_sec": ie, "cpu_us_per_event": ic,
                          "runs": idle_runs.iter().map(|r| json!({"events_per_sec": r.events_per_sec, "cpu_us_per_event": r.cpu_us_per_event, "other_cores": r.other_cores})).collect::<Vec<_>>()},
            "watched": {"events_per_sec": we, "cpu_us_per_event": wc,
                        "received_min_share": received,
                        "runs": watched_runs.iter().map(|r| json!({"events_per_sec": r.events_per_sec, "cpu_us_per_event": r.cpu_us_per_event, "other_cores": r.other_cores, "received_min_share": r.received_min, "missed_notices": r.missed})).collect::<Vec<_>>()},
            "throughput_ratio": we / ie.max(1e-9),
            "cpu_per_event_ratio": wc / ic.max(1e-9),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "## Live debugger cost: `/v1/batch` with 0 and {} SSE watchers\n",
        a.watchers
    );
    println!("`{command}`  ");
    println!("{}  ", machine.describe());
    println!(
        "median of {} rounds, {:.0} s each; other processes used up to {:.2} cores meanwhile{}\n",
        a.rounds,
        a.duration,
        other,
        if other > 0.2 {
            " (busy machine: figures are provisional)"
        } else {
            ""
        }
    );
    println!("| watchers | events/s | server CPU µs/event | each watcher received |");
    println!("|---:|---:|---:|---:|");
    println!("| 0 | {ie:.0} | {ic:.2} | – |");
    println!(
        "| {} | {we:.0} | {wc:.2} | ≥ {:.1} % |",
        a.watchers,
        received * 100.0
    );
    println!(
        "| **ratio** | **{:.3}** ({:+.1} %) | **{:.3}** ({:+.1} %) | |",
        we / ie.max(1e-9),
        (we / ie.max(1e-9) - 1.0) * 100.0,
        wc / ic.max(1e-9),
        (wc / ic.max(1e-9) - 1.0) * 100.0
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::count_across;

    #[test]
    fn counts_needles_split_across_chunks() {
        let text = b"id: 1\nevent: accepted\ndata: {}\n\nid: 2\nevent: accepted\ndata: {}\n\n";
        for cut in 0..text.len() {
            let mut carry = Vec::new();
            let n = count_across(&mut carry, &text[..cut], b"\ndata: ")
                + count_across(&mut carry, &text[cut..], b"\ndata: ");
            assert_eq!(n, 2, "cut at {cut}");
        }
        for size in 1..8 {
            let mut carry = Vec::new();
            let n: u64 = text
                .chunks(size)
                .map(|c| count_across(&mut carry, c, b"\ndata: "))
                .sum();
            assert_eq!(n, 2, "chunks of {size}");
        }
    }
}

//! The `delivery` bench: events/s a `webhook` destination delivers to a batched
//! receiver, and the delivery latency at a fixed rate, each beside the same receiver
//! fed directly by the bench.
//!
//! The receiver is an HTTP server in this process on 127.0.0.1; it takes a single
//! event or `{"batch":[…]}` and records, per event, its `messageId` (which names the
//! phase and the event's sequence number) and the wall-clock time it arrived. The
//! server under test runs with the warehouse off, so delivery has the server's CPU
//! to itself; the destination is created through the admin API with `source_ids: []`
//! (every source) and the given `batch_size`. Events belong to 1,000 users, so the
//! engine's per-user ordering does not serialize them.
//!
//! **Throughput.** The destination is created disabled (its cursor is the log's head),
//! `events` events are ingested, then it is enabled: the figure is events over the
//! time from the enabling `PATCH` to the arrival of the last distinct event. The
//! baseline sends the same number of events, in request bodies of the same size and
//! shape as the destination's (built from a body it delivered, with fresh ids), from
//! the bench to the receiver over `in_flight` keep-alive connections (the webhook
//! type's requests in flight), full speed.
//!
//! **Latency.** `/v1/track` at `rate` events/s (open loop); each event carries the
//! time its request left the bench (`properties.sent_us`), and its latency is its
//! arrival at the receiver minus that time. The baseline posts the same events at the
//! same rate straight to the receiver. Events sent during the warm-up are not counted.
//!
//! Delivery is at-least-once: duplicates are counted, and only the first arrival of an
//! event is used. Nothing here asserts a time; the figures are printed for a reader.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::machine::Machine;
use crate::pipeline::{self, CpuMark, CpuUse, Drive, Node, Percentiles, Sent, now_us};
use crate::server::locate_binary;

/// Target of issue #5: events/s delivered.
const TARGET_EVENTS_PER_SEC: f64 = 20_000.0;
/// Target of issue #5: p99 delivery latency, ms.
const TARGET_P99_MS: f64 = 100.0;
/// Distinct users the events belong to.
const USERS: u64 = 1_000;

/// Options of the `delivery` bench.
#[derive(Debug, Clone)]
pub struct Options {
    /// Events of the throughput phase.
    pub events: u64,
    /// The destination's `batch_size`.
    pub batch_size: u64,
    /// Events per `/v1/batch` request while ingesting the backlog.
    pub ingest_batch: u64,
    /// Connections of the direct throughput baseline (the webhook type's requests in
    /// flight).
    pub in_flight: usize,
    /// Events/s of the latency phase.
    pub rate: f64,
    /// Measured seconds of the latency phase.
    pub duration: Duration,
    /// Unmeasured seconds at its start.
    pub warmup: Duration,
    /// Sender connections of the latency phase.
    pub connections: usize,
    /// The `tributary` binary (default: next to this executable).
    pub server_bin: Option<PathBuf>,
    /// Where the server's data dir goes.
    pub tmp_dir: PathBuf,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// What the receiver saw of one phase.
#[derive(Debug, Clone, Default)]
struct Arrivals {
    /// Sequence number → (sent µs, first arrival µs).
    first: HashMap<u64, (u64, u64)>,
    /// Arrivals of an event already seen.
    duplicates: u64,
    /// Requests carrying events of this phase.
    requests: u64,
    /// Body bytes of those requests.
    bytes: u64,
}

/// The in-process receiver.
#[derive(Default)]
struct Receiver {
    phases: Mutex<HashMap<String, Arrivals>>,
    /// The first `{"batch":…}` body of the pipeline's throughput phase, kept as the
    /// template of the baseline's bodies.
    sample: Mutex<Option<Vec<u8>>>,
    bad: Mutex<u64>,
}

#[derive(Deserialize)]
struct Incoming {
    #[serde(default)]
    batch: Option<Vec<Event>>,
    #[serde(rename = "messageId", default)]
    message_id: Option<String>,
    #[serde(default)]
    properties: Option<Props>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "messageId")]
    message_id: String,
    properties: Props,
}

#[derive(Deserialize)]
struct Props {
    sent_us: u64,
}

/// `d-<run>-<phase>-<seq>` → `(phase, seq)`.
fn parse_id(id: &str) -> Option<(&str, u64)> {
    let (rest, seq) = id.rsplit_once('-')?;
    let (_, phase) = rest.rsplit_once('-')?;
    Some((phase, seq.parse().ok()?))
}

impl Receiver {
    fn record(&self, body: &[u8], at_us: u64) {
        let Ok(incoming) = serde_json::from_slice::<Incoming>(body) else {
            *self.bad.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            return;
        };
        let events: Vec<(String, u64)> = match incoming.batch {
            Some(batch) => batch
                .into_iter()
                .map(|e| (e.message_id, e.properties.sent_us))
                .collect(),
            None => match (incoming.message_id, incoming.properties) {
                (Some(id), Some(p)) => vec![(id, p.sent_us)],
                _ => Vec::new(),
            },
        };
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        let mut counted: Option<String> = None;
        for (id, sent_us) in &events {
            let Some((phase, seq)) = parse_id(id) else {
                continue;
            };
            let a = phases.entry(phase.to_string()).or_default();
            if counted.as_deref() != Some(phase) {
                a.requests += 1;
                a.bytes += body.len() as u64;
                counted = Some(phase.to_string());
            }
            match a.first.entry(seq) {
                std::collections::hash_map::Entry::Occupied(_) => a.duplicates += 1,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((*sent_us, at_us));
                }
            }
        }
        drop(phases);
        if counted.as_deref() == Some("t") && events.len() > 1 {
            let mut sample = self.sample.lock().unwrap_or_else(|p| p.into_inner());
            if sample.is_none() {
                *sample = Some(body.to_vec());
            }
        }
    }

    fn distinct(&self, phase: &str) -> u64 {
        self.phases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(phase)
            .map_or(0, |a| a.first.len() as u64)
    }

    fn take(&self, phase: &str) -> Arrivals {
        self.phases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(phase)
            .unwrap_or_default()
    }
}

async fn hook(State(r): State<Arc<Receiver>>, body: axum::body::Bytes) -> StatusCode {
    let at = now_us();
    r.record(&body, at);
    StatusCode::OK
}

/// Starts the receiver on a loopback port.
async fn start_receiver() -> anyhow::Result<(SocketAddr, Arc<Receiver>)> {
    let receiver = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, receiver))
}

/// Delivery throughput and its baseline.
#[derive(Debug, Clone)]
pub struct ThroughputResult {
    /// Events in the backlog.
    pub events: u64,
    /// Seconds from enabling the destination to the last distinct arrival.
    pub secs: f64,
    /// Requests the receiver got.
    pub requests: u64,
    /// Body bytes the receiver got.
    pub bytes: u64,
    /// Duplicate arrivals.
    pub duplicates: u64,
    /// CPU over the delivery.
    pub cpu: CpuUse,
    /// The destination's stats after the phase.
    pub stats: Value,
    /// Direct baseline: seconds for the same events.
    pub direct_secs: f64,
    /// Direct baseline: requests.
    pub direct_requests: u64,
    /// CPU over the baseline.
    pub direct_cpu: CpuUse,
}

impl ThroughputResult {
    /// Events/s through Tributary.
    pub fn per_sec(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    /// Events/s of the direct baseline.
    pub fn direct_per_sec(&self) -> f64 {
        self.events as f64 / self.direct_secs.max(1e-9)
    }
}

/// One latency phase.
#[derive(Debug, Clone)]
pub struct LatencyPhase {
    /// Events of the window that arrived.
    pub arrived: u64,
    /// Events of the window sent and acknowledged (through Tributary) or answered
    /// (direct).
    pub sent: u64,
    /// Send → arrival, ms.
    pub latency: Percentiles,
    /// 200 from ingest → arrival, ms (through Tributary only).
    pub from_ack: Option<Percentiles>,
    /// Ingest acknowledgement latency, ms (through Tributary only).
    pub ack: Option<Percentiles>,
    /// Requests the receiver got, whole phase (warm-up included).
    pub requests: u64,
    /// Distinct events the receiver got, whole phase (warm-up included).
    pub events: u64,
    /// Duplicate arrivals.
    pub duplicates: u64,
    /// CPU over the phase.
    pub cpu: CpuUse,
}

/// Everything the bench measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// The command line.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// The server binary.
    pub server_bin: PathBuf,
    /// The options.
    pub options: Options,
    /// Throughput.
    pub throughput: ThroughputResult,
    /// Latency through Tributary.
    pub latency: LatencyPhase,
    /// Latency of the direct baseline.
    pub direct_latency: LatencyPhase,
    /// How the server exited.
    pub exit: String,
}

/// Command-line arguments of `tributary-bench delivery`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events of the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// The webhook destination's `batch_size`.
    #[arg(long, default_value_t = 500)]
    batch_size: u64,
    /// Events per `/v1/batch` request while ingesting the backlog.
    #[arg(long, default_value_t = 500)]
    ingest_batch: u64,
    /// Connections of the direct throughput baseline (the webhook type sends 8
    /// requests at a time).
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Events/s of the latency phase.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured seconds of the latency phase.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Unmeasured warm-up seconds at its start.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Sender connections of the latency phase.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// The `tributary` binary (default: next to this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Directory for the server's data dir (must be on a real disk).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print the report as JSON instead of markdown.
    #[arg(long)]
    json: bool,
}

/// Runs `tributary-bench delivery` and prints its report.
pub fn main(a: Args, command: String) -> anyhow::Result<()> {
    ensure!(
        a.events > 0 && a.rate > 0.0 && a.duration > 0.0,
        "--events, --rate and --duration must be positive"
    );
    ensure!(
        (1..=1000).contains(&a.batch_size),
        "--batch-size must be between 1 and 1000"
    );
    let opts = Options {
        events: a.events,
        batch_size: a.batch_size,
        ingest_batch: a.ingest_batch.max(1),
        in_flight: a.in_flight.max(1),
        rate: a.rate,
        duration: Duration::from_secs_f64(a.duration),
        warmup: Duration::from_secs_f64(a.warmup.max(0.0)),
        connections: a.connections.max(1),
        server_bin: a.server_bin,
        tmp_dir: a.tmp_dir.unwrap_or_else(std::env::temp_dir),
        timeout: Duration::from_secs_f64(a.timeout.max(0.1)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(run(opts, command))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json(&report))?);
    } else {
        print!("{}", markdown(&report));
    }
    Ok(())
}

/// Runs the bench.
pub async fn run(opts: Options, command: String) -> anyhow::Result<Report> {
    let bin = locate_binary(opts.server_bin.as_deref())?;
    let run_id = format!("{:x}", now_us() % 0xff_ffff);
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-dl-")
        .tempdir_in(&opts.tmp_dir)
        .with_context(|| format!("creating a data dir under {}", opts.tmp_dir.display()))?;
    let (raddr, receiver) = start_receiver().await?;
    let node = Node::start(
        &bin,
        &dir.path().join("data"),
        &[("TRIBUTARY_WAREHOUSE", "off".to_string())],
    )
    .await?;
    let key = node.create_source("bench", "bench").await?;
    let dest = node
        .admin_ok(
            "POST",
            "/destinations",
            Some(&json!({
                "type": "webhook",
                "name": "bench",
                "source_ids": [],
                "settings": {"url": format!("http://{raddr}/hook"), "batch_size": opts.batch_size},
                "enabled": false,
            })),
        )
        .await?;
    let dest_id = dest["id"]
        .as_str()
        .context("the created destination has no id")?
        .to_string();

    eprintln!("delivery bench: throughput, {} events", opts.events);
    let throughput = throughput(&opts, &node, &key, &dest_id, &run_id, raddr, &receiver).await?;
    eprintln!("delivery bench: latency at {} events/s", opts.rate);
    let latency = latency(&opts, &node, &key, &run_id, &receiver).await?;
    let direct_latency = latency_direct(&opts, &run_id, raddr, &receiver).await?;
    let exit = node.stop().await?;
    Ok(Report {
        command,
        machine: Machine::detect(),
        server_bin: bin,
        options: opts,
        throughput,
        latency,
        direct_latency,
        exit,
    })
}

fn event_id(run_id: &str, phase: &str, seq: u64) -> String {
    format!("d-{run_id}-{phase}-{seq}")
}

#[allow(clippy::too_many_arguments)]
async fn throughput(
    opts: &Options,
    node: &Node,
    key: &str,
    dest_id: &str,
    run_id: &str,
    raddr: SocketAddr,
    receiver: &Receiver,
) -> anyhow::Result<ThroughputResult> {
    // The backlog, while the destination is disabled.
    let per = opts.ingest_batch.max(1);
    let requests = opts.events.div_ceil(per);
    let events = requests * per;
    let run = run_id.to_string();
    let sent = pipeline::drive(
        node.addr,
        "/v1/batch",
        Some(key),
        Drive {
            requests,
            rate: None,
            connections: 4,
            timeout: opts.timeout,
        },
        Arc::new(move |i, sent_us| {
            let batch: Vec<Value> = (0..per)
                .map(|k| {
                    let seq = i * per + k;
                    pipeline::bench_event(&event_id(&run, "t", seq), seq % USERS, seq, sent_us)
                })
                .collect();
            json!({ "batch": batch }).to_string().into_bytes()
        }),
    )
    .await;
    let failed = sent.iter().filter(|s| s.status != 200).count();
    ensure!(failed == 0, "{failed} of {requests} ingest requests failed");

    // Enable the destination and wait for every event.
    eprintln!("  {events} events in the log; enabling the destination");
    let cpu0 = CpuMark::now(Some(&node.proc_id()));
    let t0 = now_us();
    node.admin_ok(
        "PATCH",
        &format!("/destinations/{dest_id}"),
        Some(&json!({"enabled": true})),
    )
    .await?;
    wait_for(receiver, "t", events, Duration::from_secs(300)).await?;
    let cpu = cpu0.until(&CpuMark::now(Some(&node.proc_id())));
    // Let the worker commit its cursor (every 200 ms) before reading the stats.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = node
        .admin_ok("GET", &format!("/destinations/{dest_id}"), None)
        .await?["stats"]
        .clone();
    let arrivals = receiver.take("t");
    let last = arrivals
        .first
        .values()
        .map(|&(_, at)| at)
        .max()
        .unwrap_or(t0);
    let secs = (last.saturating_sub(t0)) as f64 / 1e6;

    // The baseline: bodies shaped like the destination's, straight to the receiver.
    let sample = receiver
        .sample
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .context("the receiver kept no batch body to copy")?;
    let template: Value = serde_json::from_slice(&sample)?;
    let template = template["batch"]
        .as_array()
        .cloned()
        .context("the sample body has no batch")?;
    let size = opts.batch_size.max(1);
    let direct_requests = events.div_ceil(size);
    let bodies: Vec<Vec<u8>> = (0..direct_requests)
        .map(|r| {
            let batch: Vec<Value> = (r * size..((r + 1) * size).min(events))
                .map(|seq| {
                    let mut e = template[(seq % template.len() as u64) as usize].clone();
                    e["messageId"] = json!(event_id(run_id, "b", seq));
                    e
                })
                .collect();
            json!({ "batch": batch }).to_string().into_bytes()
        })
        .collect();
    let bodies = Arc::new(bodies);
    let cpu0 = CpuMark::now(Some(&node.proc_id()));
    let started = Instant::now();
    let sent = pipeline::drive(
        raddr,
        "/hook",
        None,
        Drive {
            requests: direct_requests,
            rate: None,
            connections: opts.in_flight,
            timeout: opts.timeout,
        },
        Arc::new(move |i, _| bodies[i as usize].clone()),
    )
    .await;
    let direct_secs = started.elapsed().as_secs_f64();
    let direct_cpu = cpu0.until(&CpuMark::now(Some(&node.proc_id())));
    ensure!(
        sent.iter().all(|s| s.status == 200),
        "the receiver refused direct requests"
    );
    let direct = receiver.take("b");
    ensure!(
        direct.first.len() as u64 == events,
        "the receiver counted {} of {events} direct events",
        direct.first.len()
    );
    Ok(ThroughputResult {
        events,
        secs,
        requests: arrivals.requests,
        bytes: arrivals.bytes,
        duplicates: arrivals.duplicates,
        cpu,
        stats,
        direct_secs,
        direct_requests: direct.requests,
        direct_cpu,
    })
}

async fn wait_for(
    receiver: &Receiver,
    phase: &str,
    events: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let n = receiver.distinct(phase);
        if n >= events {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {n} of {events} events of phase {phase} arrived within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The body of latency event `seq` as `/v1/track` takes it.
fn track_body(run_id: &str, phase: &str, seq: u64, sent_us: u64) -> Vec<u8> {
    let mut e = pipeline::bench_event(&event_id(run_id, phase, seq), seq % USERS, seq, sent_us);
    if let Value::Object(m) = &mut e {
        m.remove("type");
    }
    e.to_string().into_bytes()
}

fn latency_shape(opts: &Options) -> (Drive, u64) {
    let warmup = (opts.warmup.as_secs_f64() * opts.rate).ceil() as u64;
    let requests = warmup + (opts.duration.as_secs_f64() * opts.rate).ceil() as u64;
    (
        Drive {
            requests,
            rate: Some(opts.rate),
            connections: opts.connections,
            timeout: opts.timeout,
        },
        warmup,
    )
}

fn summarize(
    arrivals: &Arrivals,
    sent: &[Sent],
    warmup: u64,
    through_tributary: bool,
    cpu: CpuUse,
) -> LatencyPhase {
    let window: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.index >= warmup && s.status == 200)
        .collect();
    let mut latency = Vec::new();
    let mut from_ack = Vec::new();
    for s in &window {
        if let Some(&(sent_us, at)) = arrivals.first.get(&s.index) {
            latency.push(at.saturating_sub(sent_us));
            from_ack.push(at.saturating_sub(s.acked_us));
        }
    }
    let mut ack: Vec<u64> = window.iter().map(|s| s.acked_us - s.sent_us).collect();
    LatencyPhase {
        arrived: latency.len() as u64,
        sent: window.len() as u64,
        latency: pipeline::percentiles(&mut latency),
        from_ack: through_tributary.then(|| pipeline::percentiles(&mut from_ack)),
        ack: through_tributary.then(|| pipeline::percentiles(&mut ack)),
        requests: arrivals.requests,
        events: arrivals.first.len() as u64,
        duplicates: arrivals.duplicates,
        cpu,
    }
}

async fn latency(
    opts: &Options,
    node: &Node,
    key: &str,
    run_id: &str,
    receiver: &Receiver,
) -> anyhow::Result<LatencyPhase> {
    let (shape, warmup) = latency_shape(opts);
    let run = run_id.to_string();
    let cpu0 = CpuMark::now(Some(&node.proc_id()));
    let sent = pipeline::drive(
        node.addr,
        "/v1/track",
        Some(key),
        shape,
        Arc::new(move |i, sent_us| track_body(&run, "l", i, sent_us)),
    )
    .await;
    let acked = sent.iter().filter(|s| s.status == 200).count() as u64;
    let arrived = wait_for(receiver, "l", acked, Duration::from_secs(60)).await;
    let cpu = cpu0.until(&CpuMark::now(Some(&node.proc_id())));
    if let Err(e) = arrived {
        eprintln!("  {e:#}");
    }
    let arrivals = receiver.take("l");
    Ok(summarize(&arrivals, &sent, warmup, true, cpu))
}

async fn latency_direct(
    opts: &Options,
    run_id: &str,
    raddr: SocketAddr,
    receiver: &Receiver,
) -> anyhow::Result<LatencyPhase> {
    let (shape, warmup) = latency_shape(opts);
    let run = run_id.to_string();
    let cpu0 = CpuMark::now(None);
    let sent = pipeline::drive(
        raddr,
        "/hook",
        None,
        shape,
        Arc::new(move |i, sent_us| track_body(&run, "m", i, sent_us)),
    )
    .await;
    let cpu = cpu0.until(&CpuMark::now(None));
    let arrivals = receiver.take("m");
    Ok(summarize(&arrivals, &sent, warmup, false, cpu))
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

fn mark(ok: bool) -> &'static str {
    if ok { "✅" } else { "❌" }
}

/// The markdown page.
pub fn markdown(r: &Report) -> String {
    let o = &r.options;
    let t = &r.throughput;
    let l = &r.latency;
    let d = &r.direct_latency;
    let mut s = String::new();
    let _ = writeln!(s, "## Delivery benchmark\n");
    let _ = writeln!(s, "- command: `{}`", r.command);
    let _ = writeln!(s, "- machine: {}", r.machine.describe());
    let _ = writeln!(
        s,
        "- server: `{}` (release) as a separate process on 127.0.0.1, `TRIBUTARY_WAREHOUSE=off`; \
         one `webhook` destination, `batch_size` {}, to a receiver in the bench process on 127.0.0.1; \
         events of {} users",
        r.server_bin.display(),
        o.batch_size,
        USERS
    );
    let _ = writeln!(
        s,
        "- baselines: the same receiver fed by the bench directly — throughput with bodies like the \
         destination's over {} connections, latency with the same events at the same rate\n",
        o.in_flight
    );
    let _ = writeln!(
        s,
        "| figure | Tributary | direct to the receiver | ratio | target | |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---|---|");
    let _ = writeln!(
        s,
        "| delivery throughput, backlog of {} events, events/s (enable → last arrival) | **{}** | {} | {:.2} | ≥ {} | {} |",
        thousands(t.events as f64),
        thousands(t.per_sec()),
        thousands(t.direct_per_sec()),
        t.per_sec() / t.direct_per_sec().max(1e-9),
        thousands(TARGET_EVENTS_PER_SEC),
        mark(t.per_sec() >= TARGET_EVENTS_PER_SEC)
    );
    let complete = l.arrived == l.sent && l.sent > 0;
    let _ = writeln!(
        s,
        "| delivery latency p99 at {} events/s, send → receiver (p50 / p95 in brackets) | **{:.1} ms** ({:.1} / {:.1}) | {:.2} ms ({:.2} / {:.2}) | {:.0} | p99 ≤ {:.0} ms | {} |",
        thousands(o.rate),
        l.latency.p99,
        l.latency.p50,
        l.latency.p95,
        d.latency.p99,
        d.latency.p50,
        d.latency.p95,
        l.latency.p99 / d.latency.p99.max(1e-9),
        TARGET_P99_MS,
        mark(complete && l.latency.p99 <= TARGET_P99_MS)
    );
    let _ = writeln!(s, "\n### Details\n");
    let _ = writeln!(
        s,
        "- throughput: {} requests ({:.0} events each, {:.0} KiB), {} duplicates, {:.2} s; CPU {}; destination stats `{}`",
        thousands(t.requests as f64),
        t.events as f64 / t.requests.max(1) as f64,
        t.bytes as f64 / t.requests.max(1) as f64 / 1024.0,
        t.duplicates,
        t.secs,
        t.cpu.describe(),
        t.stats
    );
    let _ = writeln!(
        s,
        "- direct throughput: {} requests in {:.2} s; CPU {}",
        thousands(t.direct_requests as f64),
        t.direct_secs,
        t.direct_cpu.describe()
    );
    for (name, p) in [("through Tributary", l), ("direct", d)] {
        let _ = writeln!(
            s,
            "- latency {name}: {} of {} events arrived; send → arrival p50 {:.2} / p95 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms{}{}; {} requests for {} events in all, warm-up included ({:.2} events each), {} duplicates; CPU {}",
            thousands(p.arrived as f64),
            thousands(p.sent as f64),
            p.latency.p50,
            p.latency.p95,
            p.latency.p99,
            p.latency.p999,
            p.latency.max,
            p.from_ack
                .map(|a| format!("; from the 200 p50 {:.2} / p99 {:.2} ms", a.p50, a.p99))
                .unwrap_or_default(),
            p.ack
                .map(|a| format!("; ingest ack p50 {:.2} / p99 {:.2} ms", a.p50, a.p99))
                .unwrap_or_default(),
            thousands(p.requests as f64),
            thousands(p.events as f64),
            p.events as f64 / p.requests.max(1) as f64,
            p.duplicates,
            p.cpu.describe()
        );
    }
    let _ = writeln!(s, "- server exit on SIGTERM: {}", r.exit);
    s
}

fn latency_json(p: &LatencyPhase) -> Value {
    json!({
        "arrived": p.arrived,
        "sent": p.sent,
        "latency_ms": p.latency.to_json(),
        "from_ack_ms": p.from_ack.map(|x| x.to_json()),
        "ack_ms": p.ack.map(|x| x.to_json()),
        "requests": p.requests,
        "events": p.events,
        "duplicates": p.duplicates,
        "cpu_cores": p.cpu.to_json(),
    })
}

/// The JSON document.
pub fn json(r: &Report) -> Value {
    let t = &r.throughput;
    json!({
        "command": r.command,
        "machine": r.machine.to_json(),
        "server_bin": r.server_bin,
        "batch_size": r.options.batch_size,
        "throughput": {
            "events": t.events,
            "secs": t.secs,
            "events_per_sec": t.per_sec(),
            "requests": t.requests,
            "bytes": t.bytes,
            "duplicates": t.duplicates,
            "cpu_cores": t.cpu.to_json(),
            "destination_stats": t.stats,
            "direct": {
                "secs": t.direct_secs,
                "events_per_sec": t.direct_per_sec(),
                "requests": t.direct_requests,
                "cpu_cores": t.direct_cpu.to_json(),
            },
            "ratio": t.per_sec() / t.direct_per_sec().max(1e-9),
        },
        "latency": {
            "rate": r.options.rate,
            "through_tributary": latency_json(&r.latency),
            "direct": latency_json(&r.direct_latency),
        },
        "exit": r.exit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_phase_and_sequence() {
        assert_eq!(parse_id(&event_id("a1f", "t", 42)), Some(("t", 42)));
        assert_eq!(parse_id("nonsense"), None);
    }

    #[test]
    fn receiver_counts_batches_singles_and_duplicates() {
        let r = Receiver::default();
        let batch = json!({"batch": [
            {"messageId": "d-x-t-1", "properties": {"sent_us": 10}},
            {"messageId": "d-x-t-2", "properties": {"sent_us": 20}},
        ]})
        .to_string();
        r.record(batch.as_bytes(), 100);
        r.record(batch.as_bytes(), 200);
        r.record(
            json!({"messageId": "d-x-l-7", "properties": {"sent_us": 5}})
                .to_string()
                .as_bytes(),
            50,
        );
        assert_eq!(r.distinct("t"), 2);
        let t = r.take("t");
        assert_eq!((t.requests, t.duplicates), (2, 2));
        assert_eq!(t.first[&1], (10, 100));
        assert_eq!(r.take("l").first[&7], (5, 50));
        assert!(r.sample.lock().unwrap().is_some());
    }
}

//! What the `warehouse` and `delivery` benches share: a `tributary serve` child whose
//! environment the bench chooses (warehouse URL, micro-batch interval) and whose data
//! dir outlives a restart, its admin and ops calls, a fixed-rate or full-speed sender
//! of Tracking API requests that records when each request left and was answered,
//! the bench's event shape, a fresh PostgreSQL database per run, and CPU sampling.
//!
//! The child inherits no `TRIBUTARY_*` variable from the bench's environment: it gets
//! the admin token and exactly the variables the bench passes. It is stopped with
//! SIGTERM (graceful drain), then SIGKILL after 15 s. Times that are compared across
//! the bench and the server (send, acknowledgement, arrival at a receiver, the
//! warehouse's `received_at`/`uuid_ts`) are all wall-clock microseconds since the Unix
//! epoch from the same machine's clock ([`now_us`]), so differences between them are
//! meaningful; durations measured inside the bench alone use [`Instant`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::http::{self, Conn};
use crate::machine;
use crate::payload::base64_encode;
use crate::server::Metrics;

/// Wall-clock microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A running `tributary serve` with a caller-chosen environment.
pub struct Node {
    child: Child,
    /// The loopback address it listens on.
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// When it was spawned.
    pub spawned: Instant,
    token: String,
    log_path: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Node {
    /// Starts `bin serve` on a free loopback port with `data_dir` (kept by the caller,
    /// so a restart finds the same log and control state) and `env`, and waits for
    /// `/health`. Its stderr goes to `<data_dir>.log` (appended across restarts).
    pub async fn start(
        bin: &Path,
        data_dir: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Node> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let token = format!("bench-admin-{port}-{}", std::process::id());
        let log_path = data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TRIBUTARY_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(addr.to_string())
            .env("TRIBUTARY_ADMIN_TOKEN", &token)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let spawned = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let mut node = Node {
            child,
            addr,
            pid,
            spawned,
            token,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http::once(addr, "GET", "/health", &[], b"").await {
                return Ok(node);
            }
            if let Some(status) = node.child.try_wait()? {
                bail!(
                    "the server exited with {status} before it was healthy:\n{}",
                    node.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the server was not healthy after 30 s:\n{}",
                    node.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The pid as a `/proc` path component.
    pub fn proc_id(&self) -> String {
        self.pid.to_string()
    }

    /// The last lines of the server's stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// An admin API call (`path` under `/api/v1`); returns the status and the JSON
    /// body (`null` when the body is empty or not JSON).
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let auth = format!("Bearer {}", self.token);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, resp) = http::once(
            self.addr,
            method,
            &format!("/api/v1{path}"),
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            bytes.as_bytes(),
        )
        .await
        .with_context(|| format!("{method} /api/v1{path}"))?;
        Ok((status, serde_json::from_slice(&resp).unwrap_or(Value::Null)))
    }

    /// An admin call that must answer 2xx; returns its JSON body.
    pub async fn admin_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (status, v) = self.admin(method, path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} /api/v1{path} answered {status}: {v}");
        }
        Ok(v)
    }

    /// Creates an `http` source with `schema`; returns its write key.
    pub async fn create_source(&self, name: &str, schema: &str) -> anyhow::Result<String> {
        let v = self
            .admin_ok(
                "POST",
                "/sources",
                Some(&json!({"type": "http", "name": name, "schema": schema})),
            )
            .await?;
        v["write_key"]
            .as_str()
            .map(str::to_string)
            .context("the created source has no write_key")
    }

    /// `POST /api/v1/query`: the result rows, or an error with the server's answer.
    pub async fn query(&self, sql: &str) -> anyhow::Result<Vec<Vec<Value>>> {
        let (status, v) = self
            .admin("POST", "/query", Some(&json!({ "sql": sql })))
            .await?;
        if status != 200 {
            bail!("query answered {status}: {v}");
        }
        match v["rows"].as_array() {
            Some(rows) => Ok(rows
                .iter()
                .map(|r| r.as_array().cloned().unwrap_or_default())
                .collect()),
            None => bail!("query answer has no rows: {v}"),
        }
    }

    /// `GET /ready` as JSON.
    pub async fn ready(&self) -> anyhow::Result<Value> {
        let (status, body) = http::once(self.addr, "GET", "/ready", &[], b"")
            .await
            .context("GET /ready")?;
        if status != 200 {
            bail!(
                "/ready answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, body) = http::once(self.addr, "GET", "/metrics", &[], b"")
            .await
            .context("GET /metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(Metrics::parse(&String::from_utf8_lossy(&body)))
    }

    /// Stops the server: SIGTERM, then SIGKILL after 15 s. Returns how it exited.
    pub async fn stop(mut self) -> anyhow::Result<String> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.to_string());
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                let status = self.child.wait()?;
                return Ok(format!(
                    "killed after 15 s without exiting on SIGTERM ({status})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The bench's track event: `Bench Event` with seven properties, so that with the
/// ten fixed columns and `context_library_name`, `context_library_version` and
/// `context_ip` (which ingest adds) its warehouse table has exactly 20 columns
/// (`tracks` gets 13). `sent_us` is the wall-clock time the request left the bench.
pub fn bench_event(id: &str, user: u64, seq: u64, sent_us: u64) -> Value {
    json!({
        "type": "track",
        "event": "Bench Event",
        "messageId": id,
        "userId": format!("user-{user}"),
        "context": {"library": {"name": "tributary-bench", "version": "1.0.0"}},
        "properties": {
            "sent_us": sent_us,
            "seq": seq,
            "price": 19.99 + (seq % 100) as f64,
            "currency": "USD",
            "sku": format!("SKU-{}", seq % 5000),
            "in_stock": !seq.is_multiple_of(3),
            "note": "a bench event with a few properties of each type",
        },
    })
}

/// One request sent by [`drive`].
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// The request's index (0-based) in the phase.
    pub index: u64,
    /// When it was due (open loop) or taken (full speed), µs since the epoch.
    pub due_us: u64,
    /// When it left, µs since the epoch.
    pub sent_us: u64,
    /// When its answer was read, µs since the epoch (0 on a transport error).
    pub acked_us: u64,
    /// The HTTP status (0 on a transport error or timeout).
    pub status: u16,
}

/// How [`drive`] sends.
#[derive(Debug, Clone, Copy)]
pub struct Drive {
    /// Requests to send.
    pub requests: u64,
    /// Requests per second (open loop), or `None` for full speed (closed loop).
    pub rate: Option<f64>,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Builds request `index`'s body, given the time it leaves (µs since the epoch).
pub type BodyFn = dyn Fn(u64, u64) -> Vec<u8> + Send + Sync;

/// Sends `shape.requests` `POST {path}` requests (JSON bodies from `body`, HTTP Basic
/// auth with `write_key` when given) to `addr` and returns one [`Sent`] per request,
/// by index. Open loop: request `i` is due at `start + i / rate` whatever happened to
/// the earlier ones; full speed: each connection sends its next request as soon as
/// the previous one is answered.
pub async fn drive(
    addr: SocketAddr,
    path: &str,
    write_key: Option<&str>,
    shape: Drive,
    body: Arc<BodyFn>,
) -> Vec<Sent> {
    let head_auth =
        write_key.map(|k| format!("Basic {}", base64_encode(format!("{k}:").as_bytes())));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let start_us = now_us();
    let mut tasks = Vec::new();
    for _ in 0..shape.connections.max(1) {
        let next = next.clone();
        let body = body.clone();
        let path = path.to_string();
        let auth = head_auth.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut conn: Option<Conn> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= shape.requests {
                    break;
                }
                let due_us = match shape.rate {
                    Some(rate) => {
                        let offset = Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until((start + offset).into()).await;
                        start_us + offset.as_micros() as u64
                    }
                    None => now_us(),
                };
                if conn.as_ref().is_none_or(|c| c.closed) {
                    conn = Conn::connect(addr).await.ok();
                }
                let sent_us = now_us();
                let mut headers = vec![("Content-Type", "application/json")];
                if let Some(a) = &auth {
                    headers.push(("Authorization", a.as_str()));
                }
                let request = http::request(
                    "POST",
                    &addr.to_string(),
                    &path,
                    &headers,
                    &body(i, sent_us),
                );
                let (status, acked_us) = match conn.as_mut() {
                    None => (0, 0),
                    Some(c) => {
                        match tokio::time::timeout(shape.timeout, c.roundtrip(&request)).await {
                            Ok(Ok(resp)) => (resp.status, now_us()),
                            _ => {
                                conn = None;
                                (0, 0)
                            }
                        }
                    }
                };
                out.push(Sent {
                    index: i,
                    due_us,
                    sent_us,
                    acked_us,
                    status,
                });
            }
            out
        }));
    }
    let mut all = Vec::with_capacity(shape.requests as usize);
    for t in tasks {
        if let Ok(v) = t.await {
            all.extend(v);
        }
    }
    all.sort_by_key(|s| s.index);
    all
}

/// Percentiles of durations, in milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// JSON form (milliseconds).
    pub fn to_json(self) -> Value {
        json!({"n": self.n, "p50_ms": self.p50, "p90_ms": self.p90, "p95_ms": self.p95,
               "p99_ms": self.p99, "p999_ms": self.p999, "max_ms": self.max})
    }
}

/// Percentiles of durations given in microseconds (sorted in place).
pub fn percentiles(us: &mut [u64]) -> Percentiles {
    if us.is_empty() {
        return Percentiles::default();
    }
    us.sort_unstable();
    let at = |q: f64| {
        let i = ((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1;
        us[i] as f64 / 1000.0
    };
    Percentiles {
        n: us.len(),
        p50: at(0.50),
        p90: at(0.90),
        p95: at(0.95),
        p99: at(0.99),
        p999: at(0.999),
        max: us[us.len() - 1] as f64 / 1000.0,
    }
}

/// CPU counters at one instant, for per-phase deltas.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    server: f64,
    bench: f64,
    postgres: f64,
    machine: f64,
}

/// CPU use over an interval, in cores (1.0 = one core busy the whole time).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// The server process.
    pub server: f64,
    /// This bench process (load generator, receiver, poller).
    pub bench: f64,
    /// Every process named `postgres` (the warehouse's backends and any other
    /// client's).
    pub postgres: f64,
    /// Everything else on the machine (other work competing with the bench).
    pub other: f64,
}

/// CPU seconds of every process whose name starts with `postgres`.
pub fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut total = 0.0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("postgres") {
            total += machine::process_cpu_secs(pid);
        }
    }
    total
}

impl CpuMark {
    /// Reads the counters now; `server_pid` is `None` when no server runs.
    pub fn now(server_pid: Option<&str>) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            server: server_pid.map_or(0.0, machine::process_cpu_secs),
            bench: machine::process_cpu_secs("self"),
            postgres: postgres_cpu_secs(),
            machine: machine::machine_cpu_secs().0,
        }
    }

    /// Use between `self` and `later`.
    pub fn until(&self, later: &CpuMark) -> CpuUse {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-6);
        let server = (later.server - self.server).max(0.0);
        let bench = (later.bench - self.bench).max(0.0);
        let postgres = (later.postgres - self.postgres).max(0.0);
        let machine = (later.machine - self.machine).max(0.0);
        CpuUse {
            server: server / wall,
            bench: bench / wall,
            postgres: postgres / wall,
            other: ((machine - server - bench - postgres) / wall).max(0.0),
        }
    }
}

impl CpuUse {
    /// `server 0.52, postgres 0.10, bench 0.05, other 0.01` (cores).
    pub fn describe(&self) -> String {
        format!(
            "server {:.2}, postgres {:.2}, bench {:.2}, other {:.2}",
            self.server, self.postgres, self.bench, self.other
        )
    }

    /// JSON form (cores).
    pub fn to_json(self) -> Value {
        json!({"server": self.server, "postgres": self.postgres, "bench": self.bench, "other": self.other})
    }
}

/// A PostgreSQL database created for one run and dropped afterwards.
pub struct PgDatabase {
    /// Its name.
    pub name: String,
    /// `postgres://…/<name>` for `TRIBUTARY_WAREHOUSE` and the bench's own client.
    pub url: String,
    admin_url: String,
}

impl PgDatabase {
    /// Creates `tributary_bench_<tag>_<pid>_<time>` on the server of `admin_url` (a
    /// URL of an existing database, e.g. `postgres://postgres@127.0.0.1:5432/postgres`).
    pub async fn create(admin_url: &str, tag: &str) -> anyhow::Result<PgDatabase> {
        let name = format!(
            "tributary_bench_{tag}_{}_{}",
            std::process::id(),
            now_us() / 1000 % 100_000_000
        );
        let client = pg_connect(admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .context("the PostgreSQL URL has no database part")?;
        Ok(PgDatabase {
            url: format!("{base}/{name}"),
            name,
            admin_url: admin_url.to_string(),
        })
    }

    /// Drops the database (connections to it are terminated).
    pub async fn drop_now(self) -> anyhow::Result<()> {
        let client = pg_connect(&self.admin_url).await?;
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("DROP DATABASE {}", self.name))?;
        Ok(())
    }
}

/// Connects to PostgreSQL without TLS; the connection task runs on the runtime.
pub async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let mut cfg: tokio_postgres::Config = url.parse().context("PostgreSQL URL")?;
    cfg.connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(conn);
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_use_subtracts_known_processes_from_the_machine() {
        let a = CpuMark {
            at: Instant::now(),
            server: 1.0,
            bench: 1.0,
            postgres: 1.0,
            machine: 10.0,
        };
        let b = CpuMark {
            at: a.at + Duration::from_secs(2),
            server: 2.0,
            bench: 1.5,
            postgres: 1.5,
            machine: 13.0,
        };
        let u = a.until(&b);
        assert!((u.server - 0.5).abs() < 1e-9);
        assert!((u.bench - 0.25).abs() < 1e-9);
        assert!((u.postgres - 0.25).abs() < 1e-9);
        assert!((u.other - 0.5).abs() < 1e-9);
    }

    #[test]
    fn percentiles_pick_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let p = percentiles(&mut v);
        assert_eq!(
            (p.n, p.p50, p.p95, p.p99, p.max),
            (1000, 500.0, 950.0, 990.0, 1000.0)
        );
        assert_eq!(percentiles(&mut []).n, 0);
    }

    #[test]
    fn bench_event_has_seven_properties() {
        let e = bench_event("m-1", 3, 7, 1_700_000_000_000_000);
        assert_eq!(e["properties"].as_object().unwrap().len(), 7);
        assert_eq!(e["userId"], "user-3");
        assert_eq!(e["properties"]["sent_us"], 1_700_000_000_000_000u64);
    }
}

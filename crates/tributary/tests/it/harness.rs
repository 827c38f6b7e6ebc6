//! Starting and stopping real `tributary serve` processes for tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Whether every service-backed test must run (CI) instead of skipping.
pub fn require_all() -> bool {
    std::env::var("TRIBUTARY_TEST_REQUIRE")
        .map(|v| v == "all")
        .unwrap_or(false)
}

/// Returns true when the test may go on; prints the skip (or panics under
/// `TRIBUTARY_TEST_REQUIRE=all`) when `check` says the service is missing.
pub fn service_available(test: &str, check: Result<(), String>) -> bool {
    match check {
        Ok(()) => true,
        Err(why) if require_all() => panic!("{test}: required service missing: {why}"),
        Err(why) => {
            report_skip(test, &why);
            false
        }
    }
}

/// Prints `SKIP <test>: <reason>` so that it shows in plain `cargo test` output:
/// libtest captures only what goes through `print!`/`eprint!`, so the line is
/// written to the process's stderr handle directly.
pub fn report_skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIP {test}: {why}");
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running server process.
pub struct Server {
    child: Option<Child>,
    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// Admin token.
    pub token: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The port.
    pub port: u16,
    /// Extra environment given to the process.
    pub env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on a fresh data dir.
    pub fn start() -> Server {
        Self::start_with(Vec::new())
    }

    /// Starts a server on a fresh data dir with extra environment.
    pub fn start_with(env: Vec<(String, String)>) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Server {
            child: None,
            url: String::new(),
            token: format!("test-token-{}", free_port()),
            data_dir: tmp.path().to_path_buf(),
            port: free_port(),
            env,
            _tmp: Some(tmp),
        };
        s.spawn();
        s
    }

    /// Starts a server on a given (existing) data dir.
    pub fn start_in(dir: PathBuf, env: Vec<(String, String)>) -> Server {
        let mut s = Server {
            child: None,
            url: String::new(),
            token: format!("test-token-{}", free_port()),
            data_dir: dir,
            port: free_port(),
            env,
            _tmp: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("server.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tributary"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .env("TRIBUTARY_ADMIN_TOKEN", &self.token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start tributary"));
        self.url = format!("http://127.0.0.1:{}", self.port);
        self.wait_healthy();
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ =
                    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not become healthy; log:\n{}", self.log());
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }

    /// SIGKILL, returning the instant the signal was sent (before reaping the
    /// process, which a loaded machine may delay).
    pub fn kill_signalled_at(&mut self) -> Option<Instant> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        let sent = Instant::now();
        let _ = c.wait();
        Some(sent)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        #[allow(unsafe_code)]
        // SAFETY: sending a signal to a child process we own.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process again on the same data dir and port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// An admin-API request.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = client()
            .request(method, format!("{}/api/v1{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a source and returns its JSON (with `write_key`).
    pub async fn create_source(&self, kind: &str, name: &str, schema: &str) -> Value {
        let (st, v) = self
            .admin(
                reqwest::Method::POST,
                "/sources",
                Some(json!({"type": kind, "name": name, "schema": schema})),
            )
            .await;
        assert_eq!(st, 201, "create source: {v}");
        v
    }

    /// The newest `limit` stored events of a source (debugger endpoint).
    pub async fn events(&self, source_id: &str, limit: usize) -> Vec<Value> {
        let (st, v) = self
            .admin(
                reqwest::Method::GET,
                &format!("/sources/{source_id}/events?limit={limit}"),
                None,
            )
            .await;
        assert_eq!(st, 200, "{v}");
        v.as_array().cloned().unwrap_or_default()
    }

    /// Posts raw bytes to a path with a write key in Basic auth.
    pub async fn post_raw(
        &self,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = client().post(format!("{}{path}", self.url)).body(body);
        if let Some(k) = key {
            req = req.basic_auth(k, Some(""));
        }
        for (h, v) in headers {
            req = req.header(*h, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Posts JSON to a Tracking API path with a write key in Basic auth.
    pub async fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        self.post_raw(
            path,
            Some(key),
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `tributary ARGS` with `env` (and no inherited `TRIBUTARY_*` or `RUST_LOG`)
/// until it exits, at most `limit`; returns its exit status (`None` when it was still
/// running and had to be killed) and its stderr.
pub fn run_to_exit(
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tributary"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("TRIBUTARY_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start tributary");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

/// A plain HTTP client.
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The write key and id of a source JSON.
pub fn key_id(source: &Value) -> (String, String) {
    (
        source["write_key"].as_str().unwrap().to_string(),
        source["id"].as_str().unwrap().to_string(),
    )
}

/// This crate's directory, read at run time: a cached test binary built from another
/// checkout of the workspace carries that checkout's compile-time `CARGO_MANIFEST_DIR`.
pub fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests")
}

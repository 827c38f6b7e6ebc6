//! Starting the binary the way a newcomer does, and the errors that must name their
//! cause: the data-dir lock, host names in `--listen`, a data dir that is a file, a
//! missing config file, no admin token before the configuration opened, log files
//! without colour codes, PostgreSQL notices kept out of INFO, and `/metrics` showing
//! its counters at zero right after a restart.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::harness::{Server, client, free_port, key_id, run_to_exit};

/// Kills the child when the test ends, however it ends.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn health_within(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(r) = client()
            .get(format!("http://127.0.0.1:{port}/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_and_names_the_first_pid() {
    let first = Server::start();
    let pid = first.pid().unwrap();
    let dir = first.data_dir.display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let (status, err) = run_to_exit(
        &["serve", "--data-dir", &dir, "--listen", &listen],
        &[("TRIBUTARY_ADMIN_TOKEN", "t")],
        Duration::from_secs(20),
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second server must exit with an error, got {status:?}: {err}"
    );
    assert!(
        err.contains(&format!(
            "data dir {dir} is in use by another tributary (pid {pid})"
        )),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(first.data_dir.join("lock"))
            .unwrap()
            .trim(),
        pid.to_string(),
        "the lock file names the holder"
    );
}

#[tokio::test]
async fn listen_accepts_localhost() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(tmp.path().join("log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args([
            "serve",
            "--listen",
            &format!("localhost:{port}"),
            "--data-dir",
        ])
        .arg(tmp.path().join("data"))
        .env("TRIBUTARY_ADMIN_TOKEN", "t")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _guard = Kill(child);
    assert!(
        health_within(port, Duration::from_secs(30)).await,
        "no /health on 127.0.0.1:{port} after --listen localhost:{port}: {}",
        std::fs::read_to_string(tmp.path().join("log")).unwrap_or_default()
    );
}

#[test]
fn a_data_dir_that_is_a_file_is_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let (status, err) = run_to_exit(
        &[
            "serve",
            "--data-dir",
            file.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &[("TRIBUTARY_ADMIN_TOKEN", "t")],
        Duration::from_secs(20),
    );
    assert!(status.is_some_and(|s| !s.success()), "{status:?}: {err}");
    assert!(
        err.contains(&format!("data dir {} is not a directory", file.display())),
        "{err}"
    );
}

#[test]
fn a_missing_config_file_is_reported_once() {
    let (status, err) = run_to_exit(
        &["serve", "--config", "/nonexistent/tributary.toml"],
        &[],
        Duration::from_secs(20),
    );
    assert!(status.is_some_and(|s| !s.success()), "{status:?}: {err}");
    assert!(
        err.contains("cannot read config file /nonexistent/tributary.toml"),
        "{err}"
    );
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the OS error once: {err}"
    );
}

#[test]
fn no_admin_token_is_made_when_the_warehouse_url_is_invalid() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let (status, err) = run_to_exit(
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &[("TRIBUTARY_WAREHOUSE", "mysql://db/x")],
        Duration::from_secs(20),
    );
    assert!(status.is_some_and(|s| !s.success()), "{status:?}: {err}");
    assert!(err.contains("warehouse"), "names the warehouse: {err}");
    assert!(
        !err.contains("admin token"),
        "no token printed before the start failed: {err}"
    );
    assert!(
        !data.join("admin-token").exists(),
        "no token file left behind"
    );
}

#[tokio::test]
async fn logs_written_to_a_file_have_no_colour_codes() {
    let s = Server::start_with(vec![("RUST_LOG".into(), "info".into())]);
    s.create_source("http", "Web", "web").await;
    let log = s.log();
    assert!(log.contains("tributary listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file: {log:?}"
    );
}

/// The value of an unlabelled (or fully labelled) series in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn metrics_show_their_counters_at_zero_after_a_restart() {
    let mut s = Server::start();
    let (key, _) = key_id(&s.create_source("http", "Web", "web").await);
    let (st, _) = s
        .post("/v1/track", &key, json!({"userId":"u","event":"E"}))
        .await;
    assert_eq!(st, 200);
    // Loaded before the restart, so the new process has nothing left to load and its
    // warehouse counters stay at zero too.
    crate::warehouse::caught_up(&s).await;
    s.restart();
    let text = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "tributary_events_accepted_total",
        "tributary_events_duplicate_total",
        "tributary_events_rejected_total{reason=\"no_user_anon_id\"}",
        "tributary_append_failures_total{reason=\"unavailable\"}",
        "tributary_warehouse_rows_loaded_total",
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series} in:\n{text}");
    }
    assert!(
        text.contains("# HELP tributary_events_accepted_total"),
        "{text}"
    );
    // And it counts from there.
    let (st, _) = s
        .post("/v1/track", &key, json!({"userId":"u","event":"E2"}))
        .await;
    assert_eq!(st, 200);
    let text = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(&text, "tributary_events_accepted_total"),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn postgresql_notices_are_logged_at_debug_not_info() {
    let test = "postgresql_notices_are_logged_at_debug_not_info";
    let Some(url) = crate::warehouse::fresh_postgres_db(test) else {
        return;
    };
    let mut s = Server::start_with(vec![
        ("TRIBUTARY_WAREHOUSE".into(), url),
        ("TRIBUTARY_WAREHOUSE_INTERVAL_MS".into(), "200".into()),
        // Everything at INFO, PostgreSQL's client at DEBUG: a notice shows at DEBUG.
        ("RUST_LOG".into(), "info,tokio_postgres=debug".into()),
    ]);
    let (key, _) = key_id(&s.create_source("http", "Web", "web").await);
    s.post("/v1/track", &key, json!({"userId":"u","event":"E"}))
        .await;
    crate::warehouse::caught_up(&s).await;
    // A restart runs the idempotent DDL again: PostgreSQL answers with NOTICEs
    // ("… already exists, skipping").
    s.restart();
    s.post("/v1/track", &key, json!({"userId":"u","event":"E2"}))
        .await;
    crate::warehouse::caught_up(&s).await;
    let (st, _) = s.admin(Method::GET, "/warehouse", None).await;
    assert_eq!(st, 200);
    let log = s.log();
    let notices: Vec<&str> = log.lines().filter(|l| l.contains("NOTICE")).collect();
    assert!(
        !notices.is_empty(),
        "expected PostgreSQL notices in the debug log:\n{log}"
    );
    for l in &notices {
        assert!(
            l.contains("DEBUG") && !l.contains(" INFO "),
            "notice not at DEBUG: {l}"
        );
    }
}

//! `POST /api/v1/query` through the real binary: huge answers are cut without the
//! server's memory growing (its `/proc/<pid>/status` read from outside), and query
//! failures answer with their own codes.

use std::time::Duration;

use crate::harness::Server;
use crate::warehouse::{fresh_postgres_db, query};

/// A `kB` line of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

const MIB: u64 = 1024 * 1024;

/// Runs each statement; every answer is 200, truncated by bytes, at most 16 MiB of
/// rows; the server's peak RSS stays under 100 MiB above where it started.
async fn bounded(s: &Server, statements: &[&str]) {
    let pid = s.pid().expect("server runs");
    // One small query first, so the query path's one-time allocations are in the
    // baseline.
    let (st, v) = query(s, "select 1").await;
    assert_eq!(st, 200, "{v}");
    let before = status_bytes(pid, "VmRSS");
    for sql in statements {
        let started = std::time::Instant::now();
        let (st, v) = query(s, sql).await;
        assert_eq!(st, 200, "{sql}: {v}");
        assert_eq!(v["truncated"], true, "{sql}");
        assert_eq!(v["truncated_reason"], "max_bytes", "{sql}");
        let rows = serde_json::to_string(&v["rows"]).unwrap().len() as u64;
        assert!(rows <= 16 * MIB, "{sql}: {rows} bytes of rows");
        let peak = status_bytes(pid, "VmHWM");
        eprintln!(
            "{sql}: {} rows, {:.1} MiB of rows in {:.2} s; server RSS {:.1} MiB before, peak {:.1} MiB",
            v["rows"].as_array().map_or(0, Vec::len),
            rows as f64 / MIB as f64,
            started.elapsed().as_secs_f64(),
            before as f64 / MIB as f64,
            peak as f64 / MIB as f64
        );
        assert!(
            peak < before + 100 * MIB,
            "{sql}: server peak RSS {} MiB, started at {} MiB",
            peak / MIB,
            before / MIB
        );
    }
}

#[tokio::test]
async fn huge_query_answers_keep_the_server_small_on_sqlite() {
    let s = Server::start();
    bounded(
        &s,
        &[
            "with recursive r(n) as (select 1 union all select n + 1 from r where n < 300) select randomblob(1000000) from r",
            "with recursive r(n) as (select 1 union all select n + 1 from r where n < 400) select zeroblob(1000000), n from r",
            "with recursive r(n) as (select 1 union all select n + 1 from r where n < 300) select printf('%.*c', 1000000, 'x') from r",
        ],
    )
    .await;
    // One value past the cap is refused, not built.
    let pid = s.pid().expect("runs");
    let before = status_bytes(pid, "VmRSS");
    let (st, v) = query(&s, "select zeroblob(300000000)").await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["code"], "bad_query");
    assert!(status_bytes(pid, "VmHWM") < before + 100 * MIB);
}

#[tokio::test]
async fn huge_query_answers_keep_the_server_small_on_postgresql() {
    let test = "huge_query_answers_keep_the_server_small_on_postgresql";
    let Some(url) = fresh_postgres_db(test) else {
        return;
    };
    let mut s = Server::start_with(vec![("TRIBUTARY_WAREHOUSE".into(), url.clone())]);
    bounded(
        &s,
        &[
            "select repeat('x', 1000000) from generate_series(1, 300)",
            "select repeat('x', 300000000)",
            "select repeat('x', 1000000) as a, 1 as b from generate_series(1, 400)",
        ],
    )
    .await;
    s.stop();
    drop_postgres_db(&url);
}

#[tokio::test]
async fn query_failures_answer_their_own_codes() {
    // The warehouse is PostgreSQL on a port nothing listens on.
    let s = Server::start_with(vec![(
        "TRIBUTARY_WAREHOUSE".into(),
        "postgres://postgres@127.0.0.1:1/none".into(),
    )]);
    let (st, v) = query(&s, "select 1").await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["code"], "warehouse_unavailable");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(message.contains("warehouse"), "{message}");
    assert!(!message.contains("event log"), "{message}");
    let (st, v) = query(&s, "copy (select 1) to program 'id'").await;
    assert_eq!((st, v["code"].as_str()), (400, Some("query_not_allowed")));

    let Some(url) = fresh_postgres_db("query_failures_answer_their_own_codes") else {
        return;
    };
    // A superuser as the query login: refused before anything runs.
    let mut s = Server::start_with(vec![
        ("TRIBUTARY_WAREHOUSE".into(), url.clone()),
        ("TRIBUTARY_WAREHOUSE_QUERY_URL".into(), url.clone()),
    ]);
    let (st, v) = query(&s, "select 1").await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["code"], "query_role_unsafe");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("SUPERUSER")),
        "{v}"
    );
    s.stop();
    drop_postgres_db(&url);
}

/// Drops a database made by `fresh_postgres_db` and the query role the server
/// created for it.
pub(crate) fn drop_postgres_db(url: &str) {
    let Some(db) = url.rsplit('/').next() else {
        return;
    };
    let psql = |database: &str, sql: &str| -> String {
        std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-At",
                "-d",
                database,
                "-c",
                sql,
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let roles = psql(db, "select role from tributary.query_role");
    for role in roles.lines().filter(|r| !r.is_empty()) {
        psql(db, &format!("DROP OWNED BY \"{role}\""));
    }
    // Sessions of the stopped server may take a moment to go.
    std::thread::sleep(Duration::from_millis(200));
    psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    );
    for role in roles.lines().filter(|r| !r.is_empty()) {
        psql("postgres", &format!("DROP ROLE IF EXISTS \"{role}\""));
    }
}

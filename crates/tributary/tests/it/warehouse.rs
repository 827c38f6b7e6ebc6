//! The seed query through the running binary: an ActiveCampaign source with schema
//! `activecampaign` receives the six Email events (webhooks and Segment calls) and
//! `select * from activecampaign.email_delivered` returns them — on the embedded
//! SQLite warehouse and on the real PostgreSQL at 127.0.0.1:5432.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Server, key_id, service_available};

const EMAIL_EVENTS: [&str; 6] = [
    "Email Delivered",
    "Email Opened",
    "Email Link Clicked",
    "Email Unsubscribed",
    "Email Bounced",
    "Email Marked as Spam",
];

pub(crate) async fn query(s: &Server, sql: &str) -> (u16, Value) {
    s.admin(Method::POST, "/query", Some(json!({"sql": sql})))
        .await
}

/// Polls until `sql` returns at least `n` rows.
async fn rows_eventually(s: &Server, sql: &str, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = query(s, sql).await;
        if st == 200 && v["rows"].as_array().is_some_and(|r| r.len() >= n) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: never reached {n} rows; last answer {st} {v}\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn col(v: &Value, name: &str) -> usize {
    v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no column {name} in {}", v["columns"]))
}

async fn seed_query_scenario(s: &Server) {
    let (key, _) = key_id(
        &s.create_source("activecampaign", "ActiveCampaign", "activecampaign")
            .await,
    );
    let batch: Vec<Value> = EMAIL_EVENTS
        .iter()
        .enumerate()
        .map(|(i, e)| {
            json!({"type":"track","event":e,"userId":"u-1","messageId":format!("email-{i}"),
                "timestamp":"2026-11-20T10:00:00+01:00",
                "properties":{"email_id":"m-17","email_subject":"Spring is here","campaign_id":"42","campaign_name":"March"},
                "context":{"traits":{"email":"ann@example.com"}}})
        })
        .collect();
    let (st, v) = s.post("/v1/batch", &key, json!({"batch": batch})).await;
    assert_eq!(st, 200, "{v}");
    let v = rows_eventually(s, "select * from activecampaign.email_delivered", 1).await;
    let row = &v["rows"][0];
    assert_eq!(row[col(&v, "id")], "email-0");
    assert_eq!(row[col(&v, "user_id")], "u-1");
    assert_eq!(row[col(&v, "event")], "email_delivered");
    assert_eq!(row[col(&v, "event_text")], "Email Delivered");
    assert_eq!(row[col(&v, "email_subject")], "Spring is here");
    assert_eq!(row[col(&v, "campaign_id")], "42");
    assert_eq!(row[col(&v, "context_traits_email")], "ann@example.com");
    assert!(
        row[col(&v, "original_timestamp")]
            .as_str()
            .unwrap()
            .starts_with("2026-11-20T09:00:00")
    );
    for (table, _) in [
        ("email_opened", 0),
        ("email_link_clicked", 0),
        ("email_unsubscribed", 0),
        ("email_bounced", 0),
        ("email_marked_as_spam", 0),
    ] {
        rows_eventually(s, &format!("select id from activecampaign.{table}"), 1).await;
    }
    let v = rows_eventually(s, "select event_text, count(*) as n from activecampaign.tracks group by event_text order by 1", 6).await;
    assert_eq!(v["rows"].as_array().unwrap().len(), 6, "{v}");
    // Sending the same batch again changes nothing: ids are loaded once.
    s.post("/v1/batch", &key, json!({"batch": batch})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, v) = query(s, "select count(*) from activecampaign.tracks").await;
    assert_eq!(v["rows"][0][0], 6, "{v}");
    // Read-only: writes through the query endpoint are refused.
    let (st, v) = query(s, "delete from activecampaign.tracks").await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["code"], "bad_query");
    let (_, v) = query(s, "select count(*) from activecampaign.tracks").await;
    assert_eq!(v["rows"][0][0], 6);
    // Status and table view.
    let (st, w) = s.admin(Method::GET, "/warehouse", None).await;
    assert_eq!(st, 200);
    let schema = w["schemas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "activecampaign")
        .unwrap();
    assert!(
        schema["tables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "email_delivered" && t["rows"] == 1),
        "{w}"
    );
    let (st, t) = s
        .admin(
            Method::GET,
            "/warehouse/activecampaign/email_delivered",
            None,
        )
        .await;
    assert_eq!(st, 200);
    let types: Vec<(String, String)> = t["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        types.contains(&("received_at".into(), "timestamp".into())),
        "{types:?}"
    );
    assert!(
        types.contains(&("email_subject".into(), "text".into())),
        "{types:?}"
    );
    let (st, _) = s
        .admin(Method::GET, "/warehouse/activecampaign/nope", None)
        .await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn seed_query_on_the_embedded_sqlite_warehouse() {
    let s = Server::start_with(vec![(
        "TRIBUTARY_WAREHOUSE_INTERVAL_MS".into(),
        "200".into(),
    )]);
    seed_query_scenario(&s).await;
    // The CLI prints the same table.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args([
            "sql",
            "select id, event_text from activecampaign.email_delivered",
            "--format",
            "csv",
        ])
        .args(["--server", &s.url, "--token", &s.token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "id,event_text\nemail-0,Email Delivered\n"
    );
}

/// Creates a fresh PostgreSQL database for one test (so parallel runs do not share
/// the `activecampaign` schema or the loader's state), via `psql`.
pub(crate) fn fresh_postgres_db(test: &str) -> Option<String> {
    let name = format!(
        "tributary_it_{}_{}",
        std::process::id(),
        crate::harness::free_port()
    );
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
        ])
        .arg(format!("CREATE DATABASE {name}"))
        .output();
    let check = match out {
        Err(e) => Err(format!("psql not runnable: {e}")),
        Ok(o) if !o.status.success() => Err(format!(
            "PostgreSQL not reachable at 127.0.0.1:5432: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => Ok(()),
    };
    service_available(test, check).then(|| format!("postgres://postgres@127.0.0.1:5432/{name}"))
}

#[tokio::test]
async fn seed_query_on_postgresql() {
    let Some(url) = fresh_postgres_db("seed_query_on_postgresql") else {
        return;
    };
    let s = Server::start_with(vec![
        ("TRIBUTARY_WAREHOUSE".into(), url),
        ("TRIBUTARY_WAREHOUSE_INTERVAL_MS".into(), "200".into()),
    ]);
    seed_query_scenario(&s).await;
    let (_, w) = s.admin(Method::GET, "/warehouse", None).await;
    assert_eq!(w["kind"], "postgres");
}

/// Sends batches of unique messages from several tasks until `stop`, recording the
/// messageIds that got a 200.
async fn continuous_load(
    url: String,
    key: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<String> {
    use std::sync::atomic::Ordering;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (url, key, stop) = (url.clone(), key.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = crate::harness::client();
            let mut acked = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let ids: Vec<String> = (0..25).map(|i| format!("x-{t}-{n}-{i}")).collect();
                n += 1;
                let batch: Vec<Value> = ids
                    .iter()
                    .map(|id| json!({"type":"track","userId":"u","event":"Order Completed","messageId":id,"properties":{"total":n}}))
                    .collect();
                let r = client
                    .post(format!("{url}/v1/batch"))
                    .basic_auth(&key, Some(""))
                    .json(&json!({"batch": batch}))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => acked.extend(ids),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

pub(crate) async fn caught_up(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = crate::harness::client()
            .get(format!("{}/ready", s.url))
            .send()
            .await;
        if let Ok(r) = r
            && let Ok(v) = r.json::<Value>().await
            && v["warehouse"]["lag_events"] == 0
            && v["log"]["head"].as_u64().unwrap_or(0) > 0
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "warehouse never caught up\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_exactly_once(s: &Server, acked: &[String]) {
    for table in ["tracks", "order_completed"] {
        let (_, v) = query(
            s,
            &format!("select count(*), count(distinct id) from shop.{table}"),
        )
        .await;
        assert_eq!(
            v["rows"][0][0], v["rows"][0][1],
            "{table}: duplicate rows: {v}"
        );
        let mut ids = std::collections::HashSet::new();
        loop {
            let sql = format!(
                "select id from shop.{table} order by id limit 5000 offset {}",
                ids.len()
            );
            let (st, v) = query(s, &sql).await;
            assert_eq!(st, 200, "{v}");
            let page = v["rows"].as_array().unwrap();
            if page.is_empty() {
                break;
            }
            ids.extend(page.iter().map(|r| r[0].as_str().unwrap().to_string()));
        }
        let missing: Vec<&String> = acked
            .iter()
            .filter(|id| !ids.contains(*id))
            .take(5)
            .collect();
        assert!(
            missing.is_empty(),
            "{table}: acknowledged but not loaded: {missing:?}"
        );
    }
}

async fn kill_during_load(extra_env: Vec<(String, String)>, mid_load: impl FnOnce()) {
    let mut env = vec![(
        "TRIBUTARY_WAREHOUSE_INTERVAL_MS".to_string(),
        "100".to_string(),
    )];
    env.extend(extra_env);
    let mut s = Server::start_with(env);
    let (key, _) = key_id(&s.create_source("http", "Shop", "shop").await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(continuous_load(s.url.clone(), key.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(700)).await;
    mid_load();
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert!(
        acked.len() >= 100,
        "too little load to prove anything: {}",
        acked.len()
    );
    s.restart();
    caught_up(&s).await;
    assert_exactly_once(&s, &acked).await;
}

#[tokio::test]
async fn sigkill_during_continuous_load_loads_every_acknowledged_event_exactly_once() {
    kill_during_load(Vec::new(), || {}).await;
}

#[tokio::test]
async fn postgresql_connections_dropped_and_sigkill_mid_load_still_load_exactly_once() {
    let test = "postgresql_connections_dropped_and_sigkill_mid_load_still_load_exactly_once";
    let Some(url) = fresh_postgres_db(test) else {
        return;
    };
    let db = url.rsplit('/').next().unwrap().to_string();
    // What a PostgreSQL restart looks like to the loader: every connection to its
    // database is terminated mid-load (without stopping the shared server that other
    // tests use).
    let drop_connections = move || {
        let out = std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    kill_during_load(vec![("TRIBUTARY_WAREHOUSE".into(), url)], drop_connections).await;
}

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

async fn query(s: &Server, sql: &str) -> (u16, Value) {
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
fn fresh_postgres_db(test: &str) -> Option<String> {
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

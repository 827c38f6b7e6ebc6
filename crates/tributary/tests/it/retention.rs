//! The log contract end to end: positions that name their log (a new data dir beside
//! a PostgreSQL warehouse another one filled), retention bounded by consumers (a
//! warehouse down longer than the retention window loses nothing and its lag grows),
//! and the size cap's losses made explicit (metrics, `/ready`, status, gaps).
//!
//! The warehouse goes down and comes back through [`Proxy`], a TCP relay to the real
//! PostgreSQL that the test switches on and off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Server, client, key_id};
use crate::warehouse::{caught_up, fresh_postgres_db, query};

/// A relay on a free local port to PostgreSQL at 127.0.0.1:5432. While off, every
/// connection is accepted and closed at once (a warehouse that refuses service).
struct Proxy {
    port: u16,
    on: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let on = Arc::new(AtomicBool::new(false));
        let flag = on.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
                    }
                });
            }
        });
        Proxy { port, on, task }
    }

    fn url(&self, postgres_url: &str) -> String {
        postgres_url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", self.port))
    }

    fn switch(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ready(s: &Server) -> Value {
    client()
        .get(format!("{}/ready", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn metrics(s: &Server) -> String {
    client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Sends `ids` as track events of `key`'s source, 100 per batch; every one must get
/// a 200.
async fn send(s: &Server, key: &str, ids: &[String], pad: usize) {
    for chunk in ids.chunks(100) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|id| {
                json!({"type":"track","userId":format!("u-{}", id.len() % 7),"event":"Order Completed",
                       "messageId":id,"properties":{"pad":"x".repeat(pad)}})
            })
            .collect();
        let (st, v) = s.post("/v1/batch", key, json!({"batch": batch})).await;
        assert_eq!(st, 200, "{v}");
    }
}

async fn assert_loaded_once(s: &Server, ids: &[String]) {
    let (st, v) = query(
        s,
        "select count(*), count(distinct id) from shop.order_completed",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rows"][0][0], v["rows"][0][1], "duplicates: {v}");
    assert_eq!(
        v["rows"][0][0].as_i64(),
        Some(ids.len() as i64),
        "every acknowledged event loaded once: {v}"
    );
}

#[tokio::test]
async fn a_new_data_dir_loads_into_a_postgres_warehouse_another_data_dir_filled() {
    let test = "a_new_data_dir_loads_into_a_postgres_warehouse_another_data_dir_filled";
    let Some(url) = fresh_postgres_db(test) else {
        return;
    };
    let env = vec![
        ("TRIBUTARY_WAREHOUSE".to_string(), url),
        (
            "TRIBUTARY_WAREHOUSE_INTERVAL_MS".to_string(),
            "200".to_string(),
        ),
    ];
    let first: Vec<String> = (0..40).map(|i| format!("first-{i}")).collect();
    {
        let mut s = Server::start_with(env.clone());
        let (key, _) = key_id(&s.create_source("http", "web", "shop").await);
        send(&s, &key, &first, 0).await;
        caught_up(&s).await;
        assert_loaded_once(&s, &first).await;
        s.stop();
    }
    // Another data dir, the same warehouse: its log starts at seq 1 again.
    let s = Server::start_with(env);
    let (key, _) = key_id(&s.create_source("http", "web", "shop").await);
    let mut second: Vec<String> = (0..25).map(|i| format!("second-{i}")).collect();
    // Two messages the first data dir also stored: loaded once, through `id`.
    second.extend(["first-0".to_string(), "first-1".to_string()]);
    send(&s, &key, &second, 0).await;
    caught_up(&s).await;
    let all: Vec<String> = first.iter().chain(&second[..25]).cloned().collect();
    assert_loaded_once(&s, &all).await;
}

#[tokio::test]
async fn a_warehouse_down_longer_than_retention_loses_nothing_and_its_lag_grows() {
    let test = "a_warehouse_down_longer_than_retention_loses_nothing_and_its_lag_grows";
    let Some(url) = fresh_postgres_db(test) else {
        return;
    };
    let proxy = Proxy::start().await;
    let s = Server::start_with(vec![
        ("TRIBUTARY_WAREHOUSE".into(), proxy.url(&url)),
        ("TRIBUTARY_WAREHOUSE_INTERVAL_MS".into(), "200".into()),
        ("TRIBUTARY_LOG_RETENTION".into(), "5s".into()),
    ]);
    let (key, _) = key_id(&s.create_source("http", "web", "shop").await);
    let mut ids: Vec<String> = (0..501).map(|i| format!("down-{i}")).collect();
    send(&s, &key, &ids, 0).await;
    // Down for 30 s, six times the retention window (a shorter stand-in for 90 s).
    let down = Instant::now();
    let mut lags = Vec::new();
    let mut n = 0;
    while down.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let more: Vec<String> = (0..10).map(|i| format!("during-{n}-{i}")).collect();
        n += 1;
        send(&s, &key, &more, 0).await;
        ids.extend(more);
        let r = ready(&s).await;
        lags.push(r["warehouse"]["lag_seconds"].as_f64().unwrap_or(0.0));
        assert_eq!(
            r["log"]["records"].as_u64(),
            Some(ids.len() as u64),
            "retention deleted records the warehouse has not loaded: {r}"
        );
        assert_eq!(r["warehouse"]["retrying"], true, "{r}");
    }
    assert!(
        lags.windows(2).all(|w| w[1] > w[0]) && lags.last().copied().unwrap_or(0.0) >= 25.0,
        "lag_seconds must grow while the warehouse is down: {lags:?}"
    );
    proxy.switch(true);
    caught_up(&s).await;
    assert_loaded_once(&s, &ids).await;
    // Loaded and older than the retention window: now they may go, and they do.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ready(&s).await;
        if r["log"]["records"].as_u64() == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "loaded events were never pruned: {r}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = ready(&s).await;
    assert_eq!(r["status"], "ready", "{r}");
    assert_eq!(r["warehouse"]["lag_seconds"].as_f64(), Some(0.0), "{r}");
}

#[tokio::test]
async fn the_size_cap_drop_is_counted_shown_and_reported_as_a_gap() {
    let test = "the_size_cap_drop_is_counted_shown_and_reported_as_a_gap";
    let Some(url) = fresh_postgres_db(test) else {
        return;
    };
    let proxy = Proxy::start().await;
    let s = Server::start_with(vec![
        ("TRIBUTARY_WAREHOUSE".into(), proxy.url(&url)),
        ("TRIBUTARY_WAREHOUSE_INTERVAL_MS".into(), "200".into()),
        ("TRIBUTARY_LOG_RETENTION".into(), "10s".into()),
        ("TRIBUTARY_LOG_MAX_BYTES".into(), "1000000".into()),
        ("TRIBUTARY_RETRY_MIN_BACKOFF".into(), "1s".into()),
    ]);
    let (key, source_id) = key_id(&s.create_source("http", "web", "shop").await);
    // A destination whose receiver is down: its cursor stays behind too.
    let dead_port = crate::harness::free_port();
    let (st, d) = s
        .admin(
            Method::POST,
            "/destinations",
            Some(
                json!({"type":"webhook","name":"down","source_ids":[source_id],
                        "settings":{"url":format!("http://127.0.0.1:{dead_port}/hook")}}),
            ),
        )
        .await;
    assert_eq!(st, 201, "{d}");
    let dest = d["id"].as_str().unwrap().to_string();
    // ~3 MB of events into a 1 MB log nobody can consume.
    let ids: Vec<String> = (0..1500).map(|i| format!("cap-{i}")).collect();
    send(&s, &key, &ids, 2000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let dropped = loop {
        let m = metrics(&s).await;
        let line = m.lines().find(|l| {
            l.starts_with("tributary_log_unconsumed_dropped_total")
                && l.contains("consumer=\"warehouse\"")
        });
        if let Some(v) = line
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v > 0.0)
        {
            break v as u64;
        }
        assert!(Instant::now() < deadline, "no drop counted:\n{m}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        metrics(&s)
            .await
            .contains(&format!("consumer=\"destination:{dest}\"")),
        "the destination's loss is counted too"
    );
    let r = ready(&s).await;
    assert_eq!(r["status"], "degraded", "{r}");
    let reasons = r["reasons"].to_string();
    assert!(reasons.contains("warehouse"), "{r}");
    assert!(
        r["log"]["unconsumed_dropped"].as_u64().unwrap_or(0) > 0,
        "{r}"
    );
    let (_, d) = s
        .admin(Method::GET, &format!("/destinations/{dest}"), None)
        .await;
    assert_eq!(d["stats"]["gap"]["from"], 1, "{d}");
    assert!(
        d["stats"]["unconsumed_dropped"].as_u64().unwrap_or(0) > 0,
        "{d}"
    );
    assert!(
        s.log()
            .contains("size cap deleted records a consumer had not read")
    );

    // The warehouse comes back: it loads what is left and names the gap.
    proxy.switch(true);
    caught_up(&s).await;
    let (st, w) = s.admin(Method::GET, "/warehouse", None).await;
    assert_eq!(st, 200, "{w}");
    assert_eq!(w["gap"]["from"], 1, "{w}");
    let to = w["gap"]["to"].as_u64().unwrap();
    assert!(to as f64 >= dropped as f64 - 1.0, "{w}");
    assert!(
        w["unconsumed_dropped"].as_u64().unwrap_or(0) >= dropped,
        "{w}"
    );
    let (_, v) = query(&s, "select count(*) from shop.order_completed").await;
    let loaded = v["rows"][0][0].as_i64().unwrap() as u64;
    assert_eq!(
        loaded + w["gap"]["records"].as_u64().unwrap(),
        ids.len() as u64,
        "every event is loaded or in the reported gap: {w} {v}"
    );
}

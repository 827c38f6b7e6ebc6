//! Cluster mode end to end: a 3-server NATS JetStream cluster (`sync_interval:
//! always`, R3), the local PostgreSQL as control plane and warehouse, and three
//! `tributary serve` nodes. Load is spread over the nodes by the test client while a
//! node and then the stream leader are SIGKILLed and a node is SIGSTOPped past its
//! lease; afterwards every messageId that got a 200 is exactly once in the warehouse
//! and at least once at a webhook receiver, one user's events in order.
//!
//! Needs nats-server ≥ 2.12 (`.ci/install-test-deps.sh`), PostgreSQL and `psql`;
//! skipped with a `SKIP` line otherwise (failed under `TRIBUTARY_TEST_REQUIRE=all`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

#[path = "../../../eventlog/tests/it/nats.rs"]
pub(crate) mod nats;

use crate::harness::{Server, client};
use crate::query_safety::drop_postgres_db;
use crate::warehouse::fresh_postgres_db;
use nats::{Nats, nats_server};

type Received = Arc<Mutex<Vec<String>>>;

/// A webhook receiver that records every messageId it gets, in arrival order.
async fn receiver() -> (String, Received) {
    use axum::extract::State;
    let got: Received = Default::default();
    async fn hook(State(got): State<Received>, body: axum::body::Bytes) -> &'static str {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let items = match v.get("batch") {
            Some(Value::Array(a)) => a.clone(),
            _ => vec![v],
        };
        got.lock().unwrap().extend(
            items
                .iter()
                .filter_map(|i| i["messageId"].as_str().map(String::from)),
        );
        "ok"
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

fn psql(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args(["-At", "-v", "ON_ERROR_STOP=1", "-d", url, "-c"])
        .arg(sql)
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn node(nats: &Nats, control: &str, warehouse: &str, id: &str) -> Server {
    Server::start_with(vec![
        ("TRIBUTARY_LOG".into(), nats.url()),
        ("TRIBUTARY_LOG_REPLICAS".into(), "3".into()),
        ("TRIBUTARY_LOG_PARTITIONS".into(), "4".into()),
        ("TRIBUTARY_CONTROL".into(), control.into()),
        ("TRIBUTARY_WAREHOUSE".into(), warehouse.into()),
        ("TRIBUTARY_WAREHOUSE_BATCH_INTERVAL".into(), "200ms".into()),
        ("TRIBUTARY_CLUSTER_NODE_ID".into(), id.into()),
        ("TRIBUTARY_CLUSTER_LEASE_TTL".into(), "3s".into()),
    ])
}

fn signal(s: &Server, sig: i32) {
    let pid = s.pid().expect("running") as i32;
    #[allow(unsafe_code)]
    // SAFETY: sending a signal to a child process this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// One client sending batches round-robin over the nodes, one request at a time, so
/// a user's messages are accepted in the order of their numbers. Returns the acked
/// messageIds.
struct Load {
    acked: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<u64>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn start_load(urls: Vec<String>, key: String) -> Load {
    let acked: Arc<Mutex<Vec<String>>> = Default::default();
    let failed: Arc<Mutex<u64>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (a, f, s) = (acked.clone(), failed.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let http = client();
        let mut next: HashMap<usize, u64> = HashMap::new();
        let mut round = 0usize;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            let mut batch = Vec::new();
            let mut ids = Vec::new();
            for i in 0..20 {
                let user = (round * 7 + i) % 12;
                let n = next.entry(user).or_default();
                *n += 1;
                let id = format!("m-u{user}-{n}");
                ids.push(id.clone());
                batch.push(
                    json!({"type": "track", "event": "Step", "userId": format!("u{user}"),
                    "messageId": id, "properties": {"n": *n}}),
                );
            }
            let url = &urls[round % urls.len()];
            round += 1;
            let res = http
                .post(format!("{url}/v1/batch"))
                .basic_auth(&key, Some(""))
                .timeout(Duration::from_secs(30))
                .json(&json!({"batch": batch}))
                .send()
                .await;
            match res {
                Ok(r) if r.status().as_u16() == 200 => a.lock().unwrap().extend(ids),
                _ => *f.lock().unwrap() += 1,
            }
        }
    });
    Load {
        acked,
        failed,
        stop,
        task,
    }
}

/// (user, n) of `m-u<user>-<n>`.
fn parse(id: &str) -> Option<(String, u64)> {
    let rest = id.strip_prefix("m-")?;
    let (user, n) = rest.rsplit_once('-')?;
    Some((user.to_string(), n.parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_load_once_and_deliver_in_order_through_kills_and_a_stall() {
    let test = "three_nodes_load_once_and_deliver_in_order_through_kills_and_a_stall";
    let Some(bin) = nats_server(test) else {
        return;
    };
    let Some(control) = fresh_postgres_db(test) else {
        return;
    };
    let warehouse = fresh_postgres_db(test).expect("second database");
    let mut nats = Nats::start(&bin, 3);
    let db = control.rsplit('/').next().unwrap().to_string();
    let mut nodes: Vec<Server> = (0..3)
        .map(|i| node(&nats, &control, &warehouse, &format!("n{i}-{db}")))
        .collect();
    let (hook, got) = receiver().await;
    let src = nodes[0].create_source("http", "Web", "web").await;
    let key = src["write_key"].as_str().unwrap().to_string();
    let src_id = src["id"].as_str().unwrap().to_string();
    let (st, dest) = nodes[0]
        .admin(
            Method::POST,
            "/destinations",
            Some(
                json!({"type": "webhook", "name": "Hook", "source_ids": [src_id],
                        "settings": {"url": hook}}),
            ),
        )
        .await;
    assert_eq!(st, 201, "{dest}");
    // Every node knows the key before the load starts.
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (st, _) = n
                .post("/v1/track", &key, json!({"type": "track", "event": "Warm", "userId": "w", "messageId": format!("warm-{}", n.port)}))
                .await;
            if st == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "node {} refuses the key", n.url);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let load = start_load(nodes.iter().map(|n| n.url.clone()).collect(), key.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A node dies mid-load and comes back.
    nodes[1].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    nodes[1].restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The stream leader dies mid-load (~8 s of election, retried within the bound).
    let leader = nats.stream_leader("TRIBUTARY").expect("a stream leader");
    nats.kill(leader);
    tokio::time::sleep(Duration::from_secs(12)).await;
    nats.restart(leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A node stalls past its lease: the others take its partitions over.
    signal(&nodes[2], libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(&nodes[2], libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.task.await.unwrap();
    let acked: Vec<String> = load.acked.lock().unwrap().clone();
    let failed = *load.failed.lock().unwrap();
    let acked_set: HashSet<&str> = acked.iter().map(String::as_str).collect();
    assert_eq!(acked.len(), acked_set.len());
    assert!(
        acked.len() > 1000,
        "too little load got through: {}",
        acked.len()
    );

    // Exactly once in the warehouse: count = count distinct ⊇ the acked set.
    let deadline = Instant::now() + Duration::from_secs(90);
    let loaded: HashSet<String> = loop {
        let ids = psql(&warehouse, "SELECT id FROM web.tracks WHERE id LIKE 'm-%'");
        let ids: Vec<String> = ids.lines().map(str::to_string).collect();
        let set: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(ids.len(), set.len(), "a message loaded twice");
        if acked_set.iter().all(|id| set.contains(*id)) {
            break set;
        }
        assert!(
            Instant::now() < deadline,
            "{} acked messages not loaded; node logs:\n{}",
            acked_set.iter().filter(|id| !set.contains(**id)).count(),
            nodes
                .iter()
                .map(|n| n.log())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let counts = psql(
        &warehouse,
        "SELECT count(*) || ' ' || count(DISTINCT id) FROM web.tracks WHERE id LIKE 'm-%'",
    );
    let (count, distinct) = counts.split_once(' ').unwrap();
    assert_eq!(count, distinct, "warehouse rows: {counts}");

    // At least once at the receiver, a user's first deliveries in order.
    let deadline = Instant::now() + Duration::from_secs(90);
    let received = loop {
        let got = got.lock().unwrap().clone();
        let set: HashSet<&str> = got.iter().map(String::as_str).collect();
        if acked_set.iter().all(|id| set.contains(id)) {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "{} acked messages never delivered",
            acked_set.iter().filter(|id| !set.contains(**id)).count()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut seen = HashSet::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut duplicates = 0;
    for id in &received {
        if !seen.insert(id.as_str()) {
            duplicates += 1;
            continue;
        }
        let Some((user, n)) = parse(id) else { continue };
        if !acked_set.contains(id.as_str()) {
            continue;
        }
        let prev = last.insert(user.clone(), n).unwrap_or(0);
        assert!(prev < n, "{user}: {n} delivered after {prev}");
    }
    println!(
        "cluster: {} acked, {failed} requests failed, {} loaded, {} deliveries ({duplicates} duplicates)",
        acked.len(),
        loaded.len(),
        received.len()
    );

    for n in &mut nodes {
        n.stop();
    }
    drop(nats);
    drop_postgres_db(&control);
    drop_postgres_db(&warehouse);
}

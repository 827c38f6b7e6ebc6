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

/// One delivery as the receiver saw it.
#[derive(Clone)]
struct Delivery {
    message_id: String,
    at: Instant,
    /// Sent by the watched process (the node that is stalled later).
    from_watched: bool,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Delivery>>>,
    /// The pid whose requests are marked `from_watched` (0: none).
    watched: Arc<std::sync::atomic::AtomicU32>,
}

impl Receiver {
    fn ids(&self) -> Vec<String> {
        let got = self.got.lock().unwrap();
        got.iter().map(|d| d.message_id.clone()).collect()
    }
}

/// Whether the TCP connection whose client end is 127.0.0.1:`port` belongs to
/// process `pid`: the socket's inode from `/proc/net/tcp`, then `pid`'s open files.
/// (Observed from outside, so the nodes need not say who they are.)
fn connection_of(pid: u32, port: u16) -> bool {
    let Ok(tcp) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!(":{port:04X}");
    let inode = tcp.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && f[1].ends_with(&local)).then(|| f[9].to_string())
    });
    let Some(inode) = inode else { return false };
    let target = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|dir| {
        dir.flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == target.as_str()))
    })
}

/// A webhook receiver that records every messageId it gets, in arrival order, and
/// whether the watched process sent it.
async fn receiver() -> (String, Receiver) {
    use axum::extract::{ConnectInfo, State};
    let rx = Receiver::default();
    async fn hook(
        State(rx): State<Receiver>,
        ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
        body: axum::body::Bytes,
    ) -> &'static str {
        let at = Instant::now();
        let watched = rx.watched.load(std::sync::atomic::Ordering::Relaxed);
        let from_watched = watched != 0 && connection_of(watched, peer.port());
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let items = match v.get("batch") {
            Some(Value::Array(a)) => a.clone(),
            _ => vec![v],
        };
        rx.got.lock().unwrap().extend(items.iter().filter_map(|i| {
            Some(Delivery {
                message_id: i["messageId"].as_str()?.to_string(),
                at,
                from_watched,
            })
        }));
        "ok"
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(rx.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap()
    });
    (url, rx)
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
    let (hook, rx) = receiver().await;
    // The node that is stalled later: the receiver tells its requests apart.
    rx.watched.store(
        nodes[2].pid().expect("running"),
        std::sync::atomic::Ordering::Relaxed,
    );
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
    let dest_id = dest["id"].as_str().unwrap().to_string();
    let consumer = format!("destination:{dest_id}");
    let stalled_id = format!("n2-{db}");
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

    let started = Instant::now();
    let load = start_load(nodes.iter().map(|n| n.url.clone()).collect(), key.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A node dies mid-load and comes back.
    nodes[1].kill();
    println!("node 1 killed at {}ms", started.elapsed().as_millis());
    tokio::time::sleep(Duration::from_secs(3)).await;
    nodes[1].restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The stream leader dies mid-load (~8 s of election, retried within the bound).
    let leader = nats.stream_leader("TRIBUTARY").expect("a stream leader");
    nats.kill(leader);
    println!(
        "stream leader killed at {}ms",
        started.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_secs(12)).await;
    nats.restart(leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A node stalls past its lease: the others take its partitions over.
    let stale: Vec<(u32, u64)> = psql(
        &control,
        &format!(
            "SELECT partition || ' ' || epoch FROM tributary_control.leases
             WHERE consumer = '{consumer}' AND owner = '{stalled_id}' AND expires_at > now()"
        ),
    )
    .lines()
    .filter_map(|l| {
        let (p, e) = l.split_once(' ')?;
        Some((p.parse().ok()?, e.parse().ok()?))
    })
    .collect();
    signal(&nodes[2], libc::SIGSTOP);
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db_stopped_at = psql(&control, "SELECT clock_timestamp()");
    tokio::time::sleep(Duration::from_millis(7500)).await;
    signal(&nodes[2], libc::SIGCONT);
    let woke_at = Instant::now();
    // For 3 s after it woke: the stale node writes no delivery marker under its old
    // leases, and we note when (if) it wins a lease of the destination again.
    let mut regained_at: Option<Instant> = None;
    let stale_pairs = if stale.is_empty() {
        "(-1, -1)".to_string()
    } else {
        stale
            .iter()
            .map(|(p, e)| format!("({p}, {e})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    while woke_at.elapsed() < Duration::from_secs(3) {
        let written = psql(
            &control,
            &format!(
                "SELECT count(*) FROM tributary_control.delivery_markers
                 WHERE dest_id = '{dest_id}' AND node_id = '{stalled_id}'
                   AND (partition, epoch) IN ({stale_pairs})
                   AND updated_at > '{db_stopped_at}'"
            ),
        );
        assert_eq!(
            written, "0",
            "the stale node wrote delivery markers after its stall"
        );
        if regained_at.is_none() {
            let new_leases = psql(
                &control,
                &format!(
                    "SELECT count(*) FROM tributary_control.leases
                     WHERE consumer = '{consumer}' AND owner = '{stalled_id}'
                       AND (partition, epoch) NOT IN ({stale_pairs})"
                ),
            );
            if new_leases != "0" {
                regained_at = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = client()
        .get(format!("{}/metrics", nodes[2].url))
        .send()
        .await
        .expect("the woken node answers")
        .text()
        .await
        .unwrap();
    let fenced: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tributary_lease_fenced_commits_total"))
        .collect();
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
        let got = rx.ids();
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

    // Duplicates only for what was in flight at a change of owner, and counted: the
    // receiver's duplicates are at most the `redelivered` the cluster reports, which
    // is at most what can be in flight at all those handovers (each partition's
    // worker has at most max_in_flight (8) webhook requests of batch_size (1) event
    // out). Handovers: every change of a lease's hands raises its epoch (a first
    // grant is 1); the killed node restarts under its own id and may renew its
    // unexpired leases at the same epoch — at most once per partition.
    let (st, view) = nodes[0]
        .admin(Method::GET, &format!("/destinations/{dest_id}"), None)
        .await;
    assert_eq!(st, 200, "{view}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut redelivered = view["stats"]["redelivered"].as_u64().unwrap();
    while redelivered < duplicates && Instant::now() < deadline {
        // A duplicate is counted once its request has been answered and recorded.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, view) = nodes[0]
            .admin(Method::GET, &format!("/destinations/{dest_id}"), None)
            .await;
        redelivered = view["stats"]["redelivered"].as_u64().unwrap();
    }
    let handovers: u64 = psql(
        &control,
        &format!(
            "SELECT COALESCE(sum(epoch - 1), 0) + count(*) FROM tributary_control.leases
             WHERE consumer = '{consumer}'"
        ),
    )
    .parse()
    .unwrap();
    let bound = handovers * 8;
    println!(
        "cluster: {} acked, {failed} requests failed, {} loaded, {} deliveries ({duplicates} duplicates, \
         {redelivered} counted as redelivered, bound {bound} = {handovers} handovers x 8 in flight)",
        acked.len(),
        loaded.len(),
        received.len()
    );
    if duplicates > 0 {
        // What the duplicates were, for the record (and for a failure below).
        let got = rx.got.lock().unwrap().clone();
        let mut times: HashMap<&str, Vec<String>> = HashMap::new();
        for d in &got {
            times
                .entry(d.message_id.as_str())
                .or_default()
                .push(format!(
                    "{}ms{}",
                    d.at.duration_since(started).as_millis(),
                    if d.from_watched {
                        " (stalled node)"
                    } else {
                        ""
                    }
                ));
        }
        let mut twice: Vec<_> = times.iter().filter(|(_, t)| t.len() > 1).collect();
        twice.sort();
        println!(
            "duplicates (stall {}ms..{}ms): {twice:?}",
            stopped_at.duration_since(started).as_millis(),
            woke_at.duration_since(started).as_millis()
        );
    }
    assert!(
        duplicates <= redelivered,
        "{duplicates} duplicate deliveries but only {redelivered} counted as redelivered; node logs:\n{}",
        nodes
            .iter()
            .map(|n| n
                .log()
                .lines()
                .filter(|l| l.contains("in flight") || l.contains("refused") || l.contains("lease"))
                .collect::<Vec<_>>()
                .join("\n"))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    assert!(
        redelivered <= bound,
        "{redelivered} redelivered exceeds what can have been in flight ({bound})"
    );

    // After it woke, the stale node sent nothing under its old leases: no request
    // from it reached the receiver (until it won a lease again, if it did), and
    // no position of the destination's partitions it held is at its old epoch.
    let got = rx.got.lock().unwrap().clone();
    let before = got
        .iter()
        .filter(|d| d.from_watched && d.at < stopped_at)
        .count();
    if !stale.is_empty() {
        assert!(
            before > 0,
            "the receiver saw no delivery from the node that held {stale:?} before its stall"
        );
    }
    let until = regained_at.unwrap_or_else(Instant::now);
    let after: Vec<&Delivery> = got
        .iter()
        .filter(|d| d.from_watched && d.at > woke_at && d.at < until)
        .collect();
    assert!(
        after.is_empty(),
        "the stale node delivered {} events after it woke (first {})",
        after.len(),
        after[0].message_id
    );
    for (p, e) in &stale {
        let epoch: u64 = psql(
            &control,
            &format!(
                "SELECT epoch FROM tributary_control.positions
                 WHERE consumer = '{consumer}' AND partition = {p}"
            ),
        )
        .parse()
        .unwrap();
        assert!(
            epoch > *e,
            "partition {p}: position still at the stale epoch {e}"
        );
    }
    println!(
        "stalled node: held {stale:?}, {before} deliveries before its stall, none after it woke \
         (lease won again: {}); its {fenced:?}",
        regained_at.is_some()
    );

    for n in &mut nodes {
        n.stop();
    }
    drop(nats);
    drop_postgres_db(&control);
    drop_postgres_db(&warehouse);
}

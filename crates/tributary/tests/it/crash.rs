//! Crash safety: what got a 200 survives the process dying.
//!
//! Several client tasks send `/v1/batch` requests of [`BATCH`] messages with unique
//! messageIds, recording which messageIds were acknowledged, while the server is killed
//! (SIGKILL) or stopped (SIGTERM) under them. After a restart on the same data dir every
//! acknowledged messageId must be stored exactly once, and nothing that was never sent may
//! appear. Then the batches whose fate the clients could not know (the request failed when
//! the server died, so some may be stored) are sent again, as an SDK retries them, and every
//! message must be stored exactly once: dedupe holds across the restart. This repeats for a
//! few rounds on the same data dir, each taken down at a different point of its load.
//!
//! The load is bounded: per round [`TASKS`] × [`BATCHES_PER_TASK`] × [`BATCH`] messages at
//! most, spread over [`SOURCES`] sources so that each source's events fit one read of the
//! events endpoint. The server is taken down by progress (a share of the round's load
//! acknowledged) with 1.5 s as the bound: it acknowledges thousands of messages a second
//! even in a debug build, so a time-only trigger would often find the load already done.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Server, client, key_id};

/// Concurrent client tasks.
const TASKS: usize = 4;
/// Sources the tasks are spread over (task `t` writes to source `t % SOURCES`).
const SOURCES: usize = 2;
/// Messages per `/v1/batch` request.
const BATCH: usize = 20;
/// Requests per task at most.
const BATCHES_PER_TASK: usize = 25;
/// The most the events endpoint returns.
const EVENTS_LIMIT: usize = 5000;

/// What one client task saw.
struct Sent {
    source: usize,
    /// messageIds whose request got a 200.
    acked: Vec<String>,
    /// Batches whose request failed or got a retryable status: fate unknown to the client.
    unknown: Vec<Value>,
    /// Whether the task ran out of batches before the server went away.
    finished: bool,
}

fn batch(task: usize, n: usize) -> (Vec<String>, Value) {
    let ids: Vec<String> = (0..BATCH)
        .map(|i| format!("crash-{task}-{n}-{i}"))
        .collect();
    let messages: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({
                "type": "track",
                "event": "Load Tested",
                "userId": format!("user-{task}"),
                "messageId": id,
                "properties": {"task": task, "batch": n, "i": i, "pad": "x".repeat(200)},
            })
        })
        .collect();
    (ids, json!({ "batch": messages }))
}

fn ids_of(body: &Value) -> Vec<String> {
    body["batch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_string())
        .collect()
}

/// Sends batches until they run out or the server stops answering.
async fn sender(url: String, key: String, task: usize, acked_total: Arc<AtomicUsize>) -> Sent {
    let http = client();
    let mut sent = Sent {
        source: task % SOURCES,
        acked: Vec::new(),
        unknown: Vec::new(),
        finished: false,
    };
    for n in 0..BATCHES_PER_TASK {
        let (ids, body) = batch(task, n);
        let resp = http
            .post(format!("{url}/v1/batch"))
            .basic_auth(&key, Some(""))
            .json(&body)
            .send()
            .await;
        match resp.map(|r| r.status().as_u16()) {
            // The status line is the acknowledgement: durable before it is sent.
            Ok(200) => {
                acked_total.fetch_add(ids.len(), Ordering::SeqCst);
                sent.acked.extend(ids);
            }
            // Overload is allowed to push back; the batch is retried after the restart.
            Ok(429 | 503) => sent.unknown.push(body),
            Ok(st) => panic!("task {task} batch {n}: unexpected status {st}"),
            // The server died under the request: stored or not, the client cannot know.
            Err(_) => {
                sent.unknown.push(body);
                return sent;
            }
        }
    }
    sent.finished = true;
    sent
}

/// How the server is taken down under load.
#[derive(Clone, Copy, Debug)]
enum Down {
    Kill,
    Term,
}

/// `rounds` times: run the load, take the server down mid-load, restart it on the same data
/// dir, check the log, retry the batches of unknown fate and check again. Round `r` of `n`
/// takes the server down once `(r + 1) / (n + 1)` of its load is acknowledged (or after
/// 1.5 s), so the rounds die at different points of the load.
async fn take_down_under_load(how: Down, rounds: usize) {
    let mut s = Server::start();
    let mut sources = Vec::new();
    for i in 0..SOURCES {
        let v = s
            .create_source("http", &format!("Load {i}"), &format!("load_{i}"))
            .await;
        sources.push(key_id(&v));
    }
    // Per source: acknowledged so far, and everything ever sent.
    let mut acked: Vec<HashSet<String>> = vec![HashSet::new(); SOURCES];
    let mut sent_any: Vec<HashSet<String>> = vec![HashSet::new(); SOURCES];
    for round in 0..rounds {
        let fraction = (round + 1) as f64 / (rounds + 1) as f64;
        let sent = load_until_down(&mut s, &sources, how, round, fraction).await;
        tokio::task::block_in_place(|| s.restart());
        for t in &sent {
            acked[t.source].extend(t.acked.iter().cloned());
            sent_any[t.source].extend(t.acked.iter().cloned());
            sent_any[t.source].extend(t.unknown.iter().flat_map(ids_of));
        }

        // 1. Every acknowledged message is there exactly once; nothing unsent is there.
        for (src, (_, id)) in sources.iter().enumerate() {
            let counts = stored_counts(&s, id).await;
            let mut missing: Vec<&String> = acked[src]
                .iter()
                .filter(|m| !counts.contains_key(*m))
                .collect();
            missing.sort();
            assert!(
                missing.is_empty(),
                "{how:?} round {round}: {} of {} acknowledged messages lost in source {src}, \
                 e.g. {:?}; log:\n{}",
                missing.len(),
                acked[src].len(),
                &missing[..missing.len().min(5)],
                s.log()
            );
            assert_once(&counts, how);
            let unsent: Vec<&String> = counts
                .keys()
                .filter(|m| !sent_any[src].contains(*m))
                .collect();
            assert!(
                unsent.is_empty(),
                "{how:?}: stored but never sent: {unsent:?}"
            );
        }

        // 2. The client retries what it could not confirm; dedupe holds across the restart.
        for t in &sent {
            for body in &t.unknown {
                let (st, v) = s
                    .post("/v1/batch", &sources[t.source].0, body.clone())
                    .await;
                assert_eq!(st, 200, "retry after restart: {v}");
                acked[t.source].extend(ids_of(body));
            }
        }
        for (src, (_, id)) in sources.iter().enumerate() {
            let counts = stored_counts(&s, id).await;
            assert_once(&counts, how);
            let stored: HashSet<String> = counts.into_keys().collect();
            assert_eq!(
                stored.len(),
                acked[src].len(),
                "{how:?} round {round}: after retries source {src} holds {} messages, {} were \
                 acknowledged",
                stored.len(),
                acked[src].len()
            );
            assert!(
                stored == acked[src],
                "{how:?}: stored set differs from the sent set"
            );
        }
    }
}

/// Starts the client tasks, takes the server down once `fraction` of the round's load is
/// acknowledged (or after 1.5 s), and returns what each task saw.
async fn load_until_down(
    s: &mut Server,
    sources: &[(String, String)],
    how: Down,
    round: usize,
    fraction: f64,
) -> Vec<Sent> {
    let acked_total = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            tokio::spawn(sender(
                s.url.clone(),
                sources[t % SOURCES].0.clone(),
                round * TASKS + t,
                acked_total.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    let threshold = (fraction * (TASKS * BATCHES_PER_TASK * BATCH) as f64) as usize;
    while started.elapsed() < Duration::from_millis(1500)
        && acked_total.load(Ordering::SeqCst) < threshold
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_down = acked_total.load(Ordering::SeqCst);
    match how {
        Down::Kill => tokio::task::block_in_place(|| s.kill()),
        Down::Term => {
            let status = tokio::task::block_in_place(|| s.stop()).expect("server was running");
            assert!(
                status.success(),
                "SIGTERM under load: exit {status}; log:\n{}",
                s.log()
            );
        }
    }
    let elapsed = started.elapsed();
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.expect("client task panicked"));
    }
    assert!(
        at_down > 0,
        "nothing acknowledged before {how:?}; log:\n{}",
        s.log()
    );
    assert!(
        sent.iter().any(|t| !t.finished),
        "the load finished before {how:?}: raise BATCHES_PER_TASK"
    );
    eprintln!(
        "{how:?} round {round} after {elapsed:?}: {at_down} acknowledged at the signal, {} in \
         all, {} batches of unknown fate",
        sent.iter().map(|t| t.acked.len()).sum::<usize>(),
        sent.iter().map(|t| t.unknown.len()).sum::<usize>()
    );
    sent
}

/// messageId → times stored, for one source (all of it: asserts it fits one read).
async fn stored_counts(s: &Server, source_id: &str) -> HashMap<String, usize> {
    let events = s.events(source_id, EVENTS_LIMIT).await;
    assert!(
        events.len() < EVENTS_LIMIT,
        "{} events: more than one read holds",
        events.len()
    );
    let mut counts = HashMap::new();
    for e in &events {
        let id = e["messageId"].as_str().expect("messageId").to_string();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

fn assert_once(counts: &HashMap<String, usize>, how: Down) {
    let dup: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dup.is_empty(),
        "{how:?}: {} messageIds stored more than once, e.g. {:?}",
        dup.len(),
        &dup[..dup.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    take_down_under_load(Down::Kill, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    take_down_under_load(Down::Term, 2).await;
}

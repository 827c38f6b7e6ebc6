//! Restarts: a graceful restart resumes from the cursor; a SIGKILL during delivery
//! loses nothing and re-sends only what was in flight, counted as redelivered.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tributary_destinations::CreateDestination;
use tributary_eventlog::EventLog;

use crate::support::*;

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_cursor_without_loss_or_duplicates() {
    let h = Harness::new().await;
    let rx = Receiver::ok().await;
    let dest = h
        .create(
            "webhook",
            "hook",
            json!({"url": rx.url("/"), "batch_size": 4}),
        )
        .await;
    let first: Vec<Value> = (0..20).map(|i| track(&format!("u{}", i % 4), i)).collect();
    h.append(first.clone()).await;
    h.wait_idle(&dest.id).await;
    h.engine.shutdown().await;

    // Appended while the engine is down.
    let second: Vec<Value> = (20..40).map(|i| track(&format!("u{}", i % 4), i)).collect();
    h.append(second.clone()).await;
    let engine = open_engine(h.dir.path(), h.log.clone(), fast_options()).await;
    wait_for(Duration::from_secs(10), "all delivered", || async {
        rx.accepted().len() >= 40
    })
    .await;
    let head = *h.log.subscribe().borrow();
    wait_for(Duration::from_secs(10), "idle", || async {
        engine.get(&dest.id).await.unwrap().stats.cursor >= head
    })
    .await;
    let mut expected = ids(&first);
    expected.extend(ids(&second));
    assert_exactly_once(&rx.accepted_ids(), &expected);
    let v = engine.get(&dest.id).await.unwrap();
    assert_eq!(v.stats.delivered, 40);
    assert_eq!(v.stats.redelivered, 0);
    engine.shutdown().await;
}

/// Kills the helper process if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const CHILD_ENV: &str = "TRIBUTARY_DESTINATIONS_IT_CHILD_DIR";

/// Run by `sigkill_during_delivery_only_resends_in_flight_events` as a separate
/// process that it kills; does nothing when run directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process for sigkill_during_delivery_only_resends_in_flight_events"]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let log = open_log(&dir).await;
    let _engine = open_engine(&dir, log, fast_options()).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_delivery_only_resends_in_flight_events() {
    let dir = tempfile::tempdir().unwrap();
    // The receiver processes a request when it arrives and acknowledges 25 ms
    // later, so requests on the wire at the kill were processed but never
    // acknowledged: the duplicates at-least-once delivery must re-send and count.
    let processed: Arc<Mutex<Vec<String>>> = Arc::default();
    let p = processed.clone();
    let rx = Receiver::start(move |req| {
        let mut p = p.lock().unwrap();
        for e in req.events() {
            p.push(e["messageId"].as_str().unwrap().to_string());
        }
        Reply::ok().after(Duration::from_millis(25))
    })
    .await;
    let events: Vec<Value> = (0..400)
        .map(|i| track(&format!("u{}", i % 25), i))
        .collect();
    let dest_id = {
        let log = open_log(dir.path()).await;
        let engine = open_engine(dir.path(), log.clone(), fast_options()).await;
        let dest = engine
            .create(CreateDestination {
                kind: "webhook".into(),
                name: "hook".into(),
                source_ids: vec![],
                settings: json!({"url": rx.url("/"), "batch_size": 5}),
                enabled: true,
                start: Default::default(),
                filters: Default::default(),
            })
            .await
            .unwrap();
        engine.shutdown().await;
        drop(engine);
        append(&*log, events.clone()).await;
        log.close().await;
        dest.id
    };

    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "restart::crash_child",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    wait_for(Duration::from_secs(30), "child delivering", || async {
        rx.accepted().len() >= 100
    })
    .await;
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    let before_restart = rx.accepted().len();
    assert!(before_restart < 400, "killed mid-delivery");

    let log = open_log(dir.path()).await;
    let engine = open_engine(dir.path(), log.clone(), fast_options()).await;
    let expected = ids(&events);
    wait_for(Duration::from_secs(30), "everything delivered", || async {
        let got = rx.accepted_ids();
        expected.iter().all(|e| got.contains(e))
    })
    .await;
    // Nothing acknowledged before the kill is missing, and everything arrived.
    let processed_ids = processed.lock().unwrap().clone();
    assert!(expected.iter().all(|e| processed_ids.contains(e)));
    let head = *log.subscribe().borrow();
    wait_for(Duration::from_secs(10), "idle", || async {
        let s = engine.get(&dest_id).await.unwrap().stats;
        s.cursor >= head && s.in_flight == 0
    })
    .await;
    let duplicates = processed.lock().unwrap().len() - expected.len();
    let stats = engine.get(&dest_id).await.unwrap().stats;
    eprintln!(
        "accepted before kill: {before_restart}, duplicates: {duplicates}, redelivered: {}",
        stats.redelivered
    );
    // At most the batches on the wire at the kill: 8 requests × 5 events.
    assert!(duplicates <= 40, "{duplicates} duplicates");
    assert!(
        stats.redelivered >= duplicates as u64,
        "every duplicate is counted: {} < {duplicates}",
        stats.redelivered
    );
    assert!(stats.redelivered <= 40);
    assert_eq!(stats.delivered, 400, "each event counted once as delivered");
    engine.shutdown().await;
}

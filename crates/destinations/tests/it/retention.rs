//! Destinations in the log's consumer registry: an enabled destination holds records
//! back from retention, a disabled one does not and reports what aged out as a gap
//! when it is enabled again, a deleted one leaves the registry.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tributary_destinations::{Engine, PatchDestination};
use tributary_eventlog::{CallType, EventLog, NewRecord, SqliteLog, SqliteLogConfig};

use crate::support::{SOURCE, fast_options, open_engine, wait_for};

fn old_event(i: u64) -> NewRecord {
    NewRecord {
        source_id: SOURCE.into(),
        message_id: format!("old-{i}"),
        call_type: CallType::Track,
        event: Some("Order Completed".into()),
        user_id: Some("u-1".into()),
        anonymous_id: None,
        // Two hours ago, past the one-hour retention.
        received_at_ms: chrono::Utc::now().timestamp_millis() - 2 * 3600 * 1000,
        payload: json!({"type":"track","event":"Order Completed","userId":"u-1","messageId":format!("old-{i}")})
            .to_string(),
    }
}

async fn retained(log: &SqliteLog) -> usize {
    log.read(&log.start(0), 100).await.unwrap().len()
}

#[tokio::test]
async fn a_disabled_destination_does_not_pin_the_log_and_reports_the_gap_when_enabled_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        SqliteLog::open(SqliteLogConfig {
            path: dir.path().join("events.db"),
            retention: Duration::from_secs(3600),
            prune_interval: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let engine: Engine = open_engine(dir.path(), log.clone(), fast_options()).await;
    // Its receiver is down: the events stay after its cursor.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = engine
        .create(tributary_destinations::CreateDestination {
            kind: "webhook".into(),
            name: "down".into(),
            source_ids: vec![SOURCE.into()],
            settings: json!({"url": format!("http://127.0.0.1:{port}/hook")}),
            enabled: true,
            filters: Default::default(),
            start: Default::default(),
        })
        .await
        .unwrap();
    log.append((1..=3).map(old_event).collect()).await.unwrap();
    // Enabled: retention keeps what it has not delivered, however old.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(retained(&log).await, 3);

    let patch = |enabled| PatchDestination {
        enabled: Some(enabled),
        ..Default::default()
    };
    engine.patch(&d.id, patch(false)).await.unwrap();
    wait_for(Duration::from_secs(10), "old events pruned", || async {
        retained(&log).await == 0
    })
    .await;
    let consumer = format!("destination:{}", d.id);
    let state = log.consumers().await.unwrap();
    let c = state.iter().find(|c| c.name == consumer).unwrap();
    assert!(!c.pinned, "a disabled destination does not pin: {c:?}");

    engine.patch(&d.id, patch(true)).await.unwrap();
    wait_for(Duration::from_secs(10), "gap reported", || async {
        engine.get(&d.id).await.unwrap().stats.gap.is_some()
    })
    .await;
    let v = engine.get(&d.id).await.unwrap();
    let gap = v.stats.gap.unwrap();
    assert_eq!((gap.from, gap.to, gap.records), (1, 3, 3));
    let state = log.consumers().await.unwrap();
    assert!(state.iter().find(|c| c.name == consumer).unwrap().pinned);

    engine.delete(&d.id).await.unwrap();
    let names: Vec<String> = log
        .consumers()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(!names.contains(&consumer), "{names:?}");
    engine.shutdown().await;
}

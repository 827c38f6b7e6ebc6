//! Tests of the embedded log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::open::{LAYOUT_VERSION, open_writer};
use super::writer::{Request, chrono_now_ms, write_group};
use super::*;
use crate::CallType;

fn rec(source: &str, id: &str) -> NewRecord {
    NewRecord {
        source_id: source.into(),
        message_id: id.into(),
        call_type: CallType::Track,
        event: Some("Email Opened".into()),
        user_id: Some("u1".into()),
        anonymous_id: None,
        received_at_ms: chrono_now_ms(),
        payload: format!(r#"{{"messageId":"{id}"}}"#),
    }
}

async fn open(dir: &tempfile::TempDir) -> SqliteLog {
    SqliteLog::open(SqliteLogConfig {
        path: dir.path().join("events.db"),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn appends_and_reads_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&dir).await;
    let st = log
        .append(vec![rec("s", "a"), rec("s", "b")])
        .await
        .unwrap();
    assert_eq!(st, vec![AppendStatus::Stored(1), AppendStatus::Stored(2)]);
    let rows = log.read(&log.start(0), 10).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].message_id, "a");
    assert_eq!(rows[1].seq, 2);
    assert_eq!(*log.subscribe().borrow(), 2);
}

#[tokio::test]
async fn repeated_message_is_acknowledged_but_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&dir).await;
    log.append(vec![rec("s", "a")]).await.unwrap();
    let st = log
        .append(vec![rec("s", "a"), rec("other", "a"), rec("s", "a")])
        .await
        .unwrap();
    assert_eq!(st[0], AppendStatus::Duplicate);
    assert!(matches!(st[1], AppendStatus::Stored(_)));
    assert_eq!(st[2], AppendStatus::Duplicate);
    assert_eq!(log.read(&log.start(0), 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn concurrent_appends_share_commits_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(&dir).await);
    let mut tasks = Vec::new();
    for t in 0..32 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                log.append(vec![rec("s", &format!("{t}-{i}"))])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(log.read(&log.start(0), 10_000).await.unwrap().len(), 640);
    assert_eq!(log.stats().await.unwrap().records, 640);
}

#[tokio::test]
async fn cursors_survive_reopen_and_seq_is_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(&dir).await;
        log.append(vec![rec("s", "a"), rec("s", "b")])
            .await
            .unwrap();
        log.commit("warehouse", &log.start(0).at(2)).await.unwrap();
        log.close().await;
    }
    let log = open(&dir).await;
    assert_eq!(log.cursor("warehouse", 0).await.unwrap().seq, 2);
    assert_eq!(log.cursor("nobody", 0).await.unwrap().seq, 0);
    assert_eq!(*log.subscribe().borrow(), 2);
    let st = log.append(vec![rec("s", "c")]).await.unwrap();
    assert_eq!(st, vec![AppendStatus::Stored(3)]);
    assert_eq!(log.latest("s", 2).await.unwrap()[0].message_id, "c");
    assert_eq!(log.get(&[1, 3, 99]).await.unwrap().len(), 2);
}

#[tokio::test]
async fn retention_deletes_old_records_and_ends_their_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let log = SqliteLog::open(SqliteLogConfig {
        path: dir.path().join("events.db"),
        retention: Duration::from_secs(3600),
        prune_interval: Duration::ZERO,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut old = rec("s", "old");
    old.received_at_ms -= 2 * 3600 * 1000;
    log.append(vec![old.clone(), rec("s", "new")])
        .await
        .unwrap();
    // The next group commit prunes what is older than the retention window.
    log.append(vec![rec("s", "trigger")]).await.unwrap();
    let ids: Vec<String> = log
        .read(&log.start(0), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.message_id)
        .collect();
    assert_eq!(ids, vec!["new", "trigger"]);
    // Sequence numbers keep growing; the pruned message may be stored again.
    let st = log.append(vec![old]).await.unwrap();
    assert_eq!(st, vec![AppendStatus::Stored(4)]);
}

#[tokio::test]
async fn dedupe_and_seq_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(&dir).await;
        log.append(vec![rec("s", "a"), rec("s", "b")])
            .await
            .unwrap();
        log.close().await;
    }
    let log = open(&dir).await;
    let st = log
        .append(vec![rec("s", "b"), rec("s", "c"), rec("t", "a")])
        .await
        .unwrap();
    assert_eq!(
        st,
        vec![
            AppendStatus::Duplicate,
            AppendStatus::Stored(3),
            AppendStatus::Stored(4)
        ]
    );
}

#[tokio::test]
async fn seq_is_not_reused_when_retention_deleted_the_newest_records() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SqliteLogConfig {
        path: dir.path().join("events.db"),
        retention: Duration::from_secs(3600),
        prune_interval: Duration::ZERO,
        ..Default::default()
    };
    {
        let log = SqliteLog::open(cfg.clone()).await.unwrap();
        let mut old = rec("s", "old");
        old.received_at_ms -= 2 * 3600 * 1000;
        // Stored as seq 1, pruned right after this group commits.
        assert_eq!(
            log.append(vec![old]).await.unwrap(),
            vec![AppendStatus::Stored(1)]
        );
        log.close().await;
    }
    let log = SqliteLog::open(cfg).await.unwrap();
    assert!(log.read(&log.start(0), 10).await.unwrap().is_empty());
    assert_eq!(
        log.append(vec![rec("s", "new")]).await.unwrap(),
        vec![AppendStatus::Stored(2)]
    );
}

#[test]
fn colliding_keys_never_drop_a_distinct_message() {
    let dir = tempfile::tempdir().unwrap();
    let (mut conn, mut state) = open_writer(&dir.path().join("events.db")).unwrap();
    state.dedupe.all_collide = true;
    let append = |batch: Vec<NewRecord>| {
        let (reply, _rx) = oneshot::channel();
        Request::Append { batch, reply }
    };
    let out = write_group(
        &mut conn,
        &mut state,
        &[append(vec![rec("s", "a"), rec("s", "b"), rec("t", "a")])],
    )
    .unwrap();
    assert_eq!(
        out[0],
        vec![
            AppendStatus::Stored(1),
            AppendStatus::Stored(2),
            AppendStatus::Stored(3)
        ]
    );
    let out = write_group(
        &mut conn,
        &mut state,
        &[append(vec![rec("t", "a"), rec("s", "c"), rec("s", "b")])],
    )
    .unwrap();
    assert_eq!(
        out[0],
        vec![
            AppendStatus::Duplicate,
            AppendStatus::Stored(4),
            AppendStatus::Duplicate
        ]
    );
}

#[test]
fn a_failed_group_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let (mut conn, mut state) = open_writer(&dir.path().join("events.db")).unwrap();
    let append = |batch: Vec<NewRecord>| {
        let (reply, _rx) = oneshot::channel();
        Request::Append { batch, reply }
    };
    conn.execute_batch(
        "CREATE TRIGGER fail BEFORE INSERT ON events WHEN NEW.message_id = 'bad'
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
    )
    .unwrap();
    assert!(
        write_group(
            &mut conn,
            &mut state,
            &[append(vec![rec("s", "a"), rec("s", "bad")])]
        )
        .is_err()
    );
    assert_eq!(state.last_seq, 0);
    assert_eq!(state.dedupe.len(), 0);
    let out = write_group(&mut conn, &mut state, &[append(vec![rec("s", "a")])]).unwrap();
    assert_eq!(out[0], vec![AppendStatus::Stored(1)]);
}

#[tokio::test]
async fn a_log_of_the_first_layout_is_migrated_with_its_records_and_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE events (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 source_id TEXT NOT NULL, message_id TEXT NOT NULL,
                 call_type TEXT NOT NULL, event TEXT,
                 received_at INTEGER NOT NULL, payload TEXT NOT NULL);
             CREATE UNIQUE INDEX events_dedupe ON events (source_id, message_id);
             CREATE INDEX events_received ON events (received_at);
             CREATE TABLE consumers (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
             INSERT INTO events (source_id, message_id, call_type, event, received_at, payload)
               VALUES ('s', 'a', 'track', 'E', 1, '{}'), ('s', 'b', 'track', NULL, 2, '{}'),
                      ('s', 'c', 'track', NULL, 3, '{}');
             DELETE FROM events WHERE seq = 3;
             INSERT INTO consumers VALUES ('warehouse', 2);",
        )
        .unwrap();
    }
    let log = SqliteLog::open(SqliteLogConfig {
        path: path.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let rows = log.read(&log.start(0), 10).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].seq, rows[0].event.as_deref()), (1, Some("E")));
    assert_eq!(log.cursor("warehouse", 0).await.unwrap().seq, 2);
    assert_eq!(*log.subscribe().borrow(), 3);
    // Dedupe holds for migrated records; seq 3 (deleted before) is not reused.
    let st = log
        .append(vec![rec("s", "a"), rec("s", "c")])
        .await
        .unwrap();
    assert_eq!(st, vec![AppendStatus::Duplicate, AppendStatus::Stored(4)]);
    log.close().await;
    let c = Connection::open(&path).unwrap();
    let v: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, LAYOUT_VERSION);
}

#[tokio::test]
async fn the_checkpointer_moves_the_wal_into_the_database_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&dir).await;
    let db = dir.path().join("events.db");
    let initial = std::fs::metadata(&db).unwrap().len();
    for chunk in 0..10 {
        let batch = (0..500)
            .map(|i| {
                let mut r = rec("s", &format!("{chunk}-{i}"));
                r.payload = "x".repeat(1000);
                r
            })
            .collect();
        log.append(batch).await.unwrap();
    }
    // The writer never checkpoints; only the checkpointer grows the main file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&db).unwrap().len() < initial + 4_000_000 {
        assert!(
            Instant::now() < deadline,
            "WAL not checkpointed: db file {} bytes",
            std::fs::metadata(&db).unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log.close().await;
}

#[tokio::test]
async fn append_after_close_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&dir).await;
    log.close().await;
    assert!(matches!(
        log.append(vec![rec("s", "a")]).await,
        Err(LogError::Closed)
    ));
}

fn old(source: &str, id: &str) -> NewRecord {
    let mut r = rec(source, id);
    r.received_at_ms -= 2 * 3600 * 1000;
    r
}

async fn open_pruning(dir: &tempfile::TempDir, max_bytes: Option<u64>) -> SqliteLog {
    SqliteLog::open(SqliteLogConfig {
        path: dir.path().join("events.db"),
        retention: Duration::from_secs(3600),
        prune_interval: Duration::from_millis(100),
        max_bytes,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Waits until `f` holds on the log's records, or fails after 10 s.
async fn until_seqs(log: &SqliteLog, want: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seqs: Vec<u64> = log
            .read(&log.start(0), 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        if seqs == want {
            return;
        }
        assert!(Instant::now() < deadline, "records {seqs:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_log_id_is_fixed_at_creation_and_positions_of_other_logs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let log = open(&dir).await;
        let id = log.log_id().to_string();
        log.close().await;
        id
    };
    assert_eq!(id.len(), 32, "{id}");
    let log = open(&dir).await;
    assert_eq!(log.log_id(), id, "the id survives a reopen");
    let other = tempfile::tempdir().unwrap();
    let second = open(&other).await;
    assert_ne!(second.log_id(), id, "every log gets its own id");
    let foreign = second.start(0);
    assert!(matches!(
        log.read(&foreign, 10).await,
        Err(LogError::ForeignPosition(_))
    ));
    assert!(matches!(
        log.commit("warehouse", &foreign).await,
        Err(LogError::ForeignPosition(_))
    ));
}

#[tokio::test]
async fn retention_by_age_never_passes_a_pinned_consumer_and_runs_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_pruning(&dir, None).await;
    log.append(vec![old("s", "a"), old("s", "b"), old("s", "c")])
        .await
        .unwrap();
    log.commit("warehouse", &log.start(0).at(1)).await.unwrap();
    log.commit("destination:d", &log.start(0).at(2))
        .await
        .unwrap();
    // No append arrives: the writer still prunes, up to the lowest pinned position.
    until_seqs(&log, &[2, 3]).await;
    log.commit("warehouse", &log.start(0).at(3)).await.unwrap();
    until_seqs(&log, &[3]).await;
    // A disabled destination does not hold records back; a commit pins it again.
    log.unpin("destination:d").await.unwrap();
    until_seqs(&log, &[]).await;
    let consumers = log.consumers().await.unwrap();
    let d = consumers
        .iter()
        .find(|c| c.name == "destination:d")
        .unwrap();
    assert!(!d.pinned);
    assert_eq!(d.position.seq, 2, "unpinning keeps the position");
    log.remove_consumer("destination:d").await.unwrap();
    let names: Vec<String> = log
        .consumers()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["warehouse"]);
}

#[tokio::test]
async fn a_consumer_behind_pruned_records_is_told_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_pruning(&dir, None).await;
    log.append(vec![old("s", "a"), old("s", "b"), rec("s", "c")])
        .await
        .unwrap();
    until_seqs(&log, &[3]).await;
    let out = crate::read_checked(&log, &log.start(0), 10).await.unwrap();
    assert_eq!(
        out.gap,
        Some(crate::Gap {
            partition: 0,
            from: 1,
            to: 2
        })
    );
    assert_eq!(out.records.len(), 1);
    // Caught up: no gap, whatever was deleted before.
    let out = crate::read_checked(&log, &log.start(0).at(3), 10)
        .await
        .unwrap();
    assert_eq!((out.gap, out.records.len()), (None, 0));
    let out = crate::read_checked(&log, &log.start(0).at(2), 10)
        .await
        .unwrap();
    assert_eq!(out.gap, None, "the next record is the one expected");
}

#[tokio::test]
async fn the_size_cap_deletes_unread_records_and_says_so_per_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_pruning(&dir, Some(1_000_000)).await;
    log.commit("warehouse", &log.start(0)).await.unwrap();
    for chunk in 0..6 {
        let batch = (0..500)
            .map(|i| {
                let mut r = rec("s", &format!("{chunk}-{i}"));
                r.payload = "x".repeat(1000);
                r
            })
            .collect();
        log.append(batch).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let warehouse = loop {
        let c = log.consumers().await.unwrap().remove(0);
        if c.dropped > 0 {
            break c;
        }
        assert!(Instant::now() < deadline, "nothing dropped: {c:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let gap = warehouse.gap.expect("gap recorded");
    assert_eq!(gap.from, 1, "the consumer had read nothing");
    assert_eq!(gap.len(), warehouse.dropped);
    assert!(warehouse.gap_at_ms.is_some());
    assert!(log.stats().await.unwrap().unconsumed_dropped >= warehouse.dropped);
    let first = log.first_retained(0).await.unwrap();
    assert!(first > 1 && first <= 3000, "first retained {first}");
    let out = crate::read_checked(&log, &log.start(0), 10).await.unwrap();
    assert_eq!(out.gap.map(|g| (g.from, g.to)), Some((1, first - 1)));
}

#[tokio::test]
async fn records_carry_their_call_type_and_ids_and_older_layouts_read_them_from_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE events (seq INTEGER PRIMARY KEY, source_id TEXT NOT NULL,
                 message_id TEXT NOT NULL, call_type TEXT NOT NULL, event TEXT,
                 received_at INTEGER NOT NULL, payload TEXT NOT NULL, dkey INTEGER NOT NULL);
             CREATE TABLE consumers (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);
             INSERT INTO events VALUES (1, 's', 'a', 'identify', NULL, 1,
                 '{\"type\":\"identify\",\"userId\":\"u-7\",\"anonymousId\":\"an-7\"}', 11);
             INSERT INTO consumers VALUES ('warehouse', 1);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let log = SqliteLog::open(SqliteLogConfig {
        path,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut new = rec("s", "b");
    new.call_type = CallType::Page;
    new.user_id = None;
    new.anonymous_id = Some("an-8".into());
    log.append(vec![new]).await.unwrap();
    let rows = log.read(&log.start(0), 10).await.unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|r| (r.call_type, r.user_id.as_deref(), r.anonymous_id.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            (CallType::Identify, Some("u-7"), Some("an-7")),
            (CallType::Page, None, Some("an-8"))
        ]
    );
    let w = &log.consumers().await.unwrap()[0];
    assert!(w.pinned, "consumers of an older layout bound retention");
    assert_eq!(w.position.seq, 1);
}

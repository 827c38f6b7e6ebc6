//! Positions that name their log: a second log loading into a warehouse another log
//! filled, and the adoption of positions written before logs had ids.

use serde_json::json;

use crate::support::{Harness, track, with_postgres};

/// Log A fills the warehouse; log B (a new data dir, sequence numbers from 1 again)
/// loads its own events from its beginning, and a message both logs carry is loaded
/// once. On a warehouse that kept one position per consumer name, none of B's events
/// would ever load (its seqs are at or below A's position).
async fn a_new_log_loads_into_a_warehouse_another_log_filled(a: &Harness) {
    a.source("src", "shop");
    let table = format!("{}.tracks", a.schema("shop"));
    let wh = a.open().await;
    let last = a
        .append(
            "src",
            (0..5)
                .map(|i| track(&format!("a-{i}"), "Order Completed", json!({"i": i})))
                .collect(),
        )
        .await;
    a.wait_loaded(&wh, last).await;
    assert_eq!(a.count(&wh, &table).await, 5);
    wh.shutdown().await;

    let b = a.with_new_log().await;
    assert_ne!(
        tributary_eventlog::EventLog::log_id(b.log.as_ref()),
        tributary_eventlog::EventLog::log_id(a.log.as_ref())
    );
    let mut events: Vec<_> = (0..3)
        .map(|i| track(&format!("b-{i}"), "Order Completed", json!({"i": i})))
        .collect();
    // Also in A's log: loaded once through `id`.
    events.push(track("a-0", "Order Completed", json!({"i": 0})));
    let last = b.append("src", events).await;
    assert_eq!(last, 4, "a new log numbers from 1 again");
    let wh = b.open().await;
    b.wait_loaded(&wh, last).await;
    let rows = b
        .rows(
            &wh,
            &format!("select count(*), count(distinct id) from {table}"),
        )
        .await;
    assert_eq!(rows[0][0].as_i64(), Some(8), "{rows:?}");
    assert_eq!(rows[0][1].as_i64(), Some(8), "no duplicates: {rows:?}");
    wh.shutdown().await;

    // A again: it resumes from its own position, loading nothing twice.
    let wh = a.open().await;
    let last = a
        .append("src", vec![track("a-5", "Order Completed", json!({}))])
        .await;
    a.wait_loaded(&wh, last).await;
    assert_eq!(a.count(&wh, &table).await, 9);
    wh.shutdown().await;
}

#[tokio::test]
async fn sqlite_a_new_log_loads_into_a_warehouse_another_log_filled() {
    let h = Harness::sqlite().await;
    a_new_log_loads_into_a_warehouse_another_log_filled(&h).await;
}

#[tokio::test]
async fn postgres_a_new_log_loads_into_a_warehouse_another_log_filled() {
    with_postgres(
        "postgres_a_new_log_loads_into_a_warehouse_another_log_filled",
        |h| async move { a_new_log_loads_into_a_warehouse_another_log_filled(&h).await },
    )
    .await;
}

/// A PostgreSQL warehouse whose position row predates log ids (`log_id = ''`): the
/// log that wrote it (its own copy of the position is at most the row's, the row at
/// most its head) adopts it and loads nothing again; another log does not.
#[tokio::test]
async fn postgres_a_position_from_before_log_ids_is_adopted_only_by_its_log() {
    with_postgres(
        "postgres_a_position_from_before_log_ids_is_adopted_only_by_its_log",
        |a| async move {
            a.source("src", "shop");
            let table = format!("{}.tracks", a.schema("shop"));
            let wh = a.open().await;
            let last = a
                .append(
                    "src",
                    (0..4)
                        .map(|i| track(&format!("a-{i}"), "Tick", json!({})))
                        .collect(),
                )
                .await;
            a.wait_loaded(&wh, last).await;
            wh.shutdown().await;
            // Back to the layout of a warehouse written before log ids.
            let pg = crate::support::pg_connect().await.expect("connect");
            pg.batch_execute(&format!(
                "UPDATE \"{s}\".loader_state SET log_id = '';
                 INSERT INTO \"{s}\".loader_state (consumer, log_id, log_partition, seq)
                 VALUES ('other', '', 0, 1);",
                s = a.state_schema
            ))
            .await
            .expect("rewrite state");
            // Another log first: not its row; it loads its own events from 1.
            let b = a.with_new_log().await;
            let last_b = b
                .append("src", vec![track("b-0", "Tick", json!({}))])
                .await;
            let wh = b.open().await;
            b.wait_loaded(&wh, last_b).await;
            assert_eq!(b.count(&wh, &table).await, 5);
            wh.shutdown().await;
            // The log that wrote it adopts it: it starts at 4, not 0.
            let wh = a.open().await;
            a.wait_loaded(&wh, last).await;
            assert_eq!(wh.lag().loaded_seq, 4);
            // The loader reports the log's copy at once; its own row appears once the
            // warehouse answered.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let rows = loop {
                let rows = pg
                    .query(
                        &format!(
                            "SELECT seq FROM \"{}\".loader_state WHERE consumer = 'warehouse' AND log_id = $1",
                            a.state_schema
                        ),
                        &[&tributary_eventlog::EventLog::log_id(a.log.as_ref())],
                    )
                    .await
                    .expect("read state");
                if !rows.is_empty() || std::time::Instant::now() > deadline {
                    break rows;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            };
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].get::<_, i64>(0), 4);
            let legacy = pg
                .query(
                    &format!(
                        "SELECT consumer FROM \"{}\".loader_state WHERE log_id = ''",
                        a.state_schema
                    ),
                    &[],
                )
                .await
                .expect("read state");
            let legacy: Vec<String> = legacy.iter().map(|r| r.get(0)).collect();
            assert_eq!(legacy, vec!["other"], "the row was adopted, not copied");
            wh.shutdown().await;
        },
    )
    .await;
}

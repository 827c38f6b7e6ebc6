//! The loader's own counters (the warehouse's `stats` module): row counts and last
//! load per table, events per day, and the email report's counts — each checked
//! against what the raw tables say, right after a load, after a restart, after a
//! type widening, and for a schema loaded before the counters existed.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tributary_warehouse::Warehouse;
use tributary_warehouse::report::EmailFacts;

use crate::support::{Harness, track, with_postgres};

/// Row counts of `schema` as the status reports them.
async fn status_rows(wh: &Warehouse, schema: &str) -> HashMap<String, (u64, Option<String>)> {
    let st = wh.status().await.expect("status");
    st.schemas
        .into_iter()
        .find(|s| s.name == schema)
        .map(|s| {
            s.tables
                .into_iter()
                .map(|t| (t.name, (t.rows, t.last_load_at)))
                .collect()
        })
        .unwrap_or_default()
}

/// Every table's count as the status says it and as `count(*)` says it.
async fn assert_counts_are_exact(h: &Harness, wh: &Warehouse, schema: &str) {
    let rows = status_rows(wh, schema).await;
    assert!(!rows.is_empty(), "no tables in {schema}");
    for (table, (n, _)) in &rows {
        let raw = h.count(wh, &format!("{schema}.{table}")).await;
        assert_eq!(
            *n, raw as u64,
            "{schema}.{table}: status {n}, count(*) {raw}"
        );
    }
}

fn email(id: &str, event: &str, who: Option<&str>, campaign: Value, ts: &str) -> Value {
    let mut m = track(
        id,
        event,
        json!({"campaign_id": campaign, "campaign_name": format!("Campaign {campaign}"),
               "link_url": if event == "Email Link Clicked" { json!(format!("https://x.example/{}", id.len() % 3)) } else { Value::Null }}),
    );
    m["timestamp"] = json!(ts);
    match who {
        Some(w) if w.starts_with("user") => {
            m["userId"] = json!(w);
        }
        Some(w) => {
            m["anonymousId"] = json!(w);
        }
        None => {
            m.as_object_mut().expect("object").remove("anonymousId");
        }
    }
    m
}

/// A mix of email events: repeated recipients across batches and days, users by
/// userId and by anonymousId, clicks on three links, events without a campaign.
fn email_mix(batch: usize) -> Vec<Value> {
    let events = [
        "Email Delivered",
        "Email Opened",
        "Email Link Clicked",
        "Email Bounced",
        "Email Unsubscribed",
        "Email Marked as Spam",
    ];
    (0..60)
        .map(|i| {
            let event = events[(i * 7 + batch) % events.len()];
            let who = match i % 9 {
                0 => None,
                1 | 2 => Some(format!("user{}", i % 4)),
                _ => Some(format!("anon{}@example.com", (i + batch) % 11)),
            };
            let campaign = if i % 13 == 5 {
                Value::Null
            } else {
                json!(((i + batch) % 3) as i64)
            };
            let ts = format!("2026-11-{:02}T0{}:00:00.000Z", 20 + (i + batch) % 3, i % 10);
            email(
                &format!("b{batch}-m{i}"),
                event,
                who.as_deref(),
                campaign,
                &ts,
            )
        })
        .collect()
}

/// The report from the counters equals the report from the raw tables (a window
/// covering everything reads the raw tables).
async fn assert_report_matches_raw(wh: &Warehouse, schema: &str) -> EmailFacts {
    let from: DateTime<Utc> = "2000-01-01T00:00:00Z".parse().expect("time");
    let to: DateTime<Utc> = "2100-01-01T00:00:00Z".parse().expect("time");
    let counted = wh.email_facts(schema, None, None).await.expect("counted");
    let raw = wh
        .email_facts(schema, Some(from), Some(to))
        .await
        .expect("raw");
    assert!(!raw.totals.is_empty(), "no email facts at all");
    assert_eq!(counted.totals, raw.totals, "totals");
    assert_eq!(counted.daily, raw.daily, "daily");
    assert_eq!(counted.links, raw.links, "links");
    counted
}

pub async fn counts_follow_loads_restarts_and_widening(h: &Harness) {
    h.source("src", "shop");
    let shop = h.schema("shop");
    let wh = h.open().await;
    let mut batch: Vec<Value> = (0..30)
        .map(|i| track(&format!("o-{i}"), "Order Completed", json!({"total": i})))
        .collect();
    batch.push(track("p-1", "Product Viewed", json!({"sku": "A"})));
    let last = h.append("src", batch).await;
    h.wait_loaded(&wh, last).await;
    let rows = status_rows(&wh, &shop).await;
    assert_eq!(rows["order_completed"].0, 30);
    assert_eq!(rows["product_viewed"].0, 1);
    assert_eq!(rows["tracks"].0, 31);
    assert!(rows["tracks"].1.is_some(), "last load of tracks");
    assert_counts_are_exact(h, &wh, &shop).await;

    // A duplicate id and a widening (bigint total meets a float) in one batch.
    let last = h
        .append(
            "src",
            vec![
                track("o-0", "Order Completed", json!({"total": 1})),
                track("o-x", "Order Completed", json!({"total": 2.5})),
                json!({"type": "identify", "messageId": "i-1", "userId": "u1",
                       "traits": {"email": "u1@example.com"},
                       "receivedAt": "2026-11-27T05:10:54.000Z", "timestamp": "2026-11-27T05:10:54.000Z"}),
            ],
        )
        .await;
    h.wait_loaded(&wh, last).await;
    let rows = status_rows(&wh, &shop).await;
    assert_eq!(
        rows["order_completed"].0, 31,
        "widened table keeps its count"
    );
    assert_eq!(rows["tracks"].0, 32);
    assert_eq!(rows["users"].0, 1);
    assert_counts_are_exact(h, &wh, &shop).await;

    // An identify of the same user again: `users` is upserted, not grown.
    let last = h
        .append(
            "src",
            vec![json!({"type": "identify", "messageId": "i-2", "userId": "u1",
                        "traits": {"plan": "pro"},
                        "receivedAt": "2026-11-27T05:10:55.000Z", "timestamp": "2026-11-27T05:10:55.000Z"})],
        )
        .await;
    h.wait_loaded(&wh, last).await;
    assert_eq!(status_rows(&wh, &shop).await["users"].0, 1);
    assert_eq!(status_rows(&wh, &shop).await["identifies"].0, 2);

    // Events per day of `received_at`: every primary row of the harness's records.
    let day = "2026-11-27".parse().expect("day");
    let per_day = wh.events_on(day).await.expect("events_on");
    assert_eq!(per_day.get(&shop).copied(), Some(34), "{per_day:?}");
    let other = wh
        .events_on("2026-11-28".parse().expect("day"))
        .await
        .expect("events_on");
    assert_eq!(other.get(&shop).copied(), Some(0));

    // After a restart, before any new load: the same answers.
    let before = status_rows(&wh, &shop).await;
    wh.shutdown().await;
    let wh = h.open().await;
    assert_eq!(status_rows(&wh, &shop).await, before);
    assert_eq!(
        wh.events_on(day)
            .await
            .expect("events_on")
            .get(&shop)
            .copied(),
        Some(34)
    );
    assert_counts_are_exact(h, &wh, &shop).await;
    wh.shutdown().await;
}

pub async fn email_report_from_counters_equals_the_raw_tables(h: &Harness) {
    h.source("ac", "ac");
    let ac = h.schema("ac");
    let wh = h.open().await;
    // Several loads: distinct recipients must stay distinct across batches.
    for batch in 0..4 {
        let last = h.append("ac", email_mix(batch)).await;
        h.wait_loaded(&wh, last).await;
        assert_report_matches_raw(&wh, &ac).await;
    }
    // A replayed batch (same ids) changes nothing.
    let before = wh.email_facts(&ac, None, None).await.expect("facts");
    h.append("ac", email_mix(1)).await;
    let last = h.append("ac", email_mix(4)).await;
    h.wait_loaded(&wh, last).await;
    let after = assert_report_matches_raw(&wh, &ac).await;
    assert_ne!(before, after, "the new batch counted");

    // One hand count: distinct recipients who clicked campaign "1", from the rows.
    let raw = h
        .rows(
            &wh,
            &format!(
                "select count(distinct coalesce(nullif(user_id, ''), nullif(anonymous_id, ''))) \
                 from {ac}.email_link_clicked where cast(campaign_id as text) = '1'"
            ),
        )
        .await;
    let clicked = after
        .totals
        .iter()
        .find(|t| t.campaign_id == "1" && format!("{:?}", t.metric) == "Clicked")
        .map_or(0, |t| t.recipients);
    assert_eq!(clicked as i64, raw[0][0].as_i64().expect("count"));

    // A widening of campaign_id (integers meet a float) recounts from the raw tables.
    let last = h
        .append(
            "ac",
            vec![email(
                "w-1",
                "Email Opened",
                Some("anon1@example.com"),
                json!(2.5),
                "2026-11-21T01:00:00.000Z",
            )],
        )
        .await;
    h.wait_loaded(&wh, last).await;
    assert_report_matches_raw(&wh, &ac).await;
    let last = h.append("ac", email_mix(5)).await;
    h.wait_loaded(&wh, last).await;
    assert_report_matches_raw(&wh, &ac).await;

    // Restart: the counters are still there and still right.
    wh.shutdown().await;
    let wh = h.open().await;
    assert_report_matches_raw(&wh, &ac).await;
    wh.shutdown().await;
}

#[tokio::test]
async fn sqlite_counts_follow_loads_restarts_and_widening() {
    counts_follow_loads_restarts_and_widening(&Harness::sqlite().await).await;
}

#[tokio::test]
async fn postgres_counts_follow_loads_restarts_and_widening() {
    with_postgres(
        "postgres_counts_follow_loads_restarts_and_widening",
        async |h| counts_follow_loads_restarts_and_widening(&h).await,
    )
    .await;
}

#[tokio::test]
async fn sqlite_email_report_from_counters_equals_the_raw_tables() {
    email_report_from_counters_equals_the_raw_tables(&Harness::sqlite().await).await;
}

#[tokio::test]
async fn postgres_email_report_from_counters_equals_the_raw_tables() {
    with_postgres(
        "postgres_email_report_from_counters_equals_the_raw_tables",
        async |h| email_report_from_counters_equals_the_raw_tables(&h).await,
    )
    .await;
}

/// A schema file from before the counters: its tables are counted from the raw
/// rows (status and report stay exact meanwhile), then by the next load's
/// transaction, and kept from there.
#[tokio::test]
async fn sqlite_a_schema_loaded_before_the_counters_is_counted_from_its_rows() {
    let h = Harness::sqlite().await;
    h.source("ac", "ac");
    let wh = h.open().await;
    let last = h.append("ac", email_mix(0)).await;
    h.wait_loaded(&wh, last).await;
    wh.shutdown().await;
    // Make the file look like one written before the counters existed.
    let file = h.dir.path().join("warehouse").join("ac.sqlite");
    let conn = rusqlite::Connection::open(&file).expect("open");
    let counters: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'tributary\\_\\_%' ESCAPE '\\'")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("names");
    assert!(counters.len() >= 9, "{counters:?}");
    for t in &counters {
        conn.execute_batch(&format!("DROP TABLE \"{t}\""))
            .expect("drop");
    }
    drop(conn);

    let wh = h.open().await;
    // Before any load: the raw tables answer.
    assert_counts_are_exact(&h, &wh, "ac").await;
    assert_report_matches_raw(&wh, "ac").await;
    assert_eq!(status_rows(&wh, "ac").await["tracks"].1, None);
    // The next load counts everything from the rows, this batch included.
    let last = h.append("ac", email_mix(1)).await;
    h.wait_loaded(&wh, last).await;
    assert_counts_are_exact(&h, &wh, "ac").await;
    assert_report_matches_raw(&wh, "ac").await;
    assert!(status_rows(&wh, "ac").await["tracks"].1.is_some());
    // The report now reads the counters: they hold every campaign of the rows.
    let conn = rusqlite::Connection::open(&file).expect("open");
    let counted: i64 = conn
        .query_row(
            "SELECT count(DISTINCT campaign_id) FROM tributary__email_totals",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(counted, 3);
    drop(conn);
    assert_eq!(
        status_rows(&wh, "ac").await["tracks"].0,
        120,
        "two batches of 60"
    );
    wh.shutdown().await;
}

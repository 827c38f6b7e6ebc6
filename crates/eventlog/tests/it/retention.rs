//! Retention of the JetStream log on a real nats-server: age retention waits for every
//! pinned consumer, the size cap deletes only explicitly (and counts who lost what),
//! lag is counted in records, and a stream of the older layout (`max_age`) is migrated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tributary_eventlog::jetstream::run_retention;
use tributary_eventlog::{
    CallType, ConsumerState, EventLog, JetStreamLog, LogConfig, MemoryRegistry, NewRecord,
    Ownership, Position, Sole, partition_of, read_checked,
};

use crate::nats::{Nats, nats_server};

const SOURCE: &str = "src_ret";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A user whose records go to `partition` of 2.
fn user_in(partition: u32) -> String {
    (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| partition_of(SOURCE, Some(u), None, 2) == partition)
        .unwrap()
}

fn recs(partition: u32, prefix: &str, n: usize) -> Vec<NewRecord> {
    let user = user_in(partition);
    (0..n)
        .map(|i| NewRecord {
            source_id: SOURCE.into(),
            message_id: format!("{prefix}{i}"),
            call_type: CallType::Track,
            event: Some("Email Opened".into()),
            user_id: Some(user.clone()),
            anonymous_id: None,
            received_at_ms: now_ms(),
            payload: format!(
                r#"{{"messageId":"{prefix}{i}","userId":"{user}","pad":"{}"}}"#,
                "x".repeat(200)
            ),
        })
        .collect()
}

fn config(nats: &Nats) -> LogConfig {
    LogConfig {
        url: nats.url(),
        replicas: 1,
        partitions: 2,
        retention: Duration::from_secs(1),
        prune_interval: Duration::from_millis(200),
        publish_retry: Duration::from_secs(1),
        ..Default::default()
    }
}

async fn open(config: LogConfig) -> (Arc<JetStreamLog>, Arc<MemoryRegistry>) {
    let registry = Arc::new(MemoryRegistry::default());
    let log = JetStreamLog::open(config, registry.clone())
        .await
        .expect("open the jetstream log");
    (Arc::new(log), registry)
}

/// Every record of `partition` a reader from the beginning gets, and the gap it is told.
async fn read_partition(log: &JetStreamLog, partition: u32) -> (Vec<String>, Option<(u64, u64)>) {
    let mut at = log.start(partition);
    let mut ids = Vec::new();
    let mut gap = None;
    loop {
        let got = read_checked(log, &at, 500).await.expect("read");
        if let Some(g) = got.gap {
            gap.get_or_insert((g.from, g.to));
        }
        let Some(last) = got.records.last().map(|r| r.seq) else {
            break;
        };
        ids.extend(got.records.into_iter().map(|r| r.message_id));
        at = at.at(last);
    }
    (ids, gap)
}

fn last_seq(statuses: &[tributary_eventlog::AppendStatus]) -> u64 {
    statuses
        .iter()
        .filter_map(|s| match s {
            tributary_eventlog::AppendStatus::Stored(n) => Some(*n),
            _ => None,
        })
        .max()
        .unwrap()
}

fn lag_of(
    lags: &[tributary_eventlog::jetstream::PartitionLag],
    consumer: &str,
    partition: u32,
) -> u64 {
    lags.iter()
        .find(|l| l.consumer == consumer && l.partition == partition)
        .map(|l| l.records)
        .unwrap_or_else(|| panic!("no lag for {consumer}/{partition}: {lags:?}"))
}

#[tokio::test]
async fn age_retention_keeps_what_a_consumer_behind_needs_and_lets_read_records_go() {
    let Some(bin) =
        nats_server("age_retention_keeps_what_a_consumer_behind_needs_and_lets_read_records_go")
    else {
        return;
    };
    let nats = Nats::start(&bin, 1);
    let (log, _registry) = open(config(&nats)).await;
    // JetStream itself deletes nothing: no max_age, and a full stream refuses.
    let info = async_nats::jetstream::new(log.client().clone())
        .get_stream("TRIBUTARY")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(info.max_age, Duration::ZERO);
    assert_eq!(
        info.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    );

    let end0 = last_seq(&log.append(recs(0, "a", 30)).await.unwrap());
    let end1 = last_seq(&log.append(recs(1, "b", 20)).await.unwrap());
    // The warehouse has read partition 0 and nothing of partition 1; a destination
    // has read partition 0 and is then disabled (unpinned): it does not hold records.
    log.commit("warehouse", &log.start(0).at(end0))
        .await
        .unwrap();
    log.commit("warehouse", &log.start(1)).await.unwrap();
    log.commit("destination:d1", &log.start(0).at(5))
        .await
        .unwrap();
    log.unpin("destination:d1").await.unwrap();
    // Lag in records, per consumer and partition.
    let lags = log.lag().await.unwrap();
    assert_eq!(lag_of(&lags, "warehouse", 0), 0);
    assert_eq!(lag_of(&lags, "warehouse", 1), 20);

    // Past the retention age, a pass purges what every pinned consumer has read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = log.enforce_retention(true).await.unwrap();
    assert_eq!(report.aged_out, 30, "{report:?}");
    assert_eq!(read_partition(&log, 0).await.0.len(), 0);
    let (kept, gap) = read_partition(&log, 1).await;
    assert_eq!(
        kept.len(),
        20,
        "the warehouse's unread records stay, however old"
    );
    assert_eq!(gap, None);
    // The unpinned destination is told what it lost, not skipped silently.
    let got = read_checked(log.as_ref(), &log.start(0).at(5), 10)
        .await
        .unwrap();
    assert!(got.records.is_empty());
    assert_eq!(got.gap.map(|g| (g.from, g.to)), Some((6, end0)));
    // The caught-up warehouse sees no gap in partition 0.
    let got = read_checked(log.as_ref(), &log.start(0).at(end0), 10)
        .await
        .unwrap();
    assert_eq!(got.gap, None);

    // A young record stays even when every consumer has read it.
    let young = last_seq(&log.append(recs(0, "c", 1)).await.unwrap());
    log.commit("warehouse", &log.start(0).at(young))
        .await
        .unwrap();
    assert_eq!(log.enforce_retention(true).await.unwrap().aged_out, 0);
    assert_eq!(read_partition(&log, 0).await.0, vec!["c0".to_string()]);

    // The warehouse catches up on partition 1: the runner (this node holds the
    // retention lease) lets those records go too, and the young one once it is old.
    log.commit("warehouse", &log.start(1).at(end1))
        .await
        .unwrap();
    assert_eq!(lag_of(&log.lag().await.unwrap(), "warehouse", 1), 0);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ownership: Arc<dyn Ownership> = Arc::new(Sole);
    let runner = tokio::spawn(run_retention(log.clone(), ownership, stop_rx));
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.stats().await.unwrap().records > 0 {
        assert!(Instant::now() < deadline, "retention runner purged nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send(true).unwrap();
    runner.await.unwrap();
    let (ids, gap) = read_partition(&log, 1).await;
    assert!(ids.is_empty());
    // The warehouse was at the end: no gap for it in partition 1.
    let got = read_checked(log.as_ref(), &log.start(1).at(end1), 10)
        .await
        .unwrap();
    assert_eq!(got.gap, None);
    // From the beginning a reader is told partition 1 is gone.
    assert!(gap.is_some());
}

#[tokio::test]
async fn the_size_cap_deletes_only_explicitly_and_counts_what_each_consumer_lost() {
    let Some(bin) =
        nats_server("the_size_cap_deletes_only_explicitly_and_counts_what_each_consumer_lost")
    else {
        return;
    };
    let nats = Nats::start(&bin, 1);
    let max = 64 * 1024;
    let (log, _registry) = open(LogConfig {
        max_bytes: Some(max),
        retention: Duration::from_secs(3600),
        ..config(&nats)
    })
    .await;
    // A consumer that read nothing, and one that read partition 0.
    log.commit("warehouse", &log.start(0)).await.unwrap();
    log.commit("warehouse", &log.start(1)).await.unwrap();
    // Fill the stream to its cap: JetStream refuses the rest and deletes nothing.
    let mut stored = 0u64;
    let mut refused = false;
    for round in 0..100 {
        let p = round % 2;
        match log.append(recs(p, &format!("r{round}-"), 10)).await {
            Ok(s) => stored += s.len() as u64,
            Err(e) => {
                assert!(e.to_string().contains("not acknowledged"), "{e}");
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "a full stream refuses new records");
    let stats = log.stats().await.unwrap();
    assert!(stats.bytes <= max, "{stats:?}");
    assert!(
        stats.records >= stored,
        "nothing deleted by JetStream: {stats:?} {stored}"
    );
    let end0 = read_partition(&log, 0).await.0.len() as u64;
    let before = stats.records;

    let report = log.enforce_retention(false).await.unwrap();
    let after = log.stats().await.unwrap();
    assert!(after.bytes as f64 <= max as f64 * 0.8, "{after:?}");
    assert_eq!(report.capped, before - after.records);
    // The warehouse had read nothing: every purged record is its loss, counted
    // exactly, per partition.
    let lost: u64 = report
        .losses
        .iter()
        .filter(|l| l.0 == "warehouse")
        .map(|l| l.2)
        .sum();
    assert_eq!(lost, report.capped, "{report:?}");
    assert_eq!(log.stats().await.unwrap().unconsumed_dropped, lost);
    let w = ConsumerState::merged(log.consumers().await.unwrap(), "warehouse").unwrap();
    assert_eq!(w.dropped, lost);
    let gap = w.gap.expect("the warehouse's status names the gap");
    assert!(gap.from >= 1 && gap.to >= gap.from);
    assert!(w.gap_at_ms.is_some());
    // Its reader is told too.
    let got = read_checked(
        log.as_ref(),
        &Position::new(log.log_id(), gap.partition, 0),
        10,
    )
    .await
    .unwrap();
    assert!(got.gap.is_some());
    // Room again: appends are taken.
    log.append(recs(0, "after", 5))
        .await
        .expect("room after the purge");
    assert!(end0 > 0);
}

#[tokio::test]
async fn a_stream_of_the_age_layout_is_migrated_in_place() {
    let Some(bin) = nats_server("a_stream_of_the_age_layout_is_migrated_in_place") else {
        return;
    };
    let nats = Nats::start(&bin, 1);
    // What an older version made: max_age = the retention, discard old.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TRIBUTARY".into(),
        subjects: vec!["tributary.events.>".into()],
        max_age: Duration::from_secs(3600),
        num_replicas: 1,
        allow_direct: true,
        metadata: [("tributary_partitions".to_string(), "2".to_string())].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    for r in recs(0, "old", 5) {
        js.publish(
            "tributary.events.0.src_ret",
            serde_json::to_vec(&r).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // Age retention deleted a prefix (as `max_age` would have).
    js.get_stream("TRIBUTARY")
        .await
        .unwrap()
        .purge()
        .sequence(4)
        .await
        .unwrap();
    let (log, _registry) = open(config(&nats)).await;
    let mut stream = js.get_stream("TRIBUTARY").await.unwrap();
    let c = stream.info().await.unwrap().config.clone();
    assert_eq!(c.max_age, Duration::ZERO);
    assert_eq!(c.discard, async_nats::jetstream::stream::DiscardPolicy::New);
    assert_eq!(
        c.metadata.get("tributary_floor_0").map(String::as_str),
        Some("4")
    );
    assert_eq!(
        c.metadata.get("tributary_floor_1").map(String::as_str),
        Some("4")
    );
    // A consumer at 1 is told 2..=3 may be gone.
    let got = read_checked(log.as_ref(), &log.start(0).at(1), 10).await;
    let gap = got.map(|g| g.gap).unwrap_or(None);
    assert_eq!(gap.map(|g| (g.from, g.to)), Some((2, 3)));
}

#[tokio::test]
async fn a_floor_overwritten_by_a_concurrent_stream_update_is_written_again() {
    let Some(bin) =
        nats_server("a_floor_overwritten_by_a_concurrent_stream_update_is_written_again")
    else {
        return;
    };
    let nats = Nats::start(&bin, 1);
    let (log, _registry) = open(config(&nats)).await;
    let end0 = last_seq(&log.append(recs(0, "a", 10)).await.unwrap());
    log.commit("warehouse", &log.start(0).at(end0))
        .await
        .unwrap();
    log.commit("warehouse", &log.start(1)).await.unwrap();
    log.commit("destination:d1", &log.start(0).at(3))
        .await
        .unwrap();
    log.unpin("destination:d1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(log.enforce_retention(true).await.unwrap().aged_out, 10);

    // Another node brings the stream to its configuration with metadata it read
    // before the purge (a whole-config write): partition 0's floor is gone.
    let js = async_nats::jetstream::new(log.client().clone());
    let mut stream = js.get_stream("TRIBUTARY").await.unwrap();
    let mut stale = stream.info().await.unwrap().config.clone();
    assert!(stale.metadata.remove("tributary_floor_0").is_some());
    js.update_stream(stale).await.unwrap();
    // Until retention runs again the unpinned destination could not be told...
    let got = read_checked(log.as_ref(), &log.start(0).at(3), 10)
        .await
        .unwrap();
    assert_eq!(got.gap, None, "the floor really was overwritten");
    // ...and its next pass (nothing to purge) writes the floor again.
    assert_eq!(log.enforce_retention(true).await.unwrap().aged_out, 0);
    let c = stream.info().await.unwrap().config.clone();
    assert_eq!(
        c.metadata.get("tributary_floor_0").map(String::as_str),
        Some((end0 + 1).to_string().as_str())
    );
    let got = read_checked(log.as_ref(), &log.start(0).at(3), 10)
        .await
        .unwrap();
    assert_eq!(got.gap.map(|g| (g.from, g.to)), Some((4, end0)));
}

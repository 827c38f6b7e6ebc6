//! The JetStream log on real NATS servers: what ingest and consumers see.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tributary_eventlog::{
    AppendStatus, CallType, EventLog, JetStreamLog, LogConfig, LogError, MemoryRegistry, NewRecord,
    Position, read_checked,
};

use crate::nats::{Nats, nats_server};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn rec(source: &str, user: &str, id: &str) -> NewRecord {
    NewRecord {
        source_id: source.into(),
        message_id: id.into(),
        call_type: CallType::Track,
        event: Some("Email Opened".into()),
        user_id: Some(user.into()),
        anonymous_id: None,
        received_at_ms: now_ms(),
        payload: format!(r#"{{"messageId":"{id}","userId":"{user}"}}"#),
    }
}

fn config(nats: &Nats, replicas: usize) -> LogConfig {
    LogConfig {
        url: nats.url(),
        replicas,
        partitions: 4,
        publish_retry: Duration::from_secs(15),
        ..Default::default()
    }
}

async fn open(config: LogConfig) -> (JetStreamLog, Arc<MemoryRegistry>) {
    let registry = Arc::new(MemoryRegistry::default());
    let log = JetStreamLog::open(config, registry.clone())
        .await
        .expect("open the jetstream log");
    (log, registry)
}

/// Every record of every partition, in order, as (partition, seq, message id).
async fn read_all(log: &JetStreamLog) -> Vec<(u32, u64, String, String)> {
    let mut out = Vec::new();
    for p in 0..log.partitions() {
        let mut at = log.start(p);
        loop {
            let got = read_checked(log, &at, 500).await.expect("read");
            assert!(got.gap.is_none(), "no gap expected: {:?}", got.gap);
            let Some(last) = got.records.last().map(|r| r.seq) else {
                break;
            };
            for r in got.records {
                assert_eq!(r.partition, p);
                out.push((p, r.seq, r.message_id, r.user_id.unwrap_or_default()));
            }
            at = at.at(last);
        }
    }
    out
}

#[tokio::test]
async fn appends_are_read_back_per_partition_in_order_and_deduped() {
    let Some(bin) = nats_server("appends_are_read_back_per_partition_in_order_and_deduped") else {
        return;
    };
    let nats = Nats::start(&bin, 1);
    let (log, _registry) = open(config(&nats, 1)).await;
    let batch: Vec<NewRecord> = (0..200)
        .map(|i| rec("src_a", &format!("user-{}", i % 7), &format!("m{i}")))
        .collect();
    let statuses = log.append(batch.clone()).await.expect("append");
    assert!(
        statuses
            .iter()
            .all(|s| matches!(s, AppendStatus::Stored(_)))
    );
    let seqs: Vec<u64> = statuses
        .iter()
        .map(|s| match s {
            AppendStatus::Stored(n) => *n,
            AppendStatus::Duplicate => 0,
        })
        .collect();

    // Each message once; one user's messages in one partition, in append order.
    let all = read_all(&log).await;
    assert_eq!(all.len(), 200);
    let ids: HashSet<&str> = all.iter().map(|(_, _, id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 200);
    let mut per_user: BTreeMap<&str, Vec<(u32, u64, usize)>> = BTreeMap::new();
    for (p, seq, id, user) in &all {
        let n: usize = id[1..].parse().unwrap();
        per_user
            .entry(user.as_str())
            .or_default()
            .push((*p, *seq, n));
    }
    assert_eq!(per_user.len(), 7);
    for (user, msgs) in &per_user {
        assert!(
            msgs.iter().all(|m| m.0 == msgs[0].0),
            "{user} in one partition"
        );
        assert!(
            msgs.windows(2).all(|w| w[0].1 < w[1].1 && w[0].2 < w[1].2),
            "{user} in order"
        );
    }

    // The same batch again (a client retry): acknowledged, not stored again.
    let again = log.append(batch.clone()).await.expect("append again");
    assert!(
        again.iter().all(|s| *s == AppendStatus::Duplicate),
        "{again:?}"
    );
    assert_eq!(read_all(&log).await.len(), 200);
    let stats = log.stats().await.unwrap();
    assert_eq!((stats.head, stats.records), (200, 200));
    assert_eq!(*log.subscribe().borrow(), 200);

    // Dead-letter replay by seq, the debugger's newest events, replay by time.
    let got = log.get(&[seqs[5], seqs[150], 9999]).await.unwrap();
    assert_eq!(
        got.iter()
            .map(|r| r.message_id.as_str())
            .collect::<Vec<_>>(),
        vec!["m5", "m150"]
    );
    log.append(vec![rec("src_b", "u", "b1")]).await.unwrap();
    let latest = log.latest("src_a", 3).await.unwrap();
    assert_eq!(
        latest
            .iter()
            .map(|r| r.message_id.as_str())
            .collect::<Vec<_>>(),
        vec!["m199", "m198", "m197"]
    );
    assert_eq!(log.latest("src_b", 10).await.unwrap().len(), 1);
    assert!(log.latest("src_none", 10).await.unwrap().is_empty());
    let range = log
        .read_range(now_ms() - 60_000, now_ms() + 1000, 0, 1000)
        .await
        .unwrap();
    assert_eq!(range.len(), 201);
    let after = log
        .read_range(0, i64::MAX / 2, seqs[199], 10)
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].message_id, "b1");

    // Positions name the log; another log's are refused.
    assert!(matches!(
        log.read(&Position::new("other", 0, 0), 1).await,
        Err(LogError::ForeignPosition(_))
    ));
    assert!(matches!(
        log.read(&Position::new(log.log_id(), 99, 0), 1).await,
        Err(LogError::ForeignPosition(_))
    ));
    assert_eq!(log.first_retained(all[0].0).await.unwrap(), {
        all.iter()
            .filter(|a| a.0 == all[0].0)
            .map(|a| a.1)
            .min()
            .unwrap()
    });
    log.healthy().await.expect("healthy");

    // Positions go to the registry, fenced by epoch.
    let pos = log.start(1).at(seqs[10]);
    assert!(log.commit_fenced("warehouse", &pos, 2).await.unwrap());
    assert!(
        !log.commit_fenced("warehouse", &pos.at(seqs[20]), 1)
            .await
            .unwrap()
    );
    assert_eq!(log.cursor("warehouse", 1).await.unwrap(), pos);
    assert_eq!(log.cursor("warehouse", 2).await.unwrap(), log.start(2));

    // A second node's log on the same stream: the same id, and it sees the records.
    let (other, _) = open(config(&nats, 1)).await;
    assert_eq!(other.log_id(), log.log_id());
    assert_eq!(read_all(&other).await.len(), 201);
    // A partition count other than the stream's is refused.
    let wrong = LogConfig {
        partitions: 8,
        ..config(&nats, 1)
    };
    let err = JetStreamLog::open(wrong, Arc::new(MemoryRegistry::default()))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("partitions"), "{err}");
}

#[tokio::test]
async fn ingest_gets_unavailable_while_every_server_is_down_and_recovers() {
    let Some(bin) = nats_server("ingest_gets_unavailable_while_every_server_is_down_and_recovers")
    else {
        return;
    };
    let mut nats = Nats::start(&bin, 1);
    let (log, _) = open(LogConfig {
        publish_retry: Duration::from_secs(3),
        ..config(&nats, 1)
    })
    .await;
    log.append(vec![rec("src", "u", "before")]).await.unwrap();

    nats.kill_all();
    let t = Instant::now();
    let err = log
        .append(vec![rec("src", "u", "down-1"), rec("src", "v", "down-2")])
        .await
        .expect_err("no server: never Ok");
    assert!(matches!(err, LogError::Unavailable(_)), "{err}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert!(log.healthy().await.is_err());

    // Back by itself once the server returns (same store): appends succeed.
    nats.restart_all();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match log.append(vec![rec("src", "u", "after")]).await {
            Ok(s) => {
                assert!(matches!(s[0], AppendStatus::Stored(_)));
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "not recovered: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let ids: HashSet<String> = read_all(&log).await.into_iter().map(|r| r.2).collect();
    assert!(ids.contains("before") && ids.contains("after"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.healthy().await.is_err() {
        assert!(Instant::now() < deadline, "health did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_sigkilled_stream_leader_loses_no_acked_message() {
    let Some(bin) = nats_server("a_sigkilled_stream_leader_loses_no_acked_message") else {
        return;
    };
    let mut nats = Nats::start(&bin, 3);
    let (log, _) = open(config(&nats, 3)).await;
    let log = Arc::new(log);
    log.append(vec![rec("src", "u", "warm")]).await.unwrap();

    // Writers append batches of 20 until told to stop; each remembers what was acked.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let log = log.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0u32;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<NewRecord> = (0..20)
                    .map(|i| {
                        rec(
                            "src",
                            &format!("user-{w}-{}", i % 5),
                            &format!("w{w}-{n}-{i}"),
                        )
                    })
                    .collect();
                n += 1;
                match log.append(batch.clone()).await {
                    Ok(_) => acked.extend(batch.into_iter().map(|r| r.message_id)),
                    Err(_) => failed += 1,
                }
            }
            (acked, failed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = log.leader().await.unwrap().expect("a leader");
    let i = nats.index_of(&leader).expect("leader is one of ours");
    let killed_at = Instant::now();
    nats.kill(i);
    // Through the election and some time after it.
    tokio::time::sleep(Duration::from_secs(12)).await;
    nats.restart(i);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = HashSet::new();
    let mut failures = 0;
    for w in writers {
        let (ids, failed) = w.await.unwrap();
        failures += failed;
        acked.extend(ids);
    }
    eprintln!(
        "leader {leader} killed {:?} before stop; {} ids acked, {failures} batches failed",
        killed_at.elapsed(),
        acked.len()
    );
    assert_eq!(failures, 0, "retries cover the election: no append failed");
    let all = read_all(&log).await;
    let stored: Vec<&str> = all
        .iter()
        .map(|r| r.2.as_str())
        .filter(|id| *id != "warm")
        .collect();
    let distinct: HashSet<&str> = stored.iter().copied().collect();
    assert_eq!(stored.len(), distinct.len(), "no message stored twice");
    for id in &acked {
        assert!(distinct.contains(id.as_str()), "acked {id} missing");
    }
    // Only what was in flight when the writers stopped may be stored unacked: none,
    // since each writer awaits its append.
    assert_eq!(distinct.len(), acked.len());
}

#[tokio::test]
async fn records_aged_out_before_a_consumer_read_them_are_a_gap() {
    let Some(bin) = nats_server("records_aged_out_before_a_consumer_read_them_are_a_gap") else {
        return;
    };
    let nats = Nats::start(&bin, 1);
    let (log, _) = open(LogConfig {
        retention: Duration::from_secs(2),
        duplicate_window: Duration::from_secs(1),
        ..config(&nats, 1)
    })
    .await;
    log.append(vec![rec("src", "u", "old-1"), rec("src", "u", "old-2")])
        .await
        .unwrap();
    let partition = tributary_eventlog::partition_of("src", Some("u"), None, 4);
    // A consumer that read nothing and is not registered (so it holds nothing back),
    // while retention deletes both once they are older than the retention.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = log.enforce_retention(true).await.unwrap();
    assert_eq!(report.aged_out, 2);
    log.append(vec![rec("src", "u", "new")]).await.unwrap();
    let got = read_checked(&log, &log.start(partition), 100)
        .await
        .unwrap();
    assert_eq!(got.records.len(), 1);
    assert_eq!(got.records[0].message_id, "new");
    let gap = got.gap.expect("the aged-out records are reported");
    assert_eq!((gap.partition, gap.from, gap.to), (partition, 1, 2));
    // A consumer past them sees no gap.
    let at = log.start(partition).at(got.records[0].seq);
    assert!(read_checked(&log, &at, 100).await.unwrap().gap.is_none());
}

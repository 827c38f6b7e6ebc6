//! The destinations' delivery markers and statistics in the control database
//! ([`PgLedger`]) on the real local PostgreSQL, fenced by real leases: a partition's
//! next owner reads exactly what its predecessor started and ended, and the
//! predecessor, stalled past its lease, writes nothing more. Skipped with a `SKIP`
//! line when PostgreSQL is absent, failed instead under `TRIBUTARY_TEST_REQUIRE=all`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use std::sync::Arc;

use tributary_destinations::{BatchCounts, BatchKey, Ledger, LetterChanges, NewDeadLetter};
use tributary_eventlog::{CallType, Record};
use tributary_eventlog::{Lease, Ownership};
use tributary_server::cluster::{LeaseSettings, PgLedger, PgOwnership, ledger};

use crate::leases::Schema;

fn settings(node: &str) -> LeaseSettings {
    LeaseSettings {
        node_id: node.into(),
        ttl: Duration::from_secs(2),
        renew_interval: Duration::from_millis(300),
    }
}

/// A fresh control schema with the ledger's tables (`None`: PostgreSQL is absent,
/// the test skips).
async fn ledger_schema(name: &str) -> Option<Schema> {
    let schema = Schema::fresh(name).await?;
    let mut c = schema.pool.get().await.unwrap();
    ledger::migrate(&mut c, &schema.name).await.unwrap();
    drop(c);
    Some(schema)
}

/// One node: its leases and its ledger on `schema`.
fn node(schema: &Schema, id: &str) -> (PgOwnership, PgLedger) {
    (
        PgOwnership::start(schema.pool.clone(), &schema.name, settings(id)),
        PgLedger::new(schema.pool.clone(), &schema.name, id),
    )
}

async fn lease_of(rx: &tokio::sync::watch::Receiver<Vec<Lease>>, what: &str) -> Lease {
    let start = Instant::now();
    loop {
        if let Some(l) = rx.borrow().first() {
            return *l;
        }
        assert!(start.elapsed() < Duration::from_secs(8), "{what}: no lease");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn key(l: Lease, id: u64) -> BatchKey {
    BatchKey {
        dest: "dst_1".into(),
        partition: l.partition,
        epoch: l.epoch,
        id,
    }
}

fn delivered(n: u64, redelivered: u64) -> BatchCounts {
    BatchCounts {
        delivered: n,
        redelivered,
        success_ms: Some(1),
        ..BatchCounts::default()
    }
}

const NONE: LetterChanges<'static> = LetterChanges {
    dead: &[],
    replayed_ok: &[],
};

fn set(v: &[u64]) -> HashSet<u64> {
    v.iter().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_resends_only_what_was_in_flight_and_the_stale_owner_writes_nothing() {
    let Some(schema) = ledger_schema("ledger_takeover").await else {
        return;
    };
    let consumer = "destination:dst_1";
    let (a, la) = node(&schema, "node-a");
    let (b, lb) = node(&schema, "node-b");
    let old = lease_of(&a.owned(consumer, 1), "node a").await;

    // Node a: one batch ended, one in flight, one abandoned before it could arrive.
    assert!(la.batch_started(&key(old, 1), &[1, 2, 3]).await.unwrap());
    assert!(
        la.batch_finished(&key(old, 1), true, &delivered(3, 0), NONE)
            .await
            .unwrap()
    );
    assert!(la.batch_started(&key(old, 2), &[4, 5]).await.unwrap());
    assert!(la.batch_started(&key(old, 3), &[6]).await.unwrap());
    la.batch_abandoned(&key(old, 3)).await.unwrap();
    assert_eq!(lb.tally("dst_1").await.unwrap().delivered, 3);

    // Node a stalls; node b takes the partition under a higher epoch.
    let rx_b = b.owned(consumer, 1);
    a.halt();
    let new = lease_of(&rx_b, "node b takes over").await;
    assert!(new.epoch > old.epoch, "{new:?} after {old:?}");

    // The stale owner: nothing it writes is stored.
    assert!(
        !la.batch_started(&key(old, 4), &[7]).await.unwrap(),
        "a stale epoch must not start a batch"
    );
    assert!(
        !la.batch_finished(&key(old, 2), true, &delivered(2, 0), NONE)
            .await
            .unwrap(),
        "a stale epoch must not end a batch"
    );
    la.batch_abandoned(&key(old, 2)).await.unwrap();
    la.prune("dst_1", old.partition, old.epoch, 10)
        .await
        .unwrap();

    // The new owner sees what ended (skipped) and what was in flight (re-sent).
    let rec = lb.recovery("dst_1", new.partition, 0).await.unwrap();
    assert_eq!(rec.done, set(&[1, 2, 3]));
    assert_eq!(rec.maybe, set(&[4, 5]));
    let rec = lb.recovery("dst_1", new.partition, 4).await.unwrap();
    assert_eq!((rec.done, rec.maybe), (set(&[]), set(&[5])));
    // Another partition's markers are its own.
    assert!(
        lb.recovery("dst_1", new.partition + 1, 0)
            .await
            .unwrap()
            .maybe
            .is_empty()
    );

    assert!(lb.batch_started(&key(new, 1), &[4, 5]).await.unwrap());
    assert!(
        lb.batch_finished(&key(new, 1), true, &delivered(2, 2), NONE)
            .await
            .unwrap()
    );
    let t = la.tally("dst_1").await.unwrap();
    assert_eq!((t.delivered, t.redelivered), (5, 2), "{t:?}");
    let rec = lb.recovery("dst_1", new.partition, 0).await.unwrap();
    assert_eq!(rec.done, set(&[1, 2, 3, 4, 5]));
    assert!(rec.maybe.is_empty());

    // Pruned at the committed cursor; forgotten with the destination.
    lb.prune("dst_1", new.partition, new.epoch, 5)
        .await
        .unwrap();
    let rec = lb.recovery("dst_1", new.partition, 0).await.unwrap();
    assert!(rec.done.is_empty() && rec.maybe.is_empty());
    assert!(lb.batch_started(&key(new, 2), &[9]).await.unwrap());
    lb.forget("dst_1").await.unwrap();
    assert_eq!(lb.tally("dst_1").await.unwrap(), Default::default());
    assert!(
        lb.recovery("dst_1", new.partition, 0)
            .await
            .unwrap()
            .maybe
            .is_empty()
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_write_waits_for_a_grant_in_progress_and_is_then_refused() {
    let Some(schema) = ledger_schema("ledger_lock").await else {
        return;
    };
    let consumer = "destination:dst_1";
    let (a, la) = node(&schema, "node-a");
    let held = lease_of(&a.owned(consumer, 1), "node a").await;
    assert!(la.batch_started(&key(held, 1), &[1]).await.unwrap());
    a.halt();
    // Another node's grant, still uncommitted, has moved the lease on.
    let mut grant = schema.pool.get().await.unwrap();
    let tx = grant.transaction().await.unwrap();
    tx.execute(
        &format!(
            "UPDATE \"{}\".leases SET owner = 'node-b', epoch = epoch + 1,
             expires_at = clock_timestamp() + interval '1 minute'
             WHERE consumer = $1 AND partition = $2",
            schema.name
        ),
        &[&consumer, &(held.partition as i32)],
    )
    .await
    .unwrap();
    let la = std::sync::Arc::new(la);
    let l1 = la.clone();
    let start = tokio::spawn(async move { l1.batch_started(&key(held, 2), &[2]).await.unwrap() });
    let l2 = la.clone();
    let end = tokio::spawn(async move {
        l2.batch_finished(&key(held, 1), true, &delivered(1, 0), NONE)
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !start.is_finished(),
        "the marker write must wait for the grant"
    );
    assert!(!end.is_finished(), "the batch end must wait for the grant");
    tx.commit().await.unwrap();
    assert!(!start.await.unwrap(), "refused once the grant committed");
    assert!(!end.await.unwrap(), "refused once the grant committed");
    assert_eq!(la.tally("dst_1").await.unwrap(), Default::default());
    let client = schema.pool.get().await.unwrap();
    let n: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".delivery_markers WHERE done OR batch_id = 2",
                schema.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

fn dead(partition: u32, seq: u64, attempts: u32) -> NewDeadLetter {
    NewDeadLetter {
        record: Arc::new(Record {
            seq,
            partition,
            source_id: "src_1".into(),
            message_id: format!("m-{seq}"),
            call_type: CallType::Track,
            event: Some("Email Opened".into()),
            user_id: Some("u-1".into()),
            anonymous_id: None,
            received_at_ms: 1_700_000_000_000 + seq as i64,
            payload: format!(r#"{{"type":"track","event":"Email Opened","messageId":"m-{seq}"}}"#),
        }),
        attempts,
        last_status: Some(400),
        last_response: Some("bad".into()),
        error: "receiver answered 400".into(),
        first_attempt_ms: 1_700_000_100_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_shared_by_every_node_fenced_and_claimed_once_for_replay() {
    let Some(schema) = ledger_schema("ledger_dead").await else {
        return;
    };
    let consumer = "destination:dst_1";
    let (a, la) = node(&schema, "node-a");
    let (b, lb) = node(&schema, "node-b");
    let old = lease_of(&a.owned(consumer, 1), "node a").await;

    // Node a dead-letters two events with the end of their batch.
    assert!(la.batch_started(&key(old, 1), &[3, 7]).await.unwrap());
    let letters = [dead(old.partition, 3, 5), dead(old.partition, 7, 5)];
    let ended = la
        .batch_finished(
            &key(old, 1),
            true,
            &BatchCounts::default(),
            LetterChanges {
                dead: &letters,
                replayed_ok: &[],
            },
        )
        .await
        .unwrap();
    assert!(ended);
    // Node b lists them, counted in the statistics of every node.
    let list = lb.dead_letters("dst_1", 10).await.unwrap();
    assert_eq!(
        list.iter()
            .map(|d| d.message_id.as_str())
            .collect::<Vec<_>>(),
        ["m-3", "m-7"]
    );
    assert_eq!(list[0].attempts, 5);
    assert_eq!(list[0].last_status, Some(400));
    assert_eq!(list[0].event["event"], "Email Opened");
    assert!(!list[0].replaying);
    assert_eq!(lb.tally("dst_1").await.unwrap().dead_letters, 2);

    // Node a stalls, node b takes over; a's late dead letter is not stored.
    let rx_b = b.owned(consumer, 1);
    a.halt();
    let new = lease_of(&rx_b, "node b takes over").await;
    let late = [dead(old.partition, 9, 1)];
    let ended = la
        .batch_finished(
            &key(old, 2),
            false,
            &BatchCounts::default(),
            LetterChanges {
                dead: &late,
                replayed_ok: &[],
            },
        )
        .await
        .unwrap();
    assert!(!ended, "a stale epoch must not write dead letters");
    assert_eq!(lb.tally("dst_1").await.unwrap().dead_letters, 2);

    // A replay claims them once: node a asking at the same time gets none.
    let claimed = lb.start_replay("dst_1").await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(la.start_replay("dst_1").await.unwrap().is_empty());
    assert!(lb.dead_letters("dst_1", 10).await.unwrap()[0].replaying);
    let records = lb.dead_letter_records(&claimed).await.unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].1.seq, 3);
    assert_eq!(records[0].1.user_id.as_deref(), Some("u-1"));
    assert_eq!(records[0].1.call_type, CallType::Track);

    // The first is delivered (removed), the second fails again (attempts add up,
    // idle again); node a's give-back does not touch node b's claims.
    la.end_replay("dst_1", None).await.unwrap();
    assert!(la.start_replay("dst_1").await.unwrap().is_empty());
    let again = [dead(new.partition, 7, 2)];
    let ended = lb
        .batch_finished(
            &key(new, 1),
            false,
            &BatchCounts::default(),
            LetterChanges {
                dead: &again,
                replayed_ok: &claimed[..1],
            },
        )
        .await
        .unwrap();
    assert!(ended);
    let list = lb.dead_letters("dst_1", 10).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!((list[0].seq, list[0].attempts), (7, 7));
    assert!(!list[0].replaying);

    // A claim given back (a worker stopped before it got to it) is claimable again.
    let claimed = la.start_replay("dst_1").await.unwrap();
    assert_eq!(claimed.len(), 1);
    la.end_replay("dst_1", Some(&claimed)).await.unwrap();
    assert_eq!(lb.start_replay("dst_1").await.unwrap(), claimed);

    lb.forget("dst_1").await.unwrap();
    assert!(la.dead_letters("dst_1", 10).await.unwrap().is_empty());
    b.shutdown().await;
}

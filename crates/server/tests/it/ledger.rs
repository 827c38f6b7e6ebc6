//! The destinations' delivery markers and statistics in the control database
//! ([`PgLedger`]) on the real local PostgreSQL, fenced by real leases: a partition's
//! next owner reads exactly what its predecessor started and ended, and the
//! predecessor, stalled past its lease, writes nothing more. Skipped with a `SKIP`
//! line when PostgreSQL is absent, failed instead under `TRIBUTARY_TEST_REQUIRE=all`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tributary_destinations::{BatchCounts, BatchKey, Ledger};
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

fn set(v: &[u64]) -> HashSet<u64> {
    v.iter().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_resends_only_what_was_in_flight_and_the_stale_owner_writes_nothing() {
    let Some(schema) = Schema::fresh("ledger_takeover").await else {
        return;
    };
    {
        let mut c = schema.pool.get().await.unwrap();
        ledger::migrate(&mut c, &schema.name).await.unwrap();
    }
    let consumer = "destination:dst_1";
    let a = PgOwnership::start(schema.pool.clone(), &schema.name, settings("node-a"));
    let b = PgOwnership::start(schema.pool.clone(), &schema.name, settings("node-b"));
    let la = PgLedger::new(schema.pool.clone(), &schema.name, "node-a");
    let lb = PgLedger::new(schema.pool.clone(), &schema.name, "node-b");
    let old = lease_of(&a.owned(consumer, 1), "node a").await;

    // Node a: one batch ended, one in flight, one abandoned before it could arrive.
    assert!(la.batch_started(&key(old, 1), &[1, 2, 3]).await.unwrap());
    assert!(
        la.batch_finished(&key(old, 1), true, &delivered(3, 0))
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
        !la.batch_finished(&key(old, 2), true, &delivered(2, 0))
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
        lb.batch_finished(&key(new, 1), true, &delivered(2, 2))
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
    let Some(schema) = Schema::fresh("ledger_lock").await else {
        return;
    };
    {
        let mut c = schema.pool.get().await.unwrap();
        ledger::migrate(&mut c, &schema.name).await.unwrap();
    }
    let consumer = "destination:dst_1";
    let a = PgOwnership::start(schema.pool.clone(), &schema.name, settings("node-a"));
    let la = PgLedger::new(schema.pool.clone(), &schema.name, "node-a");
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
        l2.batch_finished(&key(held, 1), true, &delivered(1, 0))
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

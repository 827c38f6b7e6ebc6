//! Cluster mode: the loader owns partitions through leases and commits with the
//! lease epoch; a loader that lost its lease (a stalled node) commits nothing.
//!
//! The leases here come from a fake [`Ownership`] the test moves by hand (the
//! PostgreSQL leases are tested with the control plane); the warehouse side — the
//! epoch claimed at start and checked inside every load transaction — is the real one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;
use tributary_eventlog::{EventLog, Lease, LogError, Ownership};
use tributary_warehouse::{SchemaCatalog, Warehouse};

use crate::support::{Harness, track, with_postgres};

/// Leases granted by the test: what this "node" believes it owns.
struct FakeOwnership {
    leases: watch::Sender<Vec<Lease>>,
    released: Mutex<bool>,
}

impl FakeOwnership {
    fn granting(leases: Vec<Lease>) -> Arc<FakeOwnership> {
        Arc::new(FakeOwnership {
            leases: watch::channel(leases).0,
            released: Mutex::new(false),
        })
    }
}

#[async_trait::async_trait]
impl Ownership for FakeOwnership {
    fn owned(&self, _consumer: &str, _partitions: u32) -> watch::Receiver<Vec<Lease>> {
        self.leases.subscribe()
    }
    async fn holds(&self, _consumer: &str, lease: Lease) -> Result<bool, LogError> {
        Ok(self.leases.borrow().contains(&lease))
    }
    async fn release(&self, _consumer: &str) -> Result<(), LogError> {
        *self.released.lock().unwrap() = true;
        Ok(())
    }
}

async fn open_owned(h: &Harness, ownership: Arc<FakeOwnership>) -> Warehouse {
    let log: Arc<dyn EventLog> = h.log.clone();
    let catalog: Arc<dyn SchemaCatalog> = h.catalog.clone();
    Warehouse::open_owned(h.config(), log, catalog, ownership)
        .await
        .expect("open warehouse")
}

fn lease(epoch: u64) -> Lease {
    Lease {
        partition: 0,
        epoch,
    }
}

/// Node A loads under epoch 1; node B takes the partition over with epoch 2 (A has
/// not noticed: it still believes it holds epoch 1, as after a SIGSTOP). While B is
/// away, A reads new records and tries to commit them: refused, nothing loaded. B
/// back: everything exactly once.
async fn a_loader_that_lost_its_lease_commits_nothing(h: &Harness) {
    h.source("src", "shop");
    let table = format!("{}.tracks", h.schema("shop"));
    let node_a = FakeOwnership::granting(vec![lease(1)]);
    let a = open_owned(h, node_a.clone()).await;
    let first = h
        .append(
            "src",
            (0..5)
                .map(|i| track(&format!("m-{i}"), "Tick", json!({})))
                .collect(),
        )
        .await;
    h.wait_loaded(&a, first).await;
    assert_eq!(h.count(&a, &table).await, 5);

    // B takes the partition over (a higher epoch), then goes away again.
    let b = open_owned(h, FakeOwnership::granting(vec![lease(2)])).await;
    h.wait_loaded(&b, first).await;
    b.shutdown().await;

    // The zombie A reads these and tries to commit them under epoch 1.
    let second = h
        .append(
            "src",
            (5..10)
                .map(|i| track(&format!("m-{i}"), "Tick", json!({})))
                .collect(),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        assert_eq!(h.count(&a, &table).await, 5, "the stale loader committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.lag().loaded_seq < second, "{:?}", a.lag());

    // The lease holder loads them, once.
    let b = open_owned(h, FakeOwnership::granting(vec![lease(2)])).await;
    h.wait_loaded(&b, second).await;
    let rows = h
        .rows(
            &b,
            &format!("select count(*), count(distinct id) from {table}"),
        )
        .await;
    assert_eq!(rows[0][0].as_i64(), Some(10), "{rows:?}");
    assert_eq!(rows[0][1].as_i64(), Some(10), "{rows:?}");

    // A loader whose lease is taken away stops, and its leases are released at
    // shutdown.
    node_a.leases.send_replace(Vec::new());
    a.shutdown().await;
    assert!(*node_a.released.lock().unwrap());
    b.shutdown().await;
}

#[tokio::test]
async fn sqlite_a_loader_that_lost_its_lease_commits_nothing() {
    let h = Harness::sqlite().await;
    a_loader_that_lost_its_lease_commits_nothing(&h).await;
}

#[tokio::test]
async fn postgres_a_loader_that_lost_its_lease_commits_nothing() {
    with_postgres(
        "postgres_a_loader_that_lost_its_lease_commits_nothing",
        |h| async move { a_loader_that_lost_its_lease_commits_nothing(&h).await },
    )
    .await;
}

//! Partition leases and the epoch-fenced registry on the real local PostgreSQL
//! (127.0.0.1:5432, db `test`), each test in a fresh schema so parallel tests do
//! not meet. Skipped with a `SKIP` line when PostgreSQL is absent, failed instead
//! under `TRIBUTARY_TEST_REQUIRE=all`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tributary_eventlog::{ConsumerRegistry, Lease, Ownership, Position};
use tributary_server::cluster::{LeaseSettings, PgOwnership, PgRegistry, pg};

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh control schema, dropped when the value goes.
pub struct Schema {
    pub name: String,
    pub pool: deadpool_postgres::Pool,
}

impl Schema {
    /// The local PostgreSQL with a new migrated schema, or `None` after printing
    /// why the test is skipped.
    pub async fn fresh(test: &str) -> Option<Schema> {
        let cfg = pg::pg_config(PG_URL, &format!("it-{test}")).expect("url");
        let pool = pg::pool(cfg, 8).expect("pool");
        let mut client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                let why = format!("PostgreSQL not reachable at 127.0.0.1:5432 ({e})");
                if std::env::var("TRIBUTARY_TEST_REQUIRE").as_deref() == Ok("all") {
                    panic!("{test}: {why} and TRIBUTARY_TEST_REQUIRE=all");
                }
                use std::io::Write;
                let _ = writeln!(std::io::stderr().lock(), "SKIP {test}: {why}");
                return None;
            }
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("it_lease_{}_{}", std::process::id(), nanos % 1_000_000_000);
        pg::migrate(&mut client, &name).await.expect("migrate");
        Some(Schema { name, pool })
    }

    async fn sql(&self, text: &str) {
        self.pool
            .get()
            .await
            .unwrap()
            .batch_execute(text)
            .await
            .unwrap();
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A plain thread: the test's runtime may be gone already.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok((c, conn)) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

fn settings(node: &str) -> LeaseSettings {
    LeaseSettings {
        node_id: node.into(),
        ttl: Duration::from_secs(2),
        renew_interval: Duration::from_millis(300),
    }
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    start.elapsed()
}

fn parts(rx: &watch::Receiver<Vec<Lease>>) -> BTreeSet<u32> {
    rx.borrow().iter().map(|l| l.partition).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_partitions_fairly_and_a_stalled_one_is_replaced_with_a_higher_epoch() {
    let Some(schema) = Schema::fresh("leases_share_and_takeover").await else {
        return;
    };
    let a = PgOwnership::start(schema.pool.clone(), &schema.name, settings("node-a"));
    let b = PgOwnership::start(schema.pool.clone(), &schema.name, settings("node-b"));
    let registry = PgRegistry::new(schema.pool.clone(), &schema.name);
    let rx_a = a.owned("warehouse", 8);
    wait_for("node a alone takes all 8", Duration::from_secs(5), || {
        parts(&rx_a).len() == 8
    })
    .await;
    let rx_b = b.owned("warehouse", 8);
    wait_for("4 + 4 once node b competes", Duration::from_secs(8), || {
        parts(&rx_a).len() == 4 && parts(&rx_b).len() == 4
    })
    .await;
    assert!(
        parts(&rx_a).is_disjoint(&parts(&rx_b)),
        "{:?} {:?}",
        parts(&rx_a),
        parts(&rx_b)
    );

    // Node a commits under its lease, then stalls (no renewals, nothing released).
    let held = rx_a.borrow()[0];
    assert!(a.holds("warehouse", held).await.unwrap());
    assert!(!b.holds("warehouse", held).await.unwrap(), "not b's lease");
    let pos = Position::new("log-1", held.partition, 10);
    assert!(
        registry
            .commit("warehouse", &pos, held.epoch)
            .await
            .unwrap()
    );
    a.halt();
    let took = wait_for(
        "node b takes every partition",
        Duration::from_secs(8),
        || parts(&rx_b).len() == 8,
    )
    .await;
    assert!(took <= Duration::from_secs(5), "takeover took {took:?}");
    let new = *rx_b
        .borrow()
        .iter()
        .find(|l| l.partition == held.partition)
        .unwrap();
    assert!(new.epoch > held.epoch, "{new:?} after {held:?}");

    // The zombie: its lease is gone and its commit is refused, even before the new
    // owner committed anything.
    assert!(!a.holds("warehouse", held).await.unwrap());
    assert!(
        !registry
            .commit("warehouse", &pos.at(20), held.epoch)
            .await
            .unwrap(),
        "a stale epoch must not commit"
    );
    assert_eq!(
        registry
            .cursor("warehouse", "log-1", held.partition)
            .await
            .unwrap()
            .unwrap()
            .seq,
        10
    );
    assert!(b.holds("warehouse", new).await.unwrap());
    assert!(
        registry
            .commit("warehouse", &pos.at(30), new.epoch)
            .await
            .unwrap()
    );
    assert!(
        !registry
            .commit("warehouse", &pos.at(40), held.epoch)
            .await
            .unwrap()
    );
    assert_eq!(
        registry
            .cursor("warehouse", "log-1", held.partition)
            .await
            .unwrap()
            .unwrap()
            .seq,
        30
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_take_at_most_their_fair_share_of_sixteen_partitions() {
    let Some(schema) = Schema::fresh("leases_three_nodes").await else {
        return;
    };
    let nodes: Vec<PgOwnership> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| PgOwnership::start(schema.pool.clone(), &schema.name, settings(n)))
        .collect();
    let rxs: Vec<_> = nodes.iter().map(|n| n.owned("warehouse", 16)).collect();
    wait_for(
        "16 partitions spread as 6/6/4",
        Duration::from_secs(10),
        || {
            let sizes: Vec<usize> = rxs.iter().map(|r| parts(r).len()).collect();
            sizes.iter().sum::<usize>() == 16 && sizes.iter().all(|n| *n <= 6)
        },
    )
    .await;
    let all: BTreeSet<u32> = rxs.iter().flat_map(parts).collect();
    assert_eq!(all.len(), 16, "every partition has exactly one owner");
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_consumer_passes_its_partitions_on_at_once() {
    let Some(schema) = Schema::fresh("leases_release").await else {
        return;
    };
    let a = PgOwnership::start(schema.pool.clone(), &schema.name, settings("node-a"));
    let b = PgOwnership::start(schema.pool.clone(), &schema.name, settings("node-b"));
    let rx_a = a.owned("destination:d1", 4);
    let rx_b = b.owned("destination:d1", 4);
    wait_for("2 + 2", Duration::from_secs(8), || {
        parts(&rx_a).len() == 2 && parts(&rx_b).len() == 2
    })
    .await;
    let before: Vec<Lease> = rx_a.borrow().clone();
    a.release("destination:d1").await.unwrap();
    assert!(rx_a.borrow().is_empty(), "released locally at once");
    // Well before the 2 s TTL: released leases are free, and b's share grows as
    // soon as a stops heartbeating for the consumer.
    let took = wait_for("b takes all 4", Duration::from_secs(4), || {
        parts(&rx_b).len() == 4
    })
    .await;
    assert!(took < Duration::from_secs(2), "took {took:?}");
    for old in before {
        let now = rx_b
            .borrow()
            .iter()
            .find(|l| l.partition == old.partition)
            .copied()
            .unwrap();
        assert!(now.epoch > old.epoch);
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_renew_drops_its_leases_before_they_expire() {
    let Some(schema) = Schema::fresh("leases_local_drop").await else {
        return;
    };
    let a = PgOwnership::start(schema.pool.clone(), &schema.name, settings("node-a"));
    let rx = a.owned("warehouse", 2);
    wait_for("both partitions", Duration::from_secs(5), || {
        parts(&rx).len() == 2
    })
    .await;
    // Renewals now fail (the tables are gone); the leases in the database would
    // have lasted 2 s from the last renewal.
    let broke = Instant::now();
    schema
        .sql(&format!(
            "ALTER TABLE \"{s}\".leases RENAME TO leases_away",
            s = schema.name
        ))
        .await;
    let dropped = wait_for("dropped locally", Duration::from_secs(3), || {
        rx.borrow().is_empty()
    })
    .await;
    assert!(
        dropped < Duration::from_secs(2),
        "dropped {dropped:?} after renewals broke: later than the TTL"
    );
    assert!(
        !a.holds(
            "warehouse",
            Lease {
                partition: 0,
                epoch: 1
            }
        )
        .await
        .unwrap_or(false)
    );
    // Renewals work again once the leases expired in the database: the node
    // competes again and wins them under new epochs.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(broke.elapsed())).await;
    schema
        .sql(&format!(
            "ALTER TABLE \"{s}\".leases_away RENAME TO leases",
            s = schema.name
        ))
        .await;
    wait_for("re-acquired", Duration::from_secs(6), || {
        parts(&rx).len() == 2
    })
    .await;
    assert!(
        rx.borrow().iter().all(|l| l.epoch >= 2),
        "{:?}",
        rx.borrow()
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_keeps_positions_per_log_and_partition() {
    let Some(schema) = Schema::fresh("registry_basics").await else {
        return;
    };
    let r = PgRegistry::new(schema.pool.clone(), &schema.name);
    assert_eq!(r.cursor("destination:x", "log", 0).await.unwrap(), None);
    assert!(
        r.commit("destination:x", &Position::new("log", 0, 5), 1)
            .await
            .unwrap()
    );
    assert!(
        r.commit("destination:x", &Position::new("log", 3, 7), 1)
            .await
            .unwrap()
    );
    assert!(
        r.commit("destination:x", &Position::new("other", 0, 2), 1)
            .await
            .unwrap()
    );
    assert!(
        r.commit("destination:y", &Position::new("log", 0, 9), 0)
            .await
            .unwrap()
    );
    assert_eq!(
        r.cursor("destination:x", "log", 3).await.unwrap(),
        Some(Position::new("log", 3, 7))
    );
    // A higher epoch fences lower ones.
    assert!(
        r.commit("destination:x", &Position::new("log", 0, 6), 2)
            .await
            .unwrap()
    );
    assert!(
        !r.commit("destination:x", &Position::new("log", 0, 8), 1)
            .await
            .unwrap()
    );
    assert_eq!(
        r.cursor("destination:x", "log", 0)
            .await
            .unwrap()
            .unwrap()
            .seq,
        6
    );
    r.unpin("destination:x").await.unwrap();
    let list = r.list().await.unwrap();
    assert_eq!(list.len(), 4);
    assert!(
        list.iter()
            .filter(|c| c.name == "destination:x")
            .all(|c| !c.pinned)
    );
    assert!(list.iter().any(|c| c.name == "destination:y" && c.pinned));
    // The next commit pins again.
    assert!(
        r.commit("destination:x", &Position::new("log", 0, 7), 2)
            .await
            .unwrap()
    );
    assert!(
        r.list()
            .await
            .unwrap()
            .iter()
            .any(|c| c.name == "destination:x" && c.position.partition == 0 && c.pinned)
    );
    r.remove("destination:x").await.unwrap();
    assert_eq!(r.cursor("destination:x", "log", 3).await.unwrap(), None);
    assert_eq!(r.list().await.unwrap().len(), 1);
}

//! Cluster mode: one loader per log partition this node owns.
//!
//! Ownership comes from [`Ownership::owned`] for consumer `warehouse` (PostgreSQL
//! leases in a cluster). For each lease a [`Loader`] reads only its partition, in
//! order, and commits rows with the partition's position *and the lease epoch* in one
//! warehouse transaction ([`crate::outcome::Fence`]). A lease that goes away (or
//! comes back with another epoch) stops its loader; the next holder claims the
//! position row for its higher epoch at start, and from then on any commit of the old
//! holder is refused inside the transaction (rolled back). Exactly once rests on
//! that and on the position check inside every load transaction: a stalled node that
//! wakes up after losing its lease commits nothing.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tributary_eventlog::{EventLog, Lease, Ownership};

use crate::loader::Loader;
use crate::outcome::CONSUMER;

struct Running {
    lease: Lease,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Runs a loader per owned partition until `stop`; `make` builds a loader.
pub(crate) async fn supervise(
    ownership: Arc<dyn Ownership>,
    log: Arc<dyn EventLog>,
    make: impl Fn() -> Loader + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    let mut owned = ownership.owned(CONSUMER, log.partitions());
    let mut running: HashMap<u32, Running> = HashMap::new();
    let mut changes_end = false;
    loop {
        let leases = owned.borrow_and_update().clone();
        metrics::gauge!("tributary_warehouse_partitions_owned").set(leases.len() as f64);
        running.retain(|partition, r| {
            let keep = leases.contains(&r.lease);
            if !keep {
                tracing::info!(
                    partition,
                    epoch = r.lease.epoch,
                    "warehouse lease lost; stopping the partition's loader"
                );
                let _ = r.stop.send(true);
            }
            keep
        });
        for lease in &leases {
            if running.contains_key(&lease.partition) {
                continue;
            }
            tracing::info!(
                partition = lease.partition,
                epoch = lease.epoch,
                "warehouse lease won; loading the partition"
            );
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(make().for_lease(*lease).run(rx));
            running.insert(
                lease.partition,
                Running {
                    lease: *lease,
                    stop: tx,
                    task,
                },
            );
        }
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            r = owned.changed(), if !changes_end => {
                if r.is_err() {
                    changes_end = true;
                }
            }
            _ = stop.changed() => break,
        }
    }
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    for (_, r) in running {
        let _ = r.task.await;
    }
    if let Err(e) = ownership.release(CONSUMER).await {
        tracing::warn!(error = %e, "could not release the warehouse leases");
    }
}

//! Partition leases in PostgreSQL: the cluster's [`Ownership`].
//!
//! One row per `(consumer, partition)` in `<schema>.leases` names its owner node,
//! the lease's epoch and when it expires (the database's clock, never a node's).
//! Each of the three transitions is one statement, so two nodes can never both
//! believe a grant succeeded:
//! - **acquire / steal on expiry**: an `INSERT … ON CONFLICT DO UPDATE … WHERE
//!   expires_at <= now()` — a free or expired partition changes hands and its epoch
//!   goes up by one (a first grant is epoch 1), a live one is left alone;
//! - **renew**: `UPDATE … WHERE owner = me AND expires_at > now()` — only a lease
//!   that is still ours and still valid is extended; what the statement does not
//!   return is lost;
//! - **release**: the lease expires at once (`-infinity`), keeping its epoch so the
//!   next holder's epoch is higher still.
//!
//! **Fencing.** The epoch only ever increases, and every change of hands increases
//! it, so a commit made under an old epoch can be recognized and refused
//! ([`super::PgRegistry::commit`], the warehouse's own transaction).
//!
//! **A node that cannot renew stops before its lease ends.** Renewal runs every
//! `renew_interval`; when no renewal has succeeded for `lease_ttl − renew_interval`
//! (measured from before the last successful renewal was sent, so the database's
//! expiry is always later) the node drops every lease locally: its consumers stop
//! before another node may take over. [`Ownership::holds`] checks that local
//! deadline and then the row itself, so a node that was stopped (SIGSTOP) and wakes
//! after its lease expired learns it before its next send or commit.
//!
//! **Fair spread.** Every node that competes for a consumer heartbeats in
//! `<schema>.members`; a node takes at most `ceil(P / live members)` partitions of a
//! consumer and gives back (releases) what it holds above that, so a joining node
//! gets its share within a renewal or two and a dead node's share is taken once its
//! leases expire.
//!
//! Metrics: `tributary_lease_owned{consumer,partition}` (1 while held),
//! `tributary_lease_partitions_owned{consumer}`, `tributary_lease_renew_failures_total`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio::sync::{Notify, watch};
use tributary_eventlog::{Lease, LogError, Ownership};

use super::pg;

/// How leases behave (from `[cluster]`).
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// This node's id (the `owner` of its leases).
    pub node_id: String,
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
    /// How often leases are renewed (and free partitions sought).
    pub renew_interval: Duration,
}

struct Entry {
    partitions: u32,
    tx: watch::Sender<Vec<Lease>>,
    held: BTreeMap<u32, u64>,
}

struct Inner {
    pool: Pool,
    schema: String,
    settings: LeaseSettings,
    consumers: Mutex<HashMap<String, Entry>>,
    wake: Notify,
    /// Until when this node's leases are certainly still valid in the database
    /// (`None`: no successful renewal yet).
    valid_until: Mutex<Option<Instant>>,
}

/// Partition ownership by leases in the control database.
pub struct PgOwnership {
    inner: Arc<Inner>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn unavailable(e: impl std::error::Error + 'static) -> LogError {
    LogError::Unavailable(format!("control database: {}", pg::error_text(&e)))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PgOwnership {
    /// Starts competing for partitions on `pool` (tables in `schema`, migrated by
    /// the caller). Must be called inside a Tokio runtime: the renewal loop runs on
    /// it until [`PgOwnership::shutdown`] or drop.
    pub fn start(pool: Pool, schema: &str, settings: LeaseSettings) -> PgOwnership {
        let inner = Arc::new(Inner {
            pool,
            schema: format!("\"{schema}\""),
            settings,
            consumers: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            valid_until: Mutex::new(None),
        });
        let task = tokio::spawn(renew_loop(inner.clone()));
        PgOwnership {
            inner,
            task: Mutex::new(Some(task)),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.settings.node_id
    }

    /// Stops renewing without releasing anything, as a stalled node would: the
    /// leases run out in the database and other nodes take them (drills, tests).
    pub fn halt(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }

    /// Stops renewing and releases every lease this node holds (clean shutdown:
    /// other nodes take over at once instead of after the TTL).
    pub async fn shutdown(&self) {
        self.halt();
        let names: Vec<String> = {
            let mut map = self
                .inner
                .consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.drain()
                .map(|(name, e)| {
                    let _ = e.tx.send(Vec::new());
                    publish_metrics(&name, &e.held, &BTreeMap::new());
                    name
                })
                .collect()
        };
        if let Err(e) = self.inner.release_rows(None).await {
            tracing::warn!(error = %e, "cannot release leases at shutdown (they expire by themselves)");
        }
        drop(names);
    }
}

impl Drop for PgOwnership {
    fn drop(&mut self) {
        self.halt();
    }
}

#[async_trait]
impl Ownership for PgOwnership {
    fn owned(&self, consumer: &str, partitions: u32) -> watch::Receiver<Vec<Lease>> {
        let partitions = partitions.max(1);
        let mut map = self
            .inner
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let rx = match map.get_mut(consumer) {
            Some(e) => {
                e.partitions = partitions;
                e.tx.subscribe()
            }
            None => {
                let (tx, rx) = watch::channel(Vec::new());
                map.insert(
                    consumer.to_string(),
                    Entry {
                        partitions,
                        tx,
                        held: BTreeMap::new(),
                    },
                );
                rx
            }
        };
        drop(map);
        self.inner.wake.notify_one();
        rx
    }

    async fn holds(&self, consumer: &str, lease: Lease) -> Result<bool, LogError> {
        if !self.inner.locally_valid() {
            return Ok(false);
        }
        let client = self.inner.pool.get().await.map_err(unavailable)?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT 1 FROM {}.leases WHERE consumer = $1 AND partition = $2
                     AND owner = $3 AND epoch = $4 AND expires_at > clock_timestamp()",
                    self.inner.schema
                ),
                &[
                    &consumer,
                    &(lease.partition as i32),
                    &self.inner.settings.node_id,
                    &(lease.epoch as i64),
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.is_some() && self.inner.locally_valid())
    }

    async fn release(&self, consumer: &str) -> Result<(), LogError> {
        let removed = self
            .inner
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(consumer);
        if let Some(e) = removed {
            let _ = e.tx.send(Vec::new());
            publish_metrics(consumer, &e.held, &BTreeMap::new());
        }
        self.inner.release_rows(Some(consumer)).await
    }
}

impl Inner {
    fn locally_valid(&self) -> bool {
        self.valid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    /// Expires this node's leases (of one consumer, or all) and its membership.
    async fn release_rows(&self, consumer: Option<&str>) -> Result<(), LogError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let node = &self.settings.node_id;
        let s = &self.schema;
        match consumer {
            Some(c) => {
                client
                    .execute(
                        &format!(
                            "UPDATE {s}.leases SET expires_at = '-infinity'
                             WHERE consumer = $1 AND owner = $2"
                        ),
                        &[&c, node],
                    )
                    .await
                    .map_err(unavailable)?;
                client
                    .execute(
                        &format!("DELETE FROM {s}.members WHERE consumer = $1 AND node_id = $2"),
                        &[&c, node],
                    )
                    .await
                    .map_err(unavailable)?;
            }
            None => {
                client
                    .execute(
                        &format!("UPDATE {s}.leases SET expires_at = '-infinity' WHERE owner = $1"),
                        &[node],
                    )
                    .await
                    .map_err(unavailable)?;
                client
                    .execute(
                        &format!("DELETE FROM {s}.members WHERE node_id = $1"),
                        &[node],
                    )
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// Drops every lease locally (renewal failed for too long).
    fn drop_all_locally(&self) {
        let mut map = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        for (name, e) in map.iter_mut() {
            if !e.held.is_empty() {
                tracing::warn!(consumer = %name, partitions = e.held.len(),
                    "cannot renew leases: stopping their partitions before they expire");
                publish_metrics(name, &e.held, &BTreeMap::new());
                e.held.clear();
                let _ = e.tx.send(Vec::new());
            }
        }
    }

    /// One renewal round for every consumer: heartbeat, renew, give back above the
    /// fair share, take free partitions up to it.
    async fn round(&self) -> Result<(), RoundError> {
        let wanted: Vec<(String, u32)> = {
            let map = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
            map.iter().map(|(n, e)| (n.clone(), e.partitions)).collect()
        };
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| RoundError(pg::error_text(&e)))?;
        let s = &self.schema;
        let node = &self.settings.node_id;
        let ttl = secs(self.settings.ttl);
        let names: Vec<&str> = wanted.iter().map(|(n, _)| n.as_str()).collect();
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.members (consumer, node_id, seen_at)
                     SELECT c, $2, clock_timestamp() FROM unnest($1::text[]) c
                     ON CONFLICT (consumer, node_id) DO UPDATE SET seen_at = excluded.seen_at"
                ),
                &[&names, node],
            )
            .await?;
        let live: HashMap<String, i64> = client
            .query(
                &format!(
                    "SELECT consumer, count(*) FROM {s}.members
                     WHERE consumer = ANY($1) AND seen_at > clock_timestamp() - make_interval(secs => $2)
                     GROUP BY consumer"
                ),
                &[&names, &ttl],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let node_offset = stable_hash(node);
        for (consumer, partitions) in &wanted {
            let renewed: BTreeMap<u32, u64> = client
                .query(
                    &format!(
                        "UPDATE {s}.leases SET expires_at = clock_timestamp() + make_interval(secs => $3)
                         WHERE consumer = $1 AND owner = $2 AND expires_at > clock_timestamp()
                         AND partition < $4
                         RETURNING partition, epoch"
                    ),
                    &[consumer, node, &ttl, &(*partitions as i32)],
                )
                .await?
                .into_iter()
                .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1) as u64))
                .collect();
            let members = live.get(consumer).copied().unwrap_or(1).max(1) as u32;
            let share = partitions.div_ceil(members) as usize;
            let mut held = renewed;
            if held.len() > share {
                let extra: Vec<u32> = held
                    .keys()
                    .rev()
                    .take(held.len() - share)
                    .copied()
                    .collect();
                for p in &extra {
                    held.remove(p);
                }
                // Stop locally first, then let the rows go.
                self.publish(consumer, &held);
                let extra_i: Vec<i32> = extra.iter().map(|p| *p as i32).collect();
                client
                    .execute(
                        &format!(
                            "UPDATE {s}.leases SET expires_at = '-infinity'
                             WHERE consumer = $1 AND owner = $2 AND partition = ANY($3)"
                        ),
                        &[consumer, node, &extra_i],
                    )
                    .await?;
                tracing::info!(consumer = %consumer, released = ?extra, "gave back partitions above the fair share");
            } else if held.len() < share {
                let free: Vec<i32> = client
                    .query(
                        &format!(
                            "SELECT p FROM generate_series(0, $2 - 1) p WHERE NOT EXISTS (
                                SELECT 1 FROM {s}.leases l WHERE l.consumer = $1
                                AND l.partition = p AND l.expires_at > clock_timestamp())"
                        ),
                        &[consumer, &(*partitions as i32)],
                    )
                    .await?
                    .into_iter()
                    .map(|r| r.get(0))
                    .collect();
                // Nodes start looking at different partitions, so they rarely
                // race for the same row.
                let start = (node_offset % *partitions as u64) as i32;
                let mut free = free;
                free.sort_by_key(|p| (p - start).rem_euclid(*partitions as i32));
                for p in free {
                    if held.len() >= share {
                        break;
                    }
                    let got = client
                        .query_opt(
                            &format!(
                                "INSERT INTO {s}.leases AS l (consumer, partition, owner, epoch, expires_at)
                                 VALUES ($1, $2, $3, 1, clock_timestamp() + make_interval(secs => $4))
                                 ON CONFLICT (consumer, partition) DO UPDATE
                                 SET owner = excluded.owner, epoch = l.epoch + 1,
                                     expires_at = excluded.expires_at
                                 WHERE l.expires_at <= clock_timestamp()
                                 RETURNING epoch"
                            ),
                            &[consumer, &p, node, &ttl],
                        )
                        .await?;
                    if let Some(r) = got {
                        let epoch = r.get::<_, i64>(0) as u64;
                        tracing::info!(consumer = %consumer, partition = p, epoch, "lease acquired");
                        held.insert(p as u32, epoch);
                    }
                }
                self.publish(consumer, &held);
            } else {
                self.publish(consumer, &held);
            }
            // Released while this round ran: give back what the round renewed or
            // took for it, so other nodes need not wait for the TTL.
            let released = !self
                .consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(consumer);
            if released {
                client
                    .execute(
                        &format!(
                            "UPDATE {s}.leases SET expires_at = '-infinity'
                             WHERE consumer = $1 AND owner = $2"
                        ),
                        &[consumer, node],
                    )
                    .await?;
                client
                    .execute(
                        &format!("DELETE FROM {s}.members WHERE consumer = $1 AND node_id = $2"),
                        &[consumer, node],
                    )
                    .await?;
            }
        }
        // Members that stopped long ago are only clutter.
        client
            .execute(
                &format!(
                    "DELETE FROM {s}.members WHERE seen_at < clock_timestamp() - interval '1 hour'"
                ),
                &[],
            )
            .await?;
        Ok(())
    }

    /// Sends `held` to the consumer's watchers when it changed (the consumer may
    /// have been released meanwhile: then nothing is sent).
    fn publish(&self, consumer: &str, held: &BTreeMap<u32, u64>) {
        let mut map = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = map.get_mut(consumer) else {
            return;
        };
        if e.held != *held {
            publish_metrics(consumer, &e.held, held);
            e.held = held.clone();
            let leases = held
                .iter()
                .map(|(p, epoch)| Lease {
                    partition: *p,
                    epoch: *epoch,
                })
                .collect();
            let _ = e.tx.send(leases);
        }
    }
}

/// Why a renewal round failed (its text, for the log).
struct RoundError(String);

impl From<tokio_postgres::Error> for RoundError {
    fn from(e: tokio_postgres::Error) -> Self {
        RoundError(pg::error_text(&e))
    }
}

fn publish_metrics(consumer: &str, before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>) {
    for p in before.keys().filter(|p| !after.contains_key(p)) {
        metrics::gauge!("tributary_lease_owned", "consumer" => consumer.to_string(), "partition" => p.to_string())
            .set(0.0);
    }
    for p in after.keys() {
        metrics::gauge!("tributary_lease_owned", "consumer" => consumer.to_string(), "partition" => p.to_string())
            .set(1.0);
    }
    metrics::gauge!("tributary_lease_partitions_owned", "consumer" => consumer.to_string())
        .set(after.len() as f64);
}

/// FNV-1a: a hash that is the same on every node and every build.
fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

async fn renew_loop(inner: Arc<Inner>) {
    let renew = inner.settings.renew_interval;
    // Leases are dropped locally this long after the last successful renewal was
    // sent: before the database lets them expire, whatever a round is doing.
    let keep = inner.settings.ttl.saturating_sub(renew).max(renew / 2);
    loop {
        let started = Instant::now();
        let round = inner.round();
        match drop_on_deadline(&inner, round).await {
            Ok(()) => {
                *inner.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(started + keep);
                metrics::gauge!("tributary_control_postgres_up", "role" => "leases").set(1.0);
            }
            Err(RoundError(e)) => {
                tracing::warn!(error = %e, "lease renewal failed");
                metrics::counter!("tributary_lease_renew_failures_total").increment(1);
                metrics::gauge!("tributary_control_postgres_up", "role" => "leases").set(0.0);
            }
        }
        let wait = async {
            tokio::select! {
                _ = tokio::time::sleep(renew) => {}
                _ = inner.wake.notified() => {
                    // A new consumer: look for its partitions soon, without spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok(())
        };
        let _ = drop_on_deadline(&inner, wait).await;
    }
}

/// Runs `work`, dropping every lease locally the moment this node's validity
/// deadline passes meanwhile (a renewal that hangs must not outlive the lease).
async fn drop_on_deadline<F>(inner: &Inner, work: F) -> Result<(), RoundError>
where
    F: std::future::Future<Output = Result<(), RoundError>>,
{
    tokio::pin!(work);
    let mut dropped = false;
    loop {
        let deadline = *inner.valid_until.lock().unwrap_or_else(|p| p.into_inner());
        let expired = deadline.is_none_or(|d| Instant::now() >= d);
        if expired && !dropped {
            inner.drop_all_locally();
            dropped = true;
        }
        let wake_at = match deadline {
            Some(d) if !dropped => tokio::time::Instant::from_std(d),
            _ => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            r = &mut work => return r,
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_fnv1a() {
        assert_eq!(stable_hash(""), 0xcbf29ce484222325);
        assert_eq!(stable_hash("a"), 0xaf63dc4c8601ec8c);
    }
}

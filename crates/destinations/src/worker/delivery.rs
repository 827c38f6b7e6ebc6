//! Delivery of one batch: sending with retries and bisection, and recording how
//! each of its events ended.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{ABORT, DRAINING, RUNNING, Shared};
use crate::ledger::{BatchCounts, BatchKey, LetterChanges};
use crate::retry::{DeliveryError, random_unit, retry_delay};
use crate::sink::Item;
use crate::store::{BatchEnd, NewDeadLetter};

/// How long a confirmed lease check stays good for the send that follows it. A
/// check that took longer (the process was stopped, the database was slow) is made
/// again, so a node woken after losing its lease learns it before it sends.
const HOLDS_FRESH: Duration = Duration::from_secs(1);

/// How one event of a batch ended.
#[derive(Debug)]
enum Outcome {
    /// Accepted; `again` when an earlier attempt of this batch may have arrived too.
    Delivered {
        again: bool,
    },
    Skipped,
    Dead {
        attempts: u32,
        error: DeliveryError,
        first_attempt_ms: i64,
    },
}

/// A batch stopped without an outcome (the worker is stopping).
#[derive(Debug)]
struct Abandoned {
    /// Some event of it may have reached the receiver.
    maybe_delivered: bool,
}

/// What a batch saw along the way.
#[derive(Default)]
struct BatchNotes {
    last_error: Option<(String, i64)>,
}

/// Sends one batch to its end and records it; true when it ended (false when
/// abandoned because the worker is stopping).
pub(super) async fn run_batch(shared: Arc<Shared>, items: Vec<Item>) -> bool {
    let live_seqs: Vec<u64> = items.iter().filter(|i| i.live).map(Item::seq).collect();
    let key = shared.batch_key();
    let marked = !live_seqs.is_empty();
    let mut stop = shared.stop.subscribe();
    if marked && !mark_started(&shared, &key, live_seqs, &mut stop).await {
        return false;
    }
    let mut notes = BatchNotes::default();
    let outcomes = deliver(&shared, &items, &mut stop, &mut notes).await;
    match outcomes {
        Ok(outcomes) => {
            record_end(&shared, &items, outcomes, &key, marked, notes).await;
            true
        }
        Err(abandoned) => {
            if marked {
                let res = match &shared.ledger {
                    None => {
                        shared
                            .store
                            .batch_abandoned(&shared.id, key.id, abandoned.maybe_delivered)
                            .await
                    }
                    // A batch that may have arrived keeps its marker (in flight).
                    Some(_) if abandoned.maybe_delivered => Ok(()),
                    Some(ledger) => ledger.batch_abandoned(&key).await,
                };
                if let Err(e) = res {
                    tracing::warn!(destination = %shared.id, error = %e.detail(), "cannot record abandoned batch");
                }
            }
            false
        }
    }
}

/// Writes the batch's in-flight marker before anything is sent; false when the
/// batch must not be sent (the lease is no longer this worker's, or the worker is
/// stopping). Embedded, a failed write is only logged (the batch then counts as not
/// in flight after a crash, as before markers existed); in cluster mode it is retried,
/// since the next owner must see every batch that may have reached the receiver.
async fn mark_started(
    shared: &Shared,
    key: &BatchKey,
    seqs: Vec<u64>,
    stop: &mut watch::Receiver<u8>,
) -> bool {
    let Some(ledger) = &shared.ledger else {
        if let Err(e) = shared.store.batch_started(&shared.id, key.id, seqs).await {
            tracing::warn!(destination = %shared.id, error = %e.detail(), "cannot record batch start");
        }
        return true;
    };
    loop {
        match ledger.batch_started(key, &seqs).await {
            Ok(true) => return true,
            Ok(false) => {
                shared.fence("delivery marker");
                return false;
            }
            Err(e) => {
                tracing::warn!(destination = %shared.id, error = %e.detail(), "cannot record batch start; retrying before sending");
                if !shared.holds().await {
                    shared.fence("delivery marker");
                    return false;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|p| *p >= DRAINING) => return false,
                }
            }
        }
    }
}

async fn record_end(
    shared: &Shared,
    items: &[Item],
    outcomes: Vec<Outcome>,
    key: &BatchKey,
    marked: bool,
    notes: BatchNotes,
) {
    let now = Utc::now().timestamp_millis();
    let mut end = BatchEnd {
        batch_id: marked.then_some(key.id),
        error: notes.last_error,
        ..BatchEnd::default()
    };
    for (item, outcome) in items.iter().zip(outcomes) {
        match outcome {
            Outcome::Delivered { again } => {
                end.delivered += 1;
                end.redelivered += u64::from(item.maybe_dup || again);
                end.success_ms = Some(now);
                end.replayed_ok.extend(item.dead_letter_id);
                let latency = (now - item.record.received_at_ms).max(0) as f64 / 1000.0;
                metrics::histogram!("tributary_destination_delivery_latency_seconds", "destination" => shared.id.clone())
                    .record(latency);
            }
            Outcome::Skipped => {
                end.skipped += 1;
                end.replayed_ok.extend(item.dead_letter_id);
            }
            Outcome::Dead {
                attempts,
                error,
                first_attempt_ms,
            } => {
                tracing::warn!(destination = %shared.id, seq = item.seq(), message_id = %item.record.message_id,
                    attempts, error = %error, "event dead-lettered");
                end.error = Some((error.message.clone(), now));
                end.dead.push(NewDeadLetter {
                    record: item.record.clone(),
                    attempts,
                    last_status: error.status(),
                    last_response: error.response.clone(),
                    error: error.message.clone(),
                    first_attempt_ms,
                });
            }
        }
    }
    let labels = [("destination", shared.id.clone())];
    metrics::counter!("tributary_destination_delivered_total", &labels).increment(end.delivered);
    metrics::counter!("tributary_destination_dead_lettered_total", &labels)
        .increment(end.dead.len() as u64);
    metrics::counter!("tributary_destination_skipped_total", &labels).increment(end.skipped);
    let Some(ledger) = &shared.ledger else {
        if let Err(e) = shared.store.batch_finished(&shared.id, end).await {
            tracing::error!(destination = %shared.id, error = %e.detail(), "cannot record batch end; its events will count as redelivered after a restart");
        }
        return;
    };
    // Cluster mode: the marker, the counts and the dead letters go to the shared
    // ledger in one fenced statement.
    let counts = BatchCounts {
        delivered: end.delivered,
        redelivered: end.redelivered,
        skipped: end.skipped,
        success_ms: end.success_ms,
        error: end.error.clone(),
    };
    let letters = LetterChanges {
        dead: &end.dead,
        replayed_ok: &end.replayed_ok,
    };
    match ledger.batch_finished(key, marked, &counts, letters).await {
        Ok(true) => {}
        Ok(false) => shared.fence("batch end"),
        Err(e) => {
            tracing::error!(destination = %shared.id, error = %e.detail(), "cannot record batch end; the partition's next owner will send it again (counted as redelivered)");
        }
    }
}

type DeliverFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<Outcome>, Abandoned>> + Send + 'a>>;

/// Sends `items` until they end: delivered, skipped, or dead after a permanent
/// failure or the retry window. Permanent failures of several events are bisected
/// so only the poison events die. Halves go in order, keeping per-user order.
fn deliver<'a>(
    shared: &'a Shared,
    items: &'a [Item],
    stop: &'a mut watch::Receiver<u8>,
    notes: &'a mut BatchNotes,
) -> DeliverFuture<'a> {
    Box::pin(async move {
        let started = Instant::now();
        let first_attempt_ms = Utc::now().timestamp_millis();
        let n = items.len() as u64;
        let opts = &shared.options;
        let mut attempt = 0u32;
        // Some earlier attempt of this batch may have reached the receiver.
        let mut any_maybe = false;
        loop {
            if attempt > 0 && *stop.borrow() != RUNNING {
                return Err(Abandoned {
                    maybe_delivered: any_maybe,
                });
            }
            attempt += 1;
            for checks in 1.. {
                let asked = Instant::now();
                if !shared.holds().await {
                    // The lease moved: the next owner sends these.
                    return Err(Abandoned {
                        maybe_delivered: any_maybe,
                    });
                }
                // A slow answer is asked again (a stalled process learns its lease
                // expired); a database that is merely slow every time is believed.
                if shared.lease.is_none() || asked.elapsed() < HOLDS_FRESH || checks >= 5 {
                    break;
                }
            }
            let res = tokio::select! {
                r = shared.sink.send(items) => r,
                _ = stop.wait_for(|p| *p >= ABORT) => {
                    return Err(Abandoned { maybe_delivered: true });
                }
            };
            let error = match res {
                Ok(report) => {
                    let mut out: Vec<Outcome> = items
                        .iter()
                        .map(|_| Outcome::Delivered { again: any_maybe })
                        .collect();
                    for i in report.skipped {
                        if let Some(o) = out.get_mut(i) {
                            *o = Outcome::Skipped;
                        }
                    }
                    for (i, error) in report.rejected {
                        if let Some(o) = out.get_mut(i) {
                            *o = Outcome::Dead {
                                attempts: attempt,
                                error,
                                first_attempt_ms,
                            };
                        }
                    }
                    return Ok(out);
                }
                Err(e) => e,
            };
            notes.last_error = Some(shared.note_error(&error));
            if !error.is_retriable() {
                if items.len() > 1 {
                    let mid = items.len() / 2;
                    let mut first = deliver(shared, &items[..mid], stop, notes).await?;
                    let second =
                        deliver(shared, &items[mid..], stop, notes)
                            .await
                            .map_err(|_| Abandoned {
                                maybe_delivered: true,
                            })?;
                    first.extend(second);
                    if any_maybe {
                        for o in &mut first {
                            if let Outcome::Delivered { again } = o {
                                *again = true;
                            }
                        }
                    }
                    return Ok(first);
                }
                return Ok(vec![Outcome::Dead {
                    attempts: attempt,
                    error,
                    first_attempt_ms,
                }]);
            }
            metrics::counter!("tributary_destination_retries_total", "destination" => shared.id.clone())
                .increment(1);
            any_maybe |= error.maybe_delivered();
            let elapsed = started.elapsed();
            if elapsed >= opts.retry_window {
                return Ok(items
                    .iter()
                    .map(|_| Outcome::Dead {
                        attempts: attempt,
                        error: error.clone(),
                        first_attempt_ms,
                    })
                    .collect());
            }
            let delay = retry_delay(
                attempt,
                opts.retry_min_backoff,
                opts.retry_max_backoff,
                error.retry_after,
                random_unit(),
            )
            .min(opts.retry_window - elapsed);
            tracing::debug!(destination = %shared.id, attempt, delay_ms = delay.as_millis() as u64,
                error = %error, "delivery failed; retrying");
            shared.live.retrying.fetch_add(n, Ordering::Relaxed);
            let stopped = tokio::select! {
                _ = tokio::time::sleep(delay) => false,
                _ = stop.wait_for(|p| *p >= DRAINING) => true,
            };
            shared.live.retrying.fetch_sub(n, Ordering::Relaxed);
            if stopped {
                return Err(Abandoned {
                    maybe_delivered: any_maybe,
                });
            }
        }
    })
}

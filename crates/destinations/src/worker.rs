//! One destination's delivery loop: its log cursor, per-user queues, bounded
//! in-flight batches, retries and dead letters.
//!
//! **At-least-once, and why.** The worker reads the log after its committed cursor
//! (consumer `destination:<id>`) and commits only the *low watermark*: the highest
//! sequence number below which every event it accepted has ended (delivered,
//! skipped or dead-lettered). An event is never passed by the cursor before its
//! outcome is durable, so a crash can only re-send, never lose. Events that ended
//! above the watermark are recorded per batch in the engine's store (see
//! [`crate::store`]), so after a crash only the batches that were actually in flight
//! are sent again — and those are counted as `redelivered`.
//!
//! **Ordering.** Events are queued per user (userId, else anonymousId). A user with
//! a batch in flight (or in retry backoff) is *busy*: its later events wait, so one
//! user's events reach the receiver in log order, even across retries. Other users
//! keep flowing in other batches, so a hot or failing user never blocks them; a
//! user's queue holds at most [`PER_USER_QUEUE`] events in memory and the rest as
//! bare sequence numbers, re-read when their turn comes, so one user cannot fill the
//! in-memory window either.
//!
//! **Bounds.** At most [`MAX_PENDING`] events are held in memory, at most
//! `Sink::max_in_flight` requests are outstanding, and each request carries at most
//! `Sink::max_batch` events. A slow destination therefore only falls behind in the
//! log (its backlog grows); it never slows ingest or another destination, which
//! each have their own worker.
//!
//! **Retries.** A batch failing with a retriable error is retried with exponential
//! backoff and full jitter (honouring `Retry-After`) until the retry window has
//! passed since its first attempt; then its events become dead letters. A permanent
//! failure of a multi-event batch is bisected to find the poison events, which
//! become dead letters while the rest are delivered.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tributary_eventlog::{EventLog, Record};

use crate::engine::EngineOptions;
use crate::filter::Selector;
use crate::retry::{DeliveryError, random_unit, retry_delay};
use crate::sink::{Item, Sink};
use crate::store::{BatchEnd, NewDeadLetter, Recovery, Store};

/// Most events held in memory per destination (queued plus in flight).
pub(crate) const MAX_PENDING: usize = 10_000;
/// Most events of one user held in memory; later ones wait as sequence numbers.
pub(crate) const PER_USER_QUEUE: usize = 1_000;
/// Most events waiting as bare sequence numbers before reading pauses.
pub(crate) const MAX_DEFERRED: usize = 1_000_000;
/// Records per log read.
const READ_PAGE: usize = 1_000;
/// Records per re-read of deferred or replayed events.
const LOAD_CHUNK: usize = 500;
/// How often the cursor is committed.
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// How long a stopping worker lets requests already on the wire finish.
const GRACE: Duration = Duration::from_secs(5);

/// Stop phases, sent on the worker's watch channel.
pub(crate) const RUNNING: u8 = 0;
/// No new batches and no more retries; requests on the wire may finish.
pub(crate) const DRAINING: u8 = 1;
/// Abandon everything now.
pub(crate) const ABORT: u8 = 2;

/// In-memory statistics of a running worker.
#[derive(Debug, Default)]
pub(crate) struct LiveStats {
    /// Events in batches waiting for a retry.
    pub retrying: AtomicU64,
    /// Events in dispatched batches.
    pub in_flight: AtomicU64,
    /// The committed cursor.
    pub cursor: AtomicU64,
    /// The last failure seen (message, ms), before it is persisted.
    pub last_error: Mutex<Option<(String, i64)>>,
}

/// Something to re-send, queued by the engine.
#[derive(Debug)]
pub(crate) enum ReplayJob {
    /// Dead letters by id.
    DeadLetters(VecDeque<i64>),
    /// Log records by sequence number.
    Seqs(VecDeque<u64>),
}

/// Everything a worker and its batch tasks share.
pub(crate) struct Shared {
    pub id: String,
    pub consumer: String,
    pub sink: Arc<dyn Sink>,
    pub selector: Selector,
    pub options: EngineOptions,
    pub store: Store,
    pub log: Arc<dyn EventLog>,
    pub live: Arc<LiveStats>,
    pub stop: watch::Sender<u8>,
}

impl Shared {
    fn note_error(&self, e: &DeliveryError) -> (String, i64) {
        let entry = (e.message.clone(), Utc::now().timestamp_millis());
        *self
            .live
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(entry.clone());
        entry
    }
}

/// A running worker.
pub(crate) struct WorkerHandle {
    commands: mpsc::UnboundedSender<ReplayJob>,
    shared: Arc<Shared>,
    join: JoinHandle<()>,
}

impl WorkerHandle {
    /// Starts a worker for one destination.
    pub(crate) fn spawn(
        id: String,
        sink: Arc<dyn Sink>,
        selector: Selector,
        options: EngineOptions,
        store: Store,
        log: Arc<dyn EventLog>,
    ) -> WorkerHandle {
        let (stop, stop_rx) = watch::channel(RUNNING);
        let (commands, cmd_rx) = mpsc::unbounded_channel();
        let head_rx = log.subscribe();
        let shared = Arc::new(Shared {
            consumer: format!("destination:{id}"),
            id,
            sink,
            selector,
            options,
            store,
            log,
            live: Arc::new(LiveStats::default()),
            stop,
        });
        let worker = Worker {
            shared: shared.clone(),
            sched: Scheduler::default(),
            outstanding: BTreeSet::new(),
            read_pos: 0,
            committed: 0,
            recovery: Recovery::default(),
            jobs: VecDeque::new(),
            tasks: JoinSet::new(),
            inflight: HashMap::new(),
            head_rx,
            log_closed: false,
        };
        let join = tokio::spawn(worker.run(cmd_rx, stop_rx));
        WorkerHandle {
            commands,
            shared,
            join,
        }
    }

    /// Its live statistics.
    pub(crate) fn live(&self) -> &LiveStats {
        &self.shared.live
    }

    /// Queues a replay; false when the worker has stopped.
    pub(crate) fn replay(&self, job: ReplayJob) -> bool {
        self.commands.send(job).is_ok()
    }

    /// Stops gracefully: no new work, requests on the wire finish (up to a grace
    /// period), the cursor is committed.
    pub(crate) async fn stop(self) {
        self.shared.stop.send_if_modified(|p| {
            let changed = *p < DRAINING;
            *p = (*p).max(DRAINING);
            changed
        });
        let _ = self.join.await;
    }

    /// Tells the worker to abandon everything now (no waiting).
    pub(crate) fn abort(&self) {
        let _ = self.shared.stop.send_replace(ABORT);
    }
}

enum Slot {
    Ready(Item),
    /// An accepted live event not held in memory.
    Deferred {
        seq: u64,
        maybe_dup: bool,
    },
}

#[derive(Default)]
struct UserQueue {
    slots: VecDeque<Slot>,
    /// `Ready` slots in `slots`.
    loaded: usize,
    busy: bool,
}

/// Per-user queues. Invariant: a user is in `ready` iff it is not busy and its
/// queue starts with a `Ready` slot; in `needs_load` iff not busy and its queue
/// starts with a `Deferred` slot.
#[derive(Default)]
struct Scheduler {
    users: HashMap<Arc<str>, UserQueue>,
    ready: VecDeque<Arc<str>>,
    needs_load: Vec<Arc<str>>,
    /// Events in memory: queued `Ready` slots plus events in flight.
    loaded: usize,
    /// `Deferred` slots.
    deferred: usize,
}

impl Scheduler {
    fn push(&mut self, item: Item, defer_over: usize) {
        let user = item.user.clone();
        let q = self.users.entry(user.clone()).or_default();
        let was_empty = q.slots.is_empty();
        if item.live && q.loaded >= defer_over {
            q.slots.push_back(Slot::Deferred {
                seq: item.seq(),
                maybe_dup: item.maybe_dup,
            });
            self.deferred += 1;
        } else {
            q.slots.push_back(Slot::Ready(item));
            q.loaded += 1;
            self.loaded += 1;
        }
        if was_empty && !q.busy {
            match q.slots.front() {
                Some(Slot::Ready(_)) => self.ready.push_back(user),
                _ => self.needs_load.push(user),
            }
        }
    }

    /// The next batch: head events of ready users, in their order, up to the limits.
    fn next_batch(&mut self, max_events: usize, max_bytes: usize) -> Option<Vec<Item>> {
        let mut items: Vec<Item> = Vec::new();
        let mut bytes = 0usize;
        while items.len() < max_events {
            let Some(user) = self.ready.pop_front() else {
                break;
            };
            let Some(q) = self.users.get_mut(&user) else {
                continue;
            };
            if q.busy {
                continue;
            }
            let mut took = 0;
            while items.len() < max_events {
                match q.slots.front() {
                    Some(Slot::Ready(it)) => {
                        if !items.is_empty() && bytes + it.size() > max_bytes {
                            break;
                        }
                        bytes += it.size();
                        if let Some(Slot::Ready(it)) = q.slots.pop_front() {
                            items.push(it);
                        }
                        q.loaded -= 1;
                        took += 1;
                    }
                    _ => break,
                }
            }
            if took == 0 {
                match q.slots.front() {
                    Some(Slot::Deferred { .. }) => self.needs_load.push(user),
                    Some(Slot::Ready(_)) => {
                        self.ready.push_front(user);
                        break;
                    }
                    None => {
                        self.users.remove(&user);
                    }
                }
                continue;
            }
            q.busy = true;
        }
        (!items.is_empty()).then_some(items)
    }

    /// A batch of these users ended: they may go again.
    fn release(&mut self, items: &[Item]) {
        self.loaded = self.loaded.saturating_sub(items.len());
        for item in items {
            let Some(q) = self.users.get_mut(&item.user) else {
                continue;
            };
            if !q.busy {
                continue;
            }
            q.busy = false;
            match q.slots.front() {
                Some(Slot::Ready(_)) => self.ready.push_back(item.user.clone()),
                Some(Slot::Deferred { .. }) => self.needs_load.push(item.user.clone()),
                None => {
                    self.users.remove(&item.user);
                }
            }
        }
    }

    /// Puts a batch back at the front of its users' queues (after a task died).
    fn requeue(&mut self, items: Vec<Item>) {
        for item in items.into_iter().rev() {
            let q = self.users.entry(item.user.clone()).or_default();
            q.loaded += 1;
            q.slots.push_front(Slot::Ready(item));
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    sched: Scheduler,
    /// Accepted live events not yet ended (queued, deferred or in flight).
    outstanding: BTreeSet<u64>,
    /// Highest sequence number read from the log.
    read_pos: u64,
    committed: u64,
    recovery: Recovery,
    jobs: VecDeque<ReplayJob>,
    tasks: JoinSet<bool>,
    inflight: HashMap<tokio::task::Id, Vec<Item>>,
    head_rx: watch::Receiver<u64>,
    log_closed: bool,
}

impl Worker {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<ReplayJob>,
        mut stop: watch::Receiver<u8>,
    ) {
        let id = self.shared.id.clone();
        if !self.start(&mut stop).await {
            return;
        }
        tracing::info!(destination = %id, cursor = self.committed, "destination worker started");
        let mut tick = tokio::time::interval(COMMIT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *stop.borrow() != RUNNING {
                break;
            }
            self.load_deferred().await;
            self.fill_live().await;
            self.fill_replay().await;
            self.dispatch();
            let can_read = self.can_read();
            tokio::select! {
                job = commands.recv() => match job {
                    Some(job) => self.jobs.push_back(job),
                    None => break,
                },
                Some(res) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.on_task(res);
                }
                r = self.head_rx.changed(), if can_read => {
                    if r.is_err() {
                        self.log_closed = true;
                    }
                }
                _ = tick.tick() => self.commit().await,
                _ = stop.changed() => {}
            }
        }
        // Draining: requests on the wire may finish; escalate after the grace period.
        if *stop.borrow() == RUNNING {
            let _ = self.shared.stop.send_replace(DRAINING);
        }
        let deadline = tokio::time::sleep(GRACE);
        tokio::pin!(deadline);
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(res) = self.tasks.join_next_with_id() => self.on_task(res),
                _ = &mut deadline, if *stop.borrow() != ABORT => {
                    let _ = self.shared.stop.send_replace(ABORT);
                }
            }
        }
        self.commit().await;
        tracing::info!(destination = %id, cursor = self.committed, "destination worker stopped");
    }

    /// Reads the cursor and the recovery markers; false if stopped meanwhile.
    async fn start(&mut self, stop: &mut watch::Receiver<u8>) -> bool {
        loop {
            let res = self.shared.log.cursor(&self.shared.consumer).await;
            match res {
                Ok(c) => {
                    self.read_pos = c;
                    self.committed = c;
                    self.shared.live.cursor.store(c, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    tracing::warn!(destination = %self.shared.id, error = %e, "cannot read destination cursor; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return false,
                    }
                }
            }
        }
        if let Err(e) = self.shared.store.reset_replaying(&self.shared.id).await {
            tracing::warn!(destination = %self.shared.id, error = %e.detail(), "cannot reset replay flags");
        }
        match self
            .shared
            .store
            .recovery(&self.shared.id, self.committed)
            .await
        {
            Ok(r) => {
                if !r.maybe.is_empty() {
                    tracing::warn!(destination = %self.shared.id, events = r.maybe.len(),
                        "events were in flight at the last stop; re-sending them");
                }
                self.recovery = r;
            }
            Err(e) => {
                tracing::error!(destination = %self.shared.id, error = %e.detail(),
                    "cannot read delivery markers; events above the cursor will be re-sent");
            }
        }
        true
    }

    fn can_read(&self) -> bool {
        !self.log_closed && self.sched.loaded < MAX_PENDING && self.sched.deferred < MAX_DEFERRED
    }

    fn watermark(&self) -> u64 {
        match self.outstanding.first() {
            Some(s) => s - 1,
            None => self.read_pos,
        }
    }

    /// Takes one live record: skips what ended before a crash and what the
    /// filters refuse, queues the rest.
    fn accept_live(&mut self, r: Record) {
        let seq = r.seq;
        if seq > self.read_pos + 1 {
            // Sequence numbers are dense; a hole means retention removed events this
            // destination had not read yet.
            tracing::warn!(destination = %self.shared.id, from = self.read_pos + 1, to = seq - 1,
                "events left the log before this destination read them");
        }
        self.read_pos = self.read_pos.max(seq);
        if self.recovery.done.remove(&seq) {
            return;
        }
        let maybe_dup = self.recovery.maybe.remove(&seq);
        if !self
            .shared
            .selector
            .accepts_record(&r.source_id, &r.call_type, r.event.as_deref())
        {
            return;
        }
        let Some(mut item) = Item::from_record(r, true) else {
            tracing::warn!(destination = %self.shared.id, seq, "log record is not JSON; skipped");
            return;
        };
        if !self
            .shared
            .selector
            .accepts_integrations(item.integrations.as_deref())
        {
            return;
        }
        item.maybe_dup = maybe_dup;
        self.outstanding.insert(seq);
        self.sched.push(item, PER_USER_QUEUE);
    }

    async fn fill_live(&mut self) {
        while self.can_read() {
            let head = *self.head_rx.borrow_and_update();
            if self.read_pos >= head {
                break;
            }
            let room = (MAX_PENDING - self.sched.loaded).clamp(1, READ_PAGE);
            match self.shared.log.read(self.read_pos, room).await {
                Ok(records) if records.is_empty() => break,
                Ok(records) => {
                    for r in records {
                        self.accept_live(r);
                    }
                }
                Err(e) => {
                    tracing::warn!(destination = %self.shared.id, error = %e, "cannot read event log");
                    break;
                }
            }
        }
    }

    /// Re-reads deferred events of users whose turn has come.
    async fn load_deferred(&mut self) {
        let mut users = std::mem::take(&mut self.sched.needs_load).into_iter();
        while let Some(user) = users.next() {
            let wanted: Vec<(u64, bool)> = match self.sched.users.get(&user) {
                Some(q) if !q.busy => q
                    .slots
                    .iter()
                    .take(LOAD_CHUNK)
                    .map_while(|s| match s {
                        Slot::Deferred { seq, maybe_dup } => Some((*seq, *maybe_dup)),
                        Slot::Ready(_) => None,
                    })
                    .collect(),
                _ => continue,
            };
            if wanted.is_empty() {
                if let Some(q) = self.sched.users.get(&user)
                    && matches!(q.slots.front(), Some(Slot::Ready(_)))
                {
                    self.sched.ready.push_back(user);
                }
                continue;
            }
            let seqs: Vec<u64> = wanted.iter().map(|w| w.0).collect();
            let records = match self.shared.log.get(&seqs).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(destination = %self.shared.id, error = %e, "cannot re-read deferred events");
                    self.sched.needs_load.push(user);
                    self.sched.needs_load.extend(users);
                    return;
                }
            };
            let mut by_seq: HashMap<u64, Record> =
                records.into_iter().map(|r| (r.seq, r)).collect();
            let Some(q) = self.sched.users.get_mut(&user) else {
                continue;
            };
            let mut loaded = Vec::with_capacity(wanted.len());
            for (seq, maybe_dup) in &wanted {
                q.slots.pop_front();
                self.sched.deferred -= 1;
                match by_seq.remove(seq).and_then(|r| Item::from_record(r, true)) {
                    Some(mut item) => {
                        item.maybe_dup = *maybe_dup;
                        loaded.push(item);
                    }
                    None => {
                        // Gone from the log (retention) or unreadable: nothing to send.
                        tracing::warn!(destination = %self.shared.id, seq, "deferred event no longer in the log");
                        self.outstanding.remove(seq);
                    }
                }
            }
            for item in loaded.into_iter().rev() {
                q.slots.push_front(Slot::Ready(item));
                q.loaded += 1;
                self.sched.loaded += 1;
            }
            match q.slots.front() {
                Some(Slot::Ready(_)) => self.sched.ready.push_back(user),
                Some(Slot::Deferred { .. }) => self.sched.needs_load.push(user),
                None => {
                    self.sched.users.remove(&user);
                }
            }
        }
    }

    /// Loads the next chunk of queued replays when there is room.
    async fn fill_replay(&mut self) {
        while self.sched.loaded < MAX_PENDING {
            let Some(job) = self.jobs.front_mut() else {
                return;
            };
            let items: Vec<Item> = match job {
                ReplayJob::DeadLetters(ids) => {
                    let n = ids.len().min(LOAD_CHUNK);
                    let chunk: Vec<i64> = ids.drain(..n).collect();
                    match self.shared.store.dead_letter_records(chunk).await {
                        Ok(rows) => rows
                            .into_iter()
                            .filter_map(|(id, r)| {
                                let mut item = Item::from_record(r, false)?;
                                item.dead_letter_id = Some(id);
                                Some(item)
                            })
                            .collect(),
                        Err(e) => {
                            tracing::error!(destination = %self.shared.id, error = %e.detail(), "cannot load dead letters for replay");
                            Vec::new()
                        }
                    }
                }
                ReplayJob::Seqs(seqs) => {
                    let n = seqs.len().min(LOAD_CHUNK);
                    let chunk: Vec<u64> = seqs.drain(..n).collect();
                    match self.shared.log.get(&chunk).await {
                        Ok(records) => records
                            .into_iter()
                            .filter_map(|r| Item::from_record(r, false))
                            .collect(),
                        Err(e) => {
                            tracing::error!(destination = %self.shared.id, error = %e, "cannot read events for replay");
                            Vec::new()
                        }
                    }
                }
            };
            let empty = match self.jobs.front() {
                Some(ReplayJob::DeadLetters(ids)) => ids.is_empty(),
                Some(ReplayJob::Seqs(seqs)) => seqs.is_empty(),
                None => true,
            };
            if empty {
                self.jobs.pop_front();
            }
            for item in items {
                self.sched.push(item, usize::MAX);
            }
        }
    }

    fn dispatch(&mut self) {
        let sink = self.shared.sink.clone();
        while self.tasks.len() < sink.max_in_flight().max(1) {
            let Some(items) = self
                .sched
                .next_batch(sink.max_batch().max(1), sink.max_batch_bytes())
            else {
                break;
            };
            self.shared
                .live
                .in_flight
                .fetch_add(items.len() as u64, Ordering::Relaxed);
            let shared = self.shared.clone();
            let batch = items.clone();
            let handle = self.tasks.spawn(run_batch(shared, batch));
            self.inflight.insert(handle.id(), items);
        }
    }

    fn on_task(&mut self, res: Result<(tokio::task::Id, bool), tokio::task::JoinError>) {
        let (id, completed) = match res {
            Ok((id, completed)) => (id, Some(completed)),
            Err(e) => (e.id(), None),
        };
        let Some(items) = self.inflight.remove(&id) else {
            return;
        };
        self.shared
            .live
            .in_flight
            .fetch_sub(items.len() as u64, Ordering::Relaxed);
        match completed {
            Some(true) => {
                for item in items.iter().filter(|i| i.live) {
                    self.outstanding.remove(&item.seq());
                }
                self.sched.release(&items);
            }
            Some(false) => {
                // Abandoned while stopping: the events stay outstanding, so the
                // cursor does not pass them and the next start sends them again.
                self.sched.release(&items);
            }
            None => {
                tracing::error!(destination = %self.shared.id, events = items.len(),
                    "delivery task failed; re-queueing its events");
                self.sched.release(&items);
                let n = items.len();
                // `release` dropped them from the in-memory count; requeue adds them back.
                self.sched.loaded += n;
                let users: Vec<Arc<str>> = items.iter().map(|i| i.user.clone()).collect();
                self.sched.requeue(items);
                for u in users {
                    if let Some(q) = self.sched.users.get(&u)
                        && !q.busy
                        && !self.sched.ready.contains(&u)
                    {
                        self.sched.ready.push_back(u);
                    }
                }
            }
        }
    }

    async fn commit(&mut self) {
        let wm = self.watermark();
        let head = *self.head_rx.borrow();
        metrics::gauge!("tributary_destination_backlog", "destination" => self.shared.id.clone())
            .set(head.saturating_sub(wm) as f64);
        if wm <= self.committed {
            return;
        }
        match self.shared.log.commit(&self.shared.consumer, wm).await {
            Ok(()) => {
                self.committed = wm;
                self.shared.live.cursor.store(wm, Ordering::Relaxed);
                if let Err(e) = self.shared.store.prune_batches(&self.shared.id, wm).await {
                    tracing::warn!(destination = %self.shared.id, error = %e.detail(), "cannot prune delivery markers");
                }
            }
            Err(e) => {
                tracing::warn!(destination = %self.shared.id, error = %e, "cannot commit destination cursor");
            }
        }
    }
}

/// How one event of a batch ended.
#[derive(Debug)]
enum Outcome {
    Delivered,
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
async fn run_batch(shared: Arc<Shared>, items: Vec<Item>) -> bool {
    let live_seqs: Vec<u64> = items.iter().filter(|i| i.live).map(Item::seq).collect();
    let batch_id = if live_seqs.is_empty() {
        None
    } else {
        let id = shared.store.next_batch_id();
        if let Err(e) = shared.store.batch_started(&shared.id, id, live_seqs).await {
            tracing::warn!(destination = %shared.id, error = %e.detail(), "cannot record batch start");
        }
        Some(id)
    };
    let mut stop = shared.stop.subscribe();
    let mut notes = BatchNotes::default();
    let outcomes = deliver(&shared, &items, &mut stop, &mut notes).await;
    match outcomes {
        Ok(outcomes) => {
            record_end(&shared, &items, outcomes, batch_id, notes).await;
            true
        }
        Err(abandoned) => {
            if let Some(b) = batch_id
                && let Err(e) = shared
                    .store
                    .batch_abandoned(&shared.id, b, abandoned.maybe_delivered)
                    .await
            {
                tracing::warn!(destination = %shared.id, error = %e.detail(), "cannot record abandoned batch");
            }
            false
        }
    }
}

async fn record_end(
    shared: &Shared,
    items: &[Item],
    outcomes: Vec<Outcome>,
    batch_id: Option<u64>,
    notes: BatchNotes,
) {
    let now = Utc::now().timestamp_millis();
    let mut end = BatchEnd {
        batch_id,
        error: notes.last_error,
        ..BatchEnd::default()
    };
    for (item, outcome) in items.iter().zip(outcomes) {
        match outcome {
            Outcome::Delivered => {
                end.delivered += 1;
                end.redelivered += u64::from(item.maybe_dup);
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
    if let Err(e) = shared.store.batch_finished(&shared.id, end).await {
        tracing::error!(destination = %shared.id, error = %e.detail(), "cannot record batch end; its events will count as redelivered after a restart");
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
        let mut last_maybe = false;
        loop {
            if attempt > 0 && *stop.borrow() != RUNNING {
                return Err(Abandoned {
                    maybe_delivered: last_maybe,
                });
            }
            attempt += 1;
            let res = tokio::select! {
                r = shared.sink.send(items) => r,
                _ = stop.wait_for(|p| *p >= ABORT) => {
                    return Err(Abandoned { maybe_delivered: true });
                }
            };
            let error = match res {
                Ok(report) => {
                    let mut out: Vec<Outcome> = items.iter().map(|_| Outcome::Delivered).collect();
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
            last_maybe = error.maybe_delivered();
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
                    maybe_delivered: last_maybe,
                });
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(seq: u64, user: &str) -> Item {
        let payload =
            json!({"type":"track","event":"E","userId":user,"messageId":format!("m{seq}")});
        Item::from_record(
            Record {
                seq,
                source_id: "s".into(),
                message_id: format!("m{seq}"),
                call_type: "track".into(),
                event: Some("E".into()),
                received_at_ms: 0,
                payload: payload.to_string(),
            },
            true,
        )
        .unwrap()
    }

    fn seqs(items: &[Item]) -> Vec<u64> {
        items.iter().map(Item::seq).collect()
    }

    #[test]
    fn busy_user_waits_others_flow() {
        let mut s = Scheduler::default();
        for (seq, u) in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "c")] {
            s.push(item(seq, u), PER_USER_QUEUE);
        }
        let b1 = s.next_batch(2, usize::MAX).unwrap();
        assert_eq!(seqs(&b1), vec![1, 2], "a's head events, in order");
        let b2 = s.next_batch(10, usize::MAX).unwrap();
        assert_eq!(seqs(&b2), vec![3, 5], "a is busy; b and c flow");
        assert!(s.next_batch(10, usize::MAX).is_none());
        s.release(&b1);
        let b3 = s.next_batch(10, usize::MAX).unwrap();
        assert_eq!(seqs(&b3), vec![4]);
        s.release(&b2);
        s.release(&b3);
        assert!(s.users.is_empty());
        assert_eq!(s.loaded, 0);
    }

    #[test]
    fn byte_limit_keeps_at_least_one_event() {
        let mut s = Scheduler::default();
        s.push(item(1, "a"), PER_USER_QUEUE);
        s.push(item(2, "b"), PER_USER_QUEUE);
        let b = s.next_batch(10, 1).unwrap();
        assert_eq!(seqs(&b), vec![1]);
        let b = s.next_batch(10, 1).unwrap();
        assert_eq!(seqs(&b), vec![2]);
    }

    #[test]
    fn hot_user_overflow_is_deferred() {
        let mut s = Scheduler::default();
        for seq in 1..=5 {
            s.push(item(seq, "hot"), 2);
        }
        assert_eq!(s.loaded, 2);
        assert_eq!(s.deferred, 3);
        let b = s.next_batch(10, usize::MAX).unwrap();
        assert_eq!(seqs(&b), vec![1, 2]);
        s.release(&b);
        assert_eq!(s.needs_load.len(), 1, "deferred head must be re-read");
        assert!(s.ready.is_empty());
    }
}

//! The syncers: the fsync that makes committed groups durable, off the writer's
//! thread, and the answers to their callers once it returned.
//!
//! The writer commits each group with `synchronous=NORMAL` (SQLite writes the WAL
//! frames but does not fsync them) and hands the group's answers here; a syncer
//! takes every group waiting, calls `fdatasync` on the WAL file, and only then
//! answers them and advances the log's head. A group is handed over only after its
//! commit's writes returned, so the `fdatasync` that a syncer starts afterwards
//! covers it: every caller is still answered only once its records are on disk.
//!
//! Why: with the fsync inside `COMMIT` the writer sat idle for the whole fsync and
//! requests arriving meanwhile waited for the next group's commit *and* fsync. Now
//! the writer commits the next group while the fsync runs, and [`SYNCERS`] fsyncs
//! may be in flight at once: on the bench machine's virtio disk one `fdatasync` at a
//! time took 4 ms, two overlapping ones 0.2–0.4 ms each.
//!
//! The head (what readers and consumers may see) only ever moves to the last seq of
//! a synced group, so nothing that a crash could still take back is read by a
//! consumer. Syncers can finish out of order; the head is the highest synced
//! group's last seq, which is safe because that fsync started after every earlier
//! group was written.
//!
//! A failed fsync leaves the WAL's pages in an unknown state (Linux may have dropped
//! them as clean), so the log stops: that group and every later append is answered
//! `Unavailable` until the server restarts and reads back what is really on disk.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use crate::{AppendStatus, LogError};

/// Why appends are refused after a failed fsync.
pub(super) const FAILED: &str = "an fsync of the event log failed; restart the server";

/// Syncer threads, so this many fsyncs can overlap.
pub(super) const SYNCERS: usize = 2;

/// One caller's answer, sent once its group is durable.
pub(super) enum Answer {
    Append(
        oneshot::Sender<Result<Vec<AppendStatus>, LogError>>,
        Vec<AppendStatus>,
    ),
    Consumer(oneshot::Sender<Result<(), LogError>>),
}

impl Answer {
    pub(super) fn fail(self, why: &str) {
        match self {
            Answer::Append(reply, _) => {
                let _ = reply.send(Err(LogError::Unavailable(why.to_string())));
            }
            Answer::Consumer(reply) => {
                let _ = reply.send(Err(LogError::Unavailable(why.to_string())));
            }
        }
    }

    fn succeed(self) {
        match self {
            Answer::Append(reply, statuses) => {
                let _ = reply.send(Ok(statuses));
            }
            Answer::Consumer(reply) => {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

/// A committed group waiting for its fsync.
pub(super) struct Committed {
    pub(super) answers: Vec<Answer>,
    /// The log's last seq after this group.
    pub(super) last_seq: u64,
}

#[derive(Default)]
struct Queue {
    groups: Vec<Committed>,
    closed: bool,
}

/// The writer's side: hand committed groups over, learn whether the log failed.
pub(super) struct Syncers {
    shared: Arc<Shared>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    failed: AtomicBool,
}

impl Syncers {
    /// Starts [`SYNCERS`] threads that fsync `wal` and publish synced seqs to `head`.
    pub(super) fn start(wal: File, head: watch::Sender<u64>) -> std::io::Result<Syncers> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            failed: AtomicBool::new(false),
        });
        let wal = Arc::new(wal);
        let head = Arc::new(head);
        let mut handles = Vec::with_capacity(SYNCERS);
        for i in 0..SYNCERS {
            let (shared, wal, head) = (shared.clone(), wal.clone(), head.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("eventlog-sync-{i}"))
                    .spawn(move || sync_loop(&shared, &wal, &head))?,
            );
        }
        Ok(Syncers { shared, handles })
    }

    /// True once an fsync failed: nothing more may be acknowledged.
    pub(super) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// Queues a committed group for the next fsync.
    pub(super) fn push(&self, group: Committed) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.groups.push(group);
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Answers everything queued (after its fsync) and stops the threads.
    pub(super) fn stop(self) {
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.closed = true;
        }
        self.shared.ready.notify_all();
        for h in self.handles {
            let _ = h.join();
        }
    }
}

fn sync_loop(shared: &Shared, wal: &File, head: &watch::Sender<u64>) {
    loop {
        let groups = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            while q.groups.is_empty() && !q.closed {
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.groups.is_empty() {
                return;
            }
            std::mem::take(&mut q.groups)
        };
        let started = Instant::now();
        let result = if shared.failed.load(Ordering::Acquire) {
            Err(FAILED.to_string())
        } else {
            wal.sync_data().map_err(|e| {
                shared.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "fsync of the event log's WAL failed; the log refuses appends until restarted");
                format!("fsync of the event log failed: {e}")
            })
        };
        metrics::histogram!("tributary_log_fsync_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                let last = groups.iter().map(|g| g.last_seq).max().unwrap_or(0);
                head.send_if_modified(|h| {
                    let newer = last > *h;
                    if newer {
                        *h = last;
                    }
                    newer
                });
                for answer in groups.into_iter().flat_map(|g| g.answers) {
                    answer.succeed();
                }
            }
            Err(e) => {
                for answer in groups.into_iter().flat_map(|g| g.answers) {
                    answer.fail(&e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(
        last_seq: u64,
    ) -> (
        Committed,
        oneshot::Receiver<Result<Vec<AppendStatus>, LogError>>,
    ) {
        let (reply, rx) = oneshot::channel();
        let answer = Answer::Append(reply, vec![AppendStatus::Stored(last_seq)]);
        (
            Committed {
                answers: vec![answer],
                last_seq,
            },
            rx,
        )
    }

    #[tokio::test]
    async fn groups_are_answered_after_their_fsync_and_the_head_only_moves_forward() {
        let dir = tempfile::tempdir().unwrap();
        let wal = File::create(dir.path().join("log-wal")).unwrap();
        let (head_tx, head) = watch::channel(0u64);
        let syncers = Syncers::start(wal, head_tx).unwrap();
        let mut waiting = Vec::new();
        for seq in 1..=50 {
            let (g, rx) = group(seq);
            syncers.push(g);
            waiting.push((seq, rx));
        }
        for (seq, rx) in waiting {
            let statuses = rx.await.expect("answered").expect("synced");
            assert_eq!(statuses, vec![AppendStatus::Stored(seq)]);
            // Answered means synced, and the head covers it.
            assert!(*head.borrow() >= seq, "head {} < {seq}", *head.borrow());
        }
        assert_eq!(*head.borrow(), 50);
        // A group whose last seq is below the head (an older group finishing late)
        // never moves the head back.
        let (g, rx) = group(10);
        syncers.push(g);
        rx.await.unwrap().unwrap();
        assert_eq!(*head.borrow(), 50);
        assert!(!syncers.failed());
        syncers.stop();
    }

    #[tokio::test]
    async fn a_failed_fsync_refuses_that_group_and_every_later_one() {
        // fsync of a pipe fails (EINVAL): what a broken disk looks like to a syncer.
        let (_read, write) = std::io::pipe().unwrap();
        let wal = File::from(std::os::fd::OwnedFd::from(write));
        let (head_tx, head) = watch::channel(0u64);
        let syncers = Syncers::start(wal, head_tx).unwrap();
        let (g, rx) = group(1);
        syncers.push(g);
        let err = rx
            .await
            .unwrap()
            .expect_err("not durable, not acknowledged");
        assert!(err.to_string().contains("fsync"), "{err}");
        assert!(syncers.failed());
        let (g, rx) = group(2);
        syncers.push(g);
        assert!(rx.await.unwrap().is_err());
        assert_eq!(*head.borrow(), 0, "nothing unsynced becomes readable");
        syncers.stop();
    }

    #[tokio::test]
    async fn stop_answers_what_was_queued() {
        let dir = tempfile::tempdir().unwrap();
        let wal = File::create(dir.path().join("log-wal")).unwrap();
        let (head_tx, _head) = watch::channel(0u64);
        let syncers = Syncers::start(wal, head_tx).unwrap();
        let mut waiting = Vec::new();
        for seq in 1..=20 {
            let (g, rx) = group(seq);
            syncers.push(g);
            waiting.push(rx);
        }
        syncers.stop();
        for rx in waiting {
            assert!(rx.await.unwrap().is_ok());
        }
    }
}

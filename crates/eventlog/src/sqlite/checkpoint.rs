//! The checkpointer: a thread that copies the WAL into the database beside the
//! writer (`PASSIVE`, so it never blocks it; `RESTART` when the WAL grows large).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::unavailable;
use crate::LogError;

/// The thread that checkpoints the WAL beside the writer.
pub(super) struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    handle: std::thread::JoinHandle<()>,
}

/// WAL frames (pages) beyond which the WAL should start over from its beginning:
/// 64 MiB at 4 KiB pages. Under continuous writes a checkpoint on another thread
/// never catches up with the newest frame, and SQLite restarts the WAL only when a
/// write transaction begins with every frame copied; so past this size the writer
/// runs one `PASSIVE` checkpoint itself between two groups (cheap: the checkpointer
/// has copied all but the last group). Past four times this size the checkpointer
/// waits for readers (`RESTART`).
pub(super) const WAL_RESTART_FRAMES: i64 = 16 * 1024;

impl Checkpointer {
    /// Starts the thread; it publishes the WAL's size in frames to `wal_frames`.
    pub(super) fn start(
        path: &Path,
        interval: Duration,
        wal_frames: Arc<AtomicI64>,
    ) -> Result<Checkpointer, LogError> {
        let conn = Connection::open(path).map_err(unavailable)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("eventlog-checkpoint".into())
            .spawn(move || {
                // Runs until told to stop or the log is dropped.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(interval)
                {
                    let started = Instant::now();
                    let checkpoint = |mode: &str| {
                        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                            r.get::<_, i64>(1)
                        })
                    };
                    let result = checkpoint("PASSIVE").and_then(|frames| {
                        if frames >= 4 * WAL_RESTART_FRAMES {
                            checkpoint("RESTART")?;
                        }
                        Ok(frames)
                    });
                    match result {
                        Ok(frames) => {
                            wal_frames.store(frames, Ordering::Relaxed);
                            if frames > 0 {
                                metrics::histogram!("tributary_log_checkpoint_seconds")
                                    .record(started.elapsed().as_secs_f64());
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "event log checkpoint failed"),
                    }
                }
            })
            .map_err(unavailable)?;
        Ok(Checkpointer { stop, handle })
    }

    pub(super) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}

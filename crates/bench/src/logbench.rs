//! The `log` bench: the embedded event log alone, in process, without HTTP — its
//! ceiling, and how it depends on the shape of the load.
//!
//! `concurrency` tasks each append `records` records per call, back to back, for a
//! fixed time, through [`SqliteLog`] exactly as ingest does (one writer thread, group
//! commit, `synchronous=FULL`). Message ids are either `random` (like the UUIDs
//! Segment SDKs send: every insert lands on a random leaf of the dedupe index) or
//! `sequential` (every insert lands on the index's rightmost leaf), which isolates the
//! cost of the `(source_id, message_id)` unique index. The log writes into a
//! temporary directory that is removed afterwards.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tributary_eventlog::{EventLog, NewRecord, SqliteLog, SqliteLogConfig};

use crate::load::Percentiles;
use crate::machine;

/// How message ids are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ids {
    /// Pseudo-random 128-bit hex ids (SDK-like).
    Random,
    /// Increasing ids.
    Sequential,
}

/// Options of the `log` bench.
#[derive(Debug, Clone)]
pub struct Options {
    /// Concurrent appending tasks.
    pub concurrency: usize,
    /// Records per append call.
    pub records: usize,
    /// Payload bytes per record.
    pub payload_bytes: usize,
    /// Measured time.
    pub duration: Duration,
    /// Message id shape.
    pub ids: Ids,
    /// Where the temporary log goes.
    pub tmp_dir: PathBuf,
}

/// splitmix64: a tiny, good-enough generator for ids.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs the bench and returns its report as JSON.
pub async fn run(opts: Options) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::Builder::new()
        .prefix("tributary-logbench-")
        .tempdir_in(&opts.tmp_dir)?;
    let log = Arc::new(
        SqliteLog::open(SqliteLogConfig {
            path: dir.path().join("events.db"),
            ..Default::default()
        })
        .await?,
    );
    let payload = format!(
        "{{\"type\":\"track\",\"event\":\"Order Completed\",\"properties\":{{\"note\":\"{}\"}}}}",
        "x".repeat(opts.payload_bytes.saturating_sub(64))
    );
    let payload = Arc::new(payload);
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + opts.duration;
    let io0 = machine::write_bytes("self");
    let cpu0 = machine::thread_cpu_secs("self");
    let self0 = machine::process_cpu_secs("self");
    let (busy0, steal0) = machine::machine_cpu_secs();
    let mut tasks = Vec::new();
    for _ in 0..opts.concurrency {
        let log = log.clone();
        let payload = payload.clone();
        let counter = counter.clone();
        let o = opts.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut stored = 0u64;
            while Instant::now() < end {
                let batch: Vec<NewRecord> = (0..o.records)
                    .map(|_| {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        let message_id = match o.ids {
                            Ids::Random => format!("{:016x}{:016x}", mix(n), mix(!n)),
                            Ids::Sequential => format!("{n:032}"),
                        };
                        NewRecord {
                            source_id: "src_bench0000000000000000".into(),
                            message_id,
                            call_type: tributary_eventlog::CallType::Track,
                            event: Some("Order Completed".into()),
                            user_id: Some(format!("user-{}", n % 10_000)),
                            anonymous_id: None,
                            received_at_ms: 1_700_000_000_000,
                            payload: payload.as_str().to_owned(),
                        }
                    })
                    .collect();
                let t = Instant::now();
                match log.append(batch).await {
                    Ok(st) => {
                        stored += st.len() as u64;
                        lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                    Err(e) => return Err(anyhow::anyhow!("append: {e}")),
                }
            }
            Ok::<_, anyhow::Error>((stored, lat))
        }));
    }
    let mut stored = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (s, l) = t.await??;
        stored += s;
        lat.extend(l);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = machine::thread_cpu_secs("self");
    let (busy1, steal1) = machine::machine_cpu_secs();
    let self_cores = (machine::process_cpu_secs("self") - self0) / secs;
    let other_cores = ((busy1 - busy0 - (steal1 - steal0)) / secs - self_cores).max(0.0);
    let writer_cores = (cpu1.get("eventlog-writer").copied().unwrap_or(0.0)
        - cpu0.get("eventlog-writer").copied().unwrap_or(0.0))
        / secs;
    let io = match (io0, machine::write_bytes("self")) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / secs),
        _ => None,
    };
    let appends = lat.len();
    let p = Percentiles::of(&mut lat);
    log.close().await;
    let db_bytes: u64 = ["events.db", "events.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.path().join(f)).ok())
        .map(|m| m.len())
        .sum();
    Ok(json!({
        "options": {
            "concurrency": opts.concurrency,
            "records_per_append": opts.records,
            "payload_bytes": payload.len(),
            "ids": format!("{:?}", opts.ids).to_lowercase(),
            "seconds": secs,
        },
        "records_per_sec": stored as f64 / secs,
        "appends_per_sec": appends as f64 / secs,
        "append_latency": p.to_json(),
        "writer_thread_cores": writer_cores,
        "process_cores": self_cores,
        "other_cores": other_cores,
        "disk_write_bytes_per_sec": io,
        "disk_write_bytes_per_record": io.map(|b| b * secs / stored.max(1) as f64),
        "db_bytes_per_record": db_bytes as f64 / stored.max(1) as f64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_do_not_collide_early() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..10_000u64 {
            assert!(seen.insert(format!("{:016x}{:016x}", mix(n), mix(!n))));
        }
    }
}

//! Load generation: closed loop (maximum throughput) and open loop (fixed rate, for
//! latency), over the raw keep-alive client of [`crate::http`].
//!
//! Closed loop: `connections` workers, each sending its next request as soon as the
//! previous one is answered, for `warmup + duration`. Throughput counts responses that
//! completed inside the measured window (after the warm-up); every response of the
//! phase, warm-up and tail included, is counted in [`Counts`] so the bench can compare
//! what the server acknowledged with what it stored.
//!
//! Open loop: request `i` is due at `start + i / rate`, whatever happened to earlier
//! requests; `connections` workers take due requests in order. Latency is reported two
//! ways: service time (from the write of the request to the end of its response) and
//! from the schedule (which also charges the time a request waited for a free
//! connection, i.e. corrected for coordinated omission). tokio's timer has 1 ms
//! resolution, so requests leave in small bursts and the schedule-based figure carries
//! up to ~1 ms of timer slack.
//!
//! No request is abandoned at the end of a phase: a worker stops taking new requests
//! when the window closes and waits (bounded by the request timeout) for the one in
//! flight, so the counts are exact unless a request failed at the transport level.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::http::Conn;
use crate::payload::Template;

/// The exact body of a plain success.
const SUCCESS: &[u8] = br#"{"success":true}"#;

/// What one phase sent and got back.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Requests answered 200.
    pub ok: u64,
    /// Events in requests answered 200, less those the answer says were duplicates or
    /// rejected: what the server says it stored.
    pub ok_events: u64,
    /// Answers other than 200, by status.
    pub statuses: BTreeMap<u16, u64>,
    /// 200s whose body was not a plain `{"success":true}`.
    pub partial: u64,
    /// Requests that failed at the transport level (connect, I/O, timeout); the
    /// server may or may not have stored them.
    pub errors: u64,
    /// Events in requests that failed at the transport level.
    pub error_events: u64,
    /// The first transport error or non-200 body seen.
    pub first_problem: Option<String>,
}

impl Counts {
    fn merge(&mut self, o: Counts) {
        self.ok += o.ok;
        self.ok_events += o.ok_events;
        for (s, n) in o.statuses {
            *self.statuses.entry(s).or_insert(0) += n;
        }
        self.partial += o.partial;
        self.errors += o.errors;
        self.error_events += o.error_events;
        if self.first_problem.is_none() {
            self.first_problem = o.first_problem;
        }
    }

    /// Non-200 answers.
    pub fn non_ok(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "ok": self.ok,
            "ok_events": self.ok_events,
            "statuses": self.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "partial": self.partial,
            "errors": self.errors,
            "error_events": self.error_events,
            "first_problem": self.first_problem,
        })
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// From latencies in microseconds (sorted in place).
    pub fn of(us: &mut [u32]) -> Percentiles {
        if us.is_empty() {
            return Percentiles::default();
        }
        us.sort_unstable();
        let at = |q: f64| {
            let i = ((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1;
            f64::from(us[i]) / 1000.0
        };
        Percentiles {
            n: us.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: f64::from(us[us.len() - 1]) / 1000.0,
        }
    }

    /// JSON form (milliseconds).
    pub fn to_json(self) -> Value {
        json!({"n": self.n, "p50_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99,
               "p999_ms": self.p999, "max_ms": self.max})
    }
}

/// The result of one load phase.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Everything in the phase (warm-up and tail included).
    pub total: Counts,
    /// 200s completed inside the measured window.
    pub window_ok: u64,
    /// Events of the 200s completed inside the measured window.
    pub window_events: u64,
    /// Length of the measured window.
    pub window: Duration,
    /// Service latency of 200s in the window.
    pub service: Percentiles,
    /// Latency from the schedule (open loop only).
    pub scheduled: Option<Percentiles>,
    /// Requests that left more than 5 ms after they were due (open loop only).
    pub late: u64,
}

impl LoadResult {
    /// Requests answered 200 per second inside the window.
    pub fn requests_per_sec(&self) -> f64 {
        self.window_ok as f64 / self.window.as_secs_f64()
    }

    /// Events acknowledged per second inside the window.
    pub fn events_per_sec(&self) -> f64 {
        self.window_events as f64 / self.window.as_secs_f64()
    }
}

/// How a phase is driven.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Concurrent connections.
    pub connections: usize,
    /// Unmeasured warm-up.
    pub warmup: Duration,
    /// Measured window.
    pub duration: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Open loop at this many requests per second; closed loop when `None`.
    pub rate: Option<f64>,
}

struct WorkerOut {
    counts: Counts,
    window_ok: u64,
    window_events: u64,
    service_us: Vec<u32>,
    scheduled_us: Vec<u32>,
    late: u64,
}

/// Runs one phase against `addr`; `first_conn` offsets the connections' id ranges so
/// that several phases with the same template never reuse an id.
pub async fn run(
    addr: SocketAddr,
    template: Arc<Template>,
    shape: Shape,
    first_conn: u64,
) -> LoadResult {
    run_spread(&[addr], template, shape, first_conn).await
}

/// [`run`] against several servers: connection `c` talks to `addrs[c % addrs.len()]`
/// (the open loop's schedule is shared, so the requests spread evenly too). Every
/// server must accept the template's write key.
pub async fn run_spread(
    addrs: &[SocketAddr],
    template: Arc<Template>,
    shape: Shape,
    first_conn: u64,
) -> LoadResult {
    assert!(!addrs.is_empty(), "run_spread needs at least one server");
    let begin = Instant::now();
    let window_start = begin + shape.warmup;
    let window_end = window_start + shape.duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(shape.connections);
    for c in 0..shape.connections {
        let template = template.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(worker(
            addrs[c % addrs.len()],
            template,
            shape,
            first_conn + c as u64,
            (begin, window_start, window_end),
            next,
        )));
    }
    let mut result = LoadResult {
        window: shape.duration,
        ..Default::default()
    };
    let mut service = Vec::new();
    let mut scheduled = Vec::new();
    for t in tasks {
        if let Ok(out) = t.await {
            result.total.merge(out.counts);
            result.window_ok += out.window_ok;
            result.window_events += out.window_events;
            result.late += out.late;
            service.extend(out.service_us);
            scheduled.extend(out.scheduled_us);
        }
    }
    result.service = Percentiles::of(&mut service);
    if shape.rate.is_some() {
        result.scheduled = Some(Percentiles::of(&mut scheduled));
    }
    result
}

async fn worker(
    addr: SocketAddr,
    template: Arc<Template>,
    shape: Shape,
    conn_id: u64,
    (begin, window_start, window_end): (Instant, Instant, Instant),
    next: Arc<AtomicU64>,
) -> WorkerOut {
    let mut generator = template.generator(conn_id);
    let mut out = WorkerOut {
        counts: Counts::default(),
        window_ok: 0,
        window_events: 0,
        service_us: Vec::new(),
        scheduled_us: Vec::new(),
        late: 0,
    };
    let interval = shape.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut conn: Option<Conn> = None;
    loop {
        // When is the next request due?
        let due = match interval {
            None => {
                let now = Instant::now();
                if now >= window_end {
                    break;
                }
                now
            }
            Some(iv) => {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let due = begin + iv.mul_f64(i as f64);
                if due >= window_end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                due
            }
        };
        if conn.as_ref().is_none_or(|c| c.closed) {
            match Conn::connect(addr).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    out.counts.errors += 1;
                    out.counts.error_events += template.events;
                    out.counts
                        .first_problem
                        .get_or_insert_with(|| format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let request = generator.next_request();
        let sent = Instant::now();
        if interval.is_some() && sent.duration_since(due) > Duration::from_millis(5) {
            out.late += 1;
        }
        let answer = tokio::time::timeout(shape.timeout, c.roundtrip(request)).await;
        let done = Instant::now();
        let in_window = done >= window_start && done < window_end;
        let in_window_scheduled = due >= window_start;
        match answer {
            Ok(Ok(resp)) if resp.status == 200 => {
                let stored = if resp.body == SUCCESS {
                    template.events
                } else {
                    out.counts.partial += 1;
                    out.counts.first_problem.get_or_insert_with(|| {
                        format!("200 with body {}", String::from_utf8_lossy(resp.body))
                    });
                    template.events.saturating_sub(not_stored(resp.body))
                };
                out.counts.ok += 1;
                out.counts.ok_events += stored;
                let counted = if interval.is_some() {
                    in_window_scheduled
                } else {
                    in_window
                };
                if counted {
                    out.window_ok += 1;
                    out.window_events += stored;
                    out.service_us.push(micros(done - sent));
                    if interval.is_some() {
                        out.scheduled_us.push(micros(done - due));
                    }
                }
            }
            Ok(Ok(resp)) => {
                *out.counts.statuses.entry(resp.status).or_insert(0) += 1;
                let status = resp.status;
                let body = String::from_utf8_lossy(resp.body).into_owned();
                out.counts
                    .first_problem
                    .get_or_insert_with(|| format!("{status}: {body}"));
                if status == 429 || status == 503 {
                    // Back off briefly, as a client honouring Retry-After would.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok(Err(e)) => {
                out.counts.errors += 1;
                out.counts.error_events += template.events;
                out.counts
                    .first_problem
                    .get_or_insert_with(|| format!("I/O: {e}"));
                conn = None;
            }
            Err(_) => {
                out.counts.errors += 1;
                out.counts.error_events += template.events;
                out.counts
                    .first_problem
                    .get_or_insert_with(|| format!("timeout after {:?}", shape.timeout));
                conn = None;
            }
        }
    }
    out
}

/// Duplicates plus rejected messages named in a 200 answer.
fn not_stored(body: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    let dups = v["duplicates"].as_u64().unwrap_or(0);
    let rejected = v["rejected"].as_array().map_or(0, |a| a.len() as u64);
    dups + rejected
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let mut v: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!(p.n, 1000);
        assert_eq!(p.p50, 500.0);
        assert_eq!(p.p99, 990.0);
        assert_eq!(p.max, 1000.0);
        assert_eq!(Percentiles::of(&mut []).n, 0);
    }

    #[test]
    fn counts_what_a_partial_answer_did_not_store() {
        assert_eq!(not_stored(br#"{"success":true,"duplicates":3}"#), 3);
        assert_eq!(
            not_stored(br#"{"success":true,"rejected":[{"index":1},{"index":4}]}"#),
            2
        );
        assert_eq!(not_stored(b"nonsense"), 0);
    }
}

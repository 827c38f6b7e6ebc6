//! Request templates: each load is one prebuilt HTTP request whose ids are patched in
//! place before every send, so generating load costs a memcpy-free digit rewrite, not
//! JSON serialization.
//!
//! Invariant: every request sent by any connection of any phase carries distinct
//! event ids — `messageId`s for the Tracking API, `contact[id]` for ActiveCampaign
//! webhooks (whose `messageId` is a hash that includes it) — so the server's dedupe
//! never collapses two bench events and "events acknowledged" must equal "events
//! stored". Each id is built from a counter `n = connection × 10^12 + sequence`:
//! `messageId`s are `bench-<run>-<phase>-<16 hex digits>` where the digits are
//! `n` scrambled by a bijection (so ids are unique but land at random places in the
//! log's dedupe index, like the UUIDs Segment SDKs send) or, with
//! [`Ids::Sequential`], `n` in decimal (every connection appends to its own region
//! of the index, which flatters the log); `contact[id]` is `<run><n in decimal>`.

use std::sync::Arc;

use serde_json::{Value, json};

/// Width of the decimal counter patched into each placeholder.
const DIGITS: usize = 16;
/// The placeholder for a decimal counter (never appears in real content).
const MARK: &str = "@@@@@@@@@@@@@@@@";
/// The placeholder for a scrambled hex counter.
const MARK_HEX: &str = "################";

/// How `messageId`s of Tracking API loads are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ids {
    /// Scrambled: unique, uniformly spread (SDK-like).
    Random,
    /// Increasing per connection.
    Sequential,
}
/// Ids of connection `c` start at `c × STRIDE`.
const STRIDE: u64 = 1_000_000_000_000;

/// A prebuilt request with placeholders for per-event ids.
pub struct Template {
    bytes: Vec<u8>,
    /// `(offset, event index within the request, scrambled hex?)` of each placeholder.
    slots: Vec<(usize, u64, bool)>,
    /// Events one request carries.
    pub events: u64,
    /// Size of the request body in bytes.
    pub body_bytes: usize,
}

/// The per-connection request generator of a [`Template`].
pub struct Generator {
    buf: Vec<u8>,
    template: Arc<Template>,
    next: u64,
}

impl Template {
    /// Builds a template from the request head (without `Content-Length`) and body;
    /// each event of the body has `marks_per_event` placeholders.
    fn new(head: String, body: String, events: u64, marks_per_event: usize) -> Template {
        let head = format!("{head}Content-Length: {}\r\n\r\n", body.len());
        let mut bytes = head.into_bytes();
        let body_start = bytes.len();
        bytes.extend_from_slice(body.as_bytes());
        let mut slots = Vec::new();
        let mut pos = body_start;
        loop {
            let dec = find(&bytes[pos..], MARK.as_bytes());
            let hex = find(&bytes[pos..], MARK_HEX.as_bytes());
            let (i, is_hex) = match (dec, hex) {
                (Some(d), Some(h)) if h < d => (h, true),
                (Some(d), _) => (d, false),
                (None, Some(h)) => (h, true),
                (None, None) => break,
            };
            let at = pos + i;
            slots.push((at, (slots.len() / marks_per_event) as u64, is_hex));
            pos = at + DIGITS;
        }
        assert_eq!(
            slots.len() as u64,
            events * marks_per_event as u64,
            "template placeholders"
        );
        Template {
            bytes,
            slots,
            events,
            body_bytes: body.len(),
        }
    }

    /// A generator for connection `conn`, whose ids do not overlap any other's.
    pub fn generator(self: &Arc<Self>, conn: u64) -> Generator {
        Generator {
            buf: self.bytes.clone(),
            template: self.clone(),
            next: conn * STRIDE,
        }
    }
}

impl Generator {
    /// The next request, with fresh ids.
    pub fn next_request(&mut self) -> &[u8] {
        for &(at, k, hex) in &self.template.slots {
            let out = &mut self.buf[at..at + DIGITS];
            if hex {
                write_hex(out, scramble(self.next + k));
            } else {
                write_digits(out, self.next + k);
            }
        }
        self.next += self.template.events;
        &self.buf
    }
}

fn write_digits(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn write_hex(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = b"0123456789abcdef"[(v & 15) as usize];
        v >>= 4;
    }
}

/// The splitmix64 finalizer: a bijection on `u64`, so distinct counters give
/// distinct, well-spread ids.
fn scramble(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn tracking_head(addr: &str, path: &str, write_key: &str) -> String {
    let auth = base64_encode(format!("{write_key}:").as_bytes());
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nUser-Agent: tributary-bench\r\n"
    )
}

/// One track event of about `size` bytes of JSON with a placeholder `messageId`.
fn track_event(run: &str, phase: &str, ids: Ids, timestamp: &str, size: usize) -> Value {
    let mark = match ids {
        Ids::Random => MARK_HEX,
        Ids::Sequential => MARK,
    };
    let mut event = json!({
        "type": "track",
        "event": "Order Completed",
        "userId": "user-1042",
        "messageId": format!("bench-{run}-{phase}-{mark}"),
        "timestamp": timestamp,
        "properties": {
            "order_id": "ord-50314",
            "revenue": 42.5,
            "currency": "USD",
            "coupon": "SPRING",
            "products": [{"sku": "SKU-1", "price": 19.99, "quantity": 2}],
        },
        "context": {
            "library": {"name": "analytics-node", "version": "2.1.0"},
            "ip": "203.0.113.7",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
            "page": {"path": "/checkout"},
        },
    });
    let len = event.to_string().len();
    let pad_overhead = r#","note":"""#.len();
    if len + pad_overhead < size {
        event["properties"]["note"] = Value::String("x".repeat(size - len - pad_overhead));
    }
    event
}

/// What the ids and timestamps of a phase's template are made of.
#[derive(Debug, Clone)]
pub struct Run {
    /// Distinguishes bench runs.
    pub id: String,
    /// Distinguishes phases of a run.
    pub phase: String,
    /// `messageId` shape.
    pub ids: Ids,
    /// `timestamp` and `sentAt` of the events.
    pub now: String,
}

/// `POST /v1/batch` with `events` track events of about `event_bytes` each.
pub fn batch(addr: &str, write_key: &str, run: &Run, events: u64, event_bytes: usize) -> Template {
    let one = track_event(&run.id, &run.phase, run.ids, &run.now, event_bytes);
    let body = json!({
        "batch": (0..events).map(|_| one.clone()).collect::<Vec<_>>(),
        "sentAt": run.now,
    })
    .to_string();
    Template::new(tracking_head(addr, "/v1/batch", write_key), body, events, 1)
}

/// `POST /v1/track` with one event of about `event_bytes`.
pub fn track(addr: &str, write_key: &str, run: &Run, event_bytes: usize) -> Template {
    let mut event = track_event(&run.id, &run.phase, run.ids, &run.now, event_bytes);
    if let Value::Object(m) = &mut event {
        m.remove("type");
        m.insert("sentAt".into(), Value::String(run.now.clone()));
    }
    Template::new(
        tracking_head(addr, "/v1/track", write_key),
        event.to_string(),
        1,
        1,
    )
}

/// `POST /v1/webhooks/activecampaign?writeKey=…` with an `open` webhook shaped like
/// ActiveCampaign's (the `open.form` fixture); `contact[id]` and the contact's email
/// are per event, so each request is a distinct event.
pub fn webhook(addr: &str, write_key: &str, run: &str) -> Template {
    let body = format!(
        "type=open&date_time=2024-02-28T07%3A04%3A13-06%3A00&initiated_from=public&initiated_by=public\
         &list=3&campaign%5Bid%5D=42&campaign%5Bname%5D=March+newsletter&campaign%5Bstatus%5D=5\
         &campaign%5Btype%5D=single&campaign%5Bmessage%5D%5Bid%5D=17\
         &campaign%5Bmessage%5D%5Bsubject%5D=Spring+is+here\
         &contact%5Bid%5D={run}{MARK}&contact%5Bemail%5D=c{MARK}%40example.com\
         &contact%5Bfirst_name%5D=Ann&contact%5Blast_name%5D=Lee&contact%5Bphone%5D=\
         &contact%5Btags%5D=vip%2C+beta&contact%5Borgname%5D=&contact%5Bip%5D=0.0.0.0\
         &contact%5Bfields%5D%5B32%5D=2024-12-31"
    );
    let head = format!(
        "POST /v1/webhooks/activecampaign?writeKey={write_key} HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nUser-Agent: ActiveCampaign/1.0\r\n"
    );
    Template::new(head, body, 1, 2)
}

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// RFC 3339 UTC timestamp (millisecond precision) for seconds since the Unix epoch.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(phase: &str, ids: Ids) -> Run {
        Run {
            id: "r1".into(),
            phase: phase.into(),
            ids,
            now: "2025-01-01T00:00:00.000Z".into(),
        }
    }

    fn body(req: &[u8]) -> &str {
        let s = std::str::from_utf8(req).unwrap();
        s.split_once("\r\n\r\n").unwrap().1
    }

    #[test]
    fn batch_events_are_the_asked_size() {
        for ids in [Ids::Random, Ids::Sequential] {
            let e = track_event("12345678", "b", ids, "2025-01-01T00:00:00.000Z", 500);
            assert_eq!(e.to_string().len(), 500);
        }
    }

    #[test]
    fn batch_ids_are_distinct_across_requests_and_connections() {
        for ids in [Ids::Random, Ids::Sequential] {
            batch_ids_are_distinct(ids);
        }
    }

    fn batch_ids_are_distinct(ids: Ids) {
        let t = Arc::new(batch("h", "k", &run("b", ids), 100, 500));
        let mut seen = std::collections::HashSet::new();
        for conn in 0..3 {
            let mut g = t.generator(conn);
            for _ in 0..3 {
                let req = g.next_request().to_vec();
                let v: Value = serde_json::from_str(body(&req)).unwrap();
                let batch = v["batch"].as_array().unwrap();
                assert_eq!(batch.len(), 100);
                for e in batch {
                    assert!(seen.insert(e["messageId"].as_str().unwrap().to_string()));
                }
            }
        }
        assert_eq!(seen.len(), 900);
    }

    #[test]
    fn track_event_is_about_the_asked_size_and_content_length_is_right() {
        let t = Arc::new(track("h", "k", &run("t", Ids::Sequential), 500));
        assert!((480..=540).contains(&t.body_bytes), "{}", t.body_bytes);
        let req = t.generator(7).next_request().to_vec();
        let text = std::str::from_utf8(&req).unwrap();
        assert!(text.contains(&format!("Content-Length: {}\r\n", body(&req).len())));
        let v: Value = serde_json::from_str(body(&req)).unwrap();
        assert_eq!(v["messageId"], "bench-r1-t-0007000000000000");
        let t = Arc::new(track("h", "k", &run("t", Ids::Random), 500));
        let req = t.generator(7).next_request().to_vec();
        let v: Value = serde_json::from_str(body(&req)).unwrap();
        let id = v["messageId"].as_str().unwrap();
        assert_eq!(id.len(), "bench-r1-t-".len() + 16);
        assert_ne!(id, "bench-r1-t-0007000000000000");
    }

    #[test]
    fn webhook_varies_contact_id_and_email_together() {
        let t = Arc::new(webhook("h", "k", "9"));
        let mut g = t.generator(1);
        let a = g.next_request().to_vec();
        let b = g.next_request().to_vec();
        assert!(
            body(&a).contains(
                "contact%5Bid%5D=90001000000000000&contact%5Bemail%5D=c0001000000000000%40"
            )
        );
        assert!(body(&b).contains("contact%5Bid%5D=90001000000000001&"));
    }

    #[test]
    fn encodes_base64_and_timestamps() {
        assert_eq!(base64_encode(b"abc123:"), "YWJjMTIzOg==");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_709_125_453_123), "2024-02-28T13:04:13.123Z");
    }
}

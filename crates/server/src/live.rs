//! The live event bus behind the debugger: every message ingest accepted, every
//! message it rejected (with its reason) and every ActiveCampaign webhook of a type
//! we do not map, as it happens, to whoever watches.
//!
//! Nothing here is durable, and nothing here is on the path of an acknowledgement:
//! entries are published after the log said the messages are durable (accepted) or
//! after the refusal was decided (rejected, unmapped), and a slow or absent watcher
//! never holds ingest up (a [`broadcast`] channel drops the oldest entries for a
//! receiver that lags; it is told how many it missed). The durable record of an
//! event stays the log; the debugger's "fate" of one event reads the stores
//! ([`crate::fate`]).
//!
//! Cost: when nobody watches (no receiver, and the last one left more than
//! [`LINGER`] ago), [`Live::watched`] is two atomic loads and ingest builds no entry
//! and allocates nothing for the bus. While someone watches, one append is one
//! entry of the bus ([`LiveBatch`]): per message, ingest adds a copy of the JSON
//! text it already encoded for the log and the row's few fields, never a clone of
//! the message's `Value`; then one lock, one `Arc` and one channel send per batch.
//! The SSE text of a batch is encoded once, by the first watcher that sends it, and
//! shared by every other watcher (`Bytes`), so ten watchers cost one encoding and
//! ten socket writes per batch.
//!
//! Resume: messages carry increasing ids (from 1, per process; a batch's are
//! consecutive). The newest batches holding [`RING`] messages are kept, so a client that reconnects with `Last-Event-ID`
//! gets what it missed ([`Live::subscribe_after`]). The ring keeps filling for
//! [`LINGER`] after the last watcher left, so a reconnect in that window loses
//! nothing; ids restart with the process, and an id above the newest known one
//! (a previous process) replays the whole ring.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

/// Messages kept for replay (`Last-Event-ID`): the ring holds the newest batches
/// with at least this many messages.
pub const RING: usize = 1000;
/// Capacity of the broadcast channel, in batches, before a receiver lags (bounds
/// what one slow watcher keeps alive: at most this many appends' messages).
const CHANNEL: usize = 64;
/// How long the ring keeps filling after the last watcher left.
pub const LINGER: Duration = Duration::from_secs(30);

/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveKind {
    /// Stored durably in the log (also a duplicate the log already had).
    Accepted,
    /// Refused by validation; `reason` says why.
    Rejected,
    /// An ActiveCampaign webhook of a type Tributary does not map (acknowledged,
    /// not loaded).
    Unmapped,
}

impl LiveKind {
    /// `accepted`, `rejected` or `unmapped`.
    pub fn as_str(self) -> &'static str {
        match self {
            LiveKind::Accepted => "accepted",
            LiveKind::Rejected => "rejected",
            LiveKind::Unmapped => "unmapped",
        }
    }
}

/// Why a message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveReason {
    /// The reason code answered to the client (e.g. `missing_event`).
    pub code: String,
    /// The explanation answered to the client.
    pub message: String,
}

/// One message of a [`LiveBatch`]: what the debugger's row shows, and its JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveItem {
    /// Track event name, page/screen name, or the ActiveCampaign type of an
    /// unmapped webhook.
    pub event: Option<String>,
    /// `track`, `identify`, … when known.
    pub call_type: Option<String>,
    /// Its `messageId` (accepted messages; rejected ones when they carried one).
    pub message_id: Option<String>,
    /// `userId`, when set.
    pub user_id: Option<String>,
    /// `anonymousId`, when set.
    pub anonymous_id: Option<String>,
    /// The recipient's email (`context.traits.email`, `traits.email` or
    /// `properties.email`), when the message has one.
    pub email: Option<String>,
    /// Why it was rejected (rejected entries only).
    pub reason: Option<LiveReason>,
    /// The normalized Segment JSON (accepted), the message as sent when it could be
    /// read (rejected), or the webhook's fields (unmapped).
    #[serde(skip)]
    pub body: LiveBody,
}

/// The JSON of a [`LiveItem`].
#[derive(Debug, Clone, PartialEq)]
pub enum LiveBody {
    /// Already serialized (accepted messages: the text the log stored, so ingest
    /// encodes nothing twice).
    Text(String),
    /// A value, encoded when the batch's frames are built.
    Value(Value),
}

impl LiveBody {
    /// The body as a value (tests, and callers that want to look inside).
    pub fn to_value(&self) -> Value {
        match self {
            LiveBody::Text(t) => serde_json::from_str(t).unwrap_or(Value::Null),
            LiveBody::Value(v) => v.clone(),
        }
    }
}

/// One entry of the live bus: the messages one append (or one refusal) produced,
/// all of one source and one kind, with consecutive ids from `first_id`. Ingest
/// publishes one of these per request, not one per message; the SSE text of the
/// whole batch is encoded once, on first use by a watcher (not on the ingest
/// path), and shared by every watcher ([`LiveBatch::frames`]).
#[derive(Debug)]
pub struct LiveBatch {
    /// The id of `items[0]`; item `i` has id `first_id + i`.
    pub first_id: u64,
    /// The source the messages arrived on.
    pub source_id: String,
    /// Accepted, rejected or unmapped.
    pub kind: LiveKind,
    /// When the server received them.
    pub at: DateTime<Utc>,
    /// The messages, in order.
    pub items: Vec<LiveItem>,
    frames: OnceLock<Frames>,
}

/// The SSE text of a batch: every item's event, back to back, and where each ends.
#[derive(Debug)]
struct Frames {
    text: bytes::Bytes,
    ends: Vec<usize>,
}

/// The JSON of one entry as the stream sends it (`body` appended as raw text).
#[derive(Serialize)]
struct Head<'a> {
    id: u64,
    source_id: &'a str,
    kind: LiveKind,
    at: &'a str,
    #[serde(flatten)]
    item: &'a LiveItem,
}

impl LiveBatch {
    /// The id of the last item.
    pub fn last_id(&self) -> u64 {
        self.first_id + self.items.len().saturating_sub(1) as u64
    }

    /// Item `i` as the JSON object the stream sends (tests and tools).
    pub fn json(&self, i: usize) -> Value {
        let f = self.frames();
        let start = if i == 0 { 0 } else { f.ends[i - 1] };
        let frame = std::str::from_utf8(&f.text[start..f.ends[i]]).unwrap_or_default();
        frame
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or(Value::Null)
    }

    fn frames(&self) -> &Frames {
        self.frames.get_or_init(|| {
            use std::io::Write as _;
            let at = serde_json::to_string(&self.at).unwrap_or_else(|_| "\"\"".into());
            let at = at.trim_matches('"');
            let mut out: Vec<u8> = Vec::with_capacity(self.items.len() * 1024);
            let mut ends = Vec::with_capacity(self.items.len());
            for (i, item) in self.items.iter().enumerate() {
                let id = self.first_id + i as u64;
                let _ = write!(out, "id: {id}\nevent: {}\ndata: ", self.kind.as_str());
                let head = Head {
                    id,
                    source_id: &self.source_id,
                    kind: self.kind,
                    at,
                    item,
                };
                // `{…}` of the fields, then `,"body":` and the body's text inside the
                // same object. Compact JSON has no line breaks: one `data:` line.
                let _ = serde_json::to_writer(&mut out, &head);
                out.pop();
                out.extend_from_slice(b",\"body\":");
                match &item.body {
                    LiveBody::Text(t) => out.extend_from_slice(t.as_bytes()),
                    LiveBody::Value(v) => {
                        let _ = serde_json::to_writer(&mut out, v);
                    }
                }
                out.extend_from_slice(b"}\n\n");
                ends.push(out.len());
            }
            Frames {
                text: out.into(),
                ends,
            }
        })
    }

    /// The SSE text of the items with an id above `after` (shared, not copied).
    fn text_after(&self, after: u64) -> bytes::Bytes {
        let f = self.frames();
        if after < self.first_id {
            return f.text.clone();
        }
        let skip = (after - self.first_id + 1) as usize;
        match skip.checked_sub(1).and_then(|k| f.ends.get(k)) {
            Some(&start) => f.text.slice(start..),
            None => bytes::Bytes::new(),
        }
    }
}

/// The fields of a single entry (a rejected message, an unmapped webhook);
/// [`Live::publish`] adds the id.
#[derive(Debug, Clone)]
pub struct NewLiveEvent {
    /// See [`LiveBatch::source_id`].
    pub source_id: String,
    /// See [`LiveBatch::kind`].
    pub kind: LiveKind,
    /// See [`LiveBatch::at`].
    pub at: DateTime<Utc>,
    /// See [`LiveItem::event`].
    pub event: Option<String>,
    /// See [`LiveItem::call_type`].
    pub call_type: Option<String>,
    /// See [`LiveItem::message_id`].
    pub message_id: Option<String>,
    /// See [`LiveItem::user_id`].
    pub user_id: Option<String>,
    /// See [`LiveItem::anonymous_id`].
    pub anonymous_id: Option<String>,
    /// See [`LiveItem::email`].
    pub email: Option<String>,
    /// See [`LiveItem::reason`].
    pub reason: Option<LiveReason>,
    /// See [`LiveItem::body`].
    pub body: Value,
}

impl NewLiveEvent {
    /// An entry for a message body: event, call type, ids and email read from it.
    pub fn from_body(source_id: &str, kind: LiveKind, at: DateTime<Utc>, body: Value) -> Self {
        let s = |k: &str| {
            body.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let call_type = s("type");
        let event = s("event").or_else(|| s("name"));
        let message_id = s("messageId");
        let user_id = s("userId");
        let anonymous_id = s("anonymousId");
        let email = body.as_object().and_then(email_of);
        NewLiveEvent {
            source_id: source_id.to_string(),
            kind,
            at,
            event,
            call_type,
            message_id,
            user_id,
            anonymous_id,
            email,
            reason: None,
            body,
        }
    }
}

/// The recipient's email of a message, where Segment's email spec and identify
/// calls put it.
pub fn email_of(m: &Map<String, Value>) -> Option<String> {
    let at = |outer: &str, key: &str| {
        m.get(outer)
            .and_then(Value::as_object)
            .and_then(|o| o.get(key))
    };
    [
        m.get("context")
            .and_then(Value::as_object)
            .and_then(|c| c.get("traits"))
            .and_then(Value::as_object)
            .and_then(|t| t.get("email")),
        at("traits", "email"),
        at("properties", "email"),
    ]
    .into_iter()
    .flatten()
    .find_map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
}

/// The in-process live bus (`state.live`).
pub struct Live {
    tx: broadcast::Sender<Arc<LiveBatch>>,
    /// The newest batches, holding at least [`RING`] messages when there are.
    ring: Mutex<Ring>,
    next_id: AtomicU64,
    epoch: Instant,
    /// Milliseconds since `epoch` until which the ring keeps filling without
    /// receivers.
    linger_until_ms: AtomicU64,
}

#[derive(Default)]
struct Ring {
    batches: VecDeque<Arc<LiveBatch>>,
    items: usize,
}

impl Default for Live {
    fn default() -> Self {
        Live::new()
    }
}

impl Live {
    /// An empty bus.
    pub fn new() -> Live {
        let (tx, _) = broadcast::channel(CHANNEL);
        Live {
            tx,
            ring: Mutex::new(Ring::default()),
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
            linger_until_ms: AtomicU64::new(0),
        }
    }

    /// Whether an entry published now would reach anyone (a receiver, or the ring
    /// within [`LINGER`] of the last watcher). Ingest checks this before building
    /// an entry, so the bus costs nothing when nobody watches.
    #[inline]
    pub fn watched(&self) -> bool {
        if self.tx.receiver_count() > 0 {
            return true;
        }
        let until = self.linger_until_ms.load(Ordering::Relaxed);
        until != 0 && (self.epoch.elapsed().as_millis() as u64) < until
    }

    /// Keeps the ring filling for [`LINGER`] from now. [`Live::publish`] calls it
    /// while someone watches, so a watcher that leaves can reconnect and resume.
    pub fn linger(&self) {
        let until = self.epoch.elapsed().as_millis() as u64 + LINGER.as_millis() as u64;
        self.linger_until_ms.store(until, Ordering::Relaxed);
    }

    /// Publishes a single entry (a no-op when nobody watches); returns its id.
    pub fn publish(&self, e: NewLiveEvent) -> Option<u64> {
        let item = LiveItem {
            event: e.event,
            call_type: e.call_type,
            message_id: e.message_id,
            user_id: e.user_id,
            anonymous_id: e.anonymous_id,
            email: e.email,
            reason: e.reason,
            body: LiveBody::Value(e.body),
        };
        self.publish_batch(&e.source_id, e.kind, e.at, vec![item])
    }

    /// Publishes the messages of one append as one entry of the bus (a no-op when
    /// nobody watches, or `items` is empty); returns the first id. The cost on the
    /// caller's thread is one lock, one `Arc` and one channel send per batch.
    pub fn publish_batch(
        &self,
        source_id: &str,
        kind: LiveKind,
        at: DateTime<Utc>,
        items: Vec<LiveItem>,
    ) -> Option<u64> {
        if items.is_empty() {
            return None;
        }
        if self.tx.receiver_count() > 0 {
            // While someone watches, keep the window open for their reconnect.
            self.linger();
        } else if !self.watched() {
            return None;
        }
        let n = items.len();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        // Ids are taken under the ring's lock, so the ring is in id order.
        let first_id = self.next_id.fetch_add(n as u64, Ordering::Relaxed);
        let entry = Arc::new(LiveBatch {
            first_id,
            source_id: source_id.to_string(),
            kind,
            at,
            items,
            frames: OnceLock::new(),
        });
        ring.items += n;
        ring.batches.push_back(entry.clone());
        while let Some(front) = ring.batches.front() {
            let len = front.items.len();
            if ring.items - len < RING {
                break;
            }
            ring.items -= len;
            ring.batches.pop_front();
        }
        let _ = self.tx.send(entry);
        drop(ring);
        Some(first_id)
    }

    /// The ring's batches with an item after `last_id` (all of them when `None`,
    /// or when `last_id` is not an id of this process) and a receiver of
    /// everything after them. Batches are shared, not copied; the first may start
    /// at or before `last_id` (the stream skips those items).
    pub fn subscribe_after(
        &self,
        last_id: Option<u64>,
    ) -> (Vec<Arc<LiveBatch>>, broadcast::Receiver<Arc<LiveBatch>>) {
        self.linger();
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        // Subscribing under the lock: nothing is published between the copy and
        // the receiver, so nothing is missed or seen twice.
        let rx = self.tx.subscribe();
        let after = self.resume_point(last_id);
        let past = ring
            .batches
            .iter()
            .filter(|b| b.last_id() > after)
            .cloned()
            .collect();
        (past, rx)
    }

    /// The id after which a stream resumes: `last_id` when this process gave it,
    /// else 0 (everything the ring holds).
    fn resume_point(&self, last_id: Option<u64>) -> u64 {
        let newest = self.next_id.load(Ordering::Relaxed).saturating_sub(1);
        match last_id {
            Some(id) if id <= newest => id,
            _ => 0,
        }
    }

    /// How many receivers are subscribed.
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// Keep-alive comments of the SSE stream are sent this often.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The `Last-Event-ID` header as an id (`None` when absent or not a number).
pub fn last_event_id(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The live stream of one source as a `text/event-stream` response, resuming
/// after `last_id` (the client's `Last-Event-ID`): first what the ring holds after
/// it, then every new entry, with a `: keep-alive` comment after [`KEEP_ALIVE`]
/// without entries. Each batch of the bus goes out as its shared, once-encoded
/// SSE text (a batch of 500 messages is one buffer for every watcher, not 500
/// encodings per watcher), so a watcher's cost is a source comparison and a
/// write per batch. A client that falls more than the channel's capacity behind
/// gets a comment saying how many batches it missed; it never holds ingest up. The
/// stream ends when the server shuts down, so it never holds a graceful shutdown
/// up. Used by the API route and by the console's.
pub fn sse(
    state: &crate::AppState,
    source_id: &str,
    last_id: Option<u64>,
) -> axum::response::Response {
    use futures::StreamExt as _;
    let after = state.live.resume_point(last_id);
    let (past, rx) = state.live.subscribe_after(last_id);
    let source = source_id.to_string();
    let mut first: Vec<bytes::Bytes> = past
        .iter()
        .filter(|b| b.source_id == source)
        .map(|b| b.text_after(after))
        .collect();
    // An opening comment, so clients (and proxies) see the stream start at once.
    first.push(bytes::Bytes::from_static(b": stream open\n\n"));
    let shutdown = state.shutdown.clone();
    let guard = WatcherGauge::new();
    let live = futures::stream::unfold(
        (rx, shutdown, source, guard),
        |(mut rx, shutdown, source, guard)| async move {
            loop {
                let next = tokio::select! {
                    r = tokio::time::timeout(KEEP_ALIVE, rx.recv()) => r,
                    _ = shutdown.wait() => return None,
                };
                let chunk = match next {
                    Err(_) => bytes::Bytes::from_static(b": keep-alive\n\n"),
                    Ok(Ok(b)) if b.source_id == source => b.text_after(0),
                    Ok(Ok(_)) => continue,
                    Ok(Err(broadcast::error::RecvError::Lagged(k))) => {
                        bytes::Bytes::from(format!(": missed {k} batches of entries\n\n"))
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                };
                let chunk: Result<bytes::Bytes, std::convert::Infallible> = Ok(chunk);
                return Some((chunk, (rx, shutdown, source, guard)));
            }
        },
    );
    let stream =
        futures::stream::iter(first.into_iter().map(Ok::<_, std::convert::Infallible>)).chain(live);
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        // Proxies (nginx) must not buffer the stream.
        .header("x-accel-buffering", "no")
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_default()
}

/// `tributary_live_watchers`: open live streams, counted up when a stream starts
/// and down when it ends (the client left, or shutdown).
struct WatcherGauge;

impl WatcherGauge {
    fn new() -> WatcherGauge {
        metrics::gauge!("tributary_live_watchers").increment(1.0);
        WatcherGauge
    }
}

impl Drop for WatcherGauge {
    fn drop(&mut self) {
        metrics::gauge!("tributary_live_watchers").decrement(1.0);
    }
}

/// `GET /api/v1/sources/{id}/events/stream`: the source's live events as
/// `text/event-stream` (bearer auth like the rest of `/api/v1`).
pub async fn api_stream(
    axum::extract::State(state): axum::extract::State<Arc<crate::AppState>>,
    crate::error::Checked(axum::extract::Path(id)): crate::error::Checked<
        axum::extract::Path<String>,
    >,
    headers: axum::http::HeaderMap,
) -> Result<axum::response::Response, crate::error::ApiError> {
    if state.control.source(&id).is_none() {
        return Err(crate::error::ApiError::NotFound(format!(
            "no source with id {id:?}"
        )));
    }
    Ok(sse(&state, &id, last_event_id(&headers)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(source: &str) -> NewLiveEvent {
        NewLiveEvent::from_body(
            source,
            LiveKind::Accepted,
            Utc::now(),
            json!({"type": "track", "event": "Email Opened", "messageId": "m1",
                   "anonymousId": "a@example.com",
                   "context": {"traits": {"email": "a@example.com"}}}),
        )
    }

    fn text_item(n: usize) -> LiveItem {
        LiveItem {
            event: Some("Signed Up".into()),
            call_type: Some("track".into()),
            message_id: Some(format!("m{n}")),
            user_id: Some("u\"1".into()),
            anonymous_id: None,
            email: None,
            reason: None,
            body: LiveBody::Text(format!(r#"{{"messageId":"m{n}","type":"track"}}"#)),
        }
    }

    #[test]
    fn nothing_is_kept_when_nobody_watches() {
        let live = Live::new();
        assert!(!live.watched());
        assert_eq!(live.publish(entry("s")), None);
        assert_eq!(
            live.publish_batch("s", LiveKind::Accepted, Utc::now(), vec![text_item(1)]),
            None
        );
        assert_eq!(live.watchers(), 0);
    }

    #[tokio::test]
    async fn replays_after_the_last_seen_id() {
        let live = Live::new();
        let (_, mut rx) = live.subscribe_after(None);
        let a = live.publish(entry("s")).unwrap();
        let b = live.publish(entry("s")).unwrap();
        assert_eq!(rx.recv().await.unwrap().first_id, a);
        assert_eq!(rx.recv().await.unwrap().first_id, b);
        let (past, _) = live.subscribe_after(Some(a));
        assert_eq!(past.iter().map(|e| e.first_id).collect::<Vec<_>>(), vec![b]);
        // An id this process never gave (a restart): the whole ring.
        let (past, _) = live.subscribe_after(Some(999));
        assert_eq!(past.len(), 2);
        let e = &past[0];
        assert_eq!(e.items[0].email.as_deref(), Some("a@example.com"));
        assert_eq!(e.items[0].event.as_deref(), Some("Email Opened"));
        assert_eq!(e.items[0].call_type.as_deref(), Some("track"));
        let v = e.json(0);
        assert_eq!(v["id"], a);
        assert_eq!(v["kind"], "accepted");
        assert_eq!(v["body"]["messageId"], "m1");
    }

    #[test]
    fn a_batch_is_one_entry_with_consecutive_ids_and_one_shared_text() {
        let live = Live::new();
        let _rx = live.subscribe_after(None);
        let first = live
            .publish_batch(
                "s",
                LiveKind::Accepted,
                Utc::now(),
                (0..3).map(text_item).collect(),
            )
            .unwrap();
        let (past, _) = live.subscribe_after(None);
        assert_eq!(past.len(), 1, "one entry for the whole append");
        let b = &past[0];
        assert_eq!(b.last_id(), first + 2);
        for i in 0..3 {
            let v = b.json(i);
            assert_eq!(v["id"], first + i as u64);
            assert_eq!(v["source_id"], "s");
            assert_eq!(v["message_id"], format!("m{i}"));
            assert_eq!(v["user_id"], "u\"1", "fields are escaped");
            assert_eq!(v["body"]["messageId"], format!("m{i}"), "raw body inside");
            assert!(v["reason"].is_null());
        }
        // Every watcher gets the same buffer, not a copy.
        let t1 = b.text_after(0);
        let t2 = b.text_after(0);
        assert_eq!(t1.as_ptr(), t2.as_ptr());
        // A resume inside the batch sends the items after the id only.
        let rest = String::from_utf8(b.text_after(first).to_vec()).unwrap();
        assert!(rest.starts_with(&format!("id: {}\n", first + 1)), "{rest}");
        assert_eq!(rest.matches("\n\n").count(), 2);
        assert!(b.text_after(first + 2).is_empty());
    }

    #[test]
    fn keeps_filling_the_ring_while_a_watcher_may_reconnect() {
        let live = Live::new();
        {
            let _rx = live.subscribe_after(None);
        }
        assert!(live.watched());
        assert!(live.publish(entry("s")).is_some());
    }

    #[test]
    fn the_ring_is_bounded() {
        let live = Live::new();
        let _rx = live.subscribe_after(None);
        for _ in 0..RING + 5 {
            live.publish(entry("s"));
        }
        let (past, _) = live.subscribe_after(None);
        assert_eq!(past.len(), RING);
        assert_eq!(past[0].first_id, 6);
        for _ in 0..10 {
            live.publish_batch(
                "s",
                LiveKind::Accepted,
                Utc::now(),
                (0..300).map(text_item).collect(),
            );
        }
        let (past, _) = live.subscribe_after(None);
        let kept: usize = past.iter().map(|b| b.items.len()).sum();
        assert!((RING..RING + 300).contains(&kept), "{kept} messages kept");
    }
}

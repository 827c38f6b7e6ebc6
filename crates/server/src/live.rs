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
//! and allocates nothing for the bus. While someone watches, each entry is built once
//! and shared (`Arc`) by every receiver and the ring.
//!
//! Resume: entries carry increasing ids (from 1, per process). The newest
//! [`RING`] entries are kept, so a client that reconnects with `Last-Event-ID`
//! gets what it missed ([`Live::subscribe_after`]). The ring keeps filling for
//! [`LINGER`] after the last watcher left, so a reconnect in that window loses
//! nothing; ids restart with the process, and an id above the newest known one
//! (a previous process) replays the whole ring.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

/// Entries kept for replay (`Last-Event-ID`).
pub const RING: usize = 1000;
/// Capacity of the broadcast channel per receiver before it lags.
const CHANNEL: usize = 1024;
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

/// One entry of the live stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveEvent {
    /// Increasing per process, from 1; the SSE `id:`.
    pub id: u64,
    /// The source it arrived on.
    pub source_id: String,
    /// Accepted, rejected or unmapped.
    pub kind: LiveKind,
    /// When the server received it.
    pub at: DateTime<Utc>,
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
    #[serde(serialize_with = "serialize_arc")]
    pub body: Arc<Value>,
    /// This entry as JSON, encoded once for every watcher ([`LiveEvent::json`]).
    #[serde(skip)]
    json: std::sync::OnceLock<Arc<str>>,
}

impl LiveEvent {
    /// This entry as compact JSON; encoded on first use and shared by every
    /// watcher after that, so ten watchers cost one encoding, not ten.
    pub fn json(&self) -> Arc<str> {
        self.json
            .get_or_init(|| {
                serde_json::to_string(self)
                    .unwrap_or_else(|_| "{}".into())
                    .into()
            })
            .clone()
    }
}

fn serialize_arc<S: serde::Serializer>(v: &Arc<Value>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().serialize(s)
}

/// The fields of an entry; [`Live::publish`] adds the id.
#[derive(Debug, Clone)]
pub struct NewLiveEvent {
    /// See [`LiveEvent::source_id`].
    pub source_id: String,
    /// See [`LiveEvent::kind`].
    pub kind: LiveKind,
    /// See [`LiveEvent::at`].
    pub at: DateTime<Utc>,
    /// See [`LiveEvent::event`].
    pub event: Option<String>,
    /// See [`LiveEvent::call_type`].
    pub call_type: Option<String>,
    /// See [`LiveEvent::message_id`].
    pub message_id: Option<String>,
    /// See [`LiveEvent::user_id`].
    pub user_id: Option<String>,
    /// See [`LiveEvent::anonymous_id`].
    pub anonymous_id: Option<String>,
    /// See [`LiveEvent::email`].
    pub email: Option<String>,
    /// See [`LiveEvent::reason`].
    pub reason: Option<LiveReason>,
    /// See [`LiveEvent::body`].
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
    tx: broadcast::Sender<Arc<LiveEvent>>,
    ring: Mutex<VecDeque<Arc<LiveEvent>>>,
    next_id: AtomicU64,
    epoch: Instant,
    /// Milliseconds since `epoch` until which the ring keeps filling without
    /// receivers.
    linger_until_ms: AtomicU64,
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
            ring: Mutex::new(VecDeque::with_capacity(RING)),
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

    /// Publishes an entry (a no-op when nobody watches); returns its id.
    pub fn publish(&self, e: NewLiveEvent) -> Option<u64> {
        if self.tx.receiver_count() > 0 {
            // While someone watches, keep the window open for their reconnect.
            self.linger();
        } else if !self.watched() {
            return None;
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        // Ids are taken under the ring's lock, so the ring is in id order.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(LiveEvent {
            id,
            source_id: e.source_id,
            kind: e.kind,
            at: e.at,
            event: e.event,
            call_type: e.call_type,
            message_id: e.message_id,
            user_id: e.user_id,
            anonymous_id: e.anonymous_id,
            email: e.email,
            reason: e.reason,
            body: Arc::new(e.body),
            json: std::sync::OnceLock::new(),
        });
        if ring.len() == RING {
            ring.pop_front();
        }
        ring.push_back(entry.clone());
        let _ = self.tx.send(entry);
        Some(id)
    }

    /// The ring's entries (oldest first) and a receiver of everything after them.
    pub fn subscribe(&self) -> (Vec<LiveEvent>, broadcast::Receiver<LiveEvent>) {
        let (past, rx) = self.subscribe_shared(None);
        (
            past.into_iter().map(|e| (*e).clone()).collect(),
            Receiver::spawn_owned(rx),
        )
    }

    /// The ring's entries after `last_id` (all of them when `None`, or when
    /// `last_id` is not an id of this process) and a receiver of everything after
    /// them. Entries are shared, not copied.
    pub fn subscribe_after(
        &self,
        last_id: Option<u64>,
    ) -> (Vec<Arc<LiveEvent>>, broadcast::Receiver<Arc<LiveEvent>>) {
        self.subscribe_shared(last_id)
    }

    fn subscribe_shared(
        &self,
        last_id: Option<u64>,
    ) -> (Vec<Arc<LiveEvent>>, broadcast::Receiver<Arc<LiveEvent>>) {
        self.linger();
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        // Subscribing under the lock: nothing is published between the copy and
        // the receiver, so nothing is missed or seen twice.
        let rx = self.tx.subscribe();
        let newest = self.next_id.load(Ordering::Relaxed).saturating_sub(1);
        let after = match last_id {
            Some(id) if id <= newest => id,
            _ => 0,
        };
        let past = ring.iter().filter(|e| e.id > after).cloned().collect();
        (past, rx)
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

/// Appends one entry as an SSE event: `id:` its id, `event:` its kind, `data:` its
/// JSON (compact JSON has no line breaks, so it is one `data:` line).
fn push_event(out: &mut Vec<u8>, e: &LiveEvent) {
    use std::io::Write as _;
    let _ = write!(out, "id: {}\nevent: {}\ndata: ", e.id, e.kind.as_str());
    out.extend_from_slice(e.json().as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// Most entries written into one chunk of the stream.
const CHUNK_ENTRIES: usize = 256;

/// The live stream of one source as a `text/event-stream` response, resuming
/// after `last_id` (the client's `Last-Event-ID`): first what the ring holds after
/// it, then every new entry, with a `: keep-alive` comment after [`KEEP_ALIVE`]
/// without entries. Entries that are ready together go out in one chunk (a batch
/// of 500 messages is one write per watcher, not 500). A client that falls more
/// than the channel's capacity behind gets a comment saying how many entries it
/// missed. The stream ends when the server shuts down, so it never holds a graceful
/// shutdown up. Used by the API route and by the console's.
pub fn sse(
    state: &crate::AppState,
    source_id: &str,
    last_id: Option<u64>,
) -> axum::response::Response {
    use futures::StreamExt as _;
    let (past, rx) = state.live.subscribe_after(last_id);
    let source = source_id.to_string();
    let mut first = Vec::new();
    for e in past.iter().filter(|e| e.source_id == source) {
        push_event(&mut first, e);
    }
    // An opening comment, so clients (and proxies) see the stream start at once.
    first.extend_from_slice(b": stream open\n\n");
    let shutdown = state.shutdown.clone();
    let live = futures::stream::unfold(
        (rx, shutdown, source),
        |(mut rx, shutdown, source)| async move {
            let mut out = Vec::new();
            loop {
                let next = tokio::select! {
                    r = tokio::time::timeout(KEEP_ALIVE, rx.recv()) => r,
                    _ = shutdown.wait() => return None,
                };
                match next {
                    Err(_) => out.extend_from_slice(b": keep-alive\n\n"),
                    Ok(Ok(e)) => {
                        let mut n = 0;
                        let mut item = Ok(e);
                        loop {
                            match item {
                                Ok(e) if e.source_id == source => {
                                    push_event(&mut out, &e);
                                    n += 1;
                                }
                                Ok(_) => {}
                                Err(broadcast::error::TryRecvError::Lagged(k)) => {
                                    out.extend_from_slice(
                                        format!(": missed {k} entries\n\n").as_bytes(),
                                    );
                                }
                                Err(_) => break,
                            }
                            if n == CHUNK_ENTRIES {
                                break;
                            }
                            item = rx.try_recv();
                        }
                    }
                    Ok(Err(broadcast::error::RecvError::Lagged(k))) => {
                        out.extend_from_slice(format!(": missed {k} entries\n\n").as_bytes());
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                }
                if !out.is_empty() {
                    let chunk: Result<bytes::Bytes, std::convert::Infallible> = Ok(out.into());
                    return Some((chunk, (rx, shutdown, source)));
                }
            }
        },
    );
    let stream = futures::stream::once(async move {
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(first))
    })
    .chain(live);
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        // Proxies (nginx) must not buffer the stream.
        .header("x-accel-buffering", "no")
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_default()
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

/// Turns a receiver of shared entries into one of owned entries (for
/// [`Live::subscribe`]'s signature) with a small forwarding task.
struct Receiver;

impl Receiver {
    fn spawn_owned(mut rx: broadcast::Receiver<Arc<LiveEvent>>) -> broadcast::Receiver<LiveEvent> {
        let (tx, out) = broadcast::channel(CHANNEL);
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        if tx.send((*e).clone()).is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        out
    }
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

    #[test]
    fn nothing_is_kept_when_nobody_watches() {
        let live = Live::new();
        assert!(!live.watched());
        assert_eq!(live.publish(entry("s")), None);
        assert_eq!(live.watchers(), 0);
    }

    #[tokio::test]
    async fn replays_after_the_last_seen_id() {
        let live = Live::new();
        let (_, mut rx) = live.subscribe_after(None);
        let a = live.publish(entry("s")).unwrap();
        let b = live.publish(entry("s")).unwrap();
        assert_eq!(rx.recv().await.unwrap().id, a);
        assert_eq!(rx.recv().await.unwrap().id, b);
        let (past, _) = live.subscribe_after(Some(a));
        assert_eq!(past.iter().map(|e| e.id).collect::<Vec<_>>(), vec![b]);
        // An id this process never gave (a restart): the whole ring.
        let (past, _) = live.subscribe_after(Some(999));
        assert_eq!(past.len(), 2);
        let e = &past[0];
        assert_eq!(e.email.as_deref(), Some("a@example.com"));
        assert_eq!(e.event.as_deref(), Some("Email Opened"));
        assert_eq!(e.call_type.as_deref(), Some("track"));
        let v = serde_json::to_value(&**e).unwrap();
        assert_eq!(v["kind"], "accepted");
        assert_eq!(v["body"]["messageId"], "m1");
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
        assert_eq!(past[0].id, 6);
    }
}

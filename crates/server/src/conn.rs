//! The HTTP/1.1 accept loop: every connection is served by hyper under Tributary's
//! own clock, so a client that holds a socket without sending a request cannot keep
//! it, and a refused client still reads its answer.
//!
//! Invariants:
//! - **Header timeout** (`http.header_timeout`, default 10 s): a request head must be
//!   complete within this time of its first byte, and a new connection must send a
//!   complete head within this time of being accepted. Past it the server answers
//!   `408 {"code":"request_timeout"}` when a head was started, and closes.
//! - **Idle timeout** (`http.idle_timeout`, default 60 s): a keep-alive connection
//!   with no request in progress and no bytes moving for this long is closed.
//! - **Body timeout** (`http.body_timeout` plus one second per `http.body_min_rate`
//!   bytes already read): enforced where ingest reads a body ([`crate::body`]);
//!   past it the answer is `408 request_timeout` and the connection closes.
//! - **Connection cap** (`http.max_connections`, default: the open-file limit, raised
//!   to its hard limit at start, minus 512 for the stores): at the cap, a new
//!   connection is admitted by closing the connection that has been idle (no request
//!   in progress) the longest; when every connection is busy the new one gets a
//!   plain 503 and is closed. Requests in progress are never cut by the cap.
//! - **Lingering close**: when hyper is done with a connection (also after a refusal
//!   sent before the body was read), the server half-closes its side and reads and
//!   discards up to `http.linger_bytes` (8 MiB) for up to `http.linger_timeout`
//!   (2 s), like nginx's lingering close, so a client that writes its whole body
//!   before reading (Python's `http.client`) reads the 413 instead of a reset.
//! - **Graceful shutdown**: once shutdown is asked, no connection is accepted,
//!   keep-alive is turned off, idle connections close, and [`serve_http`] returns
//!   only when every request in progress has been answered.
//!
//! Handlers run inside their connection's task (hyper polls the service future), so
//! the watchdog only acts while no request is in progress: a timeout or eviction
//! never drops a handler halfway (e.g. between append and answer).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower::ServiceExt as _;

/// Open files kept free for the stores (SQLite files, WAL, warehouse, sockets to
/// PostgreSQL and destinations) when the connection cap is derived from the limit.
const FD_HEADROOM: u64 = 512;

/// Connection-level HTTP settings (`[http]`, env `TRIBUTARY_HTTP_<FIELD>`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Time for a complete request head, from its first byte or from accept
    /// (`TRIBUTARY_HTTP_HEADER_TIMEOUT`, default `10s`).
    #[serde(with = "tributary_model::duration")]
    pub header_timeout: Duration,
    /// Base time for a request body (`TRIBUTARY_HTTP_BODY_TIMEOUT`, default `10s`);
    /// each `body_min_rate` bytes read add one second.
    #[serde(with = "tributary_model::duration")]
    pub body_timeout: Duration,
    /// Bytes per second a slow body must keep up (`TRIBUTARY_HTTP_BODY_MIN_RATE`,
    /// default 16384).
    pub body_min_rate: u64,
    /// How long a keep-alive connection may sit idle (`TRIBUTARY_HTTP_IDLE_TIMEOUT`,
    /// default `60s`).
    #[serde(with = "tributary_model::duration")]
    pub idle_timeout: Duration,
    /// Most open client connections (`TRIBUTARY_HTTP_MAX_CONNECTIONS`); 0 (default)
    /// means the open-file limit minus 512.
    pub max_connections: usize,
    /// Longest lingering close (`TRIBUTARY_HTTP_LINGER_TIMEOUT`, default `2s`).
    #[serde(with = "tributary_model::duration")]
    pub linger_timeout: Duration,
    /// Most bytes read and discarded in a lingering close
    /// (`TRIBUTARY_HTTP_LINGER_BYTES`, default 8 MiB).
    pub linger_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            body_min_rate: 16 * 1024,
            idle_timeout: Duration::from_secs(60),
            max_connections: 0,
            linger_timeout: Duration::from_secs(2),
            linger_bytes: 8 * 1024 * 1024,
        }
    }
}

impl HttpConfig {
    /// The connection cap for an open-file limit of `nofile`.
    pub fn effective_max_connections(&self, nofile: u64) -> usize {
        let derived = nofile.saturating_sub(FD_HEADROOM).max(64);
        let derived = usize::try_from(derived).unwrap_or(usize::MAX);
        match self.max_connections {
            0 => derived,
            n => n,
        }
    }
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass, which lives on
    // this stack frame for the duration of the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    // rlim_t is u64 on Linux but not on every Unix.
    #[allow(clippy::unnecessary_cast)]
    let soft = lim.rlim_cur as u64;
    soft
}

fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds on the server's clock; never 0, so that 0 can mean "never".
fn now_ms() -> u64 {
    clock_base().elapsed().as_millis() as u64 + 1
}

/// The instant of a [`now_ms`] reading.
fn at_ms(ms: u64) -> Instant {
    clock_base() + Duration::from_millis(ms.saturating_sub(1))
}

/// What one connection is doing, shared by its IO wrapper, its service and its
/// watchdog.
struct ConnState {
    accepted_ms: u64,
    /// Requests handed to the router and not yet answered.
    in_flight: AtomicUsize,
    /// Requests answered on this connection.
    served: AtomicU64,
    /// When the current request head began (0: none begun).
    head_started_ms: AtomicU64,
    /// Last time bytes moved either way, or a request ended.
    last_activity_ms: AtomicU64,
    /// Asked to close by the connection cap.
    evict: AtomicBool,
    /// Wakes the watchdog when any of the above changes what it waits for.
    changed: Notify,
}

impl ConnState {
    fn new() -> Self {
        let now = now_ms();
        ConnState {
            accepted_ms: now,
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(now),
            evict: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn on_read(&self, n: usize) {
        if n == 0 {
            return;
        }
        let now = now_ms();
        self.last_activity_ms.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Acquire) == 0
            && self
                .head_started_ms
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.changed.notify_one();
        }
    }

    fn on_write(&self, n: usize) {
        if n > 0 {
            self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(0, Ordering::Release);
        RequestGuard(self.clone())
    }

    /// No request was ever started on this connection (not a byte of one read).
    fn is_fresh(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.served.load(Ordering::Acquire) == 0
            && self.head_started_ms.load(Ordering::Acquire) == 0
    }

    fn idle_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// What the watchdog waits for now: `None` while a request is in progress.
    fn deadline(&self, cfg: &HttpConfig) -> Option<(u64, Expiry)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.evict.load(Ordering::Acquire) {
            return Some((0, Expiry::Evicted));
        }
        let header = cfg.header_timeout.as_millis() as u64;
        let head = self.head_started_ms.load(Ordering::Acquire);
        if head != 0 {
            return Some((head + header, Expiry::Header));
        }
        if self.served.load(Ordering::Acquire) == 0 {
            return Some((self.accepted_ms + header, Expiry::FirstRequest));
        }
        Some((
            self.idle_ms() + cfg.idle_timeout.as_millis() as u64,
            Expiry::Idle,
        ))
    }
}

/// Ends a request's claim on its connection when the router's answer is ready.
struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let st = &self.0;
        st.served.fetch_add(1, Ordering::AcqRel);
        st.last_activity_ms.store(now_ms(), Ordering::Relaxed);
        if st.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            st.changed.notify_one();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// A request head was started and not finished in time: 408.
    Header,
    /// A new connection sent no request in time.
    FirstRequest,
    /// A keep-alive connection sat idle.
    Idle,
    /// Closed to make room under the connection cap.
    Evicted,
}

/// A TCP stream that reports its traffic to its connection's state.
struct Tracked {
    tcp: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.state.on_read(buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.state.on_write(n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.state.on_write(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The router as a hyper service for one connection.
#[derive(Clone)]
struct ConnService {
    router: Router,
    peer: SocketAddr,
    state: Arc<ConnState>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let guard = self.state.begin_request();
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let router = self.router.clone();
        Box::pin(async move {
            let resp = router.oneshot(req).await;
            drop(guard);
            resp
        })
    }
}

/// Every open connection, for the cap and for `/metrics`.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    evicting: AtomicUsize,
}

impl Registry {
    fn insert(&self, state: Arc<ConnState>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.conns.lock() {
            m.insert(id, state);
            metrics::gauge!("tributary_http_connections_open").set(m.len() as f64);
        }
        id
    }

    fn remove(&self, id: u64) {
        let Ok(mut m) = self.conns.lock() else {
            return;
        };
        if let Some(st) = m.remove(&id)
            && st.evict.load(Ordering::Acquire)
        {
            self.evicting.fetch_sub(1, Ordering::AcqRel);
        }
        metrics::gauge!("tributary_http_connections_open").set(m.len() as f64);
    }

    /// Open connections not already being closed to make room.
    fn live(&self) -> usize {
        let n = self.conns.lock().map(|m| m.len()).unwrap_or(0);
        n.saturating_sub(self.evicting.load(Ordering::Acquire))
    }

    /// Asks the connection idle the longest to close; false when every connection
    /// has a request in progress.
    fn evict_one(&self) -> bool {
        let Ok(m) = self.conns.lock() else {
            return false;
        };
        let victim = m
            .values()
            .filter(|s| {
                s.in_flight.load(Ordering::Acquire) == 0 && !s.evict.load(Ordering::Acquire)
            })
            .min_by_key(|s| s.idle_ms());
        match victim {
            Some(s) => {
                s.evict.store(true, Ordering::Release);
                self.evicting.fetch_add(1, Ordering::AcqRel);
                s.changed.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A complete `Connection: close` JSON answer written straight to a socket.
fn raw_answer(status: &str, extra_headers: &str, code: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({"code": code, "message": message}).to_string();
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n{extra_headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits for every
/// request in progress to be answered.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    cfg: HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let nofile = raise_nofile_limit();
    let max = cfg.effective_max_connections(nofile);
    if max as u64 + 64 > nofile {
        tracing::warn!(
            max_connections = max,
            nofile,
            "http.max_connections leaves little room under the open-file limit"
        );
    }
    tracing::info!(
        max_connections = max,
        nofile,
        header_timeout = ?cfg.header_timeout,
        idle_timeout = ?cfg.idle_timeout,
        "accepting connections"
    );
    let cfg = Arc::new(cfg);
    let registry = Arc::new(Registry::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut shutdown => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                metrics::counter!("tributary_http_connections_total").increment(1);
                if registry.live() >= max && !registry.evict_one() {
                    metrics::counter!("tributary_http_connections_refused_total").increment(1);
                    let _ = tcp.try_write(&raw_answer(
                        "503 Service Unavailable",
                        "retry-after: 1\r\n",
                        "too_many_connections",
                        "the server is at its connection limit; retry shortly",
                    ));
                    continue;
                }
                let _ = tcp.set_nodelay(true);
                let state = Arc::new(ConnState::new());
                let id = registry.insert(state.clone());
                let registry = registry.clone();
                let cfg = cfg.clone();
                let router = router.clone();
                let stop = stop_rx.clone();
                tokio::spawn(async move {
                    serve_one(tcp, peer, state, router, &cfg, stop).await;
                    registry.remove(id);
                });
            }
            Err(e) => {
                // Out of file descriptors: make room, then retry. Any other accept
                // error is about one connection; keep going.
                if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
                    metrics::counter!("tributary_http_accept_emfile_total").increment(1);
                    registry.evict_one();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                } else {
                    tracing::debug!(error = %e, "accept failed");
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    stop_tx.closed().await;
    Ok(())
}

enum Outcome {
    Done,
    Expired(Expiry),
}

async fn serve_one(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<ConnState>,
    router: Router,
    cfg: &HttpConfig,
    mut stop: watch::Receiver<bool>,
) {
    let io = TokioIo::new(Tracked {
        tcp,
        state: state.clone(),
    });
    let svc = ConnService {
        router,
        peer,
        state: state.clone(),
    };
    let mut conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(io, svc);
    let mut stopping = *stop.borrow();
    if stopping {
        Pin::new(&mut conn).graceful_shutdown();
    }
    let outcome = loop {
        let deadline = state.deadline(cfg);
        let sleep = async {
            match deadline {
                Some((ms, _)) => tokio::time::sleep_until(at_ms(ms).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                break Outcome::Done;
            }
            _ = sleep => {
                if let Some((ms, kind)) = state.deadline(cfg)
                    && ms <= now_ms()
                {
                    break Outcome::Expired(kind);
                }
            }
            _ = state.changed.notified() => {}
            r = stop.changed(), if !stopping => {
                stopping = true;
                let _ = r;
                // A connection that never sent a byte has nothing to finish.
                if state.is_fresh() {
                    break Outcome::Expired(Expiry::FirstRequest);
                }
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    let tcp = conn.into_parts().io.into_inner().tcp;
    match outcome {
        Outcome::Done => linger(tcp, cfg).await,
        Outcome::Expired(Expiry::Header) => {
            metrics::counter!("tributary_http_timeouts_total", "phase" => "header").increment(1);
            let msg = raw_answer(
                "408 Request Timeout",
                "",
                "request_timeout",
                &format!(
                    "the request head did not arrive within {} ms",
                    cfg.header_timeout.as_millis()
                ),
            );
            let mut tcp = tcp;
            let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&msg)).await;
            linger(tcp, cfg).await;
        }
        Outcome::Expired(kind) => {
            let phase = match kind {
                Expiry::FirstRequest => "first_request",
                Expiry::Idle => "idle",
                _ => "evicted",
            };
            metrics::counter!("tributary_http_timeouts_total", "phase" => phase).increment(1);
            drop(tcp);
        }
    }
}

/// Half-closes, then reads and discards what the client still sends, bounded in
/// bytes and time, so the client reads the answer before the socket goes away.
async fn linger(mut tcp: TcpStream, cfg: &HttpConfig) {
    if tokio::time::timeout(Duration::from_secs(1), tcp.shutdown())
        .await
        .is_err()
    {
        return;
    }
    let deadline = tokio::time::Instant::now() + cfg.linger_timeout;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    while total < cfg.linger_bytes {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => total += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_http_settings_by_the_one_rule() {
        let env = std::collections::HashMap::from([
            (
                "TRIBUTARY_HTTP_HEADER_TIMEOUT".to_string(),
                "3s".to_string(),
            ),
            ("TRIBUTARY_HTTP_MAX_CONNECTIONS".to_string(), "500".into()),
        ]);
        let c = crate::Config::load(None, &env).unwrap().http;
        assert_eq!(c.header_timeout, Duration::from_secs(3));
        assert_eq!(c.max_connections, 500);
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        let env = std::collections::HashMap::from([(
            "TRIBUTARY_HTTP_IDLE_TIMEOUT".to_string(),
            "60".to_string(),
        )]);
        let err = crate::Config::load(None, &env).unwrap_err().to_string();
        assert!(err.contains("TRIBUTARY_HTTP_IDLE_TIMEOUT"), "{err}");
    }

    #[test]
    fn the_http_section_reads_from_toml() {
        let c: crate::Config = toml::from_str(
            "[http]\nheader_timeout = \"3s\"\nbody_min_rate = 1000\nmax_connections = 9\n",
        )
        .unwrap();
        assert_eq!(c.http.header_timeout, Duration::from_secs(3));
        assert_eq!(c.http.body_min_rate, 1000);
        assert_eq!(c.http.max_connections, 9);
        assert_eq!(c.http.linger_timeout, Duration::from_secs(2));
        assert!(toml::from_str::<crate::Config>("[http]\nheader_timeout = 3\n").is_err());
        assert!(toml::from_str::<crate::Config>("[http]\nheader_timout = \"3s\"\n").is_err());
    }

    #[test]
    fn the_cap_leaves_room_under_the_file_limit() {
        let c = HttpConfig::default();
        assert_eq!(c.effective_max_connections(20_000), 19_488);
        assert_eq!(c.effective_max_connections(256), 64);
        let c = HttpConfig {
            max_connections: 100,
            ..Default::default()
        };
        assert_eq!(c.effective_max_connections(20_000), 100);
    }
}

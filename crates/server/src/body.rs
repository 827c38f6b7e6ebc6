//! Reading request bodies with hard caps: the raw body is read chunk by chunk and
//! refused as soon as it passes its limit, and a gzip body is inflated only up to the
//! same limit — no unbounded buffering, no gzip bomb.
//!
//! A body also has a time limit: it must be complete within `http.body_timeout`
//! plus one second per `http.body_min_rate` bytes already received, so a client
//! that stalls or trickles is answered `408 request_timeout` instead of holding its
//! reservation and its socket (the connection closes after that answer).

use std::io::Read;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::conn::HttpConfig;
use crate::error::ApiError;

fn too_large(limit: usize) -> ApiError {
    ApiError::TooLarge {
        code: "body_too_large",
        message: format!("request body is larger than {limit} bytes"),
    }
}

/// The `Content-Length` the client declared, if any.
pub fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
}

/// Whether the body is sent with a content encoding (so it may inflate past its
/// length).
pub fn is_compressed(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !matches!(v.trim(), "" | "identity"))
}

/// The time a body may have taken once `received` bytes of it have arrived.
pub fn allowed_time(http: &HttpConfig, received: usize) -> Duration {
    http.body_timeout + Duration::from_secs_f64(received as f64 / http.body_min_rate.max(1) as f64)
}

/// Reads the body, inflating `Content-Encoding: gzip`, refusing anything whose raw or
/// inflated size passes `limit` bytes, or that arrives slower than `http` allows.
/// The caller has reserved the body's memory beforehand.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    http: &HttpConfig,
) -> Result<Vec<u8>, ApiError> {
    read_body_growing(headers, body, limit, http, None)
        .await
        .map(|(bytes, _)| bytes)
}

/// Like [`read_body`], but reserves memory from `budget` as the bytes arrive (each
/// chunk waits up to a second for room, then 429), so a client holds only what it
/// has really sent. Returns the reservation, to be held while the bytes are used.
pub async fn read_body_growing<'a>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    http: &HttpConfig,
    budget: Option<&'a Semaphore>,
) -> Result<(Vec<u8>, Option<SemaphorePermit<'a>>), ApiError> {
    if declared_length(headers).is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    let mut held: Option<SemaphorePermit<'a>> = None;
    let started = tokio::time::Instant::now();
    let mut raw = Vec::new();
    let mut body = body;
    loop {
        let deadline = started + allowed_time(http, raw.len());
        let Ok(next) = tokio::time::timeout_at(deadline, body.frame()).await else {
            metrics::counter!("tributary_http_timeouts_total", "phase" => "body").increment(1);
            return Err(ApiError::RequestTimeout(format!(
                "the request body did not arrive in time ({} of it after {:.1} s; allowed: {} s plus 1 s per {} bytes)",
                raw.len(),
                started.elapsed().as_secs_f64(),
                http.body_timeout.as_secs_f64(),
                http.body_min_rate
            )));
        };
        let Some(frame) = next else { break };
        let frame =
            frame.map_err(|_| ApiError::bad("bad_request", "could not read the request body"))?;
        if let Ok(data) = frame.into_data() {
            if raw.len() + data.len() > limit {
                return Err(too_large(limit));
            }
            if let Some(budget) = budget {
                crate::accept::reserve_more(budget, &mut held, data.len()).await?;
            }
            raw.extend_from_slice(&data);
        }
    }
    let encoding = headers
        .get(axum::http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("") | Some("identity") => Ok((raw, held)),
        Some("gzip") | Some("x-gzip") => inflate(&raw, limit).map(|b| (b, held)),
        Some(other) => Err(ApiError::bad(
            "unsupported_encoding",
            format!("Content-Encoding {other:?} is not supported; use gzip or none"),
        )),
    }
}

/// Inflates gzip data, refusing output larger than `limit`.
pub fn inflate(raw: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    let decoder = flate2::read::MultiGzDecoder::new(raw);
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| ApiError::bad("invalid_gzip", "the body is not valid gzip"))?;
    if out.len() > limit {
        return Err(ApiError::TooLarge {
            code: "body_too_large",
            message: format!("decompressed body is larger than {limit} bytes"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn inflates_within_limit() {
        assert_eq!(inflate(&gz(b"hello"), 10).unwrap(), b"hello");
    }

    #[test]
    fn refuses_gzip_bomb() {
        let bomb = gz(&vec![b'a'; 50_000_000]);
        assert!(bomb.len() < 100_000);
        let e = inflate(&bomb, 500_000).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(
            inflate(b"not gzip", 100).unwrap_err().code(),
            "invalid_gzip"
        );
    }
}

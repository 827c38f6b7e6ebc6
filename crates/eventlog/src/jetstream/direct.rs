//! JetStream's batched direct get (ADR-31, nats-server ≥ 2.11), which async-nats does
//! not wrap: one request to `$JS.API.DIRECT.GET.<stream>` with `batch` set, and the
//! server streams up to that many matching messages to the reply inbox, then an
//! end-of-batch status (`204 EOB`); `404` when nothing matches. Any replica answers,
//! so reads do not load the stream leader.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::LogError;

/// How long one batch may take to arrive.
const TIMEOUT: Duration = Duration::from_secs(5);

/// One stored message.
pub(super) struct Got {
    pub(super) seq: u64,
    pub(super) subject: String,
    pub(super) payload: Bytes,
    /// `Nats-Num-Pending`: how many more messages match the request's filter after
    /// this one (batched gets carry it; `None` when the server did not say).
    pub(super) pending: Option<u64>,
}

pub(super) struct BatchGet<'a> {
    pub(super) client: &'a async_nats::Client,
    pub(super) stream: &'a str,
}

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("jetstream read: {e}"))
}

impl BatchGet<'_> {
    /// Up to `batch` messages on subjects matching `filter`, from sequence `from` on.
    pub(super) async fn next_by_subject(
        &self,
        from: u64,
        filter: &str,
        batch: usize,
    ) -> Result<Vec<Got>, LogError> {
        let mut req = serde_json::json!({"next_by_subj": filter, "batch": batch.max(1)});
        if from > 0 {
            req["seq"] = from.into();
        }
        self.request(req, batch).await
    }

    /// Up to `batch` messages on subjects matching `filter` stored at or after
    /// `from_ms` (stream time).
    pub(super) async fn since_time(
        &self,
        from_ms: i64,
        filter: &str,
        batch: usize,
    ) -> Result<Vec<Got>, LogError> {
        let req = serde_json::json!({
            "start_time": super::time::rfc3339_ms(from_ms),
            "next_by_subj": filter,
            "batch": batch.max(1),
        });
        self.request(req, batch).await
    }

    /// How many messages on subjects matching `filter` are stored at or after `from`:
    /// one request (the first match and the server's count of the matches after it).
    pub(super) async fn count_from(&self, from: u64, filter: &str) -> Result<u64, LogError> {
        let got = self.next_by_subject(from.max(1), filter, 1).await?;
        match got.first() {
            None => Ok(0),
            Some(g) => g
                .pending
                .map(|p| p + 1)
                .ok_or_else(|| unavailable("direct get answer without Nats-Num-Pending")),
        }
    }

    /// The message at `seq`, if it is retained.
    pub(super) async fn by_seq(&self, seq: u64) -> Result<Option<Got>, LogError> {
        let got = self
            .request(serde_json::json!({"seq": seq, "batch": 1}), 1)
            .await?;
        Ok(got.into_iter().next().filter(|g| g.seq == seq))
    }

    async fn request(&self, req: serde_json::Value, batch: usize) -> Result<Vec<Got>, LogError> {
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(unavailable)?;
        let body = serde_json::to_vec(&req).map_err(unavailable)?;
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", self.stream),
                inbox,
                body.into(),
            )
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(batch.min(1024));
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let next = tokio::time::timeout_at(deadline, sub.next()).await;
            let m = match next {
                Err(_) => {
                    let _ = sub.unsubscribe().await;
                    return Err(unavailable("no answer in time (no responders?)"));
                }
                Ok(None) => return Err(unavailable("subscription closed")),
                Ok(Some(m)) => m,
            };
            if let Some(status) = m.status {
                match status.as_u16() {
                    // End of batch, or nothing (more) matches.
                    204 | 404 => break,
                    503 => {
                        let _ = sub.unsubscribe().await;
                        return Err(unavailable("no responders (stream leader election?)"));
                    }
                    code if code >= 400 => {
                        let _ = sub.unsubscribe().await;
                        return Err(unavailable(format!(
                            "status {code} {}",
                            m.description.unwrap_or_default()
                        )));
                    }
                    _ => continue,
                }
            }
            let headers = m.headers.as_ref();
            let header = |name: &str| {
                headers
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            let seq = header("Nats-Sequence")
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| unavailable("direct get answer without Nats-Sequence"))?;
            let subject = header("Nats-Subject").unwrap_or_default();
            let pending = header("Nats-Num-Pending").and_then(|s| s.parse::<u64>().ok());
            out.push(Got {
                seq,
                subject,
                payload: m.payload,
                pending,
            });
            if out.len() >= batch {
                break;
            }
        }
        let _ = sub.unsubscribe().await;
        Ok(out)
    }
}

//! Admin-API clients for the command line: `tributary sources …`. Human output by
//! default, `--json` for scripts. The token comes from `--token`,
//! `TRIBUTARY_ADMIN_TOKEN`, or `<data-dir>/admin-token`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// How to reach the server.
#[derive(Args, Clone)]
pub struct Conn {
    /// Server base URL.
    #[arg(
        long,
        env = "TRIBUTARY_SERVER",
        default_value = "http://127.0.0.1:8088",
        global = true
    )]
    pub server: String,
    /// Admin token (default: TRIBUTARY_ADMIN_TOKEN, else <data-dir>/admin-token).
    #[arg(
        long,
        env = "TRIBUTARY_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// Data directory holding admin-token.
    #[arg(
        long,
        env = "TRIBUTARY_DATA_DIR",
        default_value = "tributary-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `tributary sources …`.
#[derive(Subcommand)]
pub enum SourcesCmd {
    /// Create a source and print its write key.
    Create {
        /// `activecampaign` or `http`.
        #[arg(long = "type", default_value = "activecampaign")]
        kind: String,
        /// Nickname.
        #[arg(long)]
        name: String,
        /// Warehouse schema name.
        #[arg(long)]
        schema: String,
        /// Settings as a JSON object, e.g. '{"user_id_field":"32"}'.
        #[arg(long)]
        settings: Option<String>,
    },
    /// List sources.
    List,
    /// Show one source.
    Show {
        /// Source id.
        id: String,
    },
    /// Issue a new write key; the old one stops working.
    RotateKey {
        /// Source id.
        id: String,
    },
    /// Accept events again.
    Enable {
        /// Source id.
        id: String,
    },
    /// Refuse events (403) without deleting.
    Disable {
        /// Source id.
        id: String,
    },
    /// Delete a source.
    Delete {
        /// Source id.
        id: String,
    },
    /// Backfill ActiveCampaign's API into the source (it polls from then on): needs
    /// `settings.api` = {"url","key"} from ActiveCampaign's Settings → Developer.
    Sync {
        /// Source id.
        id: String,
        /// Read campaigns sent since then: RFC 3339 (`2024-01-31T00:00:00Z`) or a
        /// date (`2024-01-31`, midnight UTC). Default: 60 days back.
        #[arg(long)]
        since: Option<String>,
        /// Wait for the backfill to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
}

/// `--since` as the API takes it: RFC 3339 as given, a bare date as midnight UTC.
fn since_arg(raw: &str) -> String {
    let t = raw.trim();
    if t.len() == 10 && t.as_bytes().get(4) == Some(&b'-') && t.as_bytes().get(7) == Some(&b'-') {
        format!("{t}T00:00:00Z")
    } else {
        t.to_string()
    }
}

/// A one-line progress bar for a sync status (`[#####-----] 3/6 campaigns, 120 events`).
fn progress_line(st: &Value) -> String {
    let done = st["campaigns_done"].as_u64().unwrap_or(0);
    let total = st["campaigns_total"].as_u64().unwrap_or(0);
    let events = st["events"].as_u64().unwrap_or(0);
    const WIDTH: u64 = 30;
    let filled = (done.min(total) * WIDTH).checked_div(total).unwrap_or(0) as usize;
    format!(
        "[{}{}] {done}/{total} campaigns, {events} events",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    )
}

/// Polls `GET …/sync` until the run is no longer running, drawing the progress bar
/// on stderr (redrawn in place on a terminal, one line per change otherwise).
async fn wait_for_sync(c: &Client, id: &str) -> anyhow::Result<Value> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let st = c
            .call(reqwest::Method::GET, &format!("/sources/{id}/sync"), None)
            .await?;
        let line = progress_line(&st);
        if line != last {
            let mut err = std::io::stderr().lock();
            if tty {
                let _ = write!(err, "\r{line}");
            } else {
                let _ = writeln!(err, "{line}");
            }
            let _ = err.flush();
            last = line;
        }
        if st["state"] != "running" {
            if tty {
                eprintln!();
            }
            return Ok(st);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// An authenticated admin-API client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// Builds a client from the connection flags.
    pub fn new(conn: &Conn) -> anyhow::Result<Client> {
        let token = match &conn.token {
            Some(t) => t.clone(),
            None => std::fs::read_to_string(conn.data_dir.join("admin-token"))
                .map(|t| t.trim().to_string())
                .with_context(|| {
                    format!(
                        "no admin token: set TRIBUTARY_ADMIN_TOKEN or --token, or run where {} exists",
                        conn.data_dir.join("admin-token").display()
                    )
                })?,
        };
        Ok(Client {
            http: reqwest::Client::new(),
            base: conn.server.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// Sends a request to `/api/v1{path}` and returns the JSON answer or the
    /// server's `{code,message}` as an error.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let msg = value
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("request failed");
            let code = value.get("code").and_then(Value::as_str).unwrap_or("error");
            bail!("{status}: {msg} ({code})");
        }
        Ok(value)
    }
}

/// A JSON value as a table cell: strings bare, `null` as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        o => o.to_string(),
    }
}

/// Prints rows under a header, each column as wide as its widest cell, two spaces
/// between columns.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_source(s: &Value) {
    let get = |k: &str| s.get(k).map(text).unwrap_or_default();
    println!("id:          {}", get("id"));
    println!("type:        {}", get("type"));
    println!("name:        {}", get("name"));
    println!("schema:      {}", get("schema"));
    println!("enabled:     {}", get("enabled"));
    println!("write key:   {}", get("write_key"));
    println!("webhook url: {}", get("webhook_url"));
    if let Some(st) = s.get("status").and_then(Value::as_str) {
        println!("status:      {st}");
    }
    match s.get("last_event") {
        Some(Value::Object(le)) => println!(
            "last event:  {} ({}) at {}",
            le.get("event").and_then(Value::as_str).unwrap_or("-"),
            le.get("type").and_then(Value::as_str).unwrap_or("-"),
            le.get("received_at").and_then(Value::as_str).unwrap_or("-"),
        ),
        _ => println!("last event:  none yet"),
    }
    if let Some(st) = s.get("sync").filter(|v| v.is_object()) {
        let get = |k: &str| st.get(k).map(text).unwrap_or_default();
        println!("api sync:    {} {}", get("state"), progress_line(st));
        println!("  since:     {}", get("since"));
        println!("  finished:  {}", get("finished_at"));
        println!("  next poll: {}", get("next_poll_at"));
        if st.get("error").is_some_and(|e| !e.is_null()) {
            println!("  error:     {}", get("error"));
        }
    }
}

/// Runs a `sources` subcommand.
pub async fn sources(conn: Conn, cmd: SourcesCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    let c = Client::new(&conn)?;
    let out = match cmd {
        SourcesCmd::Create {
            kind,
            name,
            schema,
            settings,
        } => {
            let settings: Value = match settings {
                Some(s) => serde_json::from_str(&s).context("--settings must be a JSON object")?,
                None => json!({}),
            };
            c.call(
                Method::POST,
                "/sources",
                Some(json!({"type": kind, "name": name, "schema": schema, "settings": settings})),
            )
            .await?
        }
        SourcesCmd::List => {
            let v = c.call(Method::GET, "/sources", None).await?;
            if !conn.json {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        let le = s
                            .get("last_event")
                            .and_then(|l| l.get("received_at"))
                            .and_then(Value::as_str)
                            .unwrap_or("-");
                        vec![
                            text(&s["id"]),
                            text(&s["type"]),
                            text(&s["name"]),
                            text(&s["schema"]),
                            text(&s["enabled"]),
                            text(&s["status"]),
                            le.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "TYPE",
                        "NAME",
                        "SCHEMA",
                        "ENABLED",
                        "STATUS",
                        "LAST EVENT",
                    ],
                    &rows,
                );
                return Ok(());
            }
            v
        }
        SourcesCmd::Show { id } => c.call(Method::GET, &format!("/sources/{id}"), None).await?,
        SourcesCmd::RotateKey { id } => {
            c.call(Method::POST, &format!("/sources/{id}/write-key"), None)
                .await?
        }
        SourcesCmd::Enable { id } => {
            c.call(
                Method::PATCH,
                &format!("/sources/{id}"),
                Some(json!({"enabled": true})),
            )
            .await?
        }
        SourcesCmd::Disable { id } => {
            c.call(
                Method::PATCH,
                &format!("/sources/{id}"),
                Some(json!({"enabled": false})),
            )
            .await?
        }
        SourcesCmd::Sync { id, since, wait } => {
            let body = match since {
                Some(s) => json!({"since": since_arg(&s)}),
                None => json!({}),
            };
            let started = c
                .call(Method::POST, &format!("/sources/{id}/sync"), Some(body))
                .await?;
            if !wait {
                if !conn.json {
                    println!(
                        "sync started (since {}); follow it with `tributary sources show {id}`",
                        text(&started["since"])
                    );
                    return Ok(());
                }
                started
            } else {
                let st = wait_for_sync(&c, &id).await?;
                if st["state"] == "failed" {
                    bail!("sync failed: {}", text(&st["error"]));
                }
                if !conn.json {
                    println!(
                        "sync finished: {} campaigns, {} events; next poll at {}",
                        text(&st["campaigns_total"]),
                        text(&st["events"]),
                        text(&st["next_poll_at"])
                    );
                    return Ok(());
                }
                st
            }
        }
        SourcesCmd::Delete { id } => {
            c.call(Method::DELETE, &format!("/sources/{id}"), None)
                .await?;
            if !conn.json {
                println!("deleted {id}");
                return Ok(());
            }
            json!({"deleted": id})
        }
    };
    if conn.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_source(&out);
    }
    Ok(())
}

/// `tributary destinations …`.
#[derive(Subcommand)]
pub enum DestinationsCmd {
    /// Create a destination.
    Create {
        /// `webhook`, `segment` or `activecampaign`.
        #[arg(long = "type")]
        kind: String,
        /// Display name (also the key honoured in a message's `integrations`).
        #[arg(long)]
        name: String,
        /// Source ids whose events it receives (repeat; none means every source).
        #[arg(long = "source")]
        sources: Vec<String>,
        /// Settings as a JSON object, e.g. '{"url":"https://example.com/hook"}'.
        #[arg(long)]
        settings: String,
        /// Where delivery starts: `now` (only new events), `beginning` (every event
        /// the log keeps) or an RFC 3339 time.
        #[arg(long, default_value = "now")]
        start: String,
    },
    /// List destinations with delivery stats.
    List,
    /// Show one destination with its stats.
    Show {
        /// Destination id.
        id: String,
    },
    /// Pause delivery (the cursor is kept).
    Disable {
        /// Destination id.
        id: String,
    },
    /// Resume delivery.
    Enable {
        /// Destination id.
        id: String,
    },
    /// Delete a destination.
    Delete {
        /// Destination id.
        id: String,
    },
    /// List dead letters.
    DeadLetters {
        /// Destination id.
        id: String,
    },
    /// Re-send the dead letters (or a time range with --from/--to).
    Replay {
        /// Destination id.
        id: String,
        /// Start of a range to re-send (RFC 3339), instead of the dead letters.
        #[arg(long)]
        from: Option<String>,
        /// End of the range (RFC 3339; default now).
        #[arg(long)]
        to: Option<String>,
    },
}

/// Runs a `destinations` subcommand.
pub async fn destinations(conn: Conn, cmd: DestinationsCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    let c = Client::new(&conn)?;
    let out = match cmd {
        DestinationsCmd::Create {
            kind,
            name,
            sources,
            settings,
            start,
        } => {
            let settings: Value =
                serde_json::from_str(&settings).context("--settings must be a JSON object")?;
            c.call(
                Method::POST,
                "/destinations",
                Some(json!({"type": kind, "name": name, "source_ids": sources,
                    "settings": settings, "start": start})),
            )
            .await?
        }
        DestinationsCmd::List => {
            let v = c.call(Method::GET, "/destinations", None).await?;
            if !conn.json {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        let st = &d["stats"];
                        vec![
                            text(&d["id"]),
                            text(&d["type"]),
                            text(&d["name"]),
                            text(&d["enabled"]),
                            text(&st["delivered"]),
                            text(&st["retrying"]),
                            text(&st["dead_letters"]),
                            text(&st["backlog"]),
                            text(&st["last_error"]),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "TYPE",
                        "NAME",
                        "ENABLED",
                        "DELIVERED",
                        "RETRYING",
                        "DEAD",
                        "BACKLOG",
                        "LAST ERROR",
                    ],
                    &rows,
                );
                return Ok(());
            }
            v
        }
        DestinationsCmd::Show { id } => {
            c.call(Method::GET, &format!("/destinations/{id}"), None)
                .await?
        }
        DestinationsCmd::Disable { id } => {
            c.call(
                Method::PATCH,
                &format!("/destinations/{id}"),
                Some(json!({"enabled": false})),
            )
            .await?
        }
        DestinationsCmd::Enable { id } => {
            c.call(
                Method::PATCH,
                &format!("/destinations/{id}"),
                Some(json!({"enabled": true})),
            )
            .await?
        }
        DestinationsCmd::Delete { id } => {
            c.call(Method::DELETE, &format!("/destinations/{id}"), None)
                .await?;
            if !conn.json {
                println!("deleted {id}");
                return Ok(());
            }
            json!({"deleted": id})
        }
        DestinationsCmd::DeadLetters { id } => {
            let v = c
                .call(
                    Method::GET,
                    &format!("/destinations/{id}/dead-letters"),
                    None,
                )
                .await?;
            if !conn.json {
                let letters = v
                    .get("dead_letters")
                    .or(Some(&v))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let rows: Vec<Vec<String>> = letters
                    .iter()
                    .map(|l| {
                        vec![
                            text(&l["id"]),
                            text(&l["seq"]),
                            text(&l["message_id"]),
                            text(&l["attempts"]),
                            text(&l["last_status"]),
                            text(&l["failed_at"]),
                            text(&l["error"]),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "SEQ",
                        "MESSAGE ID",
                        "ATTEMPTS",
                        "STATUS",
                        "FAILED AT",
                        "ERROR",
                    ],
                    &rows,
                );
                return Ok(());
            }
            v
        }
        DestinationsCmd::Replay { id, from, to } => {
            let body = match from {
                Some(f) => json!({"from": f, "to": to}),
                None => json!({"dead_letters": true}),
            };
            c.call(
                Method::POST,
                &format!("/destinations/{id}/replay"),
                Some(body),
            )
            .await?
        }
    };
    if conn.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if let Some(queued) = out.get("queued") {
        println!("queued {queued} events for re-sending");
    } else {
        print_destination(&out);
    }
    Ok(())
}

fn print_destination(d: &Value) {
    let get = |k: &str| d.get(k).map(text).unwrap_or_default();
    let st = &d["stats"];
    println!("id:           {}", get("id"));
    println!("type:         {}", get("type"));
    println!("name:         {}", get("name"));
    println!("enabled:      {}", get("enabled"));
    let sources: Vec<String> = d["source_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    if sources.is_empty() {
        println!("sources:      every source");
    } else {
        println!("sources:      {}", sources.join(", "));
    }
    println!("settings:     {}", d["settings"]);
    println!(
        "delivered:    {} ({} skipped, {} retrying, {} in flight)",
        text(&st["delivered"]),
        text(&st["skipped"]),
        text(&st["retrying"]),
        text(&st["in_flight"])
    );
    println!("dead letters: {}", text(&st["dead_letters"]));
    println!(
        "backlog:      {} (cursor {})",
        text(&st["backlog"]),
        text(&st["cursor"])
    );
    println!("last success: {}", text(&st["last_success_at"]));
    if !st["last_error"].is_null() {
        println!(
            "last error:   {} at {}",
            text(&st["last_error"]),
            text(&st["last_error_at"])
        );
    }
}

/// Output formats of `tributary sql`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SqlFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// The API's JSON answer.
    Json,
}

fn cell_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Runs `tributary sql "…"` against `POST /api/v1/query`.
pub async fn sql(conn: Conn, sql: String, format: SqlFormat) -> anyhow::Result<()> {
    let c = Client::new(&conn)?;
    let out = c
        .call(reqwest::Method::POST, "/query", Some(json!({"sql": sql})))
        .await?;
    let columns: Vec<String> = out["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            c["name"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| cell_text(c))
        })
        .collect();
    let rows: Vec<Vec<String>> = out["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_array().into_iter().flatten().map(cell_text).collect())
        .collect();
    match if conn.json { SqlFormat::Json } else { format } {
        SqlFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
        SqlFormat::Csv => {
            println!(
                "{}",
                columns
                    .iter()
                    .map(|c| csv_field(c))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            for r in &rows {
                println!(
                    "{}",
                    r.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(",")
                );
            }
        }
        SqlFormat::Table => {
            let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
            for r in &rows {
                for (i, c) in r.iter().enumerate() {
                    if let Some(w) = widths.get_mut(i) {
                        *w = (*w).max(c.chars().count().min(60));
                    }
                }
            }
            let line = |cells: &[String]| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| {
                        let c: String = c.chars().take(60).collect();
                        format!("{c:<w$}")
                    })
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            println!("{}", line(&columns));
            println!(
                "{}",
                widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("-+-")
            );
            for r in &rows {
                println!("{}", line(r));
            }
            let more = if out["truncated"] == true {
                " (truncated)"
            } else {
                ""
            };
            println!(
                "({} row{}){more}",
                rows.len(),
                if rows.len() == 1 { "" } else { "s" }
            );
        }
    }
    Ok(())
}

/// `tributary report …`.
#[derive(Subcommand)]
pub enum ReportCmd {
    /// Per campaign of an ActiveCampaign source: delivered, bounced, opened,
    /// clicked, unsubscribed, spam, the rates and the links, with the definitions.
    Email {
        /// Source id.
        source: String,
        /// Start (inclusive): RFC 3339 time or YYYY-MM-DD.
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive): RFC 3339 time or YYYY-MM-DD.
        #[arg(long)]
        to: Option<String>,
    },
}

/// Percent with one decimal, `—` for a rate that has no denominator.
fn percent(v: &Value) -> String {
    match v.as_f64() {
        Some(f) => format!("{:.1}%", f * 100.0),
        None => "\u{2014}".into(),
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
fn query_value(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs `tributary report …` against `/api/v1/reports/…`.
pub async fn report(conn: Conn, cmd: ReportCmd) -> anyhow::Result<()> {
    let c = Client::new(&conn)?;
    match cmd {
        ReportCmd::Email { source, from, to } => {
            let mut path = format!("/reports/email?source={}", query_value(&source));
            if let Some(f) = from {
                path.push_str(&format!("&from={}", query_value(&f)));
            }
            if let Some(t) = to {
                path.push_str(&format!("&to={}", query_value(&t)));
            }
            let out = c.call(reqwest::Method::GET, &path, None).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            print_email_report(&out);
        }
    }
    Ok(())
}

fn print_email_report(out: &Value) {
    let campaigns: Vec<&Value> = out["campaigns"].as_array().into_iter().flatten().collect();
    if campaigns.is_empty() {
        println!("no email events loaded for this source yet");
    } else {
        let rows: Vec<Vec<String>> = campaigns
            .iter()
            .map(|c| {
                let n = |k: &str| text(&c[k]);
                vec![
                    n("campaign_id"),
                    n("campaign_name"),
                    n("delivered"),
                    n("bounced"),
                    n("opened"),
                    n("clicked"),
                    n("unsubscribed"),
                    n("spam"),
                    percent(&c["open_rate"]),
                    percent(&c["click_rate"]),
                    percent(&c["click_to_open_rate"]),
                    percent(&c["bounce_rate"]),
                    percent(&c["unsubscribe_rate"]),
                    percent(&c["spam_rate"]),
                ]
            })
            .collect();
        print_table(
            &[
                "CAMPAIGN",
                "NAME",
                "DELIVERED",
                "BOUNCED",
                "OPENED",
                "CLICKED",
                "UNSUBSCRIBED",
                "SPAM",
                "OPEN",
                "CLICK",
                "CTOR",
                "BOUNCE",
                "UNSUB",
                "SPAM%",
            ],
            &rows,
        );
        for c in &campaigns {
            let links: Vec<Vec<String>> = c["links"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    vec![
                        text(&l["url"]),
                        text(&l["clicks"]),
                        text(&l["unique_clickers"]),
                    ]
                })
                .collect();
            if links.is_empty() {
                continue;
            }
            println!();
            println!(
                "links of campaign {} ({})",
                text(&c["campaign_id"]),
                text(&c["campaign_name"])
            );
            print_table(&["URL", "CLICKS", "UNIQUE CLICKERS"], &links);
        }
    }
    println!();
    println!("definitions:");
    if let Some(defs) = out["definitions"].as_object() {
        let width = defs.keys().map(|k| k.chars().count()).max().unwrap_or(0);
        for (k, v) in defs {
            println!("  {k:<width$}  {}", text(v));
        }
    }
}

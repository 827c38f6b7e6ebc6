//! ActiveCampaign API sync end to end: a real `tributary serve` process backfills
//! from the stand-in API ([`crate::ac_api`]) and the warehouse holds exactly the
//! expected recipients per Email table, checked by SQL; a SIGKILL mid-backfill
//! resumes with no duplicate and no gap; webhooks and the API give one row for the
//! same open in either order; a refused key, an unreachable URL and a bad `since`
//! are clear errors.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::ac_api::{self, CAMPAIGNS, Faults, KEY, StandIn, campaign_id, recipient};
use crate::harness::{Server, client, key_id};

type Rows = BTreeSet<(String, String)>;

/// What each Email table must hold: (email, campaign id) pairs; clicks also name the
/// link, as `email|link`.
pub(crate) struct Expected {
    delivered: Rows,
    opened: Rows,
    clicked: Rows,
    bounced: Rows,
    unsubscribed: Rows,
    spam: Rows,
}

impl Expected {
    pub(crate) fn of(recipients: usize) -> Expected {
        let mut e = Expected {
            delivered: Rows::new(),
            opened: Rows::new(),
            clicked: Rows::new(),
            bounced: Rows::new(),
            unsubscribed: Rows::new(),
            spam: Rows::new(),
        };
        for c in 0..CAMPAIGNS {
            let cid = campaign_id(c);
            for i in 0..recipients {
                let r = recipient(i);
                let row = (r.email.clone(), cid.clone());
                if r.bounced {
                    e.bounced.insert(row.clone());
                } else {
                    e.delivered.insert(row.clone());
                }
                if r.opened {
                    e.opened.insert(row.clone());
                }
                for l in &r.clicks {
                    e.clicked
                        .insert((format!("{}|{}{l}", r.email, c + 1), cid.clone()));
                }
                match r.unsubscribed {
                    Some(why) if why.contains("spam") => {
                        e.spam.insert(row.clone());
                    }
                    Some(_) => {
                        e.unsubscribed.insert(row.clone());
                    }
                    None => {}
                }
            }
        }
        e
    }

    pub(crate) fn total(&self) -> usize {
        self.delivered.len()
            + self.opened.len()
            + self.clicked.len()
            + self.bounced.len()
            + self.unsubscribed.len()
            + self.spam.len()
    }
}

pub(crate) fn api_settings(stand_in: &StandIn) -> Value {
    json!({"api": {"url": stand_in.url, "key": KEY, "poll_minutes": 60}})
}

pub(crate) async fn create_ac_source(s: &Server, schema: &str, settings: Value) -> (u16, Value) {
    s.admin(
        Method::POST,
        "/sources",
        Some(json!({"type": "activecampaign", "name": schema, "schema": schema, "settings": settings})),
    )
    .await
}

pub(crate) async fn sync_status(s: &Server, id: &str) -> Value {
    let (st, v) = s
        .admin(Method::GET, &format!("/sources/{id}/sync"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    v
}

/// Waits until the sync is no longer running.
pub(crate) async fn sync_settles(s: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let v = sync_status(s, id).await;
        if v["state"] != "running" {
            return v;
        }
        assert!(Instant::now() < deadline, "sync still running: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn query(s: &Server, sql: &str) -> Value {
    let (st, v) = s
        .admin(Method::POST, "/query", Some(json!({"sql": sql})))
        .await;
    assert_eq!(st, 200, "{sql}: {v}");
    v
}

/// The (email, campaign) rows of one Email table; `None` while it does not exist.
async fn table_rows(s: &Server, schema: &str, table: &str) -> Option<Rows> {
    let sql = if table == "email_link_clicked" {
        format!("select anonymous_id || '|' || link_id, campaign_id from {schema}.{table}")
    } else {
        format!("select anonymous_id, campaign_id from {schema}.{table}")
    };
    let (st, v) = s
        .admin(Method::POST, "/query", Some(json!({"sql": sql})))
        .await;
    if st != 200 {
        return None;
    }
    Some(
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap_or_default().to_string(),
                    r[1].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}

/// Waits until every table holds exactly what is expected (loads are micro-batches),
/// then checks that no table holds a row twice.
pub(crate) async fn assert_tables(s: &Server, schema: &str, e: &Expected) {
    let tables: [(&str, &Rows); 6] = [
        ("email_delivered", &e.delivered),
        ("email_opened", &e.opened),
        ("email_link_clicked", &e.clicked),
        ("email_bounced", &e.bounced),
        ("email_unsubscribed", &e.unsubscribed),
        ("email_marked_as_spam", &e.spam),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    for (table, want) in tables {
        loop {
            let got = table_rows(s, schema, table).await;
            // A table nothing was loaded into does not exist.
            if got.as_ref() == Some(want) || (got.is_none() && want.is_empty()) {
                break;
            }
            if Instant::now() > deadline {
                let got = got.unwrap_or_default();
                let missing: Vec<_> = want.difference(&got).take(5).collect();
                let extra: Vec<_> = got.difference(want).take(5).collect();
                panic!(
                    "{schema}.{table}: {} rows, want {}; missing {missing:?}, extra {extra:?}",
                    got.len(),
                    want.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if want.is_empty() {
            continue;
        }
        let v = query(
            s,
            &format!("select count(*), count(distinct id) from {schema}.{table}"),
        )
        .await;
        assert_eq!(v["rows"][0][0], v["rows"][0][1], "{table}: a duplicate id");
        assert_eq!(v["rows"][0][0], json!(want.len()), "{table}: row count");
    }
}

pub(crate) async fn start_sync(s: &Server, id: &str, body: Value) -> (u16, Value) {
    s.admin(Method::POST, &format!("/sources/{id}/sync"), Some(body))
        .await
}

#[tokio::test]
async fn backfill_fills_every_email_table_with_exactly_the_expected_recipients() {
    let stand_in = StandIn::start(
        250,
        Faults {
            rate_limit_every: 13,
            fail_at: 20,
        },
    )
    .await;
    let s = Server::start();
    let (st, src) = create_ac_source(&s, "activecampaign", api_settings(&stand_in)).await;
    assert_eq!(st, 201, "{src}");
    let id = src["id"].as_str().unwrap().to_string();
    assert_eq!(
        src["settings"]["api"]["key"], "…4242",
        "the key is never shown back"
    );
    assert!(!src.to_string().contains(KEY));
    assert_eq!(src["sync"]["state"], "idle");

    let since = (stand_in.base - chrono::Duration::days(30)).to_rfc3339();
    let (st, v) = start_sync(&s, &id, json!({ "since": since })).await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["state"], "running");
    let (st, v) = start_sync(&s, &id, json!({})).await;
    assert_eq!(st, 409, "a second run while one runs: {v}");

    let started = Instant::now();
    let done = sync_settles(&s, &id).await;
    let expected = Expected::of(250);
    {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "MEASURED backfill: {} requests ({} answered 429, 1 answered 500) for {} events in {:.1}s",
            stand_in.requests(),
            stand_in.limited.load(Ordering::SeqCst),
            expected.total(),
            started.elapsed().as_secs_f64()
        );
    }

    assert_eq!(done["state"], "idle", "{done}");
    assert_eq!(
        done["campaigns_total"], 3,
        "the draft is not a sent campaign: {done}"
    );
    assert_eq!(done["campaigns_done"], 3);
    assert_eq!(done["events"], json!(expected.total()), "{done}");
    assert_eq!(
        done["events_by_type"]["Email Delivered"],
        json!(expected.delivered.len())
    );
    assert!(done["error"].is_null());
    assert!(done["next_poll_at"].is_string() && done["finished_at"].is_string());

    assert_tables(&s, "activecampaign", &expected).await;

    // The properties and times the webhook path gives, from the API's shapes.
    let v = query(
        &s,
        "select email_subject, email_id, campaign_name, context_traits_email from activecampaign.email_delivered where anonymous_id = 'r3@example.com' and campaign_id = '10'",
    )
    .await;
    assert_eq!(
        v["rows"][0],
        json!(["Subject 0", "100", "Campaign 0", "r3@example.com"]),
        "{v}"
    );
    let events = s.events(&id, 5000).await;
    let open = |email: &str| {
        events
            .iter()
            .find(|e| {
                e["event"] == "Email Opened"
                    && e["anonymousId"] == email
                    && e["properties"]["campaign_id"] == "10"
            })
            .unwrap_or_else(|| panic!("no open of {email}"))
            .clone()
    };
    for i in [2usize, 4] {
        // r2 has only the naive `tstamp` (read at the account's −06:00), r4 also
        // `tstamp_iso`: both land on the same instant.
        let want = ac_api::open_at(stand_in.base, 0, i)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        assert_eq!(
            open(&format!("r{i}@example.com"))["timestamp"],
            want,
            "r{i}"
        );
    }
    let spam = events
        .iter()
        .find(|e| e["event"] == "Email Marked as Spam")
        .unwrap();
    assert_eq!(spam["properties"]["reason"], "The emails are spam");
    let bounce = events
        .iter()
        .find(|e| e["event"] == "Email Bounced")
        .unwrap();
    assert!(
        ["hard", "soft"].contains(&bounce["properties"]["bounce_type"].as_str().unwrap()),
        "{bounce}"
    );
    assert_eq!(bounce["properties"]["bounce_code"], "5.1.1");

    // The stand-in's view: within the limit, 429s honoured, the 500 retried.
    assert!(stand_in.limited.load(Ordering::SeqCst) > 0);
    assert_eq!(stand_in.failed.load(Ordering::SeqCst), 1);
    let peak = stand_in.max_per_second();
    assert!(peak <= 5, "{peak} requests within one second");

    // A second sync (through the CLI, waiting with its progress bar) stores nothing twice.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["sources", "sync", &id, "--since", &since[..10], "--wait"])
        .env("TRIBUTARY_SERVER", &s.url)
        .env("TRIBUTARY_ADMIN_TOKEN", &s.token)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("3/3 campaigns"), "progress bar: {stderr}");
    let again = sync_status(&s, &id).await;
    assert_eq!(again["state"], "idle");
    assert_eq!(again["events"], 0, "nothing stored twice: {again}");
    assert_tables(&s, "activecampaign", &expected).await;
    let show = tokio::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["sources", "show", &id])
        .env("TRIBUTARY_SERVER", &s.url)
        .env("TRIBUTARY_ADMIN_TOKEN", &s.token)
        .output()
        .await
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("api sync:    idle"), "{show}");
    assert!(show.contains("next poll:"), "{show}");

    // Metrics name requests by status and 429s; the key is nowhere.
    let metrics = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tributary_activecampaign_api_requests_total{status=\"429\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tributary_activecampaign_api_rate_limited_total"));
    assert!(
        metrics.contains("tributary_activecampaign_sync_events_total{event=\"email_delivered\"}")
    );
    assert!(!metrics.contains(KEY));
    assert!(!s.log().contains(KEY), "the key is never logged");
}

#[tokio::test]
async fn sigkill_mid_backfill_resumes_with_no_duplicate_and_no_gap() {
    let stand_in = StandIn::start(250, Faults::default()).await;
    let mut s = Server::start();
    let (st, src) = create_ac_source(&s, "activecampaign", api_settings(&stand_in)).await;
    assert_eq!(st, 201, "{src}");
    let id = src["id"].as_str().unwrap().to_string();
    let (st, _) = start_sync(&s, &id, json!({})).await;
    assert_eq!(st, 202);
    // Kill it once some, but not all, of the backfill is stored.
    let expected = Expected::of(250);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = sync_status(&s, &id).await;
        let events = v["events"].as_u64().unwrap_or(0) as usize;
        assert_eq!(v["state"], "running", "finished before the kill: {v}");
        if events > 300 {
            assert!(events < expected.total());
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.kill();
    let before = stand_in.requests();
    s.restart();
    let done = sync_settles(&s, &id).await;
    assert_eq!(done["state"], "idle", "{done}");
    assert_eq!(done["campaigns_done"], 3);
    assert!(
        stand_in.requests() > before,
        "the restarted server resumed the run"
    );
    assert_tables(&s, "activecampaign", &expected).await;
    let stored = s.events(&id, 5000).await;
    assert_eq!(
        stored.len(),
        expected.total(),
        "the log holds each event once"
    );
}

async fn post_open_webhooks(s: &Server, key: &str, stand_in: &StandIn, recipients: usize) {
    for i in (0..recipients).filter(|i| recipient(*i).opened) {
        let r = client()
            .post(format!(
                "{}/v1/webhooks/activecampaign?writeKey={key}",
                s.url
            ))
            .form(&ac_api::open_webhook(stand_in.base, 0, i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
}

#[tokio::test]
async fn opens_by_webhook_and_by_api_are_one_row_in_either_order() {
    let recipients = 30;
    let stand_in = StandIn::start(recipients, Faults::default()).await;
    let s = Server::start();
    let expected = Expected::of(recipients);
    let opened_c0 = expected
        .opened
        .iter()
        .filter(|(_, c)| *c == campaign_id(0))
        .count();

    // Webhooks first, then the API.
    let (_, a) = create_ac_source(&s, "hooks_first", api_settings(&stand_in)).await;
    let (a_key, a_id) = key_id(&a);
    post_open_webhooks(&s, &a_key, &stand_in, recipients).await;
    start_sync(&s, &a_id, json!({})).await;
    let done = sync_settles(&s, &a_id).await;
    assert_eq!(done["state"], "idle", "{done}");
    assert_eq!(
        done["events"],
        json!(expected.total() - opened_c0),
        "the API's opens of campaign 0 were already stored: {done}"
    );
    assert_tables(&s, "hooks_first", &expected).await;

    // The API first, then the same opens as webhooks.
    let (_, b) = create_ac_source(&s, "api_first", api_settings(&stand_in)).await;
    let (b_key, b_id) = key_id(&b);
    start_sync(&s, &b_id, json!({})).await;
    assert_eq!(sync_settles(&s, &b_id).await["state"], "idle");
    post_open_webhooks(&s, &b_key, &stand_in, recipients).await;
    assert_tables(&s, "api_first", &expected).await;
    let stored = s.events(&b_id, 5000).await;
    assert_eq!(
        stored.len(),
        expected.total(),
        "the webhooks were duplicates"
    );
}

#[tokio::test]
async fn refused_key_unreachable_url_and_bad_since_are_clear_errors() {
    let stand_in: Arc<StandIn> = StandIn::start(20, Faults::default()).await;
    let s = Server::start();

    // Settings are checked against the account before they are stored.
    let (st, v) = create_ac_source(
        &s,
        "wrong",
        json!({"api": {"url": stand_in.url, "key": "not-the-key"}}),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("invalid_api_key")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("Settings → Developer"),
        "{v}"
    );
    let (st, v) = create_ac_source(
        &s,
        "nowhere",
        json!({"api": {"url": format!("http://127.0.0.1:{}", crate::harness::free_port()), "key": KEY}}),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("api_unreachable")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach ActiveCampaign"),
        "{v}"
    );
    let (st, v) = create_ac_source(
        &s,
        "badurl",
        json!({"api": {"url": "acct.api-us1.com", "key": KEY}}),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("invalid_settings")),
        "{v}"
    );

    let (st, src) = create_ac_source(&s, "activecampaign", api_settings(&stand_in)).await;
    assert_eq!(st, 201, "{src}");
    let id = src["id"].as_str().unwrap().to_string();
    for bad in ["yesterday", "2024-13-01T00:00:00Z", "2999-01-01T00:00:00Z"] {
        let (st, v) = start_sync(&s, &id, json!({ "since": bad })).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (400, Some("invalid_since")),
            "{bad}: {v}"
        );
    }
    let (st, v) = start_sync(&s, &id, json!({"since": 5})).await;
    assert_eq!(st, 400, "{v}");
    let (_, plain) = s
        .admin(
            Method::POST,
            "/sources",
            Some(json!({"type": "activecampaign", "name": "n", "schema": "noapi"})),
        )
        .await;
    let (st, v) = start_sync(&s, plain["id"].as_str().unwrap(), json!({})).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("no_api_settings")),
        "{v}"
    );

    // A masked key sent back keeps the stored key; PATCHing other fields works.
    let (st, v) = s
        .admin(
            Method::PATCH,
            &format!("/sources/{id}"),
            Some(json!({"settings": {"api": {"url": stand_in.url, "key": "…4242", "poll_minutes": 30}}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["settings"]["api"]["poll_minutes"], 30);

    // The key stops working (revoked in ActiveCampaign): the run fails clearly and
    // stores nothing.
    stand_in.revoked.store(true, Ordering::SeqCst);
    let (st, _) = start_sync(&s, &id, json!({})).await;
    assert_eq!(st, 202);
    let failed = sync_settles(&s, &id).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("refused the API key (HTTP 401)"),
        "{failed}"
    );
    assert_eq!(failed["events"], 0);
    assert!(s.events(&id, 10).await.is_empty(), "nothing stored");
    assert!(
        failed["next_poll_at"].is_string(),
        "it tries again at the next poll"
    );
}

/// Seconds of CPU a process used so far (`/proc/PID/stat` utime + stime, in the
/// kernel's fixed USER_HZ of 100 ticks per second).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is index 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// Measurement, not a timed test (`cargo test -p tributary --test it -- --ignored
/// backfill_of_10000`): 3 campaigns × 3,334 recipients against the stand-in; prints the
/// requests made, the wall time, the floor that 5 requests/s implies, and the server's
/// CPU per 10,000 stored events.
#[tokio::test]
#[ignore]
async fn backfill_of_10000_recipients_measured() {
    let per_campaign = 3334;
    let stand_in = StandIn::start(per_campaign, Faults::default()).await;
    let s = Server::start();
    let (_, src) = create_ac_source(&s, "activecampaign", api_settings(&stand_in)).await;
    let id = src["id"].as_str().unwrap().to_string();
    let pid = s.pid().unwrap();
    let (cpu0, req0, t0) = (cpu_seconds(pid), stand_in.requests(), Instant::now());
    start_sync(&s, &id, json!({})).await;
    let done = sync_settles(&s, &id).await;
    let wall = t0.elapsed().as_secs_f64();
    let requests = stand_in.requests() - req0;
    let events = done["events"].as_u64().unwrap_or(0) as f64;
    let cpu = cpu_seconds(pid) - cpu0;
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "MEASURED 10k backfill: {} recipients, {requests} requests, {wall:.1}s wall (floor {:.1}s at 5 req/s), {events} events, {:.2}s CPU ({:.2}s per 10,000 events), peak {} req/s",
        per_campaign * CAMPAIGNS,
        requests as f64 / 5.0,
        cpu,
        cpu * 10_000.0 / events.max(1.0),
        stand_in.max_per_second()
    );
    assert_eq!(done["state"], "idle", "{done}");
    assert_eq!(events as usize, Expected::of(per_campaign).total());
}

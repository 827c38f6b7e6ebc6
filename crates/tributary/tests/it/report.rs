//! Issue #12's backends through the running binary: the email report's counts on a
//! known mix of ActiveCampaign webhooks and Segment-format email tracks (every count
//! and rate checked by hand, on SQLite and on PostgreSQL), the CLI's report, and the
//! fate of an event (loaded and delivered, dead-lettered by a receiver answering
//! 400, loaded with a discarded value).

use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use reqwest::Method;
use serde_json::{Value, json};

use crate::cli::cli;
use crate::harness::{Server, client, key_id};

fn fixture(name: &str) -> String {
    let dir = format!(
        "{}/../activecampaign/tests/fixtures",
        crate::harness::manifest_dir()
    );
    std::fs::read_to_string(format!("{dir}/{name}.form"))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A fixture with another recipient (email and contact id) and, optionally,
/// another time.
fn webhook_body(name: &str, who: &str, contact_id: u32, date_time: Option<&str>) -> Vec<u8> {
    let mut body = fixture(name)
        .trim()
        .replace(
            "contact%5Bemail%5D=ann.lee%40example.com",
            &format!("contact%5Bemail%5D={who}%40example.com"),
        )
        .replace(
            "contact%5Bid%5D=36",
            &format!("contact%5Bid%5D={contact_id}"),
        );
    if let Some(t) = date_time {
        let start = body.find("date_time=").unwrap();
        let end = body[start..].find('&').map_or(body.len(), |e| start + e);
        body.replace_range(start..end, &format!("date_time={}", t.replace(':', "%3A")));
    }
    body.into_bytes()
}

async fn webhook(s: &Server, key: &str, body: Vec<u8>) {
    let r = client()
        .post(format!(
            "{}/v1/webhooks/activecampaign?writeKey={key}",
            s.url
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

fn email_track(event: &str, who: &str, campaign: &str, name: &str, ts: &str) -> Value {
    json!({
        "type": "track",
        "event": event,
        "anonymousId": format!("{who}@example.com"),
        "timestamp": ts,
        "properties": {"campaign_id": campaign, "campaign_name": name, "email_subject": "Spring is here"},
        "context": {"traits": {"email": format!("{who}@example.com")}},
    })
}

/// The known mix, and what it must count to (by hand):
///
/// campaign 42 "March newsletter"
/// - Email Delivered (Segment format): ann, bob, cid, dan, and bob again (another
///   messageId) → delivered 4
/// - webhooks: open ann, open bob, open ann again on 02-29; click ann, click ann
///   again on 02-29, click cid (no open) → opened {ann,bob,cid} 3, clicked
///   {ann,cid} 2, one link with 3 clicks by 2 clickers
/// - bounce eve → bounced 1; unsubscribe dan → 1; Email Marked as Spam dan → 1
/// - rates: open 3/4, click 2/4, click-to-open 2/3, bounce 1/(4+1), unsubscribe
///   1/4, spam 1/4
///
/// campaign 7 "Other": Email Delivered fay → delivered 1, every other count 0,
/// click-to-open null (nobody opened).
async fn seed_email_mix(s: &Server) -> String {
    let src = s
        .create_source("activecampaign", "ActiveCampaign", "activecampaign")
        .await;
    let (key, id) = key_id(&src);
    let day = "2024-02-28T12:00:00.000Z";
    let mut batch: Vec<Value> = ["ann", "bob", "cid", "dan", "bob"]
        .iter()
        .enumerate()
        .map(|(i, who)| {
            let mut t = email_track("Email Delivered", who, "42", "March newsletter", day);
            t["messageId"] = json!(format!("delivered-{i}"));
            t
        })
        .collect();
    batch.push(email_track(
        "Email Marked as Spam",
        "dan",
        "42",
        "March newsletter",
        "2024-02-28T15:00:00.000Z",
    ));
    batch.push(email_track("Email Delivered", "fay", "7", "Other", day));
    let (st, body) = s.post("/v1/batch", &key, json!({"batch": batch})).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.get("rejected").is_none(), "{body}");

    webhook(s, &key, webhook_body("open", "ann.lee", 36, None)).await;
    webhook(s, &key, webhook_body("open", "bob", 37, None)).await;
    webhook(
        s,
        &key,
        webhook_body("open", "ann.lee", 36, Some("2024-02-29T09:00:00-06:00")),
    )
    .await;
    webhook(s, &key, webhook_body("click", "ann.lee", 36, None)).await;
    webhook(
        s,
        &key,
        webhook_body("click", "ann.lee", 36, Some("2024-02-29T09:01:00-06:00")),
    )
    .await;
    webhook(s, &key, webhook_body("click", "cid", 38, None)).await;
    webhook(s, &key, webhook_body("bounce", "eve", 40, None)).await;
    webhook(s, &key, webhook_body("unsubscribe", "dan", 39, None)).await;
    crate::warehouse::caught_up(s).await;
    id
}

fn campaign<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["campaign_id"] == id)
        .unwrap_or_else(|| panic!("no campaign {id} in {report:#}"))
}

fn close(v: &Value, want: f64) -> bool {
    v.as_f64().is_some_and(|f| (f - want).abs() < 1e-9)
}

async fn assert_email_report(s: &Server, source: &str) {
    let (st, r) = s
        .admin(
            Method::GET,
            &format!("/reports/email?source={source}"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["campaigns"].as_array().unwrap().len(), 2, "{r:#}");
    let c = campaign(&r, "42");
    assert_eq!(c["campaign_name"], "March newsletter");
    let counts = |c: &Value| {
        [
            "delivered",
            "bounced",
            "opened",
            "clicked",
            "unsubscribed",
            "spam",
        ]
        .map(|k| c[k].as_u64().unwrap_or(u64::MAX))
    };
    assert_eq!(counts(c), [4, 1, 3, 2, 1, 1], "{c:#}");
    assert!(close(&c["open_rate"], 0.75), "{c:#}");
    assert!(close(&c["click_rate"], 0.5), "{c:#}");
    assert!(close(&c["click_to_open_rate"], 2.0 / 3.0), "{c:#}");
    assert!(close(&c["bounce_rate"], 0.2), "{c:#}");
    assert!(close(&c["unsubscribe_rate"], 0.25), "{c:#}");
    assert!(close(&c["spam_rate"], 0.25), "{c:#}");
    assert_eq!(
        c["links"],
        json!([{"url": "https://shop.example.com/spring?utm_source=ac&utm_campaign=march",
                "clicks": 3, "unique_clickers": 2}])
    );
    // The deliveries (12:00Z) come before the bounce (06:59:40-06:00 = 12:59:40Z).
    assert_eq!(c["first_event_at"], "2024-02-28T12:00:00.000Z");
    assert_eq!(
        c["daily"],
        json!([
            {"date": "2024-02-28", "delivered": 4, "opened": 3, "clicked": 2, "bounced": 1,
             "unsubscribed": 1, "spam": 1},
            {"date": "2024-02-29", "delivered": 0, "opened": 1, "clicked": 1, "bounced": 0,
             "unsubscribed": 0, "spam": 0},
        ])
    );
    let other = campaign(&r, "7");
    assert_eq!(counts(other), [1, 0, 0, 0, 0, 0]);
    assert!(close(&other["open_rate"], 0.0));
    assert!(other["click_to_open_rate"].is_null(), "{other:#}");
    assert!(close(&other["bounce_rate"], 0.0));
    for k in [
        "open_rate",
        "click_to_open_rate",
        "bounce_rate",
        "rates",
        "opened",
    ] {
        assert!(r["definitions"][k].is_string(), "definition {k}: {r:#}");
    }

    // A window: only the 29th. Nothing delivered in it, so its rates are null.
    let (st, r) = s
        .admin(
            Method::GET,
            &format!("/reports/email?source={source}&from=2024-02-29&to=2024-03-01"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let c = campaign(&r, "42");
    assert_eq!(counts(c), [0, 0, 1, 1, 0, 0], "{c:#}");
    assert!(c["open_rate"].is_null());
    assert_eq!(c["links"][0]["clicks"], 1);
    assert!(r["campaigns"].as_array().unwrap().len() == 1, "{r:#}");

    // Refusals are clear.
    let (st, e) = s
        .admin(
            Method::GET,
            &format!("/reports/email?source={source}&from=last+week"),
            None,
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["code"], "invalid_query");
    assert!(e["message"].as_str().unwrap().contains("`from`"), "{e}");
    let (st, e) = s
        .admin(Method::GET, "/reports/email?source=src_nope", None)
        .await;
    assert_eq!(st, 404, "{e}");
}

#[tokio::test]
async fn email_report_counts_a_known_mix_on_sqlite() {
    let s = Server::start();
    let source = seed_email_mix(&s).await;
    assert_email_report(&s, &source).await;

    // A source with no email events yet: an empty report, not an error.
    let (_, web) = key_id(&s.create_source("http", "Website", "website").await);
    let (st, r) = s
        .admin(Method::GET, &format!("/reports/email?source={web}"), None)
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["campaigns"], json!([]));

    // The CLI prints the table, the links and the definitions; --json the API's JSON.
    let out = cli(&s, &["report", "email", &source]).await;
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("CAMPAIGN"), "{out}");
    for col in ["DELIVERED", "OPENED", "CTOR", "BOUNCE"] {
        assert!(header.contains(col), "{out}");
    }
    let row42 = out
        .lines()
        .find(|l| l.starts_with("42 "))
        .unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<&str> = row42.split_whitespace().collect();
    // 42, March, newsletter, 4 1 3 2 1 1, rates.
    assert_eq!(
        &cells[3..],
        [
            "4", "1", "3", "2", "1", "1", "75.0%", "50.0%", "66.7%", "20.0%", "25.0%", "25.0%"
        ],
        "{out}"
    );
    let row7 = out.lines().find(|l| l.starts_with("7 ")).unwrap();
    assert!(
        row7.contains('\u{2014}'),
        "null rate shown as a dash: {out}"
    );
    assert!(
        out.contains("links of campaign 42 (March newsletter)"),
        "{out}"
    );
    assert!(out.contains("definitions:"), "{out}");
    assert!(out.contains("bounced / (delivered + bounced)"), "{out}");
    let json_out: Value =
        serde_json::from_str(&cli(&s, &["report", "email", &source, "--json"]).await).unwrap();
    assert_eq!(campaign(&json_out, "42")["delivered"], 4);
    let windowed = cli(
        &s,
        &[
            "report",
            "email",
            &source,
            "--from",
            "2024-02-29",
            "--to",
            "2024-03-01T00:00:00Z",
        ],
    )
    .await;
    assert!(windowed.lines().any(|l| l.starts_with("42 ")), "{windowed}");
}

#[tokio::test]
async fn email_report_counts_a_known_mix_on_postgresql() {
    let test = "email_report_counts_a_known_mix_on_postgresql";
    let Some(url) = crate::warehouse::fresh_postgres_db(test) else {
        return;
    };
    let mut s = Server::start_with(vec![
        ("TRIBUTARY_WAREHOUSE".into(), url.clone()),
        ("TRIBUTARY_WAREHOUSE_INTERVAL_MS".into(), "200".into()),
    ]);
    let source = seed_email_mix(&s).await;
    let (_, w) = s.admin(Method::GET, "/warehouse", None).await;
    assert_eq!(w["kind"], "postgres");
    assert_email_report(&s, &source).await;
    s.stop();
    crate::query_safety::drop_postgres_db(&url);
}

/// A receiver on 127.0.0.1 answering every POST with `status` and `body`.
async fn receiver(status: StatusCode, body: &'static str) -> String {
    let app = Router::new().route("/hook", post(move || async move { (status, body) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn fate_until(
    s: &Server,
    source: &str,
    message_id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, f) = s
            .admin(
                Method::GET,
                &format!("/sources/{source}/events/{message_id}"),
                None,
            )
            .await;
        if st == 200 && done(&f) {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "fate of {message_id} never settled: {st} {f:#}\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn dest<'a>(fate: &'a Value, name: &str) -> &'a Value {
    fate["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no destination {name} in {fate:#}"))
}

#[tokio::test]
async fn fate_shows_loaded_delivered_dead_lettered_and_discarded() {
    let s = Server::start();
    let (key, source) = key_id(&s.create_source("http", "Shop", "shop").await);
    let (_, other) = key_id(&s.create_source("http", "Blog", "blog").await);
    let good = receiver(StatusCode::OK, "ok").await;
    let bad = receiver(
        StatusCode::BAD_REQUEST,
        "{\"error\":\"amount must be a number\"}",
    )
    .await;
    for (name, url, sources) in [
        ("good hook", &good, json!([])),
        ("strict hook", &bad, json!([])),
        ("blog hook", &good, json!([other])),
    ] {
        let (st, d) = s
            .admin(
                Method::POST,
                "/destinations",
                Some(
                    json!({"type": "webhook", "name": name, "source_ids": sources,
                            "settings": {"url": url}}),
                ),
            )
            .await;
        assert_eq!(st, 201, "{d}");
    }
    let (st, b) = s
        .post(
            "/v1/batch",
            &key,
            json!({"batch": [
                {"type": "track", "userId": "u1", "event": "Order Completed",
                 "messageId": "order-1", "properties": {"amount": 5}},
                {"type": "track", "userId": "u2", "event": "Order Completed",
                 "messageId": "order-2", "properties": {"amount": "lots"}},
            ]}),
        )
        .await;
    assert_eq!(st, 200, "{b}");

    let settled = |f: &Value| {
        f["warehouse"]["state"] == "loaded"
            && f["destinations"].as_array().is_some_and(|ds| {
                ds.iter()
                    .all(|d| d["state"] != "pending" && d["state"] != "retrying")
            })
    };
    let f = fate_until(&s, &source, "order-1", settled).await;
    assert_eq!(f["stored"]["type"], "track");
    assert_eq!(f["stored"]["event"], "Order Completed");
    assert!(f["stored"]["seq"].as_u64().unwrap() >= 1);
    assert_eq!(f["warehouse"]["schema"], "shop");
    assert_eq!(
        f["warehouse"]["tables"],
        json!(["order_completed", "tracks"])
    );
    assert_eq!(f["warehouse"]["discards"], json!([]));
    assert_eq!(f["event"]["messageId"], "order-1");
    assert_eq!(dest(&f, "good hook")["state"], "delivered", "{f:#}");
    let strict = dest(&f, "strict hook");
    assert_eq!(strict["state"], "dead_lettered", "{f:#}");
    assert_eq!(strict["last_status"], 400);
    assert!(
        strict["last_response"]
            .as_str()
            .unwrap()
            .contains("amount must be a number"),
        "{strict}"
    );
    assert!(
        strict["detail"].as_str().unwrap().contains("HTTP 400"),
        "{strict}"
    );
    assert_eq!(dest(&f, "blog hook")["state"], "not_subscribed");

    // The second order's amount is text in a bigint column: loaded, the value
    // discarded (NULL) and recorded with the reason.
    let f = fate_until(&s, &source, "order-2", settled).await;
    assert_eq!(f["warehouse"]["state"], "loaded");
    let discards = f["warehouse"]["discards"].as_array().unwrap();
    assert_eq!(discards.len(), 1, "{f:#}");
    assert_eq!(discards[0]["table"], "order_completed");
    assert_eq!(discards[0]["column"], "amount");
    assert_eq!(discards[0]["value"], "lots");
    assert!(!discards[0]["reason"].as_str().unwrap().is_empty());
    assert!(
        f["warehouse"]["detail"]
            .as_str()
            .unwrap()
            .contains("tributary_discards"),
        "{f:#}"
    );

    // Unknown ids are 404 with a sentence.
    let (st, e) = s
        .admin(Method::GET, &format!("/sources/{source}/events/nope"), None)
        .await;
    assert_eq!(st, 404, "{e}");
    assert!(e["message"].as_str().unwrap().contains("nope"), "{e}");
    let (st, _) = s
        .admin(Method::GET, "/sources/src_nope/events/order-1", None)
        .await;
    assert_eq!(st, 404);
}

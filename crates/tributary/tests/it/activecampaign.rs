//! ActiveCampaign end to end: webhooks posted over HTTP become Segment Email events,
//! identities resolve through an earlier identify on another source, and the
//! source overview shows what ActiveCampaign's own panel shows.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Server, client, key_id};

fn fixture(name: &str) -> Vec<u8> {
    // The ActiveCampaign crate's fixtures, in the repository.
    let dir = format!(
        "{}/../activecampaign/tests/fixtures",
        crate::harness::manifest_dir()
    );
    std::fs::read(format!("{dir}/{name}.form")).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

async fn webhook(s: &Server, key: &str, body: Vec<u8>, keyed_path: bool) -> (u16, Value) {
    let url = if keyed_path {
        format!("{}/v1/webhooks/activecampaign/{key}", s.url)
    } else {
        format!("{}/v1/webhooks/activecampaign?writeKey={key}", s.url)
    };
    let r = client()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (
        st,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn webhooks_become_email_events_with_identity_from_another_source() {
    let s = Server::start();
    let ac = s
        .create_source("activecampaign", "ActiveCampaign", "activecampaign")
        .await;
    let (ac_key, ac_id) = key_id(&ac);
    assert_eq!(ac["status"], "waiting");
    assert!(ac["last_event"].is_null());
    let (web_key, _) = key_id(&s.create_source("http", "Website", "website").await);

    // The website identified Ann earlier (email case differs from ActiveCampaign's).
    let (st, _) = s
        .post(
            "/v1/identify",
            &web_key,
            json!({"userId":"user-ann","traits":{"email":"Ann.Lee@Example.com"}}),
        )
        .await;
    assert_eq!(st, 200);

    for (name, keyed) in [
        ("open", false),
        ("click", true),
        ("bounce", false),
        ("unsubscribe", true),
    ] {
        let (st, v) = webhook(&s, &ac_key, fixture(name), keyed).await;
        assert_eq!(st, 200, "{name}: {v}");
    }
    // ActiveCampaign delivers at least once: a repeat collapses into the same event.
    let (st, _) = webhook(&s, &ac_key, fixture("open"), false).await;
    assert_eq!(st, 200);

    let events = s.events(&ac_id, 50).await;
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for want in [
        "Email Opened",
        "Email Link Clicked",
        "Email Bounced",
        "Email Unsubscribed",
    ] {
        assert_eq!(
            names.iter().filter(|n| **n == want).count(),
            1,
            "{want} in {names:?}"
        );
    }
    let opened = events
        .iter()
        .find(|e| e["event"] == "Email Opened")
        .unwrap();
    assert_eq!(
        opened["userId"], "user-ann",
        "identity from the website's identify: {opened}"
    );
    assert!(opened.get("anonymousId").is_none());
    assert_eq!(opened["properties"]["campaign_id"], "42");
    assert_eq!(opened["properties"]["email_subject"], "Spring is here");
    assert_eq!(opened["context"]["traits"]["email"], "ann.lee@example.com");
    assert_eq!(opened["context"]["integration"]["name"], "activecampaign");
    assert_eq!(
        opened["timestamp"], "2024-02-28T13:04:13.000Z",
        "date_time -06:00 converted to UTC"
    );
    assert!(opened["messageId"].as_str().unwrap().starts_with("ac-"));
    let clicked = events
        .iter()
        .find(|e| e["event"] == "Email Link Clicked")
        .unwrap();
    assert!(
        clicked["properties"]["link_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("http")),
        "{clicked}"
    );

    let (_, src) = s
        .admin(Method::GET, &format!("/sources/{ac_id}"), None)
        .await;
    assert_eq!(src["status"], "receiving");
    assert_eq!(src["last_event"]["event"], "open");
    assert!(src["last_event"]["received_at"].as_str().is_some());
}

#[tokio::test]
async fn unknown_recipients_get_their_email_as_anonymous_id() {
    let s = Server::start();
    let (key, id) = key_id(
        &s.create_source("activecampaign", "AC", "activecampaign")
            .await,
    );
    let body = String::from_utf8(fixture("open"))
        .unwrap()
        .replace("ann.lee%40example.com", "bob%40example.org")
        .replace("contact%5Bid%5D=36", "contact%5Bid%5D=99");
    let (st, _) = webhook(&s, &key, body.into_bytes(), false).await;
    assert_eq!(st, 200);
    let events = s.events(&id, 5).await;
    assert_eq!(events[0]["anonymousId"], "bob@example.org");
    assert!(events[0].get("userId").is_none());
}

#[tokio::test]
async fn segment_format_email_events_keep_their_names_and_resolve_identity() {
    let s = Server::start();
    let (key, id) = key_id(
        &s.create_source("activecampaign", "AC", "activecampaign")
            .await,
    );
    let (web_key, _) = key_id(&s.create_source("http", "Web", "web").await);
    s.post(
        "/v1/identify",
        &web_key,
        json!({"userId":"u-7","traits":{"email":"cy@example.com"}}),
    )
    .await;
    let batch: Vec<Value> = [
        "Email Delivered",
        "Email Opened",
        "Email Link Clicked",
        "Email Unsubscribed",
        "Email Bounced",
        "Email Marked as Spam",
    ]
    .iter()
    .enumerate()
    .map(|(i, e)| {
        json!({"type":"track","event":e,"messageId":format!("seg-{i}"),
        "context":{"traits":{"email":"cy@example.com"}},"properties":{"email_id":"m1"}})
    })
    .collect();
    let (st, v) = s.post("/v1/batch", &key, json!({"batch": batch})).await;
    assert_eq!(st, 200, "{v}");
    let events = s.events(&id, 10).await;
    assert_eq!(events.len(), 6);
    assert!(events.iter().all(|e| e["userId"] == "u-7"), "{events:?}");
    assert!(events.iter().any(|e| e["event"] == "Email Delivered"));
    assert!(events.iter().any(|e| e["event"] == "Email Marked as Spam"));
    // Only an email, no known user: the email is the anonymousId.
    let (st, _) = s
        .post(
            "/v1/track",
            &key,
            json!({"event":"Email Delivered","context":{"traits":{"email":"new@example.com"}}}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(s.events(&id, 1).await[0]["anonymousId"], "new@example.com");
}

#[tokio::test]
async fn bad_webhooks_are_refused_clearly_and_never_with_410() {
    let s = Server::start();
    let (key, id) = key_id(
        &s.create_source("activecampaign", "AC", "activecampaign")
            .await,
    );
    let (st, v) = webhook(&s, "wrong", fixture("open"), false).await;
    assert_eq!((st, v["code"].as_str()), (401, Some("unauthorized")));
    let (st, v) = webhook(&s, &key, b"{\"type\":\"open\"}".to_vec(), false).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["message"].as_str().is_some());
    let (st, _) = webhook(&s, &key, vec![0xff, 0x00, 0x13, 0x37], false).await;
    assert_eq!(st, 400);
    // An unknown type is acknowledged, counted, shown in the debugger, not stored.
    let (st, v) = webhook(&s, &key, b"type=deal_update&deal%5Bid%5D=5".to_vec(), false).await;
    assert_eq!(st, 200, "{v}");
    let events = s.events(&id, 10).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "unmapped");
    assert_eq!(events[0]["activecampaign_type"], "deal_update");
    let metrics = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tributary_activecampaign_unmapped_total{type=\"deal_update\"} 1"),
        "{metrics}"
    );
    // Every fixture is accepted.
    for f in [
        "bounce",
        "click",
        "contact_tag_added",
        "forward",
        "open",
        "reply",
        "sent",
        "share",
        "subscribe",
        "unsubscribe",
    ] {
        let (st, v) = webhook(&s, &key, fixture(f), false).await;
        assert_eq!(st, 200, "{f}: {v}");
        assert_ne!(st, 410);
    }
}

/// An `open` webhook of campaign 42, message 17 at one instant for `email`, without
/// `contact[id]` (ActiveCampaign leaves it out for some senders and automations).
fn open_without_contact_id(email: &str) -> Vec<u8> {
    format!(
        "type=open&date_time=2024-02-28T07%3A04%3A13-06%3A00&initiated_from=public\
         &campaign%5Bid%5D=42&campaign%5Bname%5D=March+newsletter\
         &campaign%5Bmessage%5D%5Bid%5D=17&campaign%5Bmessage%5D%5Bsubject%5D=Spring+is+here\
         &contact%5Bemail%5D={}",
        email.replace('@', "%40")
    )
    .into_bytes()
}

#[tokio::test]
async fn five_recipients_without_contact_ids_are_five_events() {
    let s = Server::start();
    let (key, id) = key_id(
        &s.create_source("activecampaign", "AC", "activecampaign")
            .await,
    );
    let recipients: Vec<String> = (1..=5).map(|i| format!("r{i}@example.com")).collect();
    for email in &recipients {
        let (st, v) = webhook(&s, &key, open_without_contact_id(email), false).await;
        assert_eq!(st, 200, "{email}: {v}");
    }
    // A repeated delivery of one of them still collapses (same recipient, same event).
    let (st, _) = webhook(&s, &key, open_without_contact_id("R3@Example.com"), false).await;
    assert_eq!(st, 200);
    let events = s.events(&id, 50).await;
    let mut stored: Vec<String> = events
        .iter()
        .filter(|e| e["event"] == "Email Opened")
        .map(|e| {
            e["context"]["traits"]["email"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    stored.sort();
    assert_eq!(stored, recipients, "{events:?}");
    let ids: std::collections::HashSet<&str> = events
        .iter()
        .filter_map(|e| e["messageId"].as_str())
        .collect();
    assert_eq!(ids.len(), 5);
}

/// An automation "Webhook" action as ActiveCampaign posts it: contact fields and
/// `seriesid`, no `type` (structure of a public capture; personal data replaced).
const AUTOMATION_ACTION: &[u8] = b"contact%5Bid%5D=1358&contact%5Bemail%5D=Zoe.Auto%40example.com\
&contact%5Bfirst_name%5D=Zoe&contact%5Blast_name%5D=Auto&contact%5Bphone%5D=%2B15550100\
&contact%5Borgname%5D=Acme&contact%5Bcustomer_acct_name%5D=&contact%5Btags%5D=Externos\
&contact%5Bip4%5D=127.0.0.1&seriesid=9";

/// A global `open` webhook for `email`, built inline so the test needs no fixture.
fn open_webhook(email: &str) -> Vec<u8> {
    let email: String = form_urlencoded_byte(email);
    format!(
        "type=open&date_time=2026-01-05T10%3A00%3A00-06%3A00&initiated_from=admin\
         &contact%5Bid%5D=77&contact%5Bemail%5D={email}&campaign%5Bid%5D=42\
         &campaign%5Bmessage%5D%5Bid%5D=9"
    )
    .into_bytes()
}

fn form_urlencoded_byte(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn an_identity_acknowledged_just_before_a_sigkill_resolves_webhooks_after_restart() {
    let mut s = Server::start();
    let (ac_key, ac_id) = key_id(
        &s.create_source("activecampaign", "AC", "activecampaign")
            .await,
    );
    let (web_key, _) = key_id(&s.create_source("http", "Website", "website").await);

    let (st, v) = s
        .post(
            "/v1/identify",
            &web_key,
            json!({"userId": "user-kill-9", "traits": {"email": "Kim.Kill@Example.com"}}),
        )
        .await;
    let acked = std::time::Instant::now();
    let sent = s.kill_signalled_at().expect("server running");
    assert_eq!(st, 200, "{v}");
    let gap = sent.duration_since(acked);
    assert!(
        gap < std::time::Duration::from_millis(10),
        "SIGKILL {gap:?} after the 200"
    );

    s.restart();
    let (st, v) = webhook(&s, &ac_key, open_webhook("kim.kill@example.com"), false).await;
    assert_eq!(st, 200, "{v}");
    let events = s.events(&ac_id, 10).await;
    let opened = events
        .iter()
        .find(|e| e["event"] == "Email Opened")
        .unwrap_or_else(|| panic!("no Email Opened in {events:?}"));
    assert_eq!(opened["userId"], "user-kill-9", "{opened}");
    assert!(
        opened.get("anonymousId").is_none_or(Value::is_null),
        "{opened}"
    );
}

#[tokio::test]
async fn an_automation_webhook_step_becomes_an_identify_and_teaches_the_email() {
    let s = Server::start();
    let (key, id) = key_id(
        &s.create_source("activecampaign", "AC", "activecampaign")
            .await,
    );
    let (st, v) = webhook(&s, &key, AUTOMATION_ACTION.to_vec(), true).await;
    assert_eq!(st, 200, "{v}");
    assert!(v.get("mapped").is_none(), "mapped: {v}");
    let events = s.events(&id, 10).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["type"], "identify");
    assert_eq!(e["anonymousId"], "Zoe.Auto@example.com");
    assert_eq!(e["traits"]["email"], "Zoe.Auto@example.com");
    assert_eq!(e["traits"]["firstName"], "Zoe");
    assert_eq!(e["traits"]["lastName"], "Auto");
    assert_eq!(e["traits"]["phone"], "+15550100");
    assert_eq!(e["traits"]["company"]["name"], "Acme");
    assert_eq!(e["traits"]["tags"], json!(["Externos"]));
    assert_eq!(e["context"]["activecampaign"]["automation_id"], "9");
    // The source overview shows it as ActiveCampaign's panel would.
    let (_, src) = s.admin(Method::GET, &format!("/sources/{id}"), None).await;
    assert_eq!(src["last_event"]["type"], "identify", "{src}");
}

#[tokio::test]
async fn unmapped_webhooks_are_in_the_debugger_after_a_restart() {
    let mut s = Server::start();
    let (key, id) = key_id(
        &s.create_source("activecampaign", "AC", "activecampaign")
            .await,
    );
    for n in 0..3 {
        let body = format!("type=deal_update&deal%5Bid%5D={n}").into_bytes();
        let (st, v) = webhook(&s, &key, body, false).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["mapped"], false);
    }
    // SIGKILL: nothing gets flushed on the way down.
    s.restart();
    let events = s.events(&id, 10).await;
    assert_eq!(events.len(), 3, "{events:?}");
    for (e, n) in events.iter().zip(["2", "1", "0"]) {
        assert_eq!(e["type"], "unmapped");
        assert_eq!(e["activecampaign_type"], "deal_update");
        assert_eq!(e["fields"]["deal[id]"], n, "newest first: {events:?}");
    }
}

//! The `activecampaign` destination against a local server answering the shapes
//! documented in reference/activecampaign.md §3.5.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const KEY: &str = "ac-api-key-123";

/// A fake account: one custom field, one existing tag, contact id 10.
async fn fake_account() -> Receiver {
    let tags: Arc<Mutex<Vec<(String, String)>>> =
        Arc::new(Mutex::new(vec![("3".into(), "existing".into())]));
    let syncs = Arc::new(AtomicUsize::new(0));
    Receiver::start(move |req| {
        let path = req.uri.path().to_string();
        if path == "/event" {
            return Reply::json(200, json!({"success": 1, "message": "Event spawned"}));
        }
        if req.header("api-token").as_deref() != Some(KEY) {
            return Reply::json(403, json!({"message": "No Result found for Subscriber with id 0"}));
        }
        let query: HashMap<String, String> = req
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        match (req.method.as_str(), path.as_str()) {
            ("GET", "/api/3/fields") => Reply::json(
                200,
                json!({"fields": [
                    {"id": "1", "title": "Shirt Size", "perstag": "SHIRT_SIZE", "type": "text"},
                    {"id": "2", "title": "Interests", "perstag": "INTERESTS", "type": "checkbox"}
                ], "meta": {"total": "2"}}),
            ),
            ("POST", "/api/3/contact/sync") => {
                // The first sync hits the rate limit once.
                if syncs.fetch_add(1, Ordering::SeqCst) == 0 {
                    let mut r = Reply::json(429, json!({"message": "Too Many Requests"}));
                    r.headers.push(("retry-after", "0".into()));
                    return r;
                }
                let email = req.json()["contact"]["email"].clone();
                Reply::json(
                    201,
                    json!({"fieldValues": [], "contact": {"email": email, "id": "10", "cdate": "2022-04-14T10:03:23-05:00"}}),
                )
            }
            ("GET", "/api/3/contacts/10/contactTags") => Reply::json(
                200,
                json!({"contactTags": [{"contact": "10", "tag": "3", "id": "5"}]}),
            ),
            ("DELETE", "/api/3/contactTags/5") => Reply::json(200, json!({})),
            ("GET", "/api/3/tags") => {
                let search = query.get("search").cloned().unwrap_or_default();
                let found: Vec<Value> = tags
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, t)| t.contains(&search))
                    .map(|(id, t)| json!({"id": id, "tag": t, "tagType": "contact"}))
                    .collect();
                let total = found.len().to_string();
                Reply::json(200, json!({"tags": found, "meta": {"total": total}}))
            }
            ("POST", "/api/3/tags") => {
                let name = req.json()["tag"]["tag"].as_str().unwrap().to_string();
                let mut t = tags.lock().unwrap();
                let id = (20 + t.len()).to_string();
                t.push((id.clone(), name.clone()));
                Reply::json(201, json!({"tag": {"id": id, "tag": name, "tagType": "contact"}}))
            }
            ("POST", "/api/3/contactTags") => {
                let b = req.json()["contactTag"].clone();
                Reply::json(201, json!({"contactTag": {"contact": b["contact"], "tag": b["tag"], "id": "99"}}))
            }
            ("POST", "/api/3/contactLists") => {
                let b = req.json()["contactList"].clone();
                Reply::json(201, json!({"contactList": b}))
            }
            _ => Reply::json(404, json!({"errors": [{"title": "Not Found"}]})),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_syncs_contacts_and_track_posts_events() {
    let h = Harness::new().await;
    let ac = fake_account().await;
    let dest = h
        .create(
            "activecampaign",
            "ActiveCampaign",
            json!({
                "api_url": ac.url("/api/3"),
                "api_key": KEY,
                "actid": 99,
                "event_key": "ek-1",
                "track_url": ac.url("/event"),
            }),
        )
        .await;
    assert_eq!(
        dest.settings["api_key"],
        json!(tributary_destinations::REDACTED)
    );
    let email = "jane@example.com";
    let base = |i: usize, v: Value| {
        let mut e = v;
        e["userId"] = json!("user-1");
        e["messageId"] = json!(format!("ac-{i}"));
        e
    };
    h.append(vec![
        base(0, json!({"type": "identify", "traits": {
            "email": email, "firstName": "Jane", "lastName": "Doe", "phone": "555-0100",
            "shirt_size": "XL", "interests": ["golf", "chess"], "unmatched": "x",
            "tagsReset": true, "tags": ["vip", "existing"],
            "lists": [{"id": 2, "status": "active"}, {"id": 7, "status": "unsubscribed"}]
        }})),
        base(1, json!({"type": "track", "event": "Upgraded To The Premium Annual Plan Today",
            "context": {"traits": {"email": email}}, "properties": {"acValue": "gold", "plan": "p"}})),
        base(2, json!({"type": "identify", "traits": {"email": email, "tags": ["vip"]}})),
        base(3, json!({"type": "identify", "traits": {"firstName": "NoEmail"}})),
        base(4, json!({"type": "page", "name": "Home", "properties": {"url": "https://x"}})),
        base(5, json!({"type": "track", "event": "Logged In", "context": {"traits": {"email": email}}})),
    ])
    .await;
    wait_for(Duration::from_secs(30), "all handled", || async {
        let s = h.engine.get(&dest.id).await.unwrap().stats;
        s.delivered + s.skipped == 6
    })
    .await;
    let v = h.engine.get(&dest.id).await.unwrap();
    assert_eq!(v.stats.delivered, 4);
    assert_eq!(v.stats.skipped, 2);
    assert_eq!(v.stats.dead_letters, 0);

    let reqs: Vec<Request> = ac.requests().into_iter().map(|(r, _)| r).collect();
    let api: Vec<&Request> = reqs
        .iter()
        .filter(|r| r.uri.path().starts_with("/api/3/"))
        .collect();
    assert!(
        api.iter()
            .all(|r| r.header("api-token").as_deref() == Some(KEY))
    );
    let calls: Vec<String> = api
        .iter()
        .map(|r| format!("{} {}", r.method, r.uri.path()))
        .collect();
    assert_eq!(
        calls,
        vec![
            "GET /api/3/fields",
            "POST /api/3/contact/sync", // 429 with Retry-After: the event is retried
            "POST /api/3/contact/sync", // fields come from the cache
            "GET /api/3/contacts/10/contactTags",
            "DELETE /api/3/contactTags/5",
            "GET /api/3/tags",
            "POST /api/3/tags",
            "POST /api/3/contactTags",
            "GET /api/3/tags",
            "POST /api/3/contactTags",
            "POST /api/3/contactLists",
            "POST /api/3/contactLists",
            // Second identify: fields and the tag id come from the caches.
            "POST /api/3/contact/sync",
            "POST /api/3/contactTags",
        ]
    );
    let sync = api
        .iter()
        .filter(|r| r.uri.path() == "/api/3/contact/sync")
        .nth(1)
        .unwrap()
        .json();
    assert_eq!(
        sync,
        json!({"contact": {
            "email": email, "firstName": "Jane", "lastName": "Doe", "phone": "555-0100",
            "fieldValues": [
                {"field": "1", "value": "XL"},
                {"field": "2", "value": "||golf||chess||"}
            ]
        }})
    );
    let tag_search: Vec<String> = api
        .iter()
        .filter(|r| r.uri.path() == "/api/3/tags" && r.method == "GET")
        .map(|r| r.uri.query().unwrap().to_string())
        .collect();
    assert_eq!(
        tag_search,
        vec!["search=vip&limit=100", "search=existing&limit=100"]
    );
    let created = api
        .iter()
        .find(|r| r.uri.path() == "/api/3/tags" && r.method == "POST")
        .unwrap()
        .json();
    assert_eq!(
        created,
        json!({"tag": {"tag": "vip", "tagType": "contact", "description": ""}})
    );
    let attached: Vec<Value> = api
        .iter()
        .filter(|r| r.uri.path() == "/api/3/contactTags")
        .map(|r| r.json())
        .collect();
    assert_eq!(
        attached,
        vec![
            json!({"contactTag": {"contact": "10", "tag": "21"}}),
            json!({"contactTag": {"contact": "10", "tag": "3"}}),
            json!({"contactTag": {"contact": "10", "tag": "21"}}),
        ]
    );
    let lists: Vec<Value> = api
        .iter()
        .filter(|r| r.uri.path() == "/api/3/contactLists")
        .map(|r| r.json())
        .collect();
    assert_eq!(
        lists,
        vec![
            json!({"contactList": {"list": 2, "contact": "10", "status": 1}}),
            json!({"contactList": {"list": 7, "contact": "10", "status": 2}}),
        ]
    );

    let events: Vec<HashMap<String, String>> = reqs
        .iter()
        .filter(|r| r.uri.path() == "/event")
        .map(|r| {
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/x-www-form-urlencoded")
            );
            r.form()
        })
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["actid"], "99");
    assert_eq!(events[0]["key"], "ek-1");
    assert_eq!(events[0]["event"], "Upgraded To The Premium Annual P");
    assert_eq!(events[0]["event"].chars().count(), 32);
    assert_eq!(events[0]["eventdata"], "gold");
    assert_eq!(
        serde_json::from_str::<Value>(&events[0]["visit"]).unwrap(),
        json!({"email": email})
    );
    assert_eq!(events[1]["event"], "Logged In");
    assert!(!events[1].contains_key("eventdata"));

    // Within 5 requests/s: n API calls span at least (n-1)/5 s (10% slack for
    // scheduling jitter; a lower bound, so slowness cannot fail it).
    let first = api.first().unwrap().at;
    let last = api.last().unwrap().at;
    let min_span = Duration::from_millis(200 * (api.len() as u64 - 1) * 9 / 10);
    assert!(
        last - first >= min_span,
        "{:?} < {:?}",
        last - first,
        min_span
    );
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_tracking_refusal_is_a_dead_letter() {
    let h = Harness::new().await;
    let ac = Receiver::start(|req| {
        if req.uri.path() == "/event" {
            Reply::json(200, json!({"success": 0, "message": "Invalid key"}))
        } else {
            Reply::status(404)
        }
    })
    .await;
    let dest = h
        .create(
            "activecampaign",
            "ac",
            json!({"api_url": ac.url(""), "api_key": "k", "actid": "1", "event_key": "wrong",
                   "track_url": ac.url("/event")}),
        )
        .await;
    let mut e = track("u", 0);
    e["context"] = json!({"traits": {"email": "a@example.com"}});
    h.append(vec![e]).await;
    wait_for(Duration::from_secs(10), "dead letter", || async {
        h.engine.get(&dest.id).await.unwrap().stats.dead_letters == 1
    })
    .await;
    let dead = h.engine.dead_letters(&dest.id, 10).await.unwrap();
    assert!(dead[0].error.contains("Invalid key"));
    assert!(
        dead[0]
            .last_response
            .as_deref()
            .unwrap()
            .contains("Invalid key")
    );
    h.engine.shutdown().await;
}

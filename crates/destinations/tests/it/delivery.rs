//! The delivery engine against real webhook receivers: outages, poison events,
//! isolation, ordering, filters, replay.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tributary_destinations::{
    CreateDestination, DestinationError, EngineOptions, Filters, PatchDestination, REDACTED,
    ReplayRequest,
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_retries_until_every_event_is_delivered_once() {
    let h = Harness::new().await;
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let rx = Receiver::start(move |_| {
        if d.load(Ordering::SeqCst) {
            Reply::status(503).body("maintenance")
        } else {
            Reply::ok()
        }
    })
    .await;
    let dest = h
        .create(
            "webhook",
            "hook",
            json!({"url": rx.url("/hook"), "batch_size": 5}),
        )
        .await;
    let events: Vec<Value> = (0..40)
        .map(|i| track(&format!("user{}", i % 7), i))
        .collect();
    let ids: Vec<String> = events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    h.append(events).await;

    wait_for(
        Duration::from_secs(10),
        "503s and a retrying stat",
        || async {
            let v = h.engine.get(&dest.id).await.unwrap();
            rx.requests().len() >= 10 && v.stats.last_error.is_some()
        },
    )
    .await;
    let during = h.engine.get(&dest.id).await.unwrap();
    assert_eq!(during.stats.delivered, 0);
    assert!(during.stats.last_error.as_deref().unwrap().contains("503"));
    down.store(false, Ordering::SeqCst);

    wait_for(Duration::from_secs(20), "all delivered", || async {
        rx.accepted().len() >= ids.len()
    })
    .await;
    h.wait_idle(&dest.id).await;
    assert_exactly_once(&rx.accepted_ids(), &ids);
    let v = h.engine.get(&dest.id).await.unwrap();
    assert_eq!(v.stats.delivered, 40);
    assert_eq!(v.stats.dead_letters, 0);
    assert_eq!(v.stats.backlog, 0);
    assert!(v.stats.last_success_at.is_some());
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_is_dead_lettered_while_the_rest_flow_and_replay_resends_it() {
    let h = Harness::new().await;
    let healed = Arc::new(AtomicBool::new(false));
    let hd = healed.clone();
    let rx = Receiver::start(move |req| {
        let poison = req
            .events()
            .iter()
            .any(|e| e["properties"]["poison"] == json!(true));
        if poison && !hd.load(Ordering::SeqCst) {
            Reply::json(400, json!({"error": "cannot parse properties.poison"}))
        } else {
            Reply::ok()
        }
    })
    .await;
    let dest = h
        .create(
            "webhook",
            "hook",
            json!({"url": rx.url("/"), "batch_size": 10}),
        )
        .await;
    let mut events: Vec<Value> = (0..30).map(|i| track(&format!("u{}", i % 3), i)).collect();
    events[13]["properties"]["poison"] = json!(true);
    let poison_id = events[13]["messageId"].as_str().unwrap().to_string();
    h.append(events).await;

    wait_for(Duration::from_secs(10), "29 delivered", || async {
        rx.accepted().len() >= 29
    })
    .await;
    h.wait_idle(&dest.id).await;
    let accepted = rx.accepted_ids();
    assert_eq!(accepted.len(), 29);
    assert!(!accepted.contains(&poison_id));

    let dead = h.engine.dead_letters(&dest.id, 100).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, poison_id);
    assert_eq!(dead[0].last_status, Some(400));
    assert!(
        dead[0]
            .last_response
            .as_deref()
            .unwrap()
            .contains("cannot parse")
    );
    assert_eq!(dead[0].event["properties"]["poison"], json!(true));
    assert!(dead[0].attempts >= 1);
    let v = h.engine.get(&dest.id).await.unwrap();
    assert_eq!(v.stats.delivered, 29);
    assert_eq!(v.stats.dead_letters, 1);

    // The receiver is fixed; replay sends the dead letter again.
    healed.store(true, Ordering::SeqCst);
    let out = h
        .engine
        .replay(
            &dest.id,
            ReplayRequest {
                dead_letters: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.queued, 1);
    wait_for(Duration::from_secs(10), "replayed", || async {
        rx.accepted_ids().contains(&poison_id)
    })
    .await;
    wait_for(Duration::from_secs(5), "dead letter cleared", || async {
        h.engine
            .dead_letters(&dest.id, 10)
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let v = h.engine.get(&dest.id).await.unwrap();
    assert_eq!(v.stats.delivered, 30);
    assert_eq!(v.stats.dead_letters, 0);
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_destination_does_not_hold_back_a_healthy_one() {
    let h = Harness::new().await;
    let slow = Receiver::start(|_| Reply::ok().after(Duration::from_secs(3))).await;
    let fast = Receiver::ok().await;
    let slow_dest = h
        .create("webhook", "slow", json!({"url": slow.url("/")}))
        .await;
    let fast_dest = h
        .create("webhook", "fast", json!({"url": fast.url("/")}))
        .await;
    let events: Vec<Value> = (0..50).map(|i| track(&format!("u{i}"), i)).collect();
    h.append(events).await;

    wait_for(
        Duration::from_secs(5),
        "healthy destination caught up",
        || async { fast.accepted().len() == 50 },
    )
    .await;
    // The healthy one has everything while the slow one is still far behind.
    assert!(slow.accepted().len() < 50);
    let s = h.engine.get(&slow_dest.id).await.unwrap();
    assert!(s.stats.delivered < 50 && s.stats.backlog > 0);
    h.wait_idle(&fast_dest.id).await;
    assert_eq!(
        h.engine.get(&fast_dest.id).await.unwrap().stats.delivered,
        50
    );
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_user_arrive_in_order_despite_failures() {
    let h = Harness::new().await;
    let n = Arc::new(AtomicUsize::new(0));
    let rx = Receiver::start(move |_| {
        // Every third request fails.
        if n.fetch_add(1, Ordering::SeqCst) % 3 == 1 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    })
    .await;
    let dest = h
        .create(
            "webhook",
            "hook",
            json!({"url": rx.url("/"), "batch_size": 3}),
        )
        .await;
    let users = 5;
    let per_user = 20;
    let mut events = Vec::new();
    for i in 0..per_user {
        for u in 0..users {
            events.push(track(&format!("user{u}"), i));
        }
    }
    h.append(events).await;
    wait_for(Duration::from_secs(20), "all delivered", || async {
        rx.accepted().len() >= users * per_user
    })
    .await;
    h.wait_idle(&dest.id).await;
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    for e in rx.accepted() {
        seen.entry(e["userId"].as_str().unwrap().to_string())
            .or_default()
            .push(e["properties"]["i"].as_u64().unwrap());
    }
    assert_eq!(seen.len(), users);
    for (user, order) in seen {
        let expected: Vec<u64> = (0..per_user as u64).collect();
        assert_eq!(order, expected, "order of {user}");
    }
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_user_does_not_block_other_users() {
    let h = Harness::new().await;
    let rx = Receiver::start(|req| {
        let hot = req.events().iter().any(|e| e["userId"] == json!("hot"));
        if hot {
            Reply::ok().after(Duration::from_millis(200))
        } else {
            Reply::ok()
        }
    })
    .await;
    let dest = h
        .create("webhook", "hook", json!({"url": rx.url("/")}))
        .await;
    let mut events: Vec<Value> = (0..40).map(|i| track("hot", i)).collect();
    events.extend((0..20).map(|i| track(&format!("cold{i}"), i)));
    h.append(events).await;
    wait_for(Duration::from_secs(5), "cold users delivered", || async {
        rx.accepted()
            .iter()
            .filter(|e| e["userId"] != json!("hot"))
            .count()
            == 20
    })
    .await;
    let hot_done = rx
        .accepted()
        .iter()
        .filter(|e| e["userId"] == json!("hot"))
        .count();
    assert!(hot_done < 40, "hot user still behind ({hot_done}/40)");
    // The hot user's events are one at a time and in order.
    wait_for(Duration::from_secs(20), "hot user delivered", || async {
        rx.accepted().len() == 60
    })
    .await;
    let hot: Vec<u64> = rx
        .accepted()
        .iter()
        .filter(|e| e["userId"] == json!("hot"))
        .map(|e| e["properties"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(hot, (0..40).collect::<Vec<u64>>());
    h.wait_idle(&dest.id).await;
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_object_and_filters_select_events() {
    let h = Harness::new().await;
    let alpha_rx = Receiver::ok().await;
    let beta_rx = Receiver::ok().await;
    let alpha = h
        .create("webhook", "Alpha", json!({"url": alpha_rx.url("/")}))
        .await;
    let beta = h
        .engine
        .create(CreateDestination {
            kind: "webhook".into(),
            name: "Beta".into(),
            source_ids: vec![SOURCE.into()],
            settings: json!({"url": beta_rx.url("/")}),
            enabled: true,
            start: Default::default(),
            filters: Filters {
                call_types: vec!["track".into()],
                deny_events: vec!["Debug".into()],
                ..Filters::default()
            },
        })
        .await
        .unwrap();
    let e = |id: &str, extra: Value| {
        let mut v = track("u", 0);
        v["messageId"] = json!(id);
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    };
    h.append(vec![
        e(
            "only-alpha",
            json!({"integrations": {"All": false, "Alpha": true}}),
        ),
        e("not-beta", json!({"integrations": {"Beta": false}})),
        e("everyone", json!({})),
        e("no-one", json!({"integrations": {"All": false}})),
        e(
            "by-type-name",
            json!({"integrations": {"All": false, "Webhooks": true}}),
        ),
        e("debug", json!({"event": "Debug"})),
        e("identify", json!({"type": "identify", "traits": {"a": 1}})),
        e("other-source", json!({"_source": "src_other"})),
    ])
    .await;
    h.wait_idle(&alpha.id).await;
    h.wait_idle(&beta.id).await;
    let mut a = alpha_rx.accepted_ids();
    a.sort();
    let mut b = beta_rx.accepted_ids();
    b.sort();
    assert_eq!(
        a,
        vec![
            "by-type-name",
            "debug",
            "everyone",
            "identify",
            "not-beta",
            "only-alpha"
        ]
    );
    assert_eq!(b, vec!["by-type-name", "everyone"]);
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_signs_body_and_sends_custom_headers() {
    let h = Harness::new().await;
    let rx = Receiver::ok().await;
    let single = h
        .create(
            "webhook",
            "signed",
            json!({"url": rx.url("/one"), "secret": "topsecret", "headers": {"X-Api-Key": "k1"}}),
        )
        .await;
    assert_eq!(single.settings["secret"], json!(REDACTED));
    let batched_rx = Receiver::ok().await;
    let batched = h
        .create(
            "webhook",
            "batched",
            json!({"url": batched_rx.url("/many"), "batch_size": 50}),
        )
        .await;
    h.append((0..5).map(|i| track("same-user", i)).collect())
        .await;
    h.wait_idle(&single.id).await;
    h.wait_idle(&batched.id).await;

    let reqs = rx.requests();
    assert_eq!(reqs.len(), 5);
    for (req, _) in &reqs {
        assert_eq!(req.uri.path(), "/one");
        assert_eq!(req.header("x-api-key").as_deref(), Some("k1"));
        assert_eq!(
            req.header("content-type").as_deref(),
            Some("application/json")
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(b"topsecret").unwrap();
        mac.update(&req.body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            req.header("x-tributary-signature").as_deref(),
            Some(expected.as_str())
        );
        // batch_size 1: the body is the event itself.
        assert_eq!(req.json()["type"], json!("track"));
    }
    let breqs = batched_rx.requests();
    let total: usize = breqs
        .iter()
        .map(|(r, _)| r.json()["batch"].as_array().unwrap().len())
        .sum();
    assert_eq!(total, 5);
    assert!(breqs[0].0.header("x-tributary-signature").is_none());
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_window_expiry_makes_dead_letters() {
    let h = Harness::with_options(EngineOptions {
        retry_min_backoff: Duration::from_millis(20),
        retry_max_backoff: Duration::from_millis(100),
        retry_window: Duration::from_millis(500),
    })
    .await;
    let rx = Receiver::start(|_| {
        let mut r = Reply::status(429);
        r.headers.push(("retry-after", "0".into()));
        r
    })
    .await;
    let dest = h
        .create("webhook", "down", json!({"url": rx.url("/")}))
        .await;
    h.append(vec![track("a", 0), track("b", 1)]).await;
    wait_for(Duration::from_secs(10), "dead letters", || async {
        h.engine.get(&dest.id).await.unwrap().stats.dead_letters == 2
    })
    .await;
    let dead = h.engine.dead_letters(&dest.id, 10).await.unwrap();
    assert!(
        dead.iter()
            .all(|d| d.last_status == Some(429) && d.attempts > 1)
    );
    h.wait_idle(&dest.id).await;
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_replay_resends_events_from_the_log() {
    let h = Harness::new().await;
    let rx = Receiver::ok().await;
    let dest = h
        .create("webhook", "hook", json!({"url": rx.url("/")}))
        .await;
    let from = chrono::Utc::now() - chrono::Duration::seconds(5);
    h.append((0..10).map(|i| track("u", i)).collect()).await;
    h.wait_idle(&dest.id).await;
    assert_eq!(rx.accepted().len(), 10);
    let out = h
        .engine
        .replay(
            &dest.id,
            ReplayRequest {
                from: Some(from),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.queued, 10);
    wait_for(Duration::from_secs(10), "replayed", || async {
        rx.accepted().len() == 20
    })
    .await;
    let bad = h
        .engine
        .replay(&dest.id, ReplayRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(bad, DestinationError::Invalid(_)));
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_operations_validate_and_pause() {
    let h = Harness::new().await;
    let rx = Receiver::ok().await;
    for (kind, settings) in [
        ("webhook", json!({})),
        ("webhook", json!({"url": "ftp://x"})),
        ("webhook", json!({"url": rx.url("/"), "batch_size": 0})),
        ("segment", json!({"host": "http://x"})),
        (
            "activecampaign",
            json!({"api_url": "http://x", "api_key": "k"}),
        ),
        ("kafka", json!({})),
    ] {
        let err = h
            .engine
            .create(CreateDestination {
                kind: kind.into(),
                name: "x".into(),
                source_ids: vec![],
                settings: settings.clone(),
                enabled: true,
                start: Default::default(),
                filters: Filters::default(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, DestinationError::Invalid(_)),
            "{kind} {settings}"
        );
        assert_eq!(err.status_code(), 400);
    }
    let dest = h
        .create("webhook", "hook", json!({"url": rx.url("/")}))
        .await;
    assert_eq!(h.engine.list().await.unwrap().len(), 1);
    assert!(matches!(
        h.engine.get("dst_missing").await.unwrap_err(),
        DestinationError::NotFound
    ));

    // Paused: events wait in the log and flow after re-enabling.
    let paused = h
        .engine
        .patch(
            &dest.id,
            PatchDestination {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!paused.enabled);
    h.append((0..5).map(|i| track("u", i)).collect()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.accepted().is_empty());
    assert_eq!(h.engine.get(&dest.id).await.unwrap().stats.backlog, 5);
    let patched = h
        .engine
        .patch(
            &dest.id,
            PatchDestination {
                enabled: Some(true),
                settings: Some(json!({"batch_size": 5})),
                name: Some("renamed".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.name, "renamed");
    assert_eq!(patched.settings["batch_size"], json!(5));
    h.wait_idle(&dest.id).await;
    assert_eq!(rx.accepted().len(), 5);
    let bad = h
        .engine
        .patch(
            &dest.id,
            PatchDestination {
                settings: Some(json!({"url": "nope"})),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(bad, DestinationError::Invalid(_)));

    h.engine.delete(&dest.id).await.unwrap();
    assert!(h.engine.list().await.unwrap().is_empty());
    assert!(matches!(
        h.engine.delete(&dest.id).await.unwrap_err(),
        DestinationError::NotFound
    ));
    h.engine.shutdown().await;
}

/// Prints delivery throughput to a batched local receiver (a measurement, not an
/// assertion: run with `--ignored --nocapture`, ideally in release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput measurement; run explicitly"]
async fn throughput_to_batched_webhook() {
    let h = Harness::new().await;
    let rx = Receiver::ok().await;
    let dest = h
        .create(
            "webhook",
            "bench",
            json!({"url": rx.url("/"), "batch_size": 500}),
        )
        .await;
    let n = 50_000;
    // Appends first, with the destination paused, so only delivery is timed.
    h.engine
        .patch(
            &dest.id,
            PatchDestination {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        h.append(
            chunk
                .iter()
                .map(|i| track(&format!("u{}", i % 1000), *i))
                .collect(),
        )
        .await;
    }
    let start = std::time::Instant::now();
    h.engine
        .patch(
            &dest.id,
            PatchDestination {
                enabled: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    h.wait_idle(&dest.id).await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        h.engine.get(&dest.id).await.unwrap().stats.delivered,
        n as u64
    );
    eprintln!(
        "delivered {n} events in {secs:.2}s: {:.0} events/s",
        n as f64 / secs
    );
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_timed_out_attempt_is_counted_as_redelivered() {
    let h = Harness::new().await;
    // The first request arrives but is answered too late: the receiver has it, the
    // engine saw a timeout and sends it again.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let rx = Receiver::start(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::ok().after(Duration::from_secs(2))
        } else {
            Reply::ok()
        }
    })
    .await;
    let dest = h
        .create(
            "webhook",
            "hook",
            json!({"url": rx.url("/"), "timeout": 0.3}),
        )
        .await;
    h.append(vec![track("u", 0)]).await;
    wait_for(Duration::from_secs(10), "delivered", || async {
        rx.accepted().len() == 1
    })
    .await;
    h.wait_idle(&dest.id).await;
    let stats = h.engine.get(&dest.id).await.unwrap().stats;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the receiver got it twice");
    assert_eq!((stats.delivered, stats.redelivered), (1, 1), "{stats:?}");
    h.engine.shutdown().await;
}

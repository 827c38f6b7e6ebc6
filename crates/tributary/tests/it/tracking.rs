//! The Tracking API and admin API as a client sees them over HTTP.

use std::io::Write;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Server, client, key_id};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn healthy(s: &Server) {
    let r = client()
        .get(format!("{}/health", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "server unhealthy after bad input; log:\n{}",
        s.log()
    );
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(body["code"], want_code, "body: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {body}"
    );
}

#[tokio::test]
async fn every_call_type_is_stored_normalized() {
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Website", "website").await);
    for (path, body) in [
        (
            "/v1/track",
            json!({"userId":"u1","event":"Signed Up","properties":{"plan":"pro"},"messageId":"m-track"}),
        ),
        (
            "/v1/identify",
            json!({"userId":"u1","traits":{"email":"a@example.com"},"messageId":"m-identify"}),
        ),
        (
            "/v1/page",
            json!({"anonymousId":"a1","name":"Home","properties":{"url":"https://x"},"messageId":"m-page"}),
        ),
        (
            "/v1/screen",
            json!({"anonymousId":"a1","name":"Settings","messageId":"m-screen"}),
        ),
        (
            "/v1/group",
            json!({"userId":"u1","groupId":"g1","traits":{"name":"Acme"},"messageId":"m-group"}),
        ),
        (
            "/v1/alias",
            json!({"userId":"u1","previousId":"a1","messageId":"m-alias"}),
        ),
    ] {
        let (st, v) = s.post(path, &key, body).await;
        assert_eq!((st, v.clone()), (200, json!({"success": true})), "{path}");
    }
    let events = s.events(&id, 10).await;
    assert_eq!(events.len(), 6);
    let track = events.iter().find(|e| e["messageId"] == "m-track").unwrap();
    assert_eq!(track["type"], "track");
    assert_eq!(track["event"], "Signed Up");
    assert_eq!(track["properties"]["plan"], "pro");
    assert_eq!(track["context"]["ip"], "127.0.0.1");
    for k in ["receivedAt", "timestamp", "originalTimestamp"] {
        assert!(track[k].as_str().unwrap().ends_with('Z'), "{k}: {track}");
    }
    let alias = events.iter().find(|e| e["messageId"] == "m-alias").unwrap();
    assert_eq!(alias["previousId"], "a1");
    let group = events.iter().find(|e| e["messageId"] == "m-group").unwrap();
    assert_eq!(group["groupId"], "g1");
}

#[tokio::test]
async fn short_paths_text_plain_and_body_write_key_work_like_analytics_js() {
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Web", "web").await);
    let body = json!({"writeKey": key, "anonymousId":"a", "event":"Clicked", "messageId":"ajs-1"});
    let (st, _) = s
        .post_raw(
            "/v1/t",
            None,
            &[("content-type", "text/plain")],
            body.to_string().into_bytes(),
        )
        .await;
    assert_eq!(st, 200);
    let batch = json!({"writeKey": key, "sentAt": "2026-01-01T00:00:10Z",
        "batch":[{"type":"page","anonymousId":"a","name":"Docs","messageId":"ajs-2","timestamp":"2026-01-01T00:00:00Z"}]});
    let (st, _) = s
        .post_raw(
            "/v1/b",
            None,
            &[("content-type", "text/plain")],
            batch.to_string().into_bytes(),
        )
        .await;
    assert_eq!(st, 200);
    let events = s.events(&id, 10).await;
    assert_eq!(events.len(), 2);
    assert!(
        events.iter().all(|e| e.get("writeKey").is_none()),
        "write key must not be stored"
    );
    let page = events.iter().find(|e| e["messageId"] == "ajs-2").unwrap();
    // Clock skew: the device was 10 s into sending; timestamp = receivedAt - 10 s.
    let received = chrono_ms(page["receivedAt"].as_str().unwrap());
    let ts = chrono_ms(page["timestamp"].as_str().unwrap());
    assert_eq!(received - ts, 10_000);
    assert_eq!(page["originalTimestamp"], "2026-01-01T00:00:00.000Z");
}

/// yyyy-mm-ddThh:mm:ss.mmmZ → ms since the epoch (via `date`, keeping chrono out of
/// the test's dependencies).
fn chrono_ms(s: &str) -> i64 {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", s, "+%s%3N"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn basic_auth_without_colon_and_gzip_batches_are_accepted() {
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Srv", "srv").await);
    let b64 = base64_encode(key.as_bytes());
    let body = json!({"batch":[{"type":"track","userId":"u","event":"A"},{"type":"track","userId":"u","event":"B"}]});
    let (st, v) = s
        .post_raw(
            "/v1/batch",
            None,
            &[
                ("authorization", &format!("Basic {b64}")),
                ("content-encoding", "gzip"),
            ],
            gzip(body.to_string().as_bytes()),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.events(&id, 10).await.len(), 2);
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test]
async fn a_batch_stores_the_valid_messages_and_names_the_rejected() {
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Srv", "srv").await);
    let body = json!({"batch":[
        {"type":"track","userId":"u","event":"Good","messageId":"ok-1"},
        {"type":"track","userId":"u"},
        {"type":"identify","traits":{}},
        {"type":"track","userId":"u","event":"Good too","messageId":"ok-2"},
    ]});
    let (st, v) = s.post("/v1/batch", &key, body).await;
    assert_eq!(st, 200);
    assert_eq!(v["success"], true);
    let rejected = v["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0]["index"], 1);
    assert_eq!(rejected[0]["code"], "event_not_defined");
    assert_eq!(rejected[1]["index"], 2);
    assert_eq!(rejected[1]["code"], "no_user_anon_id");
    let ids: Vec<_> = s
        .events(&id, 10)
        .await
        .iter()
        .map(|e| e["messageId"].clone())
        .collect();
    assert_eq!(ids.len(), 2);
}

#[tokio::test]
async fn a_repeated_message_id_is_acknowledged_and_stored_once() {
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Srv", "srv").await);
    let m = json!({"userId":"u","event":"Once","messageId":"dup-1"});
    for _ in 0..3 {
        let (st, _) = s.post("/v1/track", &key, m.clone()).await;
        assert_eq!(st, 200);
    }
    assert_eq!(s.events(&id, 10).await.len(), 1);
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_the_server_stays_healthy() {
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Srv", "srv").await);
    let json_h = [("content-type", "application/json")];

    let (st, v) = s
        .post_raw("/v1/track", Some(&key), &json_h, b"{not json".to_vec())
        .await;
    assert_error(st, &v, 400, "invalid_json");
    let (st, v) = s.post("/v1/track", &key, json!({"event":"E"})).await;
    assert_error(st, &v, 400, "no_user_anon_id");
    let (st, v) = s.post("/v1/track", &key, json!({"userId":"u"})).await;
    assert_error(st, &v, 400, "event_not_defined");
    let (st, v) = s
        .post(
            "/v1/track",
            &key,
            json!({"userId":"u","event":"E","properties":"x"}),
        )
        .await;
    assert_error(st, &v, 400, "properties_not_object");
    let big = "x".repeat(40 * 1024);
    let (st, v) = s
        .post(
            "/v1/track",
            &key,
            json!({"userId":"u","event":"E","properties":{"big":big}}),
        )
        .await;
    assert_error(st, &v, 413, "message_too_large");
    let filler = "y".repeat(5_000);
    let batch: Vec<Value> = (0..120)
        .map(|i| json!({"type":"track","userId":"u","event":"E","messageId":format!("b{i}"),"properties":{"f":filler}}))
        .collect();
    let (st, v) = s.post("/v1/batch", &key, json!({"batch": batch})).await;
    assert_error(st, &v, 413, "batch_too_large");
    let batch: Vec<Value> = (0..3000)
        .map(|_| json!({"type":"track","userId":"u","event":"E"}))
        .collect();
    let (st, v) = s.post("/v1/batch", &key, json!({"batch": batch})).await;
    assert_error(st, &v, 413, "too_many_messages");
    let (st, v) = s
        .post("/v1/track", "wrong-key", json!({"userId":"u","event":"E"}))
        .await;
    assert_error(st, &v, 401, "unauthorized");
    let (st, v) = s
        .post_raw(
            "/v1/track",
            None,
            &json_h,
            json!({"userId":"u","event":"E"}).to_string().into_bytes(),
        )
        .await;
    assert_error(st, &v, 401, "unauthorized");
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (st, v) = s
        .post_raw("/v1/batch", Some(&key), &json_h, random.clone())
        .await;
    assert_error(st, &v, 400, "invalid_json");
    let (st, v) = s
        .post_raw(
            "/v1/batch",
            Some(&key),
            &[("content-encoding", "gzip")],
            random,
        )
        .await;
    assert_error(st, &v, 400, "invalid_gzip");
    let bomb = gzip(&vec![b' '; 200 * 1024 * 1024]);
    let (st, v) = s
        .post_raw(
            "/v1/batch",
            Some(&key),
            &[("content-encoding", "gzip")],
            bomb,
        )
        .await;
    assert_error(st, &v, 413, "batch_too_large");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_body = format!(r#"{{"userId":"u","event":"E","properties":{{"d":{deep}}}}}"#);
    let (st, v) = s
        .post_raw("/v1/track", Some(&key), &json_h, deep_body.into_bytes())
        .await;
    assert_error(st, &v, 400, "invalid_json");
    assert!(
        v["message"].as_str().unwrap().contains("recursion limit"),
        "{v}"
    );
    let mut bad_utf8 = br#"{"userId":"u","event":"E"#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    bad_utf8.extend_from_slice(br#""}"#);
    let (st, v) = s.post_raw("/v1/track", Some(&key), &json_h, bad_utf8).await;
    assert_error(st, &v, 400, "invalid_json");
    let (st, v) = s.post("/v1/batch", &key, json!({"batch": []})).await;
    assert_error(st, &v, 400, "empty_batch");
    let (st, v) = s
        .post("/v1/batch", &key, json!({"batch": [{"type":"track"}]}))
        .await;
    assert_error(st, &v, 400, "invalid_batch");
    assert_eq!(v["rejected"][0]["code"], "no_user_anon_id");

    // Disabled source: 403, and enabled again it accepts.
    let (st, _) = s
        .admin(
            Method::PATCH,
            &format!("/sources/{id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = s
        .post("/v1/track", &key, json!({"userId":"u","event":"E"}))
        .await;
    assert_error(st, &v, 403, "source_disabled");
    s.admin(
        Method::PATCH,
        &format!("/sources/{id}"),
        Some(json!({"enabled": true})),
    )
    .await;
    let (st, _) = s
        .post(
            "/v1/track",
            &key,
            json!({"userId":"u","event":"E","messageId":"after"}),
        )
        .await;
    assert_eq!(st, 200);

    healthy(&s).await;
    // Nothing from the refused requests was stored.
    let events = s.events(&id, 100).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let metrics = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tributary_events_rejected_total{reason=\"event_not_defined\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tributary_http_requests_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn rotating_the_write_key_stops_the_old_one_at_once() {
    let s = Server::start();
    let src = s
        .create_source("activecampaign", "ActiveCampaign", "activecampaign")
        .await;
    let (old, id) = key_id(&src);
    assert!(old.len() >= 32, "write key too short: {old}");
    assert_eq!(src["status"], "waiting");
    assert!(src["webhook_url"].as_str().unwrap().contains(&old));
    let (st, v) = s
        .admin(Method::POST, &format!("/sources/{id}/write-key"), None)
        .await;
    assert_eq!(st, 200);
    let new = v["write_key"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    let (st, _) = s
        .post("/v1/track", &old, json!({"userId":"u","event":"E"}))
        .await;
    assert_eq!(st, 401);
    let (st, _) = s
        .post("/v1/track", &new, json!({"userId":"u","event":"E"}))
        .await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn the_admin_api_needs_the_token_and_validates_sources() {
    let s = Server::start();
    let r = client()
        .get(format!("{}/api/v1/sources", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(format!("{}/api/v1/sources", s.url))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for (body, code) in [
        (
            json!({"type":"activecampaign","name":"A","schema":"Bad-Name"}),
            "invalid_schema",
        ),
        (
            json!({"type":"activecampaign","name":"A","schema":"select"}),
            "invalid_schema",
        ),
        (
            json!({"type":"activecampaign","name":"A","schema":"a".repeat(64)}),
            "invalid_schema",
        ),
        (
            json!({"type":"kafka","name":"A","schema":"k"}),
            "invalid_type",
        ),
        (
            json!({"type":"http","name":"","schema":"k"}),
            "invalid_name",
        ),
        (json!({"type":"http","name":"A"}), "invalid_request"),
    ] {
        let (st, v) = s.admin(Method::POST, "/sources", Some(body.clone())).await;
        assert_error(st, &v, 400, code);
    }
    s.create_source("http", "A", "same").await;
    let (st, v) = s
        .admin(
            Method::POST,
            "/sources",
            Some(json!({"type":"http","name":"B","schema":"same"})),
        )
        .await;
    assert_error(st, &v, 409, "conflict");
    let (st, list) = s.admin(Method::GET, "/sources", None).await;
    assert_eq!(st, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let id = list[0]["id"].as_str().unwrap().to_string();
    let (st, v) = s
        .admin(
            Method::PATCH,
            &format!("/sources/{id}"),
            Some(json!({"name":"Renamed"})),
        )
        .await;
    assert_eq!((st, v["name"].clone()), (200, json!("Renamed")));
    let (st, _) = s
        .admin(Method::DELETE, &format!("/sources/{id}"), None)
        .await;
    assert_eq!(st, 204);
    let (st, v) = s.admin(Method::GET, &format!("/sources/{id}"), None).await;
    assert_error(st, &v, 404, "not_found");
}

#[tokio::test]
async fn last_event_is_shown_and_survives_a_clean_restart() {
    let mut s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Web", "web").await);
    s.post(
        "/v1/track",
        &key,
        json!({"userId":"u","event":"Order Completed","messageId":"m1"}),
    )
    .await;
    let (_, v) = s.admin(Method::GET, &format!("/sources/{id}"), None).await;
    assert_eq!(v["last_event"]["event"], "Order Completed");
    assert_eq!(v["last_event"]["type"], "track");
    assert_eq!(v["last_event"]["message_id"], "m1");
    let status = s.stop().expect("server exits");
    assert!(
        status.success(),
        "SIGTERM should exit cleanly: {status:?}\n{}",
        s.log()
    );
    s.restart();
    let (_, v) = s.admin(Method::GET, &format!("/sources/{id}"), None).await;
    assert_eq!(v["last_event"]["event"], "Order Completed");
    assert_eq!(s.events(&id, 10).await.len(), 1);
}

#[tokio::test]
async fn the_cli_manages_sources() {
    let s = Server::start();
    let bin = env!("CARGO_BIN_EXE_tributary");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .args(["--server", &s.url, "--token", &s.token])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let created: Value = serde_json::from_str(&run(&[
        "sources",
        "create",
        "--type",
        "activecampaign",
        "--name",
        "ActiveCampaign",
        "--schema",
        "activecampaign",
        "--json",
    ]))
    .unwrap();
    let id = created["id"].as_str().unwrap();
    let listed = run(&["sources", "list"]);
    assert!(
        listed.contains(id) && listed.contains("activecampaign"),
        "{listed}"
    );
    let shown = run(&["sources", "show", id]);
    assert!(
        shown.contains("webhook url:") && shown.contains("none yet"),
        "{shown}"
    );
    let rotated: Value =
        serde_json::from_str(&run(&["sources", "rotate-key", id, "--json"])).unwrap();
    assert_ne!(rotated["write_key"], created["write_key"]);
    let disabled: Value =
        serde_json::from_str(&run(&["sources", "disable", id, "--json"])).unwrap();
    assert_eq!(disabled["enabled"], false);
    run(&["sources", "delete", id]);
    assert!(!run(&["sources", "list"]).contains(id));
}

#[tokio::test]
async fn context_ip_comes_from_x_forwarded_for_only_behind_a_trusted_proxy() {
    for (trusted, want) in [(true, "203.0.113.9"), (false, "127.0.0.1")] {
        let env = if trusted {
            vec![(
                "TRIBUTARY_TRUSTED_PROXIES".to_string(),
                "127.0.0.1".to_string(),
            )]
        } else {
            vec![]
        };
        let s = Server::start_with(env);
        let (key, id) = key_id(&s.create_source("http", "Web", "web").await);
        let body = json!({"userId":"u","event":"E"}).to_string().into_bytes();
        let (st, _) = s
            .post_raw(
                "/v1/track",
                Some(&key),
                &[("x-forwarded-for", "203.0.113.9, 10.0.0.1")],
                body,
            )
            .await;
        assert_eq!(st, 200);
        assert_eq!(
            s.events(&id, 1).await[0]["context"]["ip"],
            want,
            "trusted={trusted}"
        );
        // A client that sets context.ip itself keeps it.
        let body = json!({"userId":"u","event":"E","context":{"ip":"198.51.100.1"}})
            .to_string()
            .into_bytes();
        s.post_raw("/v1/track", Some(&key), &[], body).await;
        assert_eq!(s.events(&id, 1).await[0]["context"]["ip"], "198.51.100.1");
    }
}

#[tokio::test]
async fn first_start_generates_a_private_admin_token_and_prints_it_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let port = crate::harness::free_port();
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path())
            .env_remove("TRIBUTARY_ADMIN_TOKEN")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_file = || {
        let p = dir.path().join("admin-token");
        for _ in 0..200 {
            if let Ok(t) = std::fs::read_to_string(&p)
                && !t.trim().is_empty()
            {
                return t.trim().to_string();
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("admin-token never written");
    };
    let stop_and_stderr = |mut c: std::process::Child| {
        std::thread::sleep(std::time::Duration::from_millis(300));
        c.kill().unwrap();
        let out = c.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let first = start();
    let token = wait_file();
    let mode = std::fs::metadata(dir.path().join("admin-token"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(token.len() >= 40, "{token}");
    let r = client()
        .get(format!("http://127.0.0.1:{port}/api/v1/sources"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let err = stop_and_stderr(first);
    assert!(
        err.contains(&token),
        "the token is printed on first start: {err}"
    );
    let second = start();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(wait_file(), token, "the token is kept across restarts");
    let err = stop_and_stderr(second);
    assert!(!err.contains(&token), "printed only once: {err}");
}

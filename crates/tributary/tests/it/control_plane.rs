//! Two `tributary serve` nodes on one PostgreSQL control database
//! (`TRIBUTARY_CONTROL=postgres://…`, a fresh database per test; each node keeps
//! its own embedded log): what one node changes, the other honours within a second
//! — also right after its PostgreSQL connections were terminated — and `/ready`
//! says when a node cannot reach the control database.
//!
//! Needs the local PostgreSQL (127.0.0.1:5432, trust auth) and `psql`; skipped
//! with a `SKIP` line otherwise (failed under `TRIBUTARY_TEST_REQUIRE=all`).

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Server, client};
use crate::query_safety::drop_postgres_db;
use crate::warehouse::fresh_postgres_db;

/// Runs one statement as the superuser in `db`; its trimmed output.
fn psql(db: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
        ])
        .arg(sql)
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn node(url: &str, id: &str) -> Server {
    Server::start_with(vec![
        ("TRIBUTARY_CONTROL".into(), url.into()),
        ("TRIBUTARY_CLUSTER_NODE_ID".into(), id.into()),
        ("TRIBUTARY_WAREHOUSE".into(), "off".into()),
    ])
}

fn track(n: usize) -> Value {
    json!({"type": "track", "event": "Probe", "userId": "u1", "messageId": format!("probe-{n}")})
}

/// Polls node `s` with a track call under `key` until it answers `want`; how long
/// that took (panics after `limit`).
async fn until_status(s: &Server, key: &str, want: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let (st, body) = s.post("/v1/track", key, track(n)).await;
        if st == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "node still answers {st} {body} (want {want}) after {limit:?}; log:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(s: &Server) -> (u16, Value) {
    let resp = client()
        .get(format!("{}/ready", s.url))
        .send()
        .await
        .unwrap();
    let st = resp.status().as_u16();
    (st, resp.json().await.unwrap_or(Value::Null))
}

fn terminate_backends(db: &str, application_name: &str) -> usize {
    psql(
        db,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = '{application_name}'"
        ),
    )
    .parse()
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_node_is_honoured_by_the_other_within_a_second() {
    let test = "a_change_on_one_node_is_honoured_by_the_other_within_a_second";
    let Some(url) = fresh_postgres_db(test) else {
        return;
    };
    let db = url.rsplit('/').next().unwrap().to_string();
    let suffix = db.trim_start_matches("tributary_it_").to_string();
    let (id_a, id_b) = (format!("a-{suffix}"), format!("b-{suffix}"));
    let a = node(&url, &id_a);
    let b = node(&url, &id_b);
    let second = Duration::from_secs(1);

    // A source created on A works on B within a second.
    let src = a.create_source("http", "Web", "web").await;
    let id = src["id"].as_str().unwrap().to_string();
    let key1 = src["write_key"].as_str().unwrap().to_string();
    let seen = until_status(&b, &key1, 200, Duration::from_secs(5)).await;
    println!("new source usable on B after {seen:?}");
    assert!(
        seen <= second,
        "B took {seen:?} to accept the new source's key"
    );
    let (st, listed) = b.admin(Method::GET, &format!("/sources/{id}"), None).await;
    assert_eq!(st, 200, "{listed}");
    assert_eq!(listed["schema"], "web");

    // A key rotated on A: B refuses the old key within a second, takes the new one.
    let (st, rotated) = a
        .admin(Method::POST, &format!("/sources/{id}/write-key"), None)
        .await;
    assert_eq!(st, 200, "{rotated}");
    let key2 = rotated["write_key"].as_str().unwrap().to_string();
    let refused = until_status(&b, &key1, 401, Duration::from_secs(5)).await;
    println!("old key refused on B after {refused:?}");
    assert!(refused <= second, "B accepted the old key for {refused:?}");
    assert_eq!(b.post("/v1/track", &key2, track(0)).await.0, 200);

    // Again after B's PostgreSQL connections were terminated: the notification
    // for this rotation may be lost, the reload on reconnection is not.
    let killed = terminate_backends(&db, &format!("tributary {id_b}"));
    assert!(killed >= 1, "B had no backends to terminate");
    let (st, rotated) = a
        .admin(Method::POST, &format!("/sources/{id}/write-key"), None)
        .await;
    assert_eq!(st, 200, "{rotated}");
    let key3 = rotated["write_key"].as_str().unwrap().to_string();
    let refused = until_status(&b, &key2, 401, Duration::from_secs(5)).await;
    println!("old key refused on B after its connections were terminated: {refused:?}");
    assert!(refused <= second, "B accepted the old key for {refused:?}");
    assert_eq!(b.post("/v1/track", &key3, track(0)).await.0, 200);
    let (st, r) = ready(&b).await;
    assert_eq!(st, 200, "B is ready again after reconnecting: {r}");

    // A change on B reaches A the same way (disable → 403), and a deletion on A
    // makes B refuse the key.
    let (st, _) = b
        .admin(
            Method::PATCH,
            &format!("/sources/{id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(st, 200, "log:\n{}", b.log());
    let off = until_status(&a, &key3, 403, Duration::from_secs(5)).await;
    assert!(off <= second, "A took {off:?} to see the source disabled");
    let (st, _) = a
        .admin(Method::DELETE, &format!("/sources/{id}"), None)
        .await;
    assert!(st == 204 || st == 200, "delete answered {st}");
    let gone = until_status(&b, &key3, 401, Duration::from_secs(5)).await;
    assert!(
        gone <= second,
        "B took {gone:?} to forget the deleted source"
    );
    let (st, _) = b.admin(Method::GET, &format!("/sources/{id}"), None).await;
    assert_eq!(st, 404);

    // A schema taken through A is refused on B (the database is the judge).
    let (st, body) = a
        .admin(
            Method::POST,
            "/sources",
            Some(json!({"type": "http", "name": "Shop", "schema": "shop"})),
        )
        .await;
    assert_eq!(st, 201, "{body}; log:\n{}", a.log());
    let (st, body) = b
        .admin(
            Method::POST,
            "/sources",
            Some(json!({"type": "http", "name": "Shop 2", "schema": "shop"})),
        )
        .await;
    assert_eq!(st, 409, "{body}; log:\n{}", b.log());
    assert_eq!(body["code"], "conflict");

    drop(a);
    drop(b);
    drop_postgres_db(&url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_fails_while_the_control_database_is_unreachable_and_recovers() {
    let test = "ready_fails_while_the_control_database_is_unreachable_and_recovers";
    let Some(url) = fresh_postgres_db(test) else {
        return;
    };
    let db = url.rsplit('/').next().unwrap().to_string();
    // The node logs in as its own role, so the test can lock that role out.
    let role = format!("{db}_node");
    psql(&db, &format!("CREATE ROLE {role} LOGIN SUPERUSER"));
    let node_url = url.replace("postgres@", &format!("{role}@"));
    let id = format!("n-{db}");
    let s = node(&node_url, &id);
    let (st, body) = ready(&s).await;
    assert_eq!(st, 200, "{body}");
    let metrics = || async {
        client()
            .get(format!("{}/metrics", s.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let text = metrics().await;
    assert!(
        text.contains("tributary_control_postgres_up{role=\"control\"} 1"),
        "{text}"
    );

    psql(&db, &format!("ALTER ROLE {role} NOLOGIN"));
    terminate_backends(&db, &format!("tributary {id}"));
    let start = Instant::now();
    let body = loop {
        let (st, body) = ready(&s).await;
        if st == 503 {
            break body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "/ready still {st} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["store"], "control", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or("")
            .contains("control database"),
        "{body}"
    );
    let text = metrics().await;
    assert!(
        text.contains("tributary_control_postgres_up{role=\"control\"} 0"),
        "{text}"
    );
    // Requests with a known key are still answered from memory meanwhile.
    psql(&db, &format!("ALTER ROLE {role} LOGIN"));
    let start = Instant::now();
    loop {
        let (st, body) = ready(&s).await;
        if st == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "/ready did not recover: {st} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(s);
    terminate_backends(&db, &format!("tributary {id}"));
    drop_postgres_db(&url);
    psql("postgres", &format!("DROP ROLE IF EXISTS {role}"));
}

type Received = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A webhook receiver on 127.0.0.1 that records the messageIds it got.
async fn receiver() -> (String, Received) {
    use axum::extract::State;
    let got: Received = Default::default();
    async fn hook(State(got): State<Received>, body: axum::body::Bytes) -> &'static str {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let items = match v.get("batch") {
            Some(Value::Array(a)) => a.clone(),
            _ => vec![v],
        };
        let mut g = got.lock().unwrap();
        g.extend(
            items
                .iter()
                .filter_map(|i| i["messageId"].as_str().map(String::from)),
        );
        "ok"
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_defined_on_one_node_is_served_and_delivered_by_the_other() {
    let test = "a_destination_defined_on_one_node_is_served_and_delivered_by_the_other";
    let Some(url) = fresh_postgres_db(test) else {
        return;
    };
    let db = url.rsplit('/').next().unwrap().to_string();
    let a = node(&url, &format!("a-{db}"));
    let b = node(&url, &format!("b-{db}"));
    let (hook, got) = receiver().await;
    let src = a.create_source("http", "Web", "web").await;
    let (id, key) = (
        src["id"].as_str().unwrap().to_string(),
        src["write_key"].as_str().unwrap().to_string(),
    );
    until_status(&b, &key, 200, Duration::from_secs(5)).await;

    let (st, dest) = a
        .admin(
            Method::POST,
            "/destinations",
            Some(
                json!({"type": "webhook", "name": "Hook", "source_ids": [id],
                        "settings": {"url": hook}}),
            ),
        )
        .await;
    assert_eq!(st, 201, "{dest}");
    let dest_id = dest["id"].as_str().unwrap().to_string();
    let (st, seen) = b
        .admin(Method::GET, &format!("/destinations/{dest_id}"), None)
        .await;
    assert_eq!(st, 200, "B serves the destination A defined: {seen}");
    assert_eq!(seen["name"], "Hook");

    // B starts a worker for it by itself and delivers what B receives.
    let start = Instant::now();
    for i in 0..3 {
        let (st, _) = b
            .post(
                "/v1/track",
                &key,
                json!({"type": "track", "event": "Via B", "userId": "u", "messageId": format!("via-b-{i}")}),
            )
            .await;
        assert_eq!(st, 200);
    }
    loop {
        let have = got.lock().unwrap().clone();
        if (0..3).all(|i| have.contains(&format!("via-b-{i}"))) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "B never delivered: {have:?}\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Disabled on A: B's worker stops within a second, so B delivers nothing new.
    let (st, _) = a
        .admin(
            Method::PATCH,
            &format!("/destinations/{dest_id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(st, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, seen) = b
        .admin(Method::GET, &format!("/destinations/{dest_id}"), None)
        .await;
    assert_eq!(seen["enabled"], false, "{seen}");
    b.post(
        "/v1/track",
        &key,
        json!({"type": "track", "event": "Via B", "userId": "u", "messageId": "after-disable"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !got.lock().unwrap().contains(&"after-disable".to_string()),
        "B still delivers to a destination disabled on A"
    );

    // Deleted on B: gone on A.
    let (st, _) = b
        .admin(Method::DELETE, &format!("/destinations/{dest_id}"), None)
        .await;
    assert!(st == 204 || st == 200, "delete answered {st}");
    let (st, _) = a
        .admin(Method::GET, &format!("/destinations/{dest_id}"), None)
        .await;
    assert_eq!(st, 404);
    drop(a);
    drop(b);
    drop_postgres_db(&url);
}

/// A browser-like client that keeps redirects to itself (`303` is the answer under
/// test) and sends the cookie by hand.
fn browser() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Signs in to `s`'s console; the `name=value` of the session cookie.
async fn console_sign_in(s: &Server) -> String {
    let host = s.url.trim_start_matches("http://").to_string();
    let resp = browser()
        .post(format!("{}/login", s.url))
        .header("origin", &s.url)
        .header("host", host)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}&next=%2Fsources", s.token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 303, "sign-in on {}", s.url);
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    set.split(';').next().unwrap().to_string()
}

/// `GET path` on `s` with `cookie`: status and `Location`.
async fn console_get(s: &Server, path: &str, cookie: &str) -> (u16, String) {
    let resp = browser()
        .get(format!("{}{path}", s.url))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let loc = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (resp.status().as_u16(), loc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_session_made_on_one_node_works_on_the_other_and_sign_out_ends_it_on_both() {
    let test = "a_console_session_made_on_one_node_works_on_the_other_and_sign_out_ends_it_on_both";
    let Some(url) = fresh_postgres_db(test) else {
        return;
    };
    let db = url.rsplit('/').next().unwrap().to_string();
    let suffix = db.trim_start_matches("tributary_it_").to_string();
    let a = node(&url, &format!("a-{suffix}"));
    let b = node(&url, &format!("b-{suffix}"));

    let cookie = console_sign_in(&a).await;
    let id = cookie.split_once('=').unwrap().1.to_string();
    // The control database holds the id's SHA-256, never the id.
    let stored = psql(
        &db,
        "SELECT id_hash FROM tributary_control.console_sessions",
    );
    assert_eq!(stored.lines().count(), 1, "{stored}");
    assert!(!stored.contains(&id), "the session id itself is stored");
    assert_eq!(stored.len(), 64, "{stored}");
    let n = psql(
        &db,
        &format!(
            "SELECT count(*) FROM tributary_control.console_sessions
             WHERE id_hash = encode(sha256('{id}'::bytea), 'hex')"
        ),
    );
    assert_eq!(n, "1");

    // Made on A, honoured on B at once (no copy to wait for).
    assert_eq!(console_get(&a, "/sources", &cookie).await.0, 200);
    assert_eq!(
        console_get(&b, "/sources", &cookie).await.0,
        200,
        "log:\n{}",
        b.log()
    );

    // Sign out on B: A refuses the session on its next request.
    let page = browser()
        .get(format!("{}/sources/new", b.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("forms carry the csrf token")
        .to_string();
    let host = b.url.trim_start_matches("http://").to_string();
    let resp = browser()
        .post(format!("{}/logout", b.url))
        .header("origin", &b.url)
        .header("host", host)
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    let (st, loc) = console_get(&a, "/sources", &cookie).await;
    assert_eq!(st, 303, "A still honours a session signed out on B");
    assert!(loc.starts_with("/login"), "{loc}");
    assert_eq!(
        psql(
            &db,
            "SELECT count(*) FROM tributary_control.console_sessions"
        ),
        "0"
    );

    // An expired row is refused on every node and pruned by the next sign-in.
    let old = console_sign_in(&b).await;
    psql(
        &db,
        "UPDATE tributary_control.console_sessions SET expires_at = now() - interval '1 second'",
    );
    assert_eq!(console_get(&a, "/sources", &old).await.0, 303);
    assert_eq!(console_get(&b, "/sources", &old).await.0, 303);
    let fresh = console_sign_in(&a).await;
    assert_eq!(
        psql(
            &db,
            "SELECT count(*) FROM tributary_control.console_sessions"
        ),
        "1",
        "the expired row was pruned"
    );
    assert_eq!(console_get(&b, "/sources", &fresh).await.0, 200);

    drop(a);
    drop(b);
    drop_postgres_db(&url);
}

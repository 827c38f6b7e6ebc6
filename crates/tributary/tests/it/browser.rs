//! analytics.js by host alone: `@segment/analytics-next` from npm, unmodified, in
//! Debian's Chromium (driven by `playwright-core`), on a page served from another
//! origin, loaded with only `AnalyticsBrowser.load({writeKey, cdnURL})` pointed at
//! the server. It fetches `/v1/projects/{writeKey}/settings`, then sends page, track
//! and identify, which must land in the source's stored events.
//!
//! Needs `node`, `playwright-core` and `@segment/analytics-next` under
//! `TRIBUTARY_TEST_NODE_MODULES` (default `~/.cache/tributary-node/node_modules`) and
//! Chromium at `TRIBUTARY_TEST_CHROMIUM` (default `/usr/bin/chromium`), all from
//! `.ci/install-test-deps.sh`; skips (fails under `TRIBUTARY_TEST_REQUIRE=all`)
//! without them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Server, client, key_id, service_available};

const INSTALL_HINT: &str = "run .ci/install-test-deps.sh";

fn node_modules() -> PathBuf {
    std::env::var_os("TRIBUTARY_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/tributary-node/node_modules")
        })
}

fn chromium() -> PathBuf {
    std::env::var_os("TRIBUTARY_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

fn browser_available() -> Result<(), String> {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| format!("no `node` on PATH ({e}); {INSTALL_HINT}"))?;
    for pkg in ["playwright-core", "@segment/analytics-next"] {
        let p = node_modules().join(pkg).join("package.json");
        if !p.is_file() {
            return Err(format!(
                "{pkg} is not installed ({} missing); set TRIBUTARY_TEST_NODE_MODULES or {INSTALL_HINT}",
                p.display()
            ));
        }
    }
    if !chromium().is_file() {
        return Err(format!(
            "no Chromium at {}; set TRIBUTARY_TEST_CHROMIUM or {INSTALL_HINT}",
            chromium().display()
        ));
    }
    Ok(())
}

#[tokio::test]
async fn analytics_js_loaded_with_only_write_key_and_cdn_url_sends_events_that_land() {
    let test = "analytics_js_loaded_with_only_write_key_and_cdn_url_sends_events_that_land";
    if !service_available(test, browser_available()) {
        return;
    }
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Website", "web").await);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("node")
            .arg(format!(
                "{}/tests/browser/drive.js",
                crate::harness::manifest_dir()
            ))
            .arg(&s.url)
            .arg(&key)
            .env("NODE_PATH", node_modules())
            .env("TRIBUTARY_TEST_CHROMIUM", chromium())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser run finishes within two minutes")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser run failed ({}):\n{stdout}\n{stderr}\nserver log:\n{}",
        out.status,
        s.log()
    );
    let run: Value = serde_json::from_str(stdout.trim()).expect("driver prints JSON");
    let requests: Vec<&str> = run["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        requests.contains(&format!("GET {}/v1/projects/{key}/settings 200", s.url).as_str()),
        "analytics.js fetched its settings from the server: {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.contains("127.0.0.1") && !r.contains("failed")),
        "only local requests, none failed: {requests:#?}"
    );
    let result = &run["result"];
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let ev = s.events(&id, 50).await;
        if ev.len() >= 3 || Instant::now() > deadline {
            break ev;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (kind, check) in [("page", "name"), ("track", "event"), ("identify", "userId")] {
        let mid = result[kind].as_str().unwrap();
        let e = events
            .iter()
            .find(|e| e["messageId"] == mid)
            .unwrap_or_else(|| panic!("{kind} {mid} not stored: {events:#?}"));
        assert_eq!(e["type"], kind, "{e}");
        assert_eq!(e["anonymousId"], result["anonymousId"], "{e}");
        assert!(
            e["context"]["library"]["name"]
                .as_str()
                .unwrap_or("")
                .starts_with("analytics.js"),
            "{e}"
        );
        let want = match kind {
            "page" => "Quickstart",
            "track" => "Signed Up",
            _ => "browser-user",
        };
        assert_eq!(e[check], want, "{e}");
    }
}

#[tokio::test]
async fn settings_for_an_unknown_write_key_are_a_404_with_a_reason() {
    let s = Server::start();
    let r = client()
        .get(format!("{}/v1/projects/wk_nope/settings", s.url))
        .header("origin", "http://127.0.0.1:1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "not_found", "{v}");
    assert!(v["message"].as_str().unwrap().contains("write key"), "{v}");
}

#[tokio::test]
async fn settings_point_analytics_js_at_the_public_url() {
    let s = Server::start_with(vec![(
        "TRIBUTARY_PUBLIC_URL".into(),
        "https://t.example.com/collect".into(),
    )]);
    let (key, _) = key_id(&s.create_source("http", "Website", "web").await);
    let r = client()
        .get(format!("{}/v1/projects/{key}/settings", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let v: Value = r.json().await.unwrap();
    let seg = &v["integrations"]["Segment.io"];
    assert_eq!(seg["apiKey"], key.as_str());
    assert_eq!(seg["apiHost"], "t.example.com/collect/v1");
    assert_eq!(seg["protocol"], "https");
    assert_eq!(v["integrations"].as_object().unwrap().len(), 1, "{v}");
    assert_eq!(v["plan"], serde_json::json!({}));
}

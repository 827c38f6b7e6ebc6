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

/// `axe-core` too, for the console's accessibility checks.
fn console_browser_available() -> Result<(), String> {
    browser_available()?;
    let p = node_modules().join("axe-core/package.json");
    if !p.is_file() {
        return Err(format!(
            "axe-core is not installed ({} missing); {INSTALL_HINT}",
            p.display()
        ));
    }
    Ok(())
}

/// Where the console test saves its screenshots: `TRIBUTARY_TEST_OUTPUT` or a
/// folder in the system temp dir (printed by the test).
fn screenshot_dir() -> PathBuf {
    std::env::var_os("TRIBUTARY_TEST_OUTPUT")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("tributary-console-screenshots")
}

fn check_console_flow(name: &str, f: &Value) {
    let v = |k: &str| &f[k];
    assert!(
        v("violations").as_array().is_some_and(|a| a.is_empty()),
        "{name}: axe-core found serious or critical violations: {:#}",
        v("violations")
    );
    assert!(
        v("overflow").as_array().is_some_and(|a| a.is_empty()),
        "{name}: pages scroll sideways: {}",
        v("overflow")
    );
    assert!(
        v("focus").as_array().is_some_and(|a| a.is_empty()),
        "{name}: focus not visible on {}",
        v("focus")
    );
}

#[tokio::test]
async fn the_console_flow_works_in_a_real_browser_at_1280_and_390_px_and_by_keyboard() {
    let test = "the_console_flow_works_in_a_real_browser_at_1280_and_390_px_and_by_keyboard";
    if !service_available(test, console_browser_available()) {
        return;
    }
    let s = Server::start();
    let out_dir = screenshot_dir();
    eprintln!("console screenshots: {}", out_dir.display());
    let fixtures = format!(
        "{}/../activecampaign/tests/fixtures",
        crate::harness::manifest_dir()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new("node")
            .arg(format!(
                "{}/tests/browser/console.js",
                crate::harness::manifest_dir()
            ))
            .arg(&s.url)
            .arg(&s.token)
            .arg(&fixtures)
            .arg(&out_dir)
            .env("NODE_PATH", node_modules())
            .env("TRIBUTARY_TEST_CHROMIUM", chromium())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser run finishes within five minutes")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let run: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "driver prints JSON ({e}):\n{stdout}\n{stderr}\nserver log:\n{}",
            s.log()
        )
    });
    assert!(
        out.status.success() && run["error"].is_null(),
        "browser run failed: {}\n{stderr}\nrun so far: {run:#}\nserver log:\n{}",
        run["error"].as_str().unwrap_or(""),
        s.log()
    );
    for (name, f) in [("1280 px", &run["wide"]), ("390 px", &run["narrow"])] {
        check_console_flow(name, f);
        let ctx = format!("{name}: {f:#}");
        assert!(f["liveValidation"].as_str().unwrap().len() > 5, "{ctx}");
        assert!(f["writeKey"].as_str().unwrap().starts_with("wk_"), "{ctx}");
        assert!(
            f["webhookUrl"].as_str().unwrap().ends_with(&format!(
                "/v1/webhooks/activecampaign?writeKey={}",
                f["writeKey"].as_str().unwrap()
            )),
            "{ctx}"
        );
        assert!(
            f["lastEventBefore"].as_str().unwrap().contains("Waiting"),
            "{ctx}"
        );
        assert_eq!(f["webhookStatus"], 200, "{ctx}");
        assert!(
            f["lastEventAfter"].as_str().unwrap().starts_with("open · "),
            "{ctx}"
        );
        assert_eq!(f["statusAfter"], "Receiving", "{ctx}");
        assert_eq!(f["newCounter"], "1 new", "{ctx}");
        assert_eq!(f["rowsWhilePaused"], 0, "paused feed holds new rows: {ctx}");
        assert_eq!(f["rejectedStatus"], 400, "{ctx}");
        assert!(
            f["rejectedRow"].as_str().unwrap().contains("rejected"),
            "{ctx}"
        );
        assert_eq!(f["expandedJson"], true, "{ctx}");
        assert_eq!(f["filteredRows"], 1, "{ctx}");
        assert!(f["fate"].as_str().unwrap().contains("seq "), "{ctx}");
        assert_eq!(f["oldKeyStatus"], 401, "the old key is refused: {ctx}");
        assert_eq!(f["newKeyStatus"], 200, "{ctx}");
        assert!(f["destinationDelivered"].as_u64().unwrap() >= 1, "{ctx}");
        assert!(f["sqlRows"].as_u64().unwrap() >= 3, "{ctx}");
        let csv = f["csv"].as_str().unwrap();
        assert!(
            csv.starts_with("event_text,n\r\n") && csv.contains("Email Opened,1"),
            "{ctx}"
        );
        let r = &f["report"];
        assert_eq!(r["campaign"], "March newsletter", "{ctx}");
        assert_eq!(
            (
                r["delivered"].as_u64(),
                r["opened"].as_u64(),
                r["clicked"].as_u64()
            ),
            (Some(2), Some(1), Some(1)),
            "{ctx}"
        );
        assert_eq!(
            (r["bounced"].as_u64(), r["spam"].as_u64()),
            (Some(0), Some(0)),
            "{ctx}"
        );
        assert_eq!(f["reportHasChart"], true, "{ctx}");
        assert_eq!(f["reportHasDefinitions"], true, "{ctx}");
        assert!(
            f["afterSignOut"].as_str().unwrap().contains("/login"),
            "{ctx}"
        );
        assert!(
            f["console"].as_array().unwrap().is_empty(),
            "console errors (CSP?): {ctx}"
        );
        assert!(!f["screenshots"].as_array().unwrap().is_empty());
    }
    let k = &run["keyboard"];
    check_console_flow("keyboard", k);
    for step in [
        "skipLinkFirst",
        "rotated",
        "destinationCreated",
        "sqlResult",
        "reportReached",
        "signedOut",
    ] {
        assert_eq!(k[step], true, "keyboard flow step {step}: {k:#}");
    }
    assert!(
        run["received"].as_u64().unwrap() >= 2,
        "the receiver got the events: {run:#}"
    );
}

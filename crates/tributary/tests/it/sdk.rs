//! The official Segment SDKs as clients of a running server: `segment-analytics-python`
//! (PyPI) and `@segment/analytics-node` (npm), unmodified, pointed at the server's URL.
//!
//! Each test hands the same list of calls (track ×N, identify, page, group, alias; each with
//! a distinct `context.marker`) to a small driver script in `tests/sdk/`, which makes them
//! through the SDK's own methods (batched with a small flush size; gzip where the SDK does
//! it) and prints the messageId the SDK generated for each. The test then reads the source's
//! stored events and asserts every call is there exactly once, under the SDK's messageId,
//! with its fields intact and `context.library` naming the SDK.
//!
//! The SDKs come from `.ci/install-test-deps.sh`; tests find them through
//! `TRIBUTARY_TEST_PYTHON` (default `~/.cache/tributary-venv/bin/python`) and
//! `TRIBUTARY_TEST_NODE_MODULES` (default `~/.cache/tributary-node/node_modules`), and skip
//! (or fail under `TRIBUTARY_TEST_REQUIRE=all`) when they are missing.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::harness::{Server, key_id, service_available};

/// Track calls per run: with a flush size of 5 the SDKs send several batches.
const TRACKS: usize = 12;

const INSTALL_HINT: &str = "run .ci/install-test-deps.sh";

fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
}

fn python() -> PathBuf {
    std::env::var_os("TRIBUTARY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/tributary-venv/bin/python"))
}

fn node_modules() -> PathBuf {
    std::env::var_os("TRIBUTARY_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/tributary-node/node_modules"))
}

/// Whether a Python with `segment.analytics` importable is there.
fn python_sdk() -> Result<(), String> {
    let py = python();
    let out = std::process::Command::new(&py)
        .args(["-c", "import segment.analytics"])
        .output()
        .map_err(|e| {
            format!(
                "no Python at {} ({e}); set TRIBUTARY_TEST_PYTHON or {INSTALL_HINT}",
                py.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "{} cannot import segment.analytics (segment-analytics-python); {INSTALL_HINT}: {}",
            py.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Whether `node` runs and `@segment/analytics-node` is installed.
fn node_sdk() -> Result<(), String> {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| format!("no `node` on PATH ({e}); {INSTALL_HINT}"))?;
    let pkg = node_modules().join("@segment/analytics-node/package.json");
    if !pkg.is_file() {
        return Err(format!(
            "@segment/analytics-node is not installed ({} missing); set \
             TRIBUTARY_TEST_NODE_MODULES or {INSTALL_HINT}",
            pkg.display()
        ));
    }
    Ok(())
}

/// The calls one SDK run makes, in Segment wire naming. Every call carries a distinct
/// `context.marker` so it can be found among the stored events by content.
fn calls(sdk: &str) -> Vec<Value> {
    let user = format!("user-{sdk}");
    let anon = format!("anon-{sdk}");
    let marker = |what: &str| json!({ "marker": format!("{sdk}-{what}") });
    let mut calls: Vec<Value> = (0..TRACKS)
        .map(|i| {
            json!({
                "type": "track",
                "userId": user,
                "event": "Order Completed",
                "properties": {
                    "seq": i,
                    "revenue": 19.99,
                    "currency": "EUR",
                    "coupon": null,
                    "gift": i % 2 == 0,
                    "products": [{"sku": "sku-1", "quantity": 2}, {"sku": "sku-2", "quantity": 1}],
                    "shipping": {"method": "express", "address": {"city": "Zürich"}},
                    "note": "héllo ✓ \"quoted\" \\ 日本",
                },
                "context": marker(&format!("track-{i}")),
            })
        })
        .collect();
    calls.extend([
        json!({
            "type": "identify",
            "userId": user,
            "traits": {"email": "ada@example.com", "name": "Ada Lovelace", "plan": "pro",
                "logins": 3, "address": {"city": "London"}},
            "context": marker("identify"),
        }),
        json!({
            "type": "page",
            "anonymousId": anon,
            "name": "Pricing",
            "category": "Docs",
            "properties": {"url": "https://example.com/pricing", "title": "Pricing"},
            "context": marker("page"),
        }),
        json!({
            "type": "group",
            "userId": user,
            "groupId": format!("group-{sdk}"),
            "traits": {"name": "Acme Inc", "employees": 42, "industry": "Technology"},
            "context": marker("group"),
        }),
        json!({
            "type": "alias",
            "userId": user,
            "previousId": anon,
            "context": marker("alias"),
        }),
    ]);
    calls
}

/// Runs a driver script with the calls on stdin; returns the SDK's messageId per call.
async fn run_driver(mut cmd: tokio::process::Command, calls: &[Value], s: &Server) -> Vec<String> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start SDK driver");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(Value::from(calls.to_vec()).to_string().as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("SDK driver did not finish within 120 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK driver failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
        out.status,
        s.log()
    );
    let mut ids = vec![String::new(); calls.len()];
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let i = v["index"].as_u64().unwrap() as usize;
        ids[i] = v["messageId"].as_str().unwrap().to_string();
    }
    assert!(
        ids.iter().all(|id| !id.is_empty()),
        "driver printed no messageId for some calls:\n{stdout}\nstderr:\n{stderr}"
    );
    ids
}

/// Asserts every call is stored exactly once under its SDK messageId with its fields intact.
fn assert_stored(events: &[Value], calls: &[Value], ids: &[String], library: &str) {
    assert_eq!(
        events.len(),
        calls.len(),
        "stored {} events for {} calls: {events:#?}",
        events.len(),
        calls.len()
    );
    let stored_ids: HashSet<&str> = events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(
        stored_ids.len(),
        events.len(),
        "duplicate messageIds stored"
    );
    for (call, id) in calls.iter().zip(ids) {
        let marker = &call["context"]["marker"];
        let found: Vec<&Value> = events
            .iter()
            .filter(|e| &e["context"]["marker"] == marker)
            .collect();
        assert_eq!(found.len(), 1, "{marker} stored {} times", found.len());
        let e = found[0];
        assert_eq!(
            e["messageId"],
            id.as_str(),
            "{marker}: messageId not the SDK's"
        );
        for (k, want) in call.as_object().unwrap() {
            match k.as_str() {
                "context" => {}
                // analytics-node also copies `category` into page properties.
                "properties" if call["type"] == "page" => {
                    for (pk, pv) in want.as_object().unwrap() {
                        assert_eq!(&e[k][pk], pv, "{marker}: properties.{pk} in {e}");
                    }
                }
                _ => assert_eq!(&e[k], want, "{marker}: {k} in {e}"),
            }
        }
        assert_eq!(e["context"]["library"]["name"], library, "{marker}: {e}");
        assert!(
            e["context"]["library"]["version"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "{marker}: library version in {e}"
        );
        for k in ["timestamp", "originalTimestamp", "receivedAt", "sentAt"] {
            assert!(
                e[k].as_str().is_some_and(|t| t.ends_with('Z')),
                "{marker}: {k} in {e}"
            );
        }
    }
}

#[tokio::test]
async fn python_sdk_calls_are_stored_once_with_fields_intact() {
    if !service_available(
        "python_sdk_calls_are_stored_once_with_fields_intact",
        python_sdk(),
    ) {
        return;
    }
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Python SDK", "python_sdk").await);
    let calls = calls("python");
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(format!(
        "{}/tests/sdk/python_client.py",
        crate::harness::manifest_dir()
    ))
    .arg(&s.url)
    .arg(&key);
    let ids = run_driver(cmd, &calls, &s).await;
    let events = s.events(&id, 1000).await;
    assert_stored(&events, &calls, &ids, "analytics-python");
}

#[tokio::test]
async fn node_sdk_calls_are_stored_once_with_fields_intact() {
    if !service_available(
        "node_sdk_calls_are_stored_once_with_fields_intact",
        node_sdk(),
    ) {
        return;
    }
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Node SDK", "node_sdk").await);
    let calls = calls("node");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(format!(
        "{}/tests/sdk/node_client.js",
        crate::harness::manifest_dir()
    ))
    .arg(&s.url)
    .arg(&key)
    .env("NODE_PATH", node_modules());
    let ids = run_driver(cmd, &calls, &s).await;
    let events = s.events(&id, 1000).await;
    assert_stored(&events, &calls, &ids, "@segment/analytics-node");
}

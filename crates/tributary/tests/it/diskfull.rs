//! A full disk: the log cannot write, so ingest answers 503 with a clear body, the
//! server stays healthy, nothing acknowledged before is lost, and once there is room
//! again events are accepted. The data dir is a small tmpfs mounted by the test
//! (needs root, as in CI; otherwise it skips with the reason).

use std::process::Command;

use serde_json::json;

use crate::harness::{Server, client, key_id, service_available};

/// A tmpfs mounted for a test, unmounted on drop.
pub struct Mount(pub std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` on `dir`, or skips (`None`) when that is not possible.
pub fn mount_tmpfs(test: &str, dir: &std::path::Path, size: &str) -> Option<Mount> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output();
    let check = match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "cannot mount a tmpfs to fill (needs root): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run mount: {e}")),
    };
    service_available(test, check).then(|| Mount(dir.to_path_buf()))
}

#[tokio::test]
async fn a_full_disk_answers_503_loses_nothing_acknowledged_and_recovers() {
    let test = "a_full_disk_answers_503_loses_nothing_acknowledged_and_recovers";
    let holder = tempfile::tempdir().unwrap();
    let Some(mount) = mount_tmpfs(test, holder.path(), "4m") else {
        return;
    };
    let mut s = Server::start_in(
        mount.0.clone(),
        vec![("TRIBUTARY_WAREHOUSE".into(), "off".into())],
    );
    let (key, id) = key_id(&s.create_source("http", "Web", "web").await);
    let filler = "z".repeat(2000);
    let mut acked = Vec::new();
    let mut refused = None;
    for n in 0..2000 {
        let batch: Vec<_> = (0..10)
            .map(|i| json!({"type":"track","userId":"u","event":"E","messageId":format!("f-{n}-{i}"),"properties":{"f":filler}}))
            .collect();
        let (st, v) = s.post("/v1/batch", &key, json!({"batch": batch})).await;
        match st {
            200 => acked.extend((0..10).map(|i| format!("f-{n}-{i}"))),
            503 => {
                refused = Some(v);
                break;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    let refused = refused.expect("the disk never filled");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("retry"),
        "{refused}"
    );
    assert!(!acked.is_empty());
    let health = client()
        .get(format!("{}/health", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // Room again: the same server accepts events.
    let st = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mount.0)
        .status()
        .unwrap();
    assert!(st.success());
    let (st, v) = s
        .post(
            "/v1/track",
            &key,
            json!({"userId":"u","event":"After","messageId":"after-1"}),
        )
        .await;
    assert_eq!(st, 200, "{v}\n{}", s.log());

    // Everything acknowledged is there, once — also after a crash and restart.
    s.restart();
    let events = s.events(&id, 5000).await;
    let ids: std::collections::HashSet<String> = events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), events.len(), "duplicates stored");
    let missing: Vec<_> = acked.iter().filter(|i| !ids.contains(*i)).take(5).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert!(ids.contains("after-1"));
    s.kill();
}

#[tokio::test]
async fn the_warehouse_pauses_on_a_full_disk_and_catches_up_exactly_once() {
    let test = "the_warehouse_pauses_on_a_full_disk_and_catches_up_exactly_once";
    let holder = tempfile::tempdir().unwrap();
    let Some(mount) = mount_tmpfs(test, holder.path(), "6m") else {
        return;
    };
    let s = Server::start_in(
        mount.0.clone(),
        vec![("TRIBUTARY_WAREHOUSE_INTERVAL_MS".into(), "100".into())],
    );
    let (key, _) = key_id(&s.create_source("http", "Web", "web").await);
    let filler = "w".repeat(2000);
    let mut acked = 0u64;
    let mut full = false;
    for n in 0..3000 {
        let batch: Vec<_> = (0..10)
            .map(|i| json!({"type":"track","userId":"u","event":"Viewed","messageId":format!("w-{n}-{i}"),"properties":{"f":filler,"n":n}}))
            .collect();
        let (st, v) = s.post("/v1/batch", &key, json!({"batch": batch})).await;
        match st {
            200 => acked += 10,
            503 => {
                full = true;
                break;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(full, "the disk never filled");
    let st = Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&mount.0)
        .status()
        .unwrap();
    assert!(st.success());
    crate::warehouse::caught_up(&s).await;
    for table in ["tracks", "viewed"] {
        let (st, v) = crate::warehouse::query(
            &s,
            &format!("select count(*), count(distinct id) from web.{table}"),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["rows"][0][0], v["rows"][0][1], "{table}: duplicates: {v}");
        assert!(
            v["rows"][0][0].as_u64().unwrap() >= acked,
            "{table}: {v} < {acked} acknowledged"
        );
    }
}

//! The control plane on PostgreSQL, two `Control`s on one schema as two nodes
//! would have them: what one writes, the other serves within a second.

use std::time::{Duration, Instant};

use serde_json::json;
use tributary_server::control::{Control, ControlConfig, LastEvent, SourceType};
use tributary_server::error::ApiError;

use crate::leases::Schema;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn open(schema: &Schema, node: &str) -> std::sync::Arc<Control> {
    let config = ControlConfig {
        url: PG_URL.into(),
        schema: schema.name.clone(),
        reload_interval: Duration::from_millis(500),
    };
    Control::open_postgres(&config, node).expect("open control")
}

async fn within(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_sources_identities_and_unmapped_webhooks() {
    let Some(schema) = Schema::fresh("control_pg_two_nodes").await else {
        return;
    };
    let (a, b) = (open(&schema, "ctl-a"), open(&schema, "ctl-b"));
    assert_eq!(a.kind(), "postgres");
    let second = Duration::from_secs(1);

    let s = a
        .create(SourceType::Activecampaign, "AC", "ac", json!({"x": 1}))
        .unwrap();
    within("b knows the new key", second, || {
        b.source_by_key(&s.write_key).is_some()
    })
    .await;
    assert_eq!(b.source(&s.id).unwrap().settings["x"], 1);
    assert!(b.exists_in_db(&s.id));

    // The database judges schema uniqueness, whichever node asks.
    assert!(matches!(
        b.create(SourceType::Http, "dup", "ac", json!({})),
        Err(ApiError::Conflict(_))
    ));
    let (c1, c2) = (
        a.create(SourceType::Http, "race", "race", json!({})),
        b.create(SourceType::Http, "race", "race", json!({})),
    );
    assert!(
        c1.is_ok() != c2.is_ok(),
        "exactly one create of a schema wins: {c1:?} {c2:?}"
    );

    let r = b.rotate_key(&s.id).unwrap();
    within("a refuses the old key", second, || {
        a.source_by_key(&s.write_key).is_none() && a.source_by_key(&r.write_key).is_some()
    })
    .await;

    a.remember_identities(&[("Ann@Example.com".into(), "u-ann".into())])
        .unwrap();
    within("b resolves the identity", second, || {
        b.user_id_for_email("ann@example.com").as_deref() == Some("u-ann")
    })
    .await;

    a.record_unmapped(&s.id, &json!({"type": "sent"})).unwrap();
    assert_eq!(b.unmapped(&s.id).unwrap(), vec![json!({"type": "sent"})]);

    a.set_last_event(
        &s.id,
        LastEvent {
            event: Some("Email Opened".into()),
            kind: "track".into(),
            received_at: "2026-12-01T00:00:00.000Z".into(),
            message_id: "m1".into(),
        },
    );
    a.flush().unwrap();
    within("b shows a's last event", Duration::from_secs(3), || {
        b.last_event(&s.id).is_some_and(|e| e.message_id == "m1")
    })
    .await;

    a.delete(&s.id).unwrap();
    within("b forgets the deleted source", second, || {
        b.source(&s.id).is_none() && b.source_by_key(&r.write_key).is_none()
    })
    .await;
    assert!(b.unmapped(&s.id).unwrap().is_empty());
    assert!(matches!(b.rotate_key(&s.id), Err(ApiError::NotFound(_))));
    assert!(a.health().is_ok() && b.health().is_ok());
}

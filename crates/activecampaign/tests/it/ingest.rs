//! Mapped messages go through the real ingest rules (`tributary_model::normalize`) and
//! land in the warehouse tables and columns a user queries.

use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use tributary_activecampaign::{Settings, parse_webhook};
use tributary_model::flatten::flatten;
use tributary_model::snake::snakecase;
use tributary_model::{NormalizeContext, Normalized, normalize};

use crate::support::{Form, form_fixtures, message};

fn ingest(m: &serde_json::Map<String, Value>) -> Normalized {
    let ctx = NormalizeContext {
        received_at: Utc
            .with_ymd_and_hms(2024, 2, 28, 13, 10, 0)
            .single()
            .expect("valid time"),
        ..NormalizeContext::default()
    };
    normalize(Value::Object(m.clone()), &ctx)
        .unwrap_or_else(|r| panic!("ingest rejected {m:?}: {r:?}"))
}

/// Warehouse column names of a message section, as the loader derives them.
fn columns(m: &serde_json::Map<String, Value>, section: &str, prefix: &str) -> Vec<String> {
    let Some(Value::Object(obj)) = m.get(section) else {
        return Vec::new();
    };
    flatten(obj, prefix)
        .into_iter()
        .map(|(k, _)| snakecase(&k).into_owned())
        .collect()
}

#[test]
fn every_fixture_passes_ingest_unchanged_in_identity_and_time() {
    for (name, body) in form_fixtures() {
        let w = parse_webhook(&body, &Settings::default()).expect("maps");
        let m = message(&w);
        let n = ingest(m);
        assert_eq!(Some(&json!(n.message_id)), m.get("messageId"), "{name}");
        assert_eq!(
            n.anonymous_id.as_ref().map(|s| json!(s)).as_ref(),
            m.get("anonymousId")
        );
        assert_eq!(n.user_id, None);
        // No sentAt: our timestamp is kept as both originalTimestamp and timestamp.
        assert_eq!(
            n.body().get("originalTimestamp"),
            m.get("timestamp"),
            "{name}"
        );
        assert_eq!(n.body().get("timestamp"), m.get("timestamp"), "{name}");
        assert_eq!(n.event.as_deref(), w.mapped.event(), "{name}");
    }
}

#[test]
fn zero_date_falls_back_to_receive_time_at_ingest() {
    let w = Form::fixture("open.form")
        .set("date_time", "0000-00-00 00:00:00")
        .map();
    let n = ingest(message(&w));
    assert_eq!(n.body()["timestamp"], "2024-02-28T13:10:00.000Z");
}

#[test]
fn user_id_from_custom_field_passes_ingest() {
    let w = Form::fixture("click.form")
        .set("contact[fields][32]", "user-123")
        .map_with(&crate::support::user_id_field("32"));
    let n = ingest(message(&w));
    assert_eq!(n.user_id.as_deref(), Some("user-123"));
    assert_eq!(n.anonymous_id, None);
}

#[test]
fn events_land_in_the_tables_users_query() {
    let expected = [
        ("open.form", "email_opened"),
        ("click.form", "email_link_clicked"),
        ("bounce.form", "email_bounced"),
        ("unsubscribe.form", "email_unsubscribed"),
        ("reply.form", "email_replied"),
        ("forward.form", "email_forwarded"),
        ("share.form", "email_shared"),
        ("sent.form", "email_campaign_sent"),
    ];
    for (name, table) in expected {
        let w = Form::fixture(name).map();
        let event = w.mapped.event().expect("track");
        assert_eq!(snakecase(event), table, "{name}");
    }
    let spam = Form::fixture("unsubscribe.form")
        .set("unsubscribe[reason]", "spam")
        .map();
    assert_eq!(
        snakecase(spam.mapped.event().expect("track")),
        "email_marked_as_spam"
    );
}

#[test]
fn click_columns_are_the_email_spec_names() {
    let w = Form::fixture("click.form").map();
    let m = message(&w);
    assert_eq!(
        columns(m, "properties", ""),
        [
            "email_id",
            "email_subject",
            "campaign_id",
            "campaign_name",
            "campaign_type",
            "contact_id",
            "link_id",
            "link_url",
            "list_id",
            "initiated_from",
        ]
    );
    assert_eq!(
        columns(m, "context", "context"),
        [
            "context_traits_email",
            "context_traits_first_name",
            "context_traits_last_name",
            "context_integration_name",
            "context_library_name",
            "context_library_version",
        ]
    );
}

#[test]
fn identify_traits_become_user_columns() {
    let w = Form::fixture("contact_tag_added.form")
        .add("contact[fields][UTM_SOURCE]", "newsletter")
        .map();
    let m = message(&w);
    assert_eq!(
        columns(m, "traits", ""),
        [
            "email",
            "first_name",
            "last_name",
            "contact_id",
            "tags",
            "field_32",
            "field_utm_source",
        ]
    );
    let Some(Value::Object(traits)) = m.get("traits") else {
        panic!("traits")
    };
    let flat = flatten(traits, "");
    let tags = flat.iter().find(|(k, _)| k == "tags").map(|(_, v)| v);
    assert_eq!(tags, Some(&json!(r#"["vip","beta","webinar-2024"]"#)));
}

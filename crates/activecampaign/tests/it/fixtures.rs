//! Every body in `tests/fixtures/`, mapped, with the exact Segment call
//! a user would see for each.

use serde_json::{Value, json};
use tributary_activecampaign::{
    DedupeKey, Mapped, Settings, email_of, is_email_event, parse_form, parse_webhook,
};

use crate::support::{Form, assert_valid_segment, fixture, fixtures_dir, form_fixtures, message};

const ANN: &str = "ann.lee@example.com";

fn context_ann() -> Value {
    json!({
        "traits": {"email": ANN, "firstName": "Ann", "lastName": "Lee"},
        "integration": {"name": "activecampaign"},
        "library": {"name": "tributary-activecampaign", "version": env!("CARGO_PKG_VERSION")}
    })
}

/// The Email-spec properties shared by every campaign fixture.
fn campaign_props(initiated_from: &str) -> serde_json::Map<String, Value> {
    let Value::Object(m) = json!({
        "email_id": "17",
        "email_subject": "Spring is here",
        "campaign_id": "42",
        "campaign_name": "March newsletter",
        "campaign_type": "single",
        "contact_id": "36",
        "list_id": "3",
        "initiated_from": initiated_from,
    }) else {
        unreachable!()
    };
    m
}

fn id(raw_type: &str, link_id: &str, date_time: &str, extra: Vec<&str>) -> String {
    DedupeKey {
        raw_type,
        contact_id: "36",
        email: ANN,
        campaign_id: "42",
        message_id: "17",
        link_id,
        date_time,
        extra,
    }
    .message_id()
}

/// Maps a fixture and checks the common envelope, returning the message as a Value.
fn track(name: &str) -> Value {
    let w = parse_webhook(&fixture(name), &Settings::default()).expect("fixture maps");
    let Mapped::Track { message, email } = &w.mapped else {
        panic!("{name} should map to a track call, got {:?}", w.mapped)
    };
    assert_valid_segment(message);
    if let Some(email) = email {
        assert_eq!(email_of(message).as_deref(), Some(email.as_str()));
    }
    Value::Object(message.clone())
}

#[test]
fn every_file_in_the_fixtures_dir_is_a_known_form_body() {
    let readme = std::fs::read_to_string(fixtures_dir().join("README.md")).expect("README");
    let mut forms = 0;
    for entry in std::fs::read_dir(fixtures_dir()).expect("read dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_owned();
        if name == "README.md" {
            continue;
        }
        assert!(
            name.ends_with(".form"),
            "unexpected fixture {name}: teach these tests about it"
        );
        assert!(
            readme.contains(&format!("`{name}`")),
            "{name} not described in README.md"
        );
        forms += 1;
    }
    assert_eq!(forms, form_fixtures().len());
    assert!(
        forms >= 10,
        "expected the ten shared fixtures, found {forms}"
    );
}

#[test]
fn every_fixture_maps_to_a_valid_segment_call_named_after_its_type() {
    for (name, body) in form_fixtures() {
        let pairs = parse_form(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
        let w =
            parse_webhook(&body, &Settings::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let stem = name.trim_end_matches(".form");
        assert_eq!(w.raw_type, stem, "{name}");
        assert_eq!(pairs.get("type"), Some(stem));
        let m = w.message().unwrap_or_else(|| panic!("{name} unmapped"));
        assert_valid_segment(m);
        // Mapping is deterministic: a second delivery is the same message.
        assert_eq!(
            parse_webhook(&body, &Settings::default()).as_ref(),
            Ok(&w),
            "{name}"
        );
    }
}

#[test]
fn open_becomes_email_opened() {
    let props = campaign_props("public");
    assert_eq!(
        track("open.form"),
        json!({
            "type": "track",
            "event": "Email Opened",
            "messageId": id("open", "", "2024-02-28T07:04:13-06:00", vec![]),
            "timestamp": "2024-02-28T13:04:13.000Z",
            "anonymousId": ANN,
            "properties": props,
            "context": context_ann(),
        })
    );
}

#[test]
fn click_becomes_email_link_clicked_with_link() {
    let mut props = campaign_props("public");
    props.insert("link_id".into(), json!("9"));
    props.insert(
        "link_url".into(),
        json!("https://shop.example.com/spring?utm_source=ac&utm_campaign=march"),
    );
    let m = track("click.form");
    assert_eq!(m["event"], "Email Link Clicked");
    assert!(is_email_event(m["event"].as_str().unwrap_or_default()));
    assert_eq!(
        m["messageId"],
        id("click", "9", "2024-02-28T07:05:02-06:00", vec![])
    );
    assert_eq!(m["timestamp"], "2024-02-28T13:05:02.000Z");
    assert_eq!(m["anonymousId"], ANN);
    assert_eq!(m["properties"], Value::Object(props));
    assert_eq!(m["context"], context_ann());
}

#[test]
fn bounce_becomes_email_bounced_with_type_code_description() {
    let mut props = campaign_props("system");
    props.insert("bounce_type".into(), json!("hard"));
    props.insert("bounce_code".into(), json!("5.1.1"));
    props.insert("bounce_description".into(), json!("User unknown"));
    let m = track("bounce.form");
    assert_eq!(m["event"], "Email Bounced");
    assert_eq!(m["timestamp"], "2024-02-28T12:59:40.000Z");
    assert_eq!(m["properties"], Value::Object(props));
    // A message bounces once per recipient: the key has no time, so the API's
    // bounce (v1 gives only its date) is the same event.
    assert_eq!(m["messageId"], id("bounce", "", "", vec![]));
}

#[test]
fn unsubscribe_becomes_email_unsubscribed_with_reason_and_source() {
    let mut props = campaign_props("public");
    props.insert("reason".into(), json!("Too many emails"));
    props.insert("unsubscribe_source".into(), json!("public"));
    let m = track("unsubscribe.form");
    assert_eq!(m["event"], "Email Unsubscribed");
    assert_eq!(m["timestamp"], "2024-02-28T13:10:55.000Z");
    assert_eq!(m["properties"], Value::Object(props));
    assert_eq!(
        m["messageId"],
        id("unsubscribe", "", "2024-02-28T07:10:55-06:00", vec!["3"])
    );
}

#[test]
fn reply_forward_share_become_their_own_events() {
    let m = track("reply.form");
    assert_eq!(m["event"], "Email Replied");
    assert_eq!(m["properties"], Value::Object(campaign_props("public")));
    assert_eq!(m["timestamp"], "2024-02-28T14:15:00.000Z");

    let m = track("forward.form");
    assert_eq!(m["event"], "Email Forwarded");
    let mut props = campaign_props("public");
    props.insert("forward_count".into(), json!(1));
    assert_eq!(m["properties"], Value::Object(props));

    let m = track("share.form");
    assert_eq!(m["event"], "Email Shared");
    let mut props = campaign_props("public");
    props.insert("share_network".into(), json!("twitter"));
    props.insert("share_content".into(), json!("Spring is here"));
    assert_eq!(m["properties"], Value::Object(props));
    assert_eq!(
        m["messageId"],
        id("share", "", "2024-02-28T08:25:00-06:00", vec!["twitter"])
    );
}

#[test]
fn sent_is_campaign_level_with_a_synthetic_anonymous_id() {
    let w = parse_webhook(&fixture("sent.form"), &Settings::default()).expect("maps");
    assert_eq!(w.email(), None, "sent names no recipient");
    assert_eq!(
        track("sent.form"),
        json!({
            "type": "track",
            "event": "Email Campaign Sent",
            "messageId": DedupeKey {
                raw_type: "sent", campaign_id: "42", message_id: "17",
                date_time: "2024-02-28T06:58:00-06:00", ..DedupeKey::default()
            }.message_id(),
            "timestamp": "2024-02-28T12:58:00.000Z",
            "anonymousId": "activecampaign-campaign:42",
            "properties": {
                "email_id": "17",
                "email_subject": "Spring is here",
                "campaign_id": "42",
                "campaign_name": "March newsletter",
                "campaign_type": "single",
                "list_id": "3",
                "initiated_from": "admin",
                "recipients": 1250,
            },
            "context": {
                "integration": {"name": "activecampaign"},
                "library": {"name": "tributary-activecampaign", "version": env!("CARGO_PKG_VERSION")}
            },
        })
    );
}

#[test]
fn subscribe_capture_becomes_identify() {
    let w = parse_webhook(&fixture("subscribe.form"), &Settings::default()).expect("maps");
    let Mapped::Identify { message, email } = &w.mapped else {
        panic!("subscribe should identify, got {:?}", w.mapped)
    };
    assert_valid_segment(message);
    assert_eq!(email.as_deref(), Some("miguel@example.com"));
    let m = Value::Object(message.clone());
    assert_eq!(m["anonymousId"], "miguel@example.com");
    assert_eq!(m["timestamp"], "2017-09-21T16:33:13.000Z");
    assert_eq!(
        m["traits"],
        json!({
            "email": "miguel@example.com",
            "firstName": "Miguel",
            "lastName": "Ferrer",
            "phone": "325 7048546",
            "contact_id": "36",
            "tags": [],
        })
    );
    // The captured body lists keys in a different order from the others: no effect.
    let reordered = Form::fixture("subscribe.form");
    let mut pairs = reordered.0.clone();
    pairs.reverse();
    assert_eq!(Form(pairs).map(), w);
}

#[test]
fn contact_tag_added_becomes_identify_with_tags_and_custom_fields() {
    let w = parse_webhook(&fixture("contact_tag_added.form"), &Settings::default()).expect("maps");
    let m = Value::Object(message(&w).clone());
    assert_eq!(m["type"], "identify");
    assert_eq!(m["anonymousId"], ANN);
    assert_eq!(m["timestamp"], "2024-02-28T15:00:00.000Z");
    assert_eq!(
        m["traits"],
        json!({
            "email": ANN,
            "firstName": "Ann",
            "lastName": "Lee",
            "contact_id": "36",
            "tags": ["vip", "beta", "webinar-2024"],
            "field_32": "2024-12-31",
        })
    );
    assert_eq!(
        m["context"],
        json!({
            "integration": {"name": "activecampaign"},
            "library": {"name": "tributary-activecampaign", "version": env!("CARGO_PKG_VERSION")}
        })
    );
}

#[test]
fn the_six_email_events_cover_what_webhooks_can_send() {
    let names: Vec<String> = form_fixtures()
        .into_iter()
        .filter_map(|(_, body)| {
            parse_webhook(&body, &Settings::default())
                .ok()?
                .mapped
                .event()
                .map(str::to_owned)
        })
        .filter(|e| is_email_event(e))
        .collect();
    for expected in [
        "Email Opened",
        "Email Link Clicked",
        "Email Bounced",
        "Email Unsubscribed",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
}

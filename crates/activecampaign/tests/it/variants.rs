//! Variants of the fixtures: repeated deliveries, identity settings, unicode, missing
//! and unknown keys, dates in every form ActiveCampaign uses, malformed bodies.

use serde_json::{Value, json};
use tributary_activecampaign::{
    MapError, Mapped, ParseError, Settings, WebhookError, email_of, map_webhook, parse_form,
    parse_webhook,
};

use crate::support::{Form, assert_valid_segment, fixture, message, str_at, user_id_field};

fn message_id(form: &Form) -> String {
    str_at(message(&form.map()), &["messageId"])
        .expect("messageId")
        .to_owned()
}

fn props(form: &Form) -> Value {
    message(&form.map())
        .get("properties")
        .cloned()
        .unwrap_or(Value::Null)
}

// --- dedupe -----------------------------------------------------------------------

#[test]
fn repeated_deliveries_give_the_same_message() {
    for name in [
        "open.form",
        "click.form",
        "unsubscribe.form",
        "subscribe.form",
        "sent.form",
    ] {
        let a = parse_webhook(&fixture(name), &Settings::default()).expect("maps");
        let b = parse_webhook(&fixture(name), &Settings::default()).expect("maps");
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn redelivery_with_reordered_keys_keeps_the_message_id() {
    let form = Form::fixture("click.form");
    let mut reversed = form.0.clone();
    reversed.reverse();
    assert_eq!(message_id(&form), message_id(&Form(reversed)));
}

#[test]
fn different_links_contacts_campaigns_or_seconds_are_different_events() {
    let click = Form::fixture("click.form");
    let base = message_id(&click);
    let others = [
        Form::fixture("click.form").set("link[id]", "10"),
        Form::fixture("click.form").set("contact[id]", "37"),
        Form::fixture("click.form").set("campaign[id]", "43"),
        Form::fixture("click.form").set("campaign[message][id]", "18"),
        Form::fixture("click.form").set("date_time", "2024-02-28T07:05:03-06:00"),
        Form::fixture("click.form").set("type", "open"),
    ];
    let mut seen = vec![base];
    for other in others {
        let id = message_id(&other);
        assert!(!seen.contains(&id), "collision for {:?}", other.0);
        seen.push(id);
    }
}

#[test]
fn the_same_instant_sent_in_another_offset_is_the_same_event() {
    let central = Form::fixture("open.form");
    let utc = Form::fixture("open.form").set("date_time", "2024-02-28T13:04:13Z");
    let india = Form::fixture("open.form").set("date_time", "2024-02-28T18:34:13+05:30");
    assert_eq!(message_id(&central), message_id(&utc));
    assert_eq!(message_id(&central), message_id(&india));
}

#[test]
fn properties_that_do_not_identify_the_event_do_not_change_its_id() {
    let renamed = Form::fixture("open.form")
        .set("campaign[name]", "Renamed")
        .set("contact[first_name]", "Annie")
        .add("User-Agent", "Mozilla/5.0");
    assert_eq!(
        message_id(&renamed),
        message_id(&Form::fixture("open.form"))
    );
}

#[test]
fn two_tags_added_in_the_same_second_are_two_events() {
    let a = Form::fixture("contact_tag_added.form").set("tag", "webinar-2024");
    let b = Form::fixture("contact_tag_added.form").set("tag", "customer");
    assert_ne!(message_id(&a), message_id(&b));
}

#[test]
fn one_unsubscribe_per_list_is_one_event_per_list() {
    let a = Form::fixture("unsubscribe.form").set("list", "3");
    let b = Form::fixture("unsubscribe.form").set("list", "4");
    assert_ne!(message_id(&a), message_id(&b));
}

#[test]
fn two_contact_updates_in_the_same_second_are_two_events() {
    let update = |phone: &str| {
        Form::fixture("subscribe.form")
            .set("type", "update")
            .set("contact[phone]", phone)
    };
    assert_ne!(message_id(&update("1")), message_id(&update("2")));
    assert_eq!(message_id(&update("1")), message_id(&update("1")));
}

// --- identity ---------------------------------------------------------------------

#[test]
fn numeric_custom_field_as_user_id() {
    let form = Form::fixture("open.form").set("contact[fields][32]", "user-123");
    let w = form.map_with(&user_id_field("32"));
    let m = message(&w);
    assert_valid_segment(m);
    assert_eq!(str_at(m, &["userId"]), Some("user-123"));
    assert!(m.get("anonymousId").is_none());
    // The email is still reported, in context and beside the message.
    assert_eq!(
        str_at(m, &["context", "traits", "email"]),
        Some("ann.lee@example.com")
    );
    assert_eq!(w.email(), Some("ann.lee@example.com"));
}

#[test]
fn perstag_custom_field_as_user_id_in_any_spelling() {
    let form = Form::fixture("open.form").add("contact[fields][external_id]", " u-9 ");
    for setting in [
        "external_id",
        "EXTERNAL_ID",
        "%EXTERNAL_ID%",
        "contact[fields][External_Id]",
    ] {
        let w = form.map_with(&user_id_field(setting));
        assert_eq!(str_at(message(&w), &["userId"]), Some("u-9"), "{setting}");
    }
    // Perstag-keyed fields sent in upper case match too.
    let upper = Form::fixture("open.form").add("contact[fields][EXTERNAL_ID]", "u-10");
    let w = upper.map_with(&user_id_field("external_id"));
    assert_eq!(str_at(message(&w), &["userId"]), Some("u-10"));
}

#[test]
fn user_id_field_blank_or_absent_falls_back_to_the_email() {
    let blank = Form::fixture("open.form").set("contact[fields][32]", "  ");
    for (form, setting) in [
        (&blank, "32"),
        (&Form::fixture("open.form"), "99"),
        (&Form::fixture("open.form"), ""),
    ] {
        let w = form.map_with(&user_id_field(setting));
        let m = message(&w);
        assert_eq!(
            str_at(m, &["anonymousId"]),
            Some("ann.lee@example.com"),
            "{setting:?}"
        );
        assert!(m.get("userId").is_none());
    }
}

#[test]
fn user_id_field_applies_to_identify_too() {
    let form = Form::fixture("contact_tag_added.form");
    let w = form.map_with(&user_id_field("32"));
    let m = message(&w);
    assert_eq!(str_at(m, &["type"]), Some("identify"));
    assert_eq!(str_at(m, &["userId"]), Some("2024-12-31"));
    assert_eq!(w.email(), Some("ann.lee@example.com"));
}

#[test]
fn email_is_trimmed_and_keeps_its_case() {
    let form = Form::fixture("open.form").set("contact[email]", "  Ann.Lee@Example.COM ");
    let w = form.map();
    let m = message(&w);
    assert_eq!(str_at(m, &["anonymousId"]), Some("Ann.Lee@Example.COM"));
    assert_eq!(
        str_at(m, &["context", "traits", "email"]),
        Some("Ann.Lee@Example.COM")
    );
    assert_eq!(w.email(), Some("Ann.Lee@Example.COM"));
}

#[test]
fn contact_without_email_gets_a_contact_anonymous_id() {
    for email in [None, Some(""), Some("not-an-email")] {
        let mut form = Form::fixture("open.form").remove("contact[email]");
        if let Some(e) = email {
            form = form.set("contact[email]", e);
        }
        let w = form.map();
        let m = message(&w);
        assert_valid_segment(m);
        assert_eq!(
            str_at(m, &["anonymousId"]),
            Some("activecampaign-contact:36")
        );
        assert_eq!(w.email(), None);
        assert!(str_at(m, &["context", "traits", "email"]).is_none());
    }
}

#[test]
fn event_without_any_recipient_is_refused() {
    let form = Form::of(&[("type", "open"), ("date_time", "2024-02-28T07:04:13-06:00")]);
    assert_eq!(
        parse_webhook(&form.body(), &Settings::default()),
        Err(WebhookError::Map(MapError::NoIdentity {
            raw_type: "open".into()
        }))
    );
    // An identify never falls back to the campaign.
    let form = Form::of(&[("type", "subscribe"), ("campaign[id]", "42")]);
    assert!(matches!(
        parse_webhook(&form.body(), &Settings::default()),
        Err(WebhookError::Map(MapError::NoIdentity { .. }))
    ));
}

#[test]
fn mapped_messages_answer_email_of_like_the_segment_path() {
    for name in ["open.form", "click.form", "bounce.form", "unsubscribe.form"] {
        let w = parse_webhook(&fixture(name), &Settings::default()).expect("maps");
        assert_eq!(email_of(message(&w)).as_deref(), w.email(), "{name}");
    }
}

#[test]
fn segment_path_message_from_activecampaign_stream() {
    // What ActiveCampaign's own "send email events to Segment" stream posts when it
    // knows no userId: the email is the anonymousId.
    let m = json!({
        "type": "track", "event": "Email Delivered",
        "anonymousId": "Ann.Lee@example.com",
        "properties": {"campaign_id": "42"}
    });
    let Value::Object(m) = m else { unreachable!() };
    assert!(tributary_activecampaign::is_email_event("Email Delivered"));
    assert_eq!(email_of(&m).as_deref(), Some("Ann.Lee@example.com"));
}

// --- spam rule --------------------------------------------------------------------

#[test]
fn unsubscribe_with_a_spam_reason_is_marked_as_spam() {
    let form = Form::fixture("unsubscribe.form").set(
        "unsubscribe[reason]",
        "The emails are spam and should be reported",
    );
    let w = form.map();
    let m = message(&w);
    assert_valid_segment(m);
    assert_eq!(w.mapped.event(), Some("Email Marked as Spam"));
    assert_eq!(w.raw_type, "unsubscribe");
    assert_eq!(
        str_at(m, &["properties", "reason"]),
        Some("The emails are spam and should be reported")
    );
    assert_eq!(
        str_at(m, &["properties", "unsubscribe_source"]),
        Some("public")
    );
    // Still the same ActiveCampaign event for dedupe purposes.
    assert_ne!(message_id(&form), "");
}

#[test]
fn system_unsubscribe_without_complaint_words_stays_an_unsubscribe() {
    let form = Form::fixture("unsubscribe.form")
        .remove("unsubscribe[reason]")
        .set("initiated_from", "system")
        .set("initiated_by", "system");
    let w = form.map();
    assert_eq!(w.mapped.event(), Some("Email Unsubscribed"));
    assert_eq!(
        str_at(message(&w), &["properties", "unsubscribe_source"]),
        Some("system")
    );
    assert!(str_at(message(&w), &["properties", "reason"]).is_none());
}

#[test]
fn feedback_loop_initiator_is_marked_as_spam() {
    let form = Form::fixture("unsubscribe.form")
        .remove("unsubscribe[reason]")
        .set("initiated_by", "feedback loop");
    assert_eq!(form.map().mapped.event(), Some("Email Marked as Spam"));
}

// --- identify details -------------------------------------------------------------

#[test]
fn tag_removed_drops_the_tag_from_the_list() {
    let form = Form::fixture("contact_tag_added.form")
        .set("type", "contact_tag_removed")
        .set("tag", "vip");
    let w = form.map();
    assert_eq!(message(&w)["traits"]["tags"], json!(["beta"]));
}

#[test]
fn update_maps_numeric_and_perstag_custom_fields() {
    let form = Form::fixture("contact_tag_added.form")
        .set("type", "update")
        .remove("tag")
        .add("contact[fields][UTM_SOURCE]", "newsletter")
        .add("contact[fields][13]", "")
        .add("contact[fields][7][]", "ignored: nested");
    let w = form.map();
    let traits = &message(&w)["traits"];
    assert_eq!(traits["field_32"], "2024-12-31");
    assert_eq!(traits["field_utm_source"], "newsletter");
    assert!(traits.get("field_13").is_none(), "blank values are omitted");
    assert!(traits.get("field_7").is_none());
    assert_eq!(traits["tags"], json!(["vip", "beta"]));
    assert!(
        traits.get("phone").is_none(),
        "blank phone is omitted, not erased"
    );
}

// --- missing and unknown keys -----------------------------------------------------

#[test]
fn minimal_open_maps_with_only_what_it_has() {
    let form = Form::of(&[("type", "open"), ("contact[email]", "a@example.com")]);
    let w = form.map();
    let m = message(&w);
    assert_valid_segment(m);
    assert_eq!(m["properties"], json!({}));
    assert!(
        m.get("timestamp").is_none(),
        "no date_time: ingest uses receive time"
    );
    assert_eq!(m["context"]["traits"], json!({"email": "a@example.com"}));
}

#[test]
fn bounce_without_description_omits_it() {
    let form = Form::fixture("bounce.form")
        .remove("bounce[description]")
        .set("bounce[type]", "Soft")
        .set("bounce[code]", "");
    let p = props(&form);
    assert_eq!(p["bounce_type"], "soft");
    assert!(p.get("bounce_description").is_none());
    assert!(p.get("bounce_code").is_none());
}

#[test]
fn sent_recipients_that_do_not_parse_stay_text() {
    assert_eq!(
        props(&Form::fixture("sent.form").set("campaign[recipients]", "1,250"))["recipients"],
        json!(1250)
    );
    assert_eq!(
        props(&Form::fixture("sent.form").set("campaign[recipients]", "n/a"))["recipients"],
        json!("n/a")
    );
}

#[test]
fn public_unsubscribe_lists_come_from_list_entries() {
    let form = Form::fixture("unsubscribe.form")
        .set("list", "0")
        .add("list[][id]", "5")
        .add("list[][name]", "Weekly")
        .add("list[][id]", "6");
    let p = props(&form);
    assert_eq!(p["list_id"], "5");
    assert_eq!(p["list_ids"], json!(["5", "6"]));
    assert_eq!(p["list_name"], "Weekly");
    let p = props(&Form::fixture("open.form").set("list", "0"));
    assert!(p.get("list_id").is_none(), "list 0 means no list");
}

#[test]
fn unknown_keys_are_ignored() {
    let noisy = Form::fixture("open.form")
        .add("foo[bar][baz]", "x")
        .add("customer_acct_id", "0")
        .add("campaign[webcopy_url]", "https://example.com/web")
        .add("contact[unknown]", "y");
    assert_eq!(noisy.map(), Form::fixture("open.form").map());
}

#[test]
fn unknown_types_are_acknowledged_unmapped() {
    for t in [
        "deal_update",
        "sms_sent",
        "list_add",
        "subscriber_note",
        "opened",
        "spam",
    ] {
        let w = Form::fixture("open.form").set("type", t).map();
        assert_eq!(w.raw_type, t);
        assert_eq!(w.mapped, Mapped::Unmapped, "{t}");
        assert_eq!(w.message(), None);
    }
}

/// An automation "Webhook" action as ActiveCampaign posts it (structure of a public
/// capture; personal data replaced): contact fields and `seriesid`, no `type`.
const AUTOMATION_ACTION: &[u8] = b"contact%5Bid%5D=1358&contact%5Bemail%5D=person%40example.com\
&contact%5Bfirst_name%5D=Ann&contact%5Blast_name%5D=Lee&contact%5Bphone%5D=%2B15550100\
&contact%5Borgname%5D=&contact%5Bcustomer_acct_name%5D=&contact%5Btags%5D=Externos\
&contact%5Bip4%5D=127.0.0.1&contact%5Bfields%5D%5Butm_source%5D=newsletter&seriesid=9";

#[test]
fn automation_webhook_action_becomes_an_identify_with_the_contacts_traits() {
    let w = parse_webhook(AUTOMATION_ACTION, &Settings::default()).expect("automation maps");
    assert_eq!(w.raw_type, tributary_activecampaign::AUTOMATION_TYPE);
    let Mapped::Identify { message, email } = &w.mapped else {
        panic!("not an identify: {:?}", w.mapped);
    };
    assert_eq!(email.as_deref(), Some("person@example.com"));
    assert_eq!(message["type"], "identify");
    assert_eq!(message["anonymousId"], "person@example.com");
    let traits = &message["traits"];
    assert_eq!(traits["email"], "person@example.com");
    assert_eq!(traits["firstName"], "Ann");
    assert_eq!(traits["lastName"], "Lee");
    assert_eq!(traits["phone"], "+15550100");
    assert_eq!(traits["contact_id"], "1358");
    assert_eq!(traits["tags"], serde_json::json!(["Externos"]));
    assert_eq!(traits["field_utm_source"], "newsletter");
    assert!(traits.get("company").is_none(), "blank orgname is omitted");
    assert_eq!(message["context"]["activecampaign"]["automation_id"], "9");
    // A repeated delivery is the same message; a changed contact is a new one.
    let again = parse_webhook(AUTOMATION_ACTION, &Settings::default()).unwrap();
    assert_eq!(again.message().unwrap()["messageId"], message["messageId"]);
    let changed = [
        AUTOMATION_ACTION,
        b"&contact%5Bphone%5D=%2B15550199".as_slice(),
    ]
    .concat();
    let changed = parse_webhook(&changed, &Settings::default()).unwrap();
    assert_ne!(
        changed.message().unwrap()["messageId"],
        message["messageId"]
    );
}

#[test]
fn a_body_with_neither_type_nor_contact_is_refused_with_a_reason() {
    let err = parse_webhook(b"seriesid=9&foo=bar", &Settings::default()).expect_err("no type");
    assert_eq!(err, WebhookError::Map(MapError::MissingType));
    assert!(err.to_string().contains("no `type` key"), "{err}");
}

// --- unicode ----------------------------------------------------------------------

#[test]
fn unicode_survives_percent_encoding() {
    let form = Form::fixture("click.form")
        .set("contact[first_name]", "Zoë")
        .set("contact[last_name]", "李")
        .set("contact[email]", "josé@exämple.com")
        .set("campaign[message][subject]", "Spring 🌷 is here — ünïcödé")
        .set("link[url]", "https://example.com/ü?q=é&x=1");
    let w = form.map();
    let m = message(&w);
    assert_valid_segment(m);
    assert_eq!(str_at(m, &["anonymousId"]), Some("josé@exämple.com"));
    assert_eq!(str_at(m, &["context", "traits", "firstName"]), Some("Zoë"));
    assert_eq!(str_at(m, &["context", "traits", "lastName"]), Some("李"));
    assert_eq!(
        str_at(m, &["properties", "email_subject"]),
        Some("Spring 🌷 is here — ünïcödé")
    );
    assert_eq!(
        str_at(m, &["properties", "link_url"]),
        Some("https://example.com/ü?q=é&x=1")
    );
}

#[test]
fn raw_utf8_body_and_latin1_bytes_are_read() {
    let raw = "type=open&contact%5Bemail%5D=a%40example.com&contact%5Bfirst_name%5D=Zoë";
    let w = parse_webhook(raw.as_bytes(), &Settings::default()).expect("maps");
    assert_eq!(
        str_at(message(&w), &["context", "traits", "firstName"]),
        Some("Zoë")
    );
    // Latin-1 "é" percent-encoded (%E9) is not UTF-8: kept lossily, not refused.
    let latin1 = b"type=open&contact%5Bemail%5D=a%40example.com&contact%5Bfirst_name%5D=Jos%E9";
    let w = parse_webhook(latin1, &Settings::default()).expect("maps");
    assert_eq!(
        str_at(message(&w), &["context", "traits", "firstName"]),
        Some("Jos\u{FFFD}")
    );
}

// --- dates ------------------------------------------------------------------------

#[test]
fn date_time_in_every_form_activecampaign_uses() {
    let cases: [(&str, Option<&str>); 10] = [
        (
            "2024-02-28T07:04:13-06:00",
            Some("2024-02-28T13:04:13.000Z"),
        ),
        (
            "2024-02-28T07:04:13+05:30",
            Some("2024-02-28T01:34:13.000Z"),
        ),
        ("2024-02-28T07:04:13Z", Some("2024-02-28T07:04:13.000Z")),
        (
            "2024-02-28T07:04:13-00:00",
            Some("2024-02-28T07:04:13.000Z"),
        ),
        ("2024-02-28 07:04:13", Some("2024-02-28T07:04:13.000Z")),
        ("2024-02-28", Some("2024-02-28T00:00:00.000Z")),
        ("0000-00-00 00:00:00", None),
        ("0000-00-00", None),
        ("", None),
        ("not a date", None),
    ];
    for (date_time, expected) in cases {
        let w = Form::fixture("open.form").set("date_time", date_time).map();
        let m = message(&w);
        assert_valid_segment(m);
        assert_eq!(str_at(m, &["timestamp"]), expected, "{date_time:?}");
    }
    let w = Form::fixture("open.form").remove("date_time").map();
    assert!(message(&w).get("timestamp").is_none());
}

// --- malformed bodies -------------------------------------------------------------

#[test]
fn malformed_bodies_are_refused_with_a_message() {
    let cases: [(&[u8], ParseError); 6] = [
        (b"", ParseError::Empty),
        (b"\r\n", ParseError::Empty),
        (
            br#"{"type":"open","contact":{"email":"a@example.com"}}"#,
            ParseError::LooksLikeJson,
        ),
        (b"just some text", ParseError::NoPairs),
        (b"=open", ParseError::NoPairs),
        (
            &[0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00],
            ParseError::NotText {
                offset: 0,
                byte: 0x1f,
            },
        ),
    ];
    for (body, expected) in cases {
        let err = parse_form(body).expect_err("refused");
        assert_eq!(err, expected, "{body:?}");
        assert!(!err.to_string().is_empty());
        assert_eq!(
            parse_webhook(body, &Settings::default()),
            Err(WebhookError::Parse(expected))
        );
    }
}

#[test]
fn truncated_body_still_maps_what_arrived() {
    let body = fixture("click.form");
    let cut = &body[..body.len() / 2];
    let w = parse_webhook(cut, &Settings::default()).expect("a truncated body is still a form");
    assert_eq!(w.mapped.event(), Some("Email Link Clicked"));
    assert_valid_segment(message(&w));
}

#[test]
fn broken_percent_escapes_are_kept_literally() {
    let body = b"type=open&contact%5Bemail%5D=a%40example.com&campaign%5Bname%5D=50%+off%zz";
    let w = parse_webhook(body, &Settings::default()).expect("maps");
    assert_eq!(
        str_at(message(&w), &["properties", "campaign_name"]),
        Some("50% off%zz")
    );
}

#[test]
fn map_webhook_accepts_pairs_built_in_code() {
    let pairs = [("type", "open"), ("contact[email]", "a@example.com")]
        .into_iter()
        .collect();
    let w = map_webhook(&pairs, &Settings::default()).expect("maps");
    assert_eq!(w.email(), Some("a@example.com"));
}

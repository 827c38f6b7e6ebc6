//! Planner tests: rows per call type, naming, collisions, and the fast path held
//! equal to the general parse.

use super::*;
use serde_json::json;

fn record(seq: u64, payload: Value) -> Record {
    Record {
        partition: 0,
        seq,
        source_id: "src".into(),
        message_id: payload["messageId"].as_str().unwrap_or("m").to_string(),
        call_type: payload["type"]
            .as_str()
            .and_then(tributary_eventlog::CallType::parse)
            .unwrap_or(tributary_eventlog::CallType::Track),
        event: payload["event"].as_str().map(str::to_string),
        user_id: None,
        anonymous_id: None,
        received_at_ms: 1_800_000_000_000,
        payload: payload.to_string(),
    }
}

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_001, 0).expect("valid")
}

fn plan_record(record: &Record, uuid_ts: &DateTime<Utc>) -> Result<Vec<Planned>, Skip> {
    plan_record_at(record, &format_timestamp(uuid_ts))
}

fn get<'a>(row: &'a PlannedRow, col: &str) -> Option<&'a Value> {
    row.values.iter().find(|(c, _)| c == col).map(|(_, v)| v)
}

fn columns(row: &PlannedRow) -> Vec<&str> {
    row.values.iter().map(|(c, _)| c.as_ref()).collect()
}

#[test]
fn a_track_becomes_a_tracks_row_and_an_event_table_row() {
    let out = plan_record(
        &record(
            7,
            json!({
                "type": "track", "messageId": "m1", "event": "Email Delivered",
                "userId": "u1", "anonymousId": "a1",
                "properties": {"email_subject": "Hi", "campaignID": 12, "tags": ["x", "y"],
                               "link": {"url": "https://e.x", "id": 3}},
                "context": {"traits": {"email": "a@b.c"}, "library": {"name": "ac"}},
                "integrations": {"All": true},
                "timestamp": "2026-11-27T05:10:53.123Z",
                "originalTimestamp": "2026-11-27T05:10:53.000Z",
                "sentAt": "2026-11-27T05:10:53.100Z",
                "receivedAt": "2026-11-27T05:10:54.000Z"
            }),
        ),
        &now(),
    )
    .expect("planned");
    assert_eq!(out.len(), 2);
    let tracks = &out[0];
    assert_eq!(tracks.table, "tracks");
    assert_eq!(
        columns(&tracks.row),
        vec![
            "id",
            "anonymous_id",
            "user_id",
            "received_at",
            "sent_at",
            "timestamp",
            "original_timestamp",
            "uuid_ts",
            "event",
            "event_text",
            "context_traits_email",
            "context_library_name",
        ]
    );
    assert_eq!(get(&tracks.row, "event"), Some(&json!("email_delivered")));
    assert_eq!(
        get(&tracks.row, "event_text"),
        Some(&json!("Email Delivered"))
    );
    assert_eq!(
        get(&tracks.row, "uuid_ts"),
        Some(&json!(format_timestamp(&now())))
    );
    assert_eq!(tracks.row.seq, 7);
    assert_eq!(&*tracks.row.key, "m1");

    let ev = &out[1];
    assert_eq!(ev.table, "email_delivered");
    assert_eq!(ev.kind, TableKind::Event);
    assert_eq!(get(&ev.row, "email_subject"), Some(&json!("Hi")));
    assert_eq!(get(&ev.row, "campaign_id"), Some(&json!(12)));
    assert_eq!(get(&ev.row, "tags"), Some(&json!("[\"x\",\"y\"]")));
    assert_eq!(get(&ev.row, "link_url"), Some(&json!("https://e.x")));
    assert_eq!(get(&ev.row, "link_id"), Some(&json!(3)));
    assert_eq!(get(&ev.row, "context_traits_email"), Some(&json!("a@b.c")));
    assert!(get(&ev.row, "integrations_all").is_none());
    // tracks has no property columns.
    assert!(get(&tracks.row, "email_subject").is_none());
}

#[test]
fn properties_named_like_reserved_columns_are_prefixed_not_dropped() {
    let out = plan_record(
        &record(
            1,
            json!({"type": "track", "messageId": "m1", "event": "Signed Up",
                   "properties": {"user_id": "evil", "timestamp": "x", "id": 5,
                                  "event": "e", "context": {"ip": "1.1.1.1"}, "name": "n"},
                   "context": {"ip": "2.2.2.2"}}),
        ),
        &now(),
    )
    .expect("planned");
    let ev = &out[1].row;
    assert_eq!(get(ev, "user_id"), Some(&Value::Null));
    assert_eq!(get(ev, "_user_id"), Some(&json!("evil")));
    assert_eq!(get(ev, "_timestamp"), Some(&json!("x")));
    assert_eq!(get(ev, "_id"), Some(&json!(5)));
    assert_eq!(get(ev, "_event"), Some(&json!("e")));
    assert_eq!(get(ev, "_context_ip"), Some(&json!("1.1.1.1")));
    assert_eq!(get(ev, "context_ip"), Some(&json!("2.2.2.2")));
    assert_eq!(get(ev, "name"), Some(&json!("n")));
    assert_eq!(get(ev, "id"), Some(&json!("m1")));
}

#[test]
fn keys_that_snake_case_alike_keep_the_first_and_report_the_second() {
    let out = plan_record(
        &record(
            1,
            json!({"type": "track", "messageId": "m1", "event": "E",
                   "properties": {"planName": "a", "plan_name": "b", "plan name": null}}),
        ),
        &now(),
    )
    .expect("planned");
    let ev = &out[1].row;
    assert_eq!(get(ev, "plan_name"), Some(&json!("a")));
    assert_eq!(ev.dropped.len(), 1);
    assert_eq!(ev.dropped[0].0, "plan_name");
    assert_eq!(ev.dropped[0].1, "b");
    assert_eq!(
        ev.values.iter().filter(|(c, _)| c == "plan_name").count(),
        1
    );

    // A null first does not hide a later value.
    let out = plan_record(
        &record(
            1,
            json!({"type": "track", "messageId": "m1", "event": "E",
                   "properties": {"planName": null, "plan_name": "b"}}),
        ),
        &now(),
    )
    .expect("planned");
    assert_eq!(get(&out[1].row, "plan_name"), Some(&json!("b")));
    assert!(out[1].row.dropped.is_empty());
}

#[test]
fn events_with_hostile_names_get_safe_tables() {
    for (event, table) in [
        ("Tracks", "_tracks"),
        ("Users", "_users"),
        ("\"; DROP TABLE tracks; --", "drop_table_tracks"),
        ("Order Completed 🎉", "order_completed"),
    ] {
        let out = plan_record(
            &record(
                1,
                json!({"type": "track", "messageId": "m1", "event": event}),
            ),
            &now(),
        )
        .expect("planned");
        assert_eq!(out[1].table, table, "{event:?}");
        assert_eq!(get(&out[0].row, "event"), Some(&json!(table)));
        assert_eq!(get(&out[0].row, "event_text"), Some(&json!(event)));
    }
    let long = "Very Long Event Name ".repeat(15);
    let out = plan_record(
        &record(
            1,
            json!({"type": "track", "messageId": "m1", "event": long}),
        ),
        &now(),
    )
    .expect("planned");
    assert_eq!(out[1].table.len(), 63);
}

#[test]
fn an_identify_becomes_identifies_and_a_users_update() {
    let out = plan_record(
        &record(
            3,
            json!({"type": "identify", "messageId": "m3", "userId": "u1",
                   "traits": {"email": "a@b.c", "plan": "pro", "address": {"city": "Oslo"}, "id": "x"},
                   "receivedAt": "2026-11-27T05:10:54.000Z"}),
        ),
        &now(),
    )
    .expect("planned");
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].table, "identifies");
    assert_eq!(get(&out[0].row, "email"), Some(&json!("a@b.c")));
    assert_eq!(get(&out[0].row, "address_city"), Some(&json!("Oslo")));
    let users = &out[1];
    assert_eq!(users.table, "users");
    assert_eq!(users.kind, TableKind::Users);
    assert_eq!(&*users.row.key, "u1");
    assert_eq!(&*users.row.message_id, "m3");
    assert_eq!(get(&users.row, "id"), Some(&json!("u1")));
    assert_eq!(get(&users.row, "_id"), Some(&json!("x")));
    assert_eq!(get(&users.row, "plan"), Some(&json!("pro")));
    assert!(get(&users.row, "anonymous_id").is_none());
    // Anonymous identify: no users row.
    let out = plan_record(
        &record(
            4,
            json!({"type": "identify", "messageId": "m4", "anonymousId": "a",
                          "traits": {"plan": "x"}}),
        ),
        &now(),
    )
    .expect("planned");
    assert_eq!(out.len(), 1);
}

#[test]
fn pages_screens_groups_and_aliases_have_their_columns() {
    let page = plan_record(
        &record(
            1,
            json!({"type": "page", "messageId": "p", "name": "Home", "category": "Docs",
                          "properties": {"title": "Welcome", "url": "https://x", "name": "Home"}}),
        ),
        &now(),
    )
    .expect("planned");
    assert_eq!(page[0].table, "pages");
    assert_eq!(get(&page[0].row, "name"), Some(&json!("Home")));
    assert_eq!(get(&page[0].row, "category"), Some(&json!("Docs")));
    assert_eq!(get(&page[0].row, "title"), Some(&json!("Welcome")));
    assert_eq!(get(&page[0].row, "_name"), Some(&json!("Home")));
    let screen = plan_record(
        &record(
            2,
            json!({"type": "screen", "messageId": "s", "name": "Login"}),
        ),
        &now(),
    )
    .expect("planned");
    assert_eq!(screen[0].table, "screens");
    assert_eq!(get(&screen[0].row, "name"), Some(&json!("Login")));
    let group = plan_record(
        &record(
            3,
            json!({"type": "group", "messageId": "g", "groupId": "acme",
                          "traits": {"employees": 40}}),
        ),
        &now(),
    )
    .expect("planned");
    assert_eq!(group[0].table, "groups");
    assert_eq!(get(&group[0].row, "group_id"), Some(&json!("acme")));
    assert_eq!(get(&group[0].row, "employees"), Some(&json!(40)));
    let alias = plan_record(
        &record(
            4,
            json!({"type": "alias", "messageId": "al", "userId": "u2",
                          "previousId": "anon-1"}),
        ),
        &now(),
    )
    .expect("planned");
    assert_eq!(alias[0].table, "aliases");
    assert_eq!(get(&alias[0].row, "previous_id"), Some(&json!("anon-1")));
    assert_eq!(get(&alias[0].row, "user_id"), Some(&json!("u2")));
}

#[test]
fn unknown_types_and_bad_payloads_are_skipped() {
    let mut r = record(1, json!({"type": "launch", "messageId": "x"}));
    assert_eq!(
        plan_record(&r, &now()),
        Err(Skip::UnknownType("launch".into()))
    );
    r.payload = "not json".into();
    assert!(matches!(plan_record(&r, &now()), Err(Skip::BadPayload(_))));
    r.payload = "[1]".into();
    assert!(matches!(plan_record(&r, &now()), Err(Skip::BadPayload(_))));
}

#[test]
fn the_borrowed_parse_agrees_with_the_general_one() {
    for payload in [
        r#"{"type":"track","messageId":"m1","event":"E","userId":42,"anonymousId":"",
           "properties":{"a":{"b":[1,{"c":2}]},"d":null,"e":{}},"context":{"ip":"1.2.3.4"},
           "traits":[1],"timestamp":7,"sentAt":null,"extra":{"x":1},"extra":2}"#,
        r#"{"type":"identify","userId":"u","traits":{"plan":"pro","plan":"max","n":1.5},
           "context":"not an object","name":true,"category":"c","groupId":"g","previousId":0}"#,
        r#" {"type":null,"messageId":null,"receivedAt":"2026-11-27T05:10:54.000Z",
           "properties":{"k\u00e9y":"v\n"},"originalTimestamp":"x"}"#,
        "{}",
    ] {
        let borrowed = Msg::parse_borrowed(payload).expect("borrowed parse");
        let general = Msg::parse_general(payload).expect("general parse");
        assert_eq!(borrowed, general, "{payload}");
    }
    // What the borrowed parse does not take goes to the general one.
    for payload in [
        r#"{"type":"track","type":"page"}"#,
        "[1]",
        " x",
        r#"{"a":}"#,
    ] {
        assert!(Msg::parse_borrowed(payload).is_none(), "{payload}");
    }
    assert_eq!(
        Msg::parse(r#"{"type":"track","type":"page"}"#).map(|m| m.call_type),
        Ok(Some(json!("page")))
    );
}

#[test]
fn objects_read_from_text_plan_like_maps() {
    let payloads = [
        // A repeated key: the last value wins, in the first key's place.
        r#"{"type":"track","messageId":"m1","event":"E",
           "properties":{"a":1,"b":{"c":"x","d":[1,{"e":2}]},"a":2,"k\u00e9y":"v","f":{},"g":null}}"#,
        // Keys that snake-case alike: first kept, second reported.
        r#"{"type":"page","messageId":"m2","properties":{"planName":"a","plan_name":"b"},
           "context":{"ip":"1.2.3.4","library":{"name":"n","version":"1"}}}"#,
        r#"{"type":"identify","messageId":"m3","userId":"u","traits":{"x":{"y":{"z":true}},"n":1.5}}"#,
        r#"{"type":"group","messageId":"m4","groupId":"g","traits":{"n":-7},"context":"not an object"}"#,
        // Numbers and strings as `Value` reads them.
        r#"{"type":"track","messageId":"m5","event":"E","properties":{"u":18446744073709551615,
           "i":-9223372036854775808,"f":1.0,"z":-0.0,"e":1e300,"s":"a\"b\n\u00e9","t":true,
           "arr":[[1,2],{"x":null},"y"],"o":{"p":{"q":{}}},"n":null}}"#,
    ];
    for payload in payloads {
        // Each plans (neither way refuses it), and to the same rows both ways.
        let mut r = record(1, json!({}));
        r.payload = payload.into();
        assert!(plan_record(&r, &now()).is_ok(), "{payload}");
        assert!(Msg::parse_general(payload).is_ok(), "{payload}");
        assert_eq!(fuzz_plan_differential(payload), Ok(()), "{payload}");
    }
    let r = record(1, json!({"type": "track", "messageId": "m1", "event": "E"}));
    let mut dup = r.clone();
    dup.payload =
        r#"{"type":"track","messageId":"m1","event":"E","properties":{"a":1,"a":2}}"#.into();
    let out = plan_record(&dup, &now()).expect("planned");
    assert_eq!(get(&out[1].row, "a"), Some(&json!(2)));
    assert!(out[1].row.dropped.is_empty());
}

/// JSON text of a value whose objects may repeat keys (which `Value` cannot hold).
#[derive(Debug, Clone)]
enum Text {
    Leaf(String),
    Array(Vec<Text>),
    Object(Vec<(String, Text)>),
}

impl Text {
    fn render(&self) -> String {
        match self {
            Text::Leaf(s) => s.clone(),
            Text::Array(items) => format!(
                "[{}]",
                items.iter().map(Text::render).collect::<Vec<_>>().join(",")
            ),
            Text::Object(entries) => format!(
                "{{{}}}",
                entries
                    .iter()
                    .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v.render()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

fn text() -> impl proptest::strategy::Strategy<Value = Text> {
    use proptest::prelude::*;
    // Few distinct keys, so repeats and snake-case clashes are common.
    let key = prop_oneof![
        Just("a".to_string()),
        Just("planName".to_string()),
        Just("plan_name".to_string()),
        Just("kéy".to_string()),
        Just("id".to_string()),
        Just("event".to_string()),
        "[a-zA-Z _.-]{0,6}",
    ];
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Value::from(f).to_string()),
        Just("-0.0".to_string()),
        Just("1e300".to_string()),
        Just("\"2026-11-27T05:10:54.123+02:00\"".to_string()),
        "\\PC{0,8}".prop_map(|s| Value::from(s).to_string()),
    ]
    .prop_map(Text::Leaf);
    leaf.prop_recursive(4, 32, 5, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Text::Array),
            proptest::collection::vec((key.clone(), inner), 0..5).prop_map(Text::Object),
        ]
    })
}

/// A JSON object whose keys are distinct lowercase words (no `_`, so no two paths
/// join or snake-case to one column): what model's rule and the text path must
/// flatten to the same leaves.
fn plain_object() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,8}".prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    proptest::collection::btree_map("[a-z]{1,4}", value, 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

proptest::proptest! {
    /// The fast path (objects flattened straight from the text) plans every
    /// message exactly as the general parse does, repeated keys included.
    #[test]
    fn the_text_path_plans_like_the_general_parse(
        call in proptest::sample::select(vec!["track", "identify", "page", "screen", "group", "alias"]),
        properties in text(),
        context in text(),
        traits in text(),
        extra in text(),
    ) {
        let payload = format!(
            r#"{{"type":"{call}","messageId":"m1","event":"Order Done","userId":"u1",
               "name":"n","groupId":"g","previousId":"p","properties":{},"context":{},
               "traits":{},"extra":{},"timestamp":"2026-11-27T05:10:54.000Z"}}"#,
            properties.render(),
            context.render(),
            traits.render(),
            extra.render()
        );
        // Valid JSON throughout, so the comparison never takes its lenient exit.
        proptest::prop_assert!(Msg::parse_general(&payload).is_ok(), "{}", payload);
        let compared = fuzz_plan_differential(&payload);
        proptest::prop_assert!(compared.is_ok(), "{:?}", compared);
    }

    /// The fast path flattens `properties` straight from its text to exactly the
    /// leaves of model's one rule (`tributary_model::flatten::flatten_owned`), each
    /// under the column naming gives its joined path.
    #[test]
    fn the_text_path_flattens_by_models_rule(properties in plain_object()) {
        let payload = format!(
            r#"{{"type":"track","messageId":"m1","event":"E","properties":{properties}}}"#
        );
        let mut r = record(1, json!({}));
        r.payload = payload.clone();
        let mut rows = Vec::new();
        plan_record_with(&r, "2026-11-27T05:10:54.000Z", &mut Names::default(), &mut rows)
            .expect("planned");
        let event = &rows[1].row;
        let fixed = TableKind::Event.fixed_columns();
        let got: Vec<(String, Value)> = event.values[fixed.len()..]
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        // The object as serde_json reads its text (floats may not round-trip exactly).
        let map: serde_json::Map<String, Value> =
            serde_json::from_str(&properties.to_string()).expect("an object");
        let want: Vec<(String, Value)> = tributary_model::flatten::flatten_owned(map, "")
            .into_iter()
            .map(|(path, v)| {
                let col = crate::naming::column_name_by(&path, |n| fixed.iter().any(|(f, _)| *f == n), false);
                (col, v)
            })
            .collect();
        proptest::prop_assert_eq!(got, want, "{}", payload);
    }
}

#[test]
fn received_at_falls_back_to_the_log_time() {
    let out = plan_record(
        &record(1, json!({"type": "track", "messageId": "m1", "event": "E"})),
        &now(),
    )
    .expect("planned");
    assert_eq!(
        get(&out[0].row, "received_at"),
        Some(&json!("2027-01-15T08:00:00.000Z"))
    );
}

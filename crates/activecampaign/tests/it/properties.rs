//! Property tests: parsing and mapping never panic, on arbitrary bytes and on
//! arbitrary (mostly ActiveCampaign-shaped) key/value pairs; whatever maps is a valid
//! Segment call; the form round-trips.

use proptest::prelude::*;
use tributary_activecampaign::{FormPairs, Settings, map_webhook, parse_form, parse_webhook};

use crate::support::{Form, assert_valid_segment};

const KEYS: &[&str] = &[
    "type",
    "date_time",
    "initiated_from",
    "initiated_by",
    "list",
    "list[][id]",
    "list[][name]",
    "campaign[id]",
    "campaign[name]",
    "campaign[type]",
    "campaign[message][id]",
    "campaign[message][subject]",
    "campaign[recipients]",
    "contact[id]",
    "contact[email]",
    "contact[first_name]",
    "contact[last_name]",
    "contact[phone]",
    "contact[tags]",
    "contact[fields][32]",
    "contact[fields][external_id]",
    "link[id]",
    "link[url]",
    "bounce[type]",
    "bounce[code]",
    "bounce[description]",
    "unsubscribe[reason]",
    "share[network]",
    "forward[count]",
    "tag",
];

const TYPES: &[&str] = &[
    "open",
    "click",
    "bounce",
    "unsubscribe",
    "reply",
    "forward",
    "share",
    "sent",
    "subscribe",
    "update",
    "contact_tag_added",
    "contact_tag_removed",
    "deal_update",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(KEYS).prop_map(str::to_owned),
        1 => any::<String>(),
        1 => "contact\\[fields\\]\\[[^\\]]{0,8}\\]",
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<String>(),
        1 => proptest::sample::select(TYPES).prop_map(str::to_owned),
        1 => "[0-9]{1,4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}([+-][0-9]{2}:?[0-9]{2}|Z)?",
        1 => "[a-zA-Z.]{1,10}@[a-z]{1,8}\\.[a-z]{2,3}",
        1 => Just(String::new()),
    ]
}

fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    (
        proptest::sample::select(TYPES),
        proptest::collection::vec((key(), value()), 0..40),
    )
        .prop_map(|(t, mut rest)| {
            rest.insert(0, ("type".to_owned(), t.to_owned()));
            rest
        })
}

fn settings() -> impl Strategy<Value = Settings> {
    proptest::option::of(prop_oneof![
        Just("32".to_owned()),
        Just("%EXTERNAL_ID%".to_owned()),
        any::<String>()
    ])
    .prop_map(|user_id_field| Settings { user_id_field })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_webhook(&body, &Settings::default());
    }

    #[test]
    fn form_like_text_never_panics(body in "[a-z_\\[\\]=&%+0-9A-Fa-f .:@-]{0,400}", s in settings()) {
        if let Ok(w) = parse_webhook(body.as_bytes(), &s)
            && let Some(m) = w.message()
        {
            assert_valid_segment(m);
        }
    }

    #[test]
    fn arbitrary_pairs_never_panic_and_map_to_valid_calls(p in pairs(), s in settings()) {
        let direct = map_webhook(&FormPairs(p.clone()), &s);
        if let Ok(w) = &direct {
            if let Some(m) = w.message() {
                assert_valid_segment(m);
            }
            // Deterministic: the same pairs give the same result.
            prop_assert_eq!(&map_webhook(&FormPairs(p.clone()), &s), &direct);
        }
        // Through the wire encoding too.
        let _ = parse_webhook(&Form(p).body(), &s);
    }

    #[test]
    fn encoded_pairs_round_trip(
        p in proptest::collection::vec(("[a-zA-Z\\[\\]_0-9]{1,20}", any::<String>()), 1..30)
    ) {
        let body = Form(p.clone()).body();
        let parsed = parse_form(&body);
        prop_assert_eq!(parsed, Ok(FormPairs(p)));
    }
}

//! Shared helpers: locating the fixtures, editing bodies, and checking that a
//! mapped message is a Segment call ingest will accept.

use std::path::PathBuf;

use serde_json::{Map, Value};
use tributary_activecampaign::{Settings, Webhook, parse_webhook};

/// `crates/activecampaign/tests/fixtures`: the webhook bodies, kept in the repository
/// so a fresh clone tests on its own.
pub fn fixtures_dir() -> PathBuf {
    // Read at run time: a cached test binary built from another checkout of the same
    // workspace carries that checkout's compile-time path.
    let dir = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests"),
    )
    .join("tests/fixtures");
    assert!(
        dir.is_dir(),
        "ActiveCampaign fixtures not found at {}",
        dir.display()
    );
    dir
}

/// Every `*.form` file in the fixtures directory, sorted by name, with its body.
pub fn form_fixtures() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(fixtures_dir()).expect("read fixtures dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "form") {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 file name")
                .to_owned();
            out.push((name, std::fs::read(&path).expect("read fixture")));
        }
    }
    out.sort();
    out
}

/// One fixture body by file name.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A fixture as editable pairs.
pub struct Form(pub Vec<(String, String)>);

impl Form {
    /// Loads a fixture's pairs (decoded with the crate's own parser).
    pub fn fixture(name: &str) -> Form {
        let pairs = tributary_activecampaign::parse_form(&fixture(name)).expect("fixture parses");
        Form(pairs.0)
    }

    /// Pairs from literals.
    pub fn of(pairs: &[(&str, &str)]) -> Form {
        Form(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    /// Replaces the first `key` (or appends it).
    pub fn set(mut self, key: &str, value: &str) -> Form {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(pair) => pair.1 = value.to_owned(),
            None => self.0.push((key.to_owned(), value.to_owned())),
        }
        self
    }

    /// Appends a pair, even if the key exists.
    pub fn add(mut self, key: &str, value: &str) -> Form {
        self.0.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Removes every `key`.
    pub fn remove(mut self, key: &str) -> Form {
        self.0.retain(|(k, _)| k != key);
        self
    }

    /// The body as ActiveCampaign would post it.
    pub fn body(&self) -> Vec<u8> {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.0 {
            s.append_pair(k, v);
        }
        s.finish().into_bytes()
    }

    /// Parses and maps the body with `settings`.
    pub fn map_with(&self, settings: &Settings) -> Webhook {
        parse_webhook(&self.body(), settings).expect("maps")
    }

    /// Parses and maps the body with default settings.
    pub fn map(&self) -> Webhook {
        self.map_with(&Settings::default())
    }
}

/// Settings naming a custom field as the userId field.
pub fn user_id_field(field: &str) -> Settings {
    Settings {
        user_id_field: Some(field.to_owned()),
    }
}

/// The mapped message, panicking on `Unmapped`.
pub fn message(w: &Webhook) -> &Map<String, Value> {
    w.message()
        .unwrap_or_else(|| panic!("`{}` was not mapped", w.raw_type))
}

/// `message[a][b]…` as a string, if it is one.
pub fn str_at<'a>(m: &'a Map<String, Value>, path: &[&str]) -> Option<&'a str> {
    let (first, rest) = path.split_first()?;
    let mut v = m.get(*first)?;
    for key in rest {
        v = v.get(*key)?;
    }
    v.as_str()
}

/// Asserts what ingest requires of a Segment call, plus this crate's promises.
pub fn assert_valid_segment(m: &Map<String, Value>) {
    let kind = str_at(m, &["type"]).expect("type is a string");
    match kind {
        "track" => {
            let event = str_at(m, &["event"]).expect("track has an event");
            assert!(!event.trim().is_empty(), "blank event");
            assert!(
                m.get("properties").is_some_and(Value::is_object),
                "properties object"
            );
            assert!(m.get("traits").is_none());
        }
        "identify" => {
            assert!(
                m.get("traits").is_some_and(Value::is_object),
                "traits object"
            );
            assert!(m.get("event").is_none() && m.get("properties").is_none());
        }
        other => panic!("unexpected type {other:?}"),
    }
    let id = str_at(m, &["messageId"]).expect("messageId");
    assert!(id.starts_with("ac-") && id.len() == 35, "messageId {id:?}");
    assert!(id.len() <= 100);
    let user = str_at(m, &["userId"]);
    let anon = str_at(m, &["anonymousId"]);
    assert!(
        user.is_some_and(|s| !s.trim().is_empty()) ^ anon.is_some_and(|s| !s.trim().is_empty()),
        "exactly one of userId / anonymousId, non-blank: {m:?}"
    );
    if let Some(ts) = m.get("timestamp") {
        let ts = ts.as_str().expect("timestamp string");
        let parsed = chrono::DateTime::parse_from_rfc3339(ts).expect("timestamp is RFC 3339");
        assert!(ts.ends_with('Z') && ts.len() == 24, "UTC with millis: {ts}");
        assert_eq!(parsed.offset().local_minus_utc(), 0);
    }
    assert_eq!(
        str_at(m, &["context", "integration", "name"]),
        Some("activecampaign")
    );
    assert_eq!(
        str_at(m, &["context", "library", "name"]),
        Some("tributary-activecampaign")
    );
    assert_eq!(
        str_at(m, &["context", "library", "version"]),
        Some(env!("CARGO_PKG_VERSION"))
    );
    for section in ["properties", "traits"] {
        if let Some(Value::Object(values)) = m.get(section) {
            for (k, v) in values {
                assert!(!k.is_empty(), "empty key in {section}");
                match v {
                    Value::String(s) => assert!(
                        !s.is_empty() && s.trim() == s,
                        "{section}.{k} is blank or untrimmed: {s:?}"
                    ),
                    Value::Number(_) | Value::Array(_) => {}
                    other => panic!("{section}.{k} has unexpected value {other:?}"),
                }
            }
        }
    }
    // What the server stores must survive a JSON round trip unchanged.
    let text = serde_json::to_string(m).expect("serializes");
    let back: Map<String, Value> = serde_json::from_str(&text).expect("parses back");
    assert_eq!(&back, m);
}

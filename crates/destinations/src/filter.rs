//! Which events a destination receives: its sources, its call-type and event-name
//! filters, and Segment's per-message `integrations` object.
//!
//! Filtering is a pure function of the destination's configuration and the event,
//! so the same event is accepted or skipped the same way on the live path, after a
//! restart and on a range replay. A skipped event is simply passed over by the
//! destination's cursor; it is never a dead letter.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The Segment call types a filter may name.
pub const CALL_TYPES: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

/// Per-destination filters on call type and event name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// Call types delivered (`track`, `identify`, `page`, `screen`, `group`,
    /// `alias`); empty means all.
    #[serde(default)]
    pub call_types: Vec<String>,
    /// Track event names delivered; empty means all. Applies to `track` calls only.
    #[serde(default)]
    pub allow_events: Vec<String>,
    /// Track event names never delivered (wins over `allow_events`). Applies to
    /// `track` calls only.
    #[serde(default)]
    pub deny_events: Vec<String>,
}

impl Filters {
    /// Checks the filter names; the message is client-safe.
    pub fn validate(&self) -> Result<(), String> {
        for t in &self.call_types {
            if !CALL_TYPES.contains(&t.as_str()) {
                return Err(format!(
                    "filters.call_types: unknown call type {t:?} (expected one of {})",
                    CALL_TYPES.join(", ")
                ));
            }
        }
        if self
            .allow_events
            .iter()
            .chain(&self.deny_events)
            .any(|e| e.is_empty())
        {
            return Err("filters: event names must not be empty".into());
        }
        Ok(())
    }
}

/// A destination's compiled routing rules.
#[derive(Debug, Clone)]
pub(crate) struct Selector {
    sources: HashSet<String>,
    call_types: HashSet<String>,
    allow: HashSet<String>,
    deny: HashSet<String>,
    /// Keys looked up in `integrations`, most specific first: the destination's
    /// name, then its catalog name (e.g. `ActiveCampaign`).
    names: Vec<String>,
}

impl Selector {
    /// Compiles the rules of one destination.
    pub(crate) fn new(
        name: &str,
        catalog_name: &str,
        source_ids: &[String],
        filters: &Filters,
    ) -> Selector {
        let mut names = vec![name.to_string()];
        if catalog_name != name {
            names.push(catalog_name.to_string());
        }
        Selector {
            sources: source_ids.iter().cloned().collect(),
            call_types: filters.call_types.iter().cloned().collect(),
            allow: filters.allow_events.iter().cloned().collect(),
            deny: filters.deny_events.iter().cloned().collect(),
            names,
        }
    }

    /// Whether the destination takes this event.
    #[cfg(test)]
    pub(crate) fn accepts(
        &self,
        source_id: &str,
        call_type: &str,
        event: Option<&str>,
        payload: &Value,
    ) -> bool {
        self.accepts_record(source_id, call_type, event)
            && self.accepts_integrations(payload.get("integrations"))
    }

    /// The checks that need only the log record's columns (cheap: no JSON).
    pub(crate) fn accepts_record(
        &self,
        source_id: &str,
        call_type: &str,
        event: Option<&str>,
    ) -> bool {
        if !self.sources.is_empty() && !self.sources.contains(source_id) {
            return false;
        }
        if !self.call_types.is_empty() && !self.call_types.contains(call_type) {
            return false;
        }
        if call_type == "track" {
            let name = event.unwrap_or("");
            if self.deny.contains(name) {
                return false;
            }
            if !self.allow.is_empty() && !self.allow.contains(name) {
                return false;
            }
        }
        true
    }

    /// The check on the message itself: its `integrations` object (`None` when
    /// it has none).
    pub(crate) fn accepts_integrations(&self, integrations: Option<&Value>) -> bool {
        integrations_allow(integrations, &self.names)
    }
}

/// Segment's `integrations` rule: the first of `names` present as a key decides;
/// otherwise `All` decides; otherwise the event is sent. Keys are case-sensitive.
/// `false` (and `null`) disable; `true` or an options object enable.
pub(crate) fn integrations_allow(integrations: Option<&Value>, names: &[String]) -> bool {
    let Some(Value::Object(map)) = integrations else {
        return true;
    };
    for name in names {
        if let Some(v) = map.get(name.as_str()) {
            return truthy(v);
        }
    }
    map.get("All").map(truthy).unwrap_or(true)
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Bool(false) | Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(filters: Filters, sources: &[&str]) -> Selector {
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        Selector::new("My Hook", "Webhooks", &sources, &filters)
    }

    #[test]
    fn integrations_object() {
        let names = vec!["My Hook".to_string(), "Webhooks".to_string()];
        let allow = |v: Value| integrations_allow(Some(&v), &names);
        assert!(integrations_allow(None, &names));
        assert!(allow(json!({})));
        assert!(!allow(json!({"All": false})));
        assert!(allow(json!({"All": false, "My Hook": true})));
        assert!(allow(json!({"All": false, "My Hook": {"opt": 1}})));
        assert!(!allow(json!({"All": true, "My Hook": false})));
        assert!(allow(json!({"All": false, "Webhooks": true})));
        assert!(
            !allow(json!({"All": false, "my hook": true})),
            "case-sensitive"
        );
        assert!(allow(json!({"Salesforce": false})));
        assert!(allow(json!("garbage")));
    }

    #[test]
    fn sources_and_call_types() {
        let s = sel(
            Filters {
                call_types: vec!["track".into(), "identify".into()],
                ..Filters::default()
            },
            &["src_a"],
        );
        let p = json!({});
        assert!(s.accepts("src_a", "track", Some("X"), &p));
        assert!(s.accepts("src_a", "identify", None, &p));
        assert!(!s.accepts("src_a", "page", None, &p));
        assert!(!s.accepts("src_b", "track", Some("X"), &p));
        assert!(sel(Filters::default(), &[]).accepts("any", "alias", None, &p));
    }

    #[test]
    fn event_allow_and_deny_apply_to_track_only() {
        let s = sel(
            Filters {
                allow_events: vec!["Signed Up".into(), "Debug".into()],
                deny_events: vec!["Debug".into()],
                ..Filters::default()
            },
            &[],
        );
        let p = json!({});
        assert!(s.accepts("s", "track", Some("Signed Up"), &p));
        assert!(!s.accepts("s", "track", Some("Debug"), &p));
        assert!(!s.accepts("s", "track", Some("Other"), &p));
        assert!(s.accepts("s", "page", Some("Other"), &p));
    }

    #[test]
    fn validate_rejects_unknown_call_type() {
        let f = Filters {
            call_types: vec!["tracks".into()],
            ..Filters::default()
        };
        assert!(f.validate().unwrap_err().contains("tracks"));
        assert!(Filters::default().validate().is_ok());
    }
}

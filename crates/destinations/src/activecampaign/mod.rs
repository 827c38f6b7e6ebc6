//! The `activecampaign` destination type: identify calls become contacts, track
//! calls become event-tracking events.
//!
//! - `identify` → `POST {api_url}/api/3/contact/sync` (upsert on email) with
//!   `email`, `firstName`, `lastName`, `phone` and `fieldValues` for traits that
//!   match a custom field by title or personalization tag; then `tagsReset`
//!   (detach every tag), `tags` (create missing tags, attach) and
//!   `lists: [{id, status: active|unsubscribed}]` → `/api/3/contactLists`.
//! - `track` → form POST to `track_url` with `actid`, `key`, `event` (cut to 32
//!   characters), `eventdata` (`properties.acValue`) and `visit={"email":…}`.
//! - Other calls, and identify/track calls without an email, are skipped (counted,
//!   never dead-lettered): ActiveCampaign keys contacts on email. `page` is skipped
//!   too: ActiveCampaign documents no server-side page-view call (site tracking is
//!   its browser script), so there is nothing faithful to send.
//!
//! Every API call carries `Api-Token` and waits for the account's shared rate
//! limiter (5 requests/s by default). Custom fields and tag ids are cached (fields
//! for ten minutes, tags for the life of the destination) so an event costs one
//! sync call plus one call per tag or list, not a lookup per trait. Every step is
//! idempotent (sync upserts, attaching a tag twice is harmless), which is what makes
//! the engine's whole-event retries safe: at-least-once, never a partial contact.

pub mod config;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Method;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

pub use config::ActivecampaignSettings;

use crate::retry::DeliveryError;
use crate::sink::{Item, SendReport, Sink, execute, http_client};
use tributary_activecampaign::api::ratelimit::{self, RateLimiter};

/// Requests in flight per ActiveCampaign destination (the rate limiter paces them).
const MAX_IN_FLIGHT: usize = 2;
/// How long the custom-field list is trusted.
const FIELDS_TTL: Duration = Duration::from_secs(600);
/// ActiveCampaign's page size maximum.
const PAGE: usize = 100;
/// Longest event name event tracking takes.
pub const MAX_EVENT_CHARS: usize = 32;

/// Traits Segment reserves: never written to custom fields.
const RESERVED_TRAITS: &[&str] = &[
    "address",
    "age",
    "avatar",
    "birthday",
    "company",
    "createdAt",
    "created_at",
    "description",
    "email",
    "firstName",
    "first_name",
    "gender",
    "id",
    "lastName",
    "last_name",
    "name",
    "phone",
    "title",
    "username",
    "website",
    "tags",
    "tagsReset",
    "tags_reset",
    "lists",
];

#[derive(Debug, Clone)]
struct Field {
    id: String,
    title: String,
    perstag: String,
}

/// The outbound side of an ActiveCampaign destination.
pub(crate) struct ActivecampaignSink {
    settings: ActivecampaignSettings,
    base: String,
    client: reqwest::Client,
    limiter: Arc<RateLimiter>,
    fields: tokio::sync::Mutex<Option<(Instant, Arc<Vec<Field>>)>>,
    tags: tokio::sync::Mutex<HashMap<String, String>>,
}

impl ActivecampaignSink {
    /// Builds the sink from validated settings.
    pub(crate) fn new(settings: ActivecampaignSettings) -> Result<ActivecampaignSink, String> {
        let base = settings.api_base();
        let rps = settings
            .requests_per_second
            .unwrap_or(config::DEFAULT_REQUESTS_PER_SECOND);
        Ok(ActivecampaignSink {
            client: http_client(settings.timeout())?,
            limiter: ratelimit::for_account(&base, rps),
            base,
            settings,
            fields: tokio::sync::Mutex::new(None),
            tags: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// One rate-limited v3 API call; the parsed JSON answer (`Null` when empty).
    async fn api(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value, DeliveryError> {
        self.limiter.acquire().await;
        let mut req = self
            .client
            .request(method, format!("{}/api/3/{path}", self.base))
            .header("Api-Token", &self.settings.api_key)
            .header(reqwest::header::ACCEPT, "application/json");
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let bytes = execute(req).await?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// The account's custom fields, from cache when fresh.
    async fn fields(&self) -> Result<Arc<Vec<Field>>, DeliveryError> {
        let mut cache = self.fields.lock().await;
        if let Some((at, fields)) = cache.as_ref()
            && at.elapsed() < FIELDS_TTL
        {
            return Ok(fields.clone());
        }
        let mut out = Vec::new();
        for page in 0..50 {
            let offset = (page * PAGE).to_string();
            let limit = PAGE.to_string();
            let v = self
                .api(
                    Method::GET,
                    "fields",
                    &[("limit", &limit), ("offset", &offset)],
                    None,
                )
                .await?;
            let list = v
                .get("fields")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let n = list.len();
            out.extend(list.iter().filter_map(|f| {
                Some(Field {
                    id: id_string(f.get("id")?)?,
                    title: norm(f.get("title").and_then(Value::as_str).unwrap_or("")),
                    perstag: norm(f.get("perstag").and_then(Value::as_str).unwrap_or("")),
                })
            }));
            let total = v
                .pointer("/meta/total")
                .and_then(|t| id_string(t)?.parse::<usize>().ok());
            if n < PAGE || total.is_some_and(|t| out.len() >= t) {
                break;
            }
        }
        let fields = Arc::new(out);
        *cache = Some((Instant::now(), fields.clone()));
        Ok(fields)
    }

    /// The id of a tag by name, creating the tag when the account lacks it.
    async fn tag_id(&self, name: &str) -> Result<String, DeliveryError> {
        let key = name.to_lowercase();
        if let Some(id) = self.tags.lock().await.get(&key) {
            return Ok(id.clone());
        }
        let limit = PAGE.to_string();
        let found = self
            .api(
                Method::GET,
                "tags",
                &[("search", name), ("limit", &limit)],
                None,
            )
            .await?;
        let existing = found
            .get("tags")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|t| {
                t.get("tag")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.to_lowercase() == key)
            })
            .and_then(|t| id_string(t.get("id")?));
        let id = match existing {
            Some(id) => id,
            None => {
                let created = self
                    .api(
                        Method::POST,
                        "tags",
                        &[],
                        Some(
                            json!({"tag": {"tag": name, "tagType": "contact", "description": ""}}),
                        ),
                    )
                    .await?;
                created
                    .pointer("/tag/id")
                    .and_then(id_string)
                    .ok_or_else(|| {
                        DeliveryError::rejected("tag creation answered without an id", None)
                    })?
            }
        };
        self.tags.lock().await.insert(key, id.clone());
        Ok(id)
    }

    async fn identify(&self, v: &Value) -> Result<bool, DeliveryError> {
        let empty = Map::new();
        let traits = v.get("traits").and_then(Value::as_object).unwrap_or(&empty);
        let Some(email) = str_at(traits, "email").or_else(|| context_email(v)) else {
            return Ok(false);
        };
        let mut contact = Map::new();
        contact.insert("email".into(), email.into());
        let mut first = str_at(traits, "firstName").or_else(|| str_at(traits, "first_name"));
        let mut last = str_at(traits, "lastName").or_else(|| str_at(traits, "last_name"));
        if first.is_none()
            && last.is_none()
            && let Some(name) = str_at(traits, "name")
        {
            let mut parts = name.trim().splitn(2, ' ');
            first = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
            last = parts.next().map(|s| s.trim().to_string());
        }
        if let Some(f) = first {
            contact.insert("firstName".into(), f.into());
        }
        if let Some(l) = last {
            contact.insert("lastName".into(), l.into());
        }
        if let Some(p) = traits.get("phone").and_then(scalar_string) {
            contact.insert("phone".into(), p.into());
        }
        let custom: Vec<(&String, &Value)> = traits
            .iter()
            .filter(|(k, _)| !RESERVED_TRAITS.contains(&k.as_str()))
            .collect();
        if !custom.is_empty() {
            let fields = self.fields().await?;
            let values = field_values(&fields, &custom);
            if !values.is_empty() {
                contact.insert("fieldValues".into(), Value::Array(values));
            }
        }
        let synced = self
            .api(
                Method::POST,
                "contact/sync",
                &[],
                Some(json!({ "contact": contact })),
            )
            .await?;
        let contact_id = synced
            .pointer("/contact/id")
            .and_then(id_string)
            .ok_or_else(|| {
                DeliveryError::rejected("contact sync answered without a contact id", None)
            })?;

        if traits
            .get("tagsReset")
            .or(traits.get("tags_reset"))
            .is_some_and(truthy)
        {
            let path = format!("contacts/{contact_id}/contactTags");
            let current = self.api(Method::GET, &path, &[], None).await?;
            let ids: Vec<String> = current
                .get("contactTags")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|ct| id_string(ct.get("id")?))
                .collect();
            for id in ids {
                self.api(Method::DELETE, &format!("contactTags/{id}"), &[], None)
                    .await?;
            }
        }
        for tag in tag_names(traits.get("tags")) {
            let tag_id = self.tag_id(&tag).await?;
            self.api(
                Method::POST,
                "contactTags",
                &[],
                Some(json!({"contactTag": {"contact": contact_id, "tag": tag_id}})),
            )
            .await?;
        }
        for (list, status) in lists(traits.get("lists")) {
            self.api(
                Method::POST,
                "contactLists",
                &[],
                Some(
                    json!({"contactList": {"list": list, "contact": contact_id, "status": status}}),
                ),
            )
            .await?;
        }
        Ok(true)
    }

    async fn track(&self, v: &Value) -> Result<bool, DeliveryError> {
        let Some(email) = context_email(v).or_else(|| {
            v.get("properties")
                .and_then(Value::as_object)
                .and_then(|p| str_at(p, "email"))
        }) else {
            return Ok(false);
        };
        let event = v.get("event").and_then(Value::as_str).unwrap_or("");
        if event.is_empty() {
            return Ok(false);
        }
        let form = track_form(
            &self.settings,
            event,
            &email,
            v.pointer("/properties/acValue"),
        );
        let req = self.client.post(&self.settings.track_url).form(&form);
        let body = execute(req).await?;
        if let Ok(answer) = serde_json::from_slice::<Value>(&body)
            && answer.get("success").is_some_and(|s| !truthy(s))
        {
            let message = answer
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("event tracking refused the event");
            return Err(DeliveryError::rejected(
                format!("event tracking: {message}"),
                Some(&body),
            ));
        }
        Ok(true)
    }
}

/// The form fields of an event-tracking POST.
pub(crate) fn track_form(
    s: &ActivecampaignSettings,
    event: &str,
    email: &str,
    ac_value: Option<&Value>,
) -> Vec<(&'static str, String)> {
    let mut form = vec![
        ("actid", s.actid.clone()),
        ("key", s.event_key.clone()),
        ("event", event.chars().take(MAX_EVENT_CHARS).collect()),
    ];
    match ac_value {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => form.push(("eventdata", s.clone())),
        Some(other) => form.push(("eventdata", other.to_string())),
    }
    form.push(("visit", json!({ "email": email }).to_string()));
    form
}

/// `fieldValues` entries for traits matching a custom field by title or perstag
/// (compared case- and punctuation-insensitively: `shirtSize`, `shirt_size`,
/// `Shirt Size` and `%SHIRT_SIZE%` all match).
fn field_values(fields: &[Field], traits: &[(&String, &Value)]) -> Vec<Value> {
    let mut out = Vec::new();
    for (key, value) in traits {
        let k = norm(key);
        if k.is_empty() {
            continue;
        }
        let Some(field) = fields.iter().find(|f| f.title == k || f.perstag == k) else {
            continue;
        };
        let value = match value {
            Value::Array(items) => {
                let parts: Vec<String> = items.iter().filter_map(scalar_string).collect();
                format!("||{}||", parts.join("||"))
            }
            other => match scalar_string(other) {
                Some(s) => s,
                None => continue,
            },
        };
        out.push(json!({"field": field.id, "value": value}));
    }
    out
}

/// Tag names from `tags`: an array of strings or a comma-separated string.
fn tag_names(v: Option<&Value>) -> Vec<String> {
    let names: Vec<String> = match v {
        Some(Value::Array(a)) => a.iter().filter_map(scalar_string).collect(),
        Some(Value::String(s)) => s.split(',').map(str::to_string).collect(),
        _ => Vec::new(),
    };
    names
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `(list id, status)` pairs from `lists: [{id, status}]`; status 1 subscribes
/// (`active`), 2 unsubscribes (`unsubscribed`). Entries with another status are
/// ignored.
fn lists(v: Option<&Value>) -> Vec<(Value, u8)> {
    let Some(Value::Array(items)) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|l| {
            let id = l.get("id").filter(|id| id_string(id).is_some())?.clone();
            let status = match l
                .get("status")
                .map(|s| scalar_string(s).unwrap_or_default())
            {
                None => 1,
                Some(s) => match s.to_lowercase().as_str() {
                    "active" | "subscribed" | "subscribe" | "1" => 1,
                    "unsubscribed" | "unsubscribe" | "2" => 2,
                    _ => return None,
                },
            };
            Some((id, status))
        })
        .collect()
}

fn norm(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn str_at(m: &Map<String, Value>, key: &str) -> Option<String> {
    m.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn context_email(v: &Value) -> Option<String> {
    v.pointer("/context/traits")
        .and_then(Value::as_object)
        .and_then(|t| str_at(t, "email"))
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !matches!(s.as_str(), "" | "0" | "false"),
        Value::Null => false,
        _ => true,
    }
}

#[async_trait]
impl Sink for ActivecampaignSink {
    fn max_batch(&self) -> usize {
        1
    }

    fn max_in_flight(&self) -> usize {
        MAX_IN_FLIGHT
    }

    async fn send(&self, items: &[Item]) -> Result<SendReport, DeliveryError> {
        let mut report = SendReport::default();
        for (i, item) in items.iter().enumerate() {
            let sent = match item.record.call_type.as_str() {
                "identify" => match item.value() {
                    Ok(v) => self.identify(&v).await?,
                    Err(_) => false,
                },
                "track" => match item.value() {
                    Ok(v) => self.track(&v).await?,
                    Err(_) => false,
                },
                _ => false,
            };
            if !sent {
                report.skipped.push(i);
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ActivecampaignSettings {
        serde_json::from_value(json!({
            "api_url": "http://127.0.0.1:1", "api_key": "k", "actid": "99", "event_key": "ek"
        }))
        .unwrap()
    }

    #[test]
    fn track_form_cuts_event_and_encodes_visit() {
        let f = track_form(
            &settings(),
            "A very long event name that exceeds thirty-two chars",
            "a@example.com",
            Some(&json!("Signup button")),
        );
        let get = |k: &str| f.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("actid"), Some("99"));
        assert_eq!(get("key"), Some("ek"));
        assert_eq!(get("event").unwrap().chars().count(), 32);
        assert_eq!(get("eventdata"), Some("Signup button"));
        assert_eq!(get("visit"), Some(r#"{"email":"a@example.com"}"#));
        let f = track_form(&settings(), "Ünïcødé", "a@b.c", Some(&json!(5)));
        assert_eq!(f[2].1, "Ünïcødé");
        assert_eq!(f[3], ("eventdata", "5".to_string()));
        let f = track_form(&settings(), "E", "a@b.c", None);
        assert!(!f.iter().any(|(k, _)| *k == "eventdata"));
    }

    #[test]
    fn matches_fields_by_title_or_perstag() {
        let fields = vec![
            Field {
                id: "1".into(),
                title: norm("Shirt Size"),
                perstag: norm("SHIRT_SIZE"),
            },
            Field {
                id: "2".into(),
                title: norm("Favourite colours"),
                perstag: norm("COLOURS"),
            },
        ];
        let (a, b, c, d) = (
            "shirt_size".to_string(),
            "colours".to_string(),
            "unknown".to_string(),
            "nested".to_string(),
        );
        let (va, vb, vc, vd) = (
            json!("XL"),
            json!(["red", "blue"]),
            json!("x"),
            json!({"a": 1}),
        );
        let traits = vec![(&a, &va), (&b, &vb), (&c, &vc), (&d, &vd)];
        let v = field_values(&fields, &traits);
        assert_eq!(
            v,
            vec![
                json!({"field":"1","value":"XL"}),
                json!({"field":"2","value":"||red||blue||"})
            ]
        );
    }

    #[test]
    fn parses_tags_and_lists() {
        assert_eq!(
            tag_names(Some(&json!(["vip", " beta ", ""]))),
            vec!["vip", "beta"]
        );
        assert_eq!(tag_names(Some(&json!("a, b"))), vec!["a", "b"]);
        assert_eq!(
            lists(Some(&json!([
                {"id": 1, "status": "active"},
                {"id": "7", "status": "unsubscribed"},
                {"id": 3, "status": "weird"},
                {"id": 4}
            ]))),
            vec![(json!(1), 1), (json!("7"), 2), (json!(4), 1)]
        );
    }
}

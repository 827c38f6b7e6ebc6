//! Mapping one parsed ActiveCampaign webhook to one Segment message.
//!
//! The output is a Segment call as a client would send it (camelCase keys, as on the
//! wire): ingest validates and normalizes it like any other `track`/`identify`.
//!
//! | `type` | call | event |
//! |---|---|---|
//! | `open` | track | `Email Opened` |
//! | `click` | track | `Email Link Clicked` (+ `link_id`, `link_url`) |
//! | `bounce` | track | `Email Bounced` (+ `bounce_type`, `bounce_code`, `bounce_description`) |
//! | `unsubscribe` | track | `Email Unsubscribed`, or `Email Marked as Spam` by [`is_spam_complaint`] (+ `reason`, `unsubscribe_source`) |
//! | `reply` / `forward` / `share` | track | `Email Replied` / `Email Forwarded` (+ `forward_count`) / `Email Shared` (+ `share_network`, `share_content`) |
//! | `sent` | track | `Email Campaign Sent` (+ `recipients`), campaign-level |
//! | `subscribe`, `update`, `contact_tag_added`, `contact_tag_removed` | identify | — |
//! | no `type`, but `contact[id]` or `contact[email]`: an automation "Webhook" action ([`AUTOMATION_TYPE`]) | identify | — |
//! | anything else | [`Mapped::Unmapped`] | — |
//! | — (API only, [`map_activity`]) | track | `Email Delivered` |
//!
//! **One mapping for webhooks and the API.** [`map_activity`] turns an API-reported
//! [`Activity`] into the pairs the webhook for the same event would carry
//! ([`Activity::to_pairs`]) and maps them here, so both paths give the same event
//! name, properties, identity and `messageId`. A webhook cannot claim a delivery: no
//! `type` maps to `Email Delivered`.
//!
//! An automation "Webhook" action posts the contact's fields (`contact[...]`, custom
//! fields as `contact[fields][<perstag>]`) and the automation id as `seriesid`, with no
//! `type` and no `date_time`: it becomes an identify with the contact's traits (plus
//! `company.name` from `contact[orgname]`) and `context.activecampaign.automation_id`;
//! its `messageId` comes from the automation id and every contact field, so a
//! repeated delivery is a duplicate and a changed contact is a new identify.
//!
//! Every track call carries the Segment Email spec properties that the webhook has
//! (`email_id` ← `campaign[message][id]`, `email_subject` ← `campaign[message][subject]`,
//! `campaign_id`, `campaign_name`, `link_id`, `link_url`, `list_id`, `list_name`) plus
//! `contact_id`, `campaign_type` and `initiated_from`; the recipient is in
//! `context.traits` (`email`, `firstName`, `lastName`).
//!
//! **Identity** (first that applies):
//! 1. `userId` = `contact[fields][<Settings::user_id_field>]` when that value is not blank;
//! 2. `anonymousId` = `contact[email]`, trimmed, case kept as sent (ingest and the
//!    email → userId lookup compare case-insensitively; keeping the case means the id
//!    matches what ActiveCampaign's own Segment stream sends for the same person);
//! 3. `anonymousId` = `activecampaign-contact:<contact[id]>` (a contact with no email);
//! 4. track calls only: `anonymousId` = `activecampaign-campaign:<campaign[id]>`
//!    (campaign-level events such as `sent`);
//! 5. otherwise [`MapError::NoIdentity`].
//!
//! The recipient email is also returned beside the message, so the server can look up
//! a `userId` from earlier identifies and replace the `anonymousId`.
//!
//! **Values.** Every value is trimmed; blank values are omitted, never sent as `""`
//! (an ActiveCampaign contact without a phone must not erase a phone that another
//! source set). Ids stay strings. Counts (`recipients`, `forward_count`) become JSON
//! numbers when they parse as non-negative integers (thousands separators allowed),
//! and stay strings otherwise. Keys this module does not know are ignored.
//!
//! **Custom fields** become identify traits named `field_<key>`, where `<key>` is the
//! bracketed key of `contact[fields][<key>]`, lowercased with surrounding `%` removed:
//! `contact[fields][32]` → `field_32`, `contact[fields][UTM_SOURCE]` → `field_utm_source`.
//! The prefix keeps numeric ids valid column names and keeps custom fields from ever
//! colliding with the standard traits.
//!
//! Invariants: never panics; the same pairs always give the same message (no clock,
//! no randomness): `messageId` comes from [`DedupeKey`], `timestamp` from `date_time`
//! (omitted when it does not parse, so ingest uses the receive time).

use serde_json::{Map, Value, json};

use super::dedupe::DedupeKey;
use super::form::FormPairs;
use super::time::{parse_date_time, segment_timestamp};
use crate::segment::{
    EMAIL_BOUNCED, EMAIL_DELIVERED, EMAIL_LINK_CLICKED, EMAIL_MARKED_AS_SPAM, EMAIL_OPENED,
    EMAIL_UNSUBSCRIBED, looks_like_email,
};

/// `reply` → this track event (not in Segment's Email spec).
pub const EMAIL_REPLIED: &str = "Email Replied";
/// `forward` → this track event (not in Segment's Email spec).
pub const EMAIL_FORWARDED: &str = "Email Forwarded";
/// `share` → this track event (not in Segment's Email spec).
pub const EMAIL_SHARED: &str = "Email Shared";
/// `sent` → this campaign-level track event. It is **not** `Email Delivered`:
/// ActiveCampaign sends it once per campaign, with a recipient count.
pub const EMAIL_CAMPAIGN_SENT: &str = "Email Campaign Sent";

/// `context.integration.name` of every mapped message.
pub const INTEGRATION_NAME: &str = "activecampaign";
/// `context.library.name` of every mapped message.
pub const LIBRARY_NAME: &str = "tributary-activecampaign";
/// `context.library.version` of every mapped message.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");
/// `raw_type` of an automation "Webhook" action (a body with contact fields and no
/// `type`).
pub const AUTOMATION_TYPE: &str = "automation";
/// `anonymousId` prefix for events that name only a campaign (e.g. `sent`).
pub const CAMPAIGN_ANONYMOUS_ID_PREFIX: &str = "activecampaign-campaign:";
/// `anonymousId` prefix for events whose contact has an id but no email.
pub const CONTACT_ANONYMOUS_ID_PREFIX: &str = "activecampaign-contact:";

/// Per-source settings (from the source's `settings` JSON object).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Settings {
    /// Custom field id or perstag whose value is the userId: `contact[fields][<it>]`.
    /// Matched case-insensitively; `%PERSTAG%` and `contact[fields][X]` spellings are
    /// accepted too. `None` or blank: identity falls back to the email.
    #[serde(default)]
    pub user_id_field: Option<String>,
}

/// One mapped webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// ActiveCampaign's `type`, trimmed, as sent (e.g. `unsubscribe`): what the source
    /// overview shows as the last event, as ActiveCampaign's own panel does.
    pub raw_type: String,
    /// What it maps to.
    pub mapped: Mapped,
}

impl Webhook {
    /// The Segment message, unless unmapped.
    pub fn message(&self) -> Option<&Map<String, Value>> {
        self.mapped.message()
    }

    /// The recipient email, when the webhook names a plausible one.
    pub fn email(&self) -> Option<&str> {
        self.mapped.email()
    }
}

/// What a webhook maps to.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    /// A Segment track call (raw Segment JSON object, camelCase keys as on the wire).
    Track {
        /// The call.
        message: Map<String, Value>,
        /// The recipient email (trimmed, case as sent), for the server's
        /// email → userId lookup.
        email: Option<String>,
    },
    /// A Segment identify call.
    Identify {
        /// The call.
        message: Map<String, Value>,
        /// The contact's email (trimmed, case as sent), for the server's
        /// email → userId lookup.
        email: Option<String>,
    },
    /// A type we do not map; acknowledged, counted, not loaded.
    Unmapped,
}

impl Mapped {
    /// The Segment message, unless unmapped.
    pub fn message(&self) -> Option<&Map<String, Value>> {
        match self {
            Mapped::Track { message, .. } | Mapped::Identify { message, .. } => Some(message),
            Mapped::Unmapped => None,
        }
    }

    /// The recipient email, when there is one.
    pub fn email(&self) -> Option<&str> {
        match self {
            Mapped::Track { email, .. } | Mapped::Identify { email, .. } => email.as_deref(),
            Mapped::Unmapped => None,
        }
    }

    /// The track event name, for track calls.
    pub fn event(&self) -> Option<&str> {
        match self {
            Mapped::Track { message, .. } => message.get("event").and_then(Value::as_str),
            _ => None,
        }
    }
}

/// Why a parsed body cannot be mapped. Safe to return to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// No (or a blank) `type` key and no contact either. Global webhooks always have
    /// a `type`; automation "Webhook" actions always have `contact[id]`/`contact[email]`.
    #[error(
        "no `type` key and no contact[id] or contact[email]: not an ActiveCampaign webhook \
         (a global webhook has a `type`, an automation \"Webhook\" action the contact's fields)"
    )]
    MissingType,
    /// A mapped type that names no recipient at all.
    #[error(
        "`{raw_type}` webhook names no recipient: it has no contact[email], contact[id] \
         or campaign[id]"
    )]
    NoIdentity {
        /// The webhook's `type`.
        raw_type: String,
    },
}

/// The types we map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Open,
    Click,
    Bounce,
    Unsubscribe,
    Reply,
    Forward,
    Share,
    Sent,
    /// Only from the API ([`map_activity`]): webhooks have no per-recipient delivery.
    Delivered,
    Subscribe,
    Update,
    TagAdded,
    TagRemoved,
    /// An automation "Webhook" action (no `type`).
    Automation,
}

impl Kind {
    fn from_type(t: &str) -> Option<Kind> {
        const KINDS: [(&str, Kind); 12] = [
            ("open", Kind::Open),
            ("click", Kind::Click),
            ("bounce", Kind::Bounce),
            ("unsubscribe", Kind::Unsubscribe),
            ("reply", Kind::Reply),
            ("forward", Kind::Forward),
            ("share", Kind::Share),
            ("sent", Kind::Sent),
            ("subscribe", Kind::Subscribe),
            ("update", Kind::Update),
            ("contact_tag_added", Kind::TagAdded),
            ("contact_tag_removed", Kind::TagRemoved),
        ];
        KINDS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(t))
            .map(|(_, k)| *k)
    }

    fn is_identify(self) -> bool {
        matches!(
            self,
            Kind::Subscribe | Kind::Update | Kind::TagAdded | Kind::TagRemoved | Kind::Automation
        )
    }
}

/// Maps parsed webhook pairs to a Segment message; see the module docs for the rules.
pub fn map_webhook(pairs: &FormPairs, settings: &Settings) -> Result<Webhook, MapError> {
    let (raw_type, kind) = match pairs.get_trimmed("type") {
        Some(t) => (t, Kind::from_type(t)),
        None if ["contact[id]", "contact[email]"]
            .iter()
            .any(|k| pairs.get_trimmed(k).is_some()) =>
        {
            (AUTOMATION_TYPE, Some(Kind::Automation))
        }
        None => return Err(MapError::MissingType),
    };
    let Some(kind) = kind else {
        return Ok(Webhook {
            raw_type: raw_type.to_owned(),
            mapped: Mapped::Unmapped,
        });
    };
    map_kind(pairs, settings, raw_type, kind)
}

/// The one mapping both paths share: `pairs` in the webhook's form, `kind` already
/// decided (from `type` for webhooks, from the report for the API).
fn map_kind(
    pairs: &FormPairs,
    settings: &Settings,
    raw_type: &str,
    kind: Kind,
) -> Result<Webhook, MapError> {
    let contact = Contact::read(pairs);
    let identity =
        identity(pairs, settings, &contact, kind).ok_or_else(|| MapError::NoIdentity {
            raw_type: raw_type.to_owned(),
        })?;
    let lists = Lists::read(pairs);

    let mut message = Map::new();
    let is_identify = kind.is_identify();
    message.insert(
        "type".into(),
        json!(if is_identify { "identify" } else { "track" }),
    );
    if !is_identify {
        let event = event_name(kind, pairs);
        message.insert("event".into(), json!(event));
    }
    message.insert(
        "messageId".into(),
        json!(dedupe_key(kind, raw_type, pairs, &lists).message_id()),
    );
    if let Some(t) = pairs.get("date_time").and_then(parse_date_time) {
        message.insert("timestamp".into(), json!(segment_timestamp(t)));
    }
    match identity {
        Identity::User(id) => message.insert("userId".into(), json!(id)),
        Identity::Anonymous(id) => message.insert("anonymousId".into(), json!(id)),
    };

    let mut context = Map::new();
    if is_identify {
        message.insert(
            "traits".into(),
            Value::Object(identify_traits(kind, pairs, &contact)),
        );
    } else {
        message.insert(
            "properties".into(),
            Value::Object(track_properties(kind, pairs, &lists)),
        );
        let mut traits = Map::new();
        put(&mut traits, "email", contact.email);
        put(&mut traits, "firstName", contact.first_name);
        put(&mut traits, "lastName", contact.last_name);
        if !traits.is_empty() {
            context.insert("traits".into(), Value::Object(traits));
        }
    }
    if kind == Kind::Automation
        && let Some(series) = pairs.get_trimmed("seriesid")
    {
        context.insert("activecampaign".into(), json!({ "automation_id": series }));
    }
    context.insert("integration".into(), json!({ "name": INTEGRATION_NAME }));
    context.insert(
        "library".into(),
        json!({ "name": LIBRARY_NAME, "version": LIBRARY_VERSION }),
    );
    message.insert("context".into(), Value::Object(context));

    let email = contact.email.map(str::to_owned);
    let mapped = if is_identify {
        Mapped::Identify { message, email }
    } else {
        Mapped::Track { message, email }
    };
    Ok(Webhook {
        raw_type: raw_type.to_owned(),
        mapped,
    })
}

/// An `unsubscribe` webhook is a **spam complaint** — mapped to `Email Marked as Spam`
/// instead of `Email Unsubscribed` — when `unsubscribe[reason]`, `initiated_from` or
/// `initiated_by` contains a complaint word. Complaint words, matched
/// case-insensitively on whole words (runs of ASCII letters and digits):
///
/// - any word starting with `spam` (`spam`, `spammy`, `spamming`, …),
/// - any word starting with `complain` (`complaint`, `complained`, …),
/// - `abuse`, `abusive`, `fbl`, `junk`,
/// - or the phrase `feedback loop`.
///
/// Why: ActiveCampaign has no complaint webhook. A complaint can only surface as an
/// unsubscribe whose reason says so (its unsubscribe form's "the emails are spam"
/// choice, or a feedback-loop unsubscribe) or whose initiator names it.
/// `initiated_from=system` **alone is not a complaint**: system also covers bounce
/// processing and automations. Negations ("not spam") are not understood.
pub fn is_spam_complaint(pairs: &FormPairs) -> bool {
    ["unsubscribe[reason]", "initiated_from", "initiated_by"]
        .iter()
        .filter_map(|k| pairs.get(k))
        .any(says_complaint)
}

fn says_complaint(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words.iter().any(|w| {
        w.starts_with("spam")
            || w.starts_with("complain")
            || matches!(*w, "abuse" | "abusive" | "fbl" | "junk")
    }) || words.windows(2).any(|p| p == ["feedback", "loop"])
}

fn event_name(kind: Kind, pairs: &FormPairs) -> &'static str {
    match kind {
        Kind::Open => EMAIL_OPENED,
        Kind::Click => EMAIL_LINK_CLICKED,
        Kind::Bounce => EMAIL_BOUNCED,
        Kind::Unsubscribe if is_spam_complaint(pairs) => EMAIL_MARKED_AS_SPAM,
        Kind::Unsubscribe => EMAIL_UNSUBSCRIBED,
        Kind::Reply => EMAIL_REPLIED,
        Kind::Forward => EMAIL_FORWARDED,
        Kind::Share => EMAIL_SHARED,
        Kind::Sent => EMAIL_CAMPAIGN_SENT,
        Kind::Delivered => EMAIL_DELIVERED,
        // Identify kinds have no event; callers never ask.
        Kind::Subscribe | Kind::Update | Kind::TagAdded | Kind::TagRemoved | Kind::Automation => "",
    }
}

/// The dedupe key: the brief's tuple, plus what tells apart distinct events that share
/// it (two tags added in the same second, one unsubscribe per list, two contact
/// updates in the same second). Repeated deliveries carry identical bodies, so these
/// extras never split a duplicate.
fn dedupe_key<'a>(
    kind: Kind,
    raw_type: &'a str,
    pairs: &'a FormPairs,
    lists: &Lists<'a>,
) -> DedupeKey<'a> {
    let get = |k: &str| pairs.get_trimmed(k).unwrap_or("");
    let mut extra: Vec<&str> = Vec::new();
    match kind {
        Kind::Unsubscribe => extra.extend(lists.ids.iter().copied()),
        Kind::Share => extra.push(get("share[network]")),
        Kind::TagAdded | Kind::TagRemoved => extra.push(get("tag")),
        Kind::Subscribe | Kind::Update | Kind::Automation => {
            if kind == Kind::Automation {
                extra.push(get("seriesid"));
            }
            extra.extend(lists.ids.iter().copied());
            let mut contact: Vec<(&str, &str)> = pairs
                .iter()
                .filter(|(k, _)| k.starts_with("contact["))
                .collect();
            contact.sort_unstable();
            for (k, v) in contact {
                extra.push(k);
                extra.push(v);
            }
        }
        Kind::Open
        | Kind::Click
        | Kind::Bounce
        | Kind::Reply
        | Kind::Forward
        | Kind::Sent
        | Kind::Delivered => {}
    }
    // A message bounces once per recipient: the bounce is keyed without its time, so
    // a webhook bounce (exact time) and the API's (v1 gives only the date) are one row.
    let date_time = if kind == Kind::Bounce {
        ""
    } else {
        pairs.get("date_time").unwrap_or("")
    };
    DedupeKey {
        raw_type,
        contact_id: get("contact[id]"),
        email: get("contact[email]"),
        campaign_id: get("campaign[id]"),
        message_id: get("campaign[message][id]"),
        link_id: get("link[id]"),
        date_time,
        extra,
    }
}

fn track_properties(kind: Kind, pairs: &FormPairs, lists: &Lists<'_>) -> Map<String, Value> {
    let mut p = Map::new();
    let get = |k: &str| pairs.get_trimmed(k);
    let initiated_from = get("initiated_from").or_else(|| get("initiated_by"));
    put(&mut p, "email_id", get("campaign[message][id]"));
    put(&mut p, "email_subject", get("campaign[message][subject]"));
    put(&mut p, "campaign_id", get("campaign[id]"));
    put(&mut p, "campaign_name", get("campaign[name]"));
    put(&mut p, "campaign_type", get("campaign[type]"));
    put(&mut p, "contact_id", get("contact[id]"));
    put(&mut p, "link_id", get("link[id]"));
    put(&mut p, "link_url", get("link[url]"));
    put(&mut p, "list_id", lists.ids.first().copied());
    if lists.ids.len() > 1 {
        p.insert("list_ids".into(), json!(lists.ids));
    }
    put(&mut p, "list_name", lists.name);
    put(&mut p, "initiated_from", initiated_from);
    match kind {
        Kind::Bounce => {
            let bounce_type = get("bounce[type]").map(str::to_ascii_lowercase);
            put(&mut p, "bounce_type", bounce_type.as_deref());
            put(&mut p, "bounce_code", get("bounce[code]"));
            put(
                &mut p,
                "bounce_description",
                get("bounce[description]").or_else(|| get("bounce[descript]")),
            );
        }
        Kind::Unsubscribe => {
            put(&mut p, "reason", get("unsubscribe[reason]"));
            put(&mut p, "unsubscribe_source", initiated_from);
        }
        Kind::Share => {
            put(&mut p, "share_network", get("share[network]"));
            put(&mut p, "share_content", get("share[content]"));
        }
        Kind::Forward => {
            if let Some(n) = get("forward[count]") {
                p.insert("forward_count".into(), count(n));
            }
        }
        Kind::Sent => {
            if let Some(n) = get("campaign[recipients]") {
                p.insert("recipients".into(), count(n));
            }
        }
        _ => {}
    }
    p
}

fn identify_traits(kind: Kind, pairs: &FormPairs, contact: &Contact<'_>) -> Map<String, Value> {
    let mut t = Map::new();
    put(&mut t, "email", contact.email);
    put(&mut t, "firstName", contact.first_name);
    put(&mut t, "lastName", contact.last_name);
    put(&mut t, "phone", contact.phone);
    put(&mut t, "contact_id", contact.id);
    // `contact[tags]` is the contact's tag list; for tag events make sure it reflects
    // the change the webhook announces, whichever side of it the list was read.
    let tag = pairs.get_trimmed("tag");
    let mut tags = contact.tags.clone();
    match (kind, tag) {
        (Kind::TagAdded, Some(tag)) => {
            let tags = tags.get_or_insert_with(Vec::new);
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
        (Kind::TagRemoved, Some(tag)) => {
            if let Some(tags) = tags.as_mut() {
                tags.retain(|t| *t != tag);
            }
        }
        _ => {}
    }
    if let Some(tags) = tags {
        t.insert("tags".into(), json!(tags));
    }
    if kind == Kind::Automation
        && let Some(org) = pairs
            .get_trimmed("contact[orgname]")
            .or_else(|| pairs.get_trimmed("contact[customer_acct_name]"))
    {
        t.insert("company".into(), json!({ "name": org }));
    }
    for (key, value) in &contact.fields {
        let name = format!("field_{key}");
        if !t.contains_key(&name) {
            t.insert(name, json!(value));
        }
    }
    t
}

/// Inserts `value` under `key` when present (values reaching here are trimmed and
/// non-blank).
fn put(map: &mut Map<String, Value>, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        map.insert(key.to_owned(), Value::String(v.to_owned()));
    }
}

/// A count as a JSON number when it is a non-negative integer (`1250`, `1,250`),
/// else the trimmed string as sent.
fn count(raw: &str) -> Value {
    let digits: String = raw.chars().filter(|c| *c != ',').collect();
    match digits.parse::<u64>() {
        Ok(n) if !digits.starts_with('+') => json!(n),
        _ => json!(raw),
    }
}

/// Normalizes a custom-field key: trimmed, surrounding `%` removed, lowercase.
fn field_key(raw: &str) -> Option<String> {
    let key = raw.trim().trim_matches('%').trim();
    (!key.is_empty()).then(|| key.to_lowercase())
}

/// The `contact[...]` block.
struct Contact<'a> {
    id: Option<&'a str>,
    /// Only when it [`looks_like_email`].
    email: Option<&'a str>,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    phone: Option<&'a str>,
    /// `None` when `contact[tags]` is absent; `Some([])` when present but blank.
    tags: Option<Vec<&'a str>>,
    /// `(normalized key, value)` of non-blank `contact[fields][<key>]`, first wins.
    fields: Vec<(String, &'a str)>,
}

impl<'a> Contact<'a> {
    fn read(pairs: &'a FormPairs) -> Contact<'a> {
        let get = |k: &str| pairs.get_trimmed(k);
        let tags = pairs.get("contact[tags]").map(|raw| {
            let mut tags: Vec<&str> = Vec::new();
            for tag in raw.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if !tags.contains(&tag) {
                    tags.push(tag);
                }
            }
            tags
        });
        let mut fields: Vec<(String, &str)> = Vec::new();
        for (k, v) in pairs.iter() {
            let Some(inner) = k
                .strip_prefix("contact[fields][")
                .and_then(|r| r.strip_suffix(']'))
            else {
                continue;
            };
            let v = v.trim();
            if inner.contains(['[', ']']) || v.is_empty() {
                continue;
            }
            if let Some(key) = field_key(inner)
                && !fields.iter().any(|(seen, _)| *seen == key)
            {
                fields.push((key, v));
            }
        }
        Contact {
            id: get("contact[id]"),
            email: get("contact[email]").filter(|e| looks_like_email(e)),
            first_name: get("contact[first_name]"),
            last_name: get("contact[last_name]"),
            phone: get("contact[phone]"),
            tags,
            fields,
        }
    }

    fn field(&self, key: &str) -> Option<&'a str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// Lists named by the webhook: `list` (`0` means none) and `list[<i>][id]` entries,
/// distinct, in body order; and the first `list[<i>][name]`.
struct Lists<'a> {
    ids: Vec<&'a str>,
    name: Option<&'a str>,
}

impl<'a> Lists<'a> {
    fn read(pairs: &'a FormPairs) -> Lists<'a> {
        let mut ids: Vec<&str> = Vec::new();
        let mut name = None;
        for (k, v) in pairs.iter() {
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            let entry = k.strip_prefix("list[").and_then(|r| r.split_once(']'));
            let is_id = k == "list" || matches!(entry, Some((_, "[id]")));
            if is_id && v != "0" && !ids.contains(&v) {
                ids.push(v);
            } else if matches!(entry, Some((_, "[name]"))) && name.is_none() {
                name = Some(v);
            }
        }
        Lists { ids, name }
    }
}

enum Identity {
    User(String),
    Anonymous(String),
}

fn identity(
    pairs: &FormPairs,
    settings: &Settings,
    contact: &Contact<'_>,
    kind: Kind,
) -> Option<Identity> {
    if let Some(key) = settings
        .user_id_field
        .as_deref()
        .and_then(user_id_field_key)
        && let Some(user_id) = contact.field(&key)
    {
        return Some(Identity::User(user_id.to_owned()));
    }
    if let Some(email) = contact.email {
        return Some(Identity::Anonymous(email.to_owned()));
    }
    if let Some(id) = contact.id {
        return Some(Identity::Anonymous(format!(
            "{CONTACT_ANONYMOUS_ID_PREFIX}{id}"
        )));
    }
    if !kind.is_identify()
        && let Some(campaign) = pairs.get_trimmed("campaign[id]")
    {
        return Some(Identity::Anonymous(format!(
            "{CAMPAIGN_ANONYMOUS_ID_PREFIX}{campaign}"
        )));
    }
    None
}

/// The setting may be `32`, `UTM_SOURCE`, `%UTM_SOURCE%` or `contact[fields][32]`.
fn user_id_field_key(setting: &str) -> Option<String> {
    let s = setting.trim();
    let s = s
        .strip_prefix("contact[fields][")
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    field_key(s)
}

/// `raw_type` (and dedupe type) of an API-reported delivery ([`ActivityKind::Delivered`]).
pub const DELIVERED_TYPE: &str = "delivered";

/// The per-recipient activities ActiveCampaign's API reports (see [`map_activity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActivityKind {
    /// A recipient without a bounce: `Email Delivered` at the campaign's send time.
    Delivered,
    /// `campaign_report_open_list`: `Email Opened`.
    Open,
    /// `campaign_report_link_list`: `Email Link Clicked`.
    Click,
    /// `campaign_report_bounce_list`: `Email Bounced`.
    Bounce,
    /// `campaign_report_unsubscription_list`: `Email Unsubscribed`, or `Email Marked
    /// as Spam` by the webhook rule ([`is_spam_complaint`]) on the reason.
    Unsubscribe,
    /// `campaign_report_forward_list`: `Email Forwarded`.
    Forward,
}

impl ActivityKind {
    /// The webhook `type` this activity is the API's view of.
    pub fn raw_type(self) -> &'static str {
        match self {
            ActivityKind::Delivered => DELIVERED_TYPE,
            ActivityKind::Open => "open",
            ActivityKind::Click => "click",
            ActivityKind::Bounce => "bounce",
            ActivityKind::Unsubscribe => "unsubscribe",
            ActivityKind::Forward => "forward",
        }
    }

    fn kind(self) -> Kind {
        match self {
            ActivityKind::Delivered => Kind::Delivered,
            ActivityKind::Open => Kind::Open,
            ActivityKind::Click => Kind::Click,
            ActivityKind::Bounce => Kind::Bounce,
            ActivityKind::Unsubscribe => Kind::Unsubscribe,
            ActivityKind::Forward => Kind::Forward,
        }
    }
}

/// One recipient's email activity as ActiveCampaign's API reports it. Absent values
/// are `None`; values are used trimmed, as in a webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Activity {
    /// What happened.
    pub kind: ActivityKind,
    /// When (already read in the account's time zone), or `None` when unknown.
    pub at: Option<chrono::DateTime<chrono::Utc>>,
    /// `subscriberid` (= a webhook's `contact[id]`).
    pub contact_id: Option<String>,
    /// The recipient email.
    pub email: Option<String>,
    /// The campaign id.
    pub campaign_id: Option<String>,
    /// The campaign name.
    pub campaign_name: Option<String>,
    /// The campaign type (`single`, …).
    pub campaign_type: Option<String>,
    /// The campaign's message id (`email_id`).
    pub message_id: Option<String>,
    /// The message subject (`email_subject`).
    pub subject: Option<String>,
    /// The link id (clicks).
    pub link_id: Option<String>,
    /// The link URL (clicks).
    pub link_url: Option<String>,
    /// `hard` / `soft` (bounces).
    pub bounce_type: Option<String>,
    /// The SMTP code (bounces), e.g. `5.1.1`.
    pub bounce_code: Option<String>,
    /// The bounce description.
    pub bounce_description: Option<String>,
    /// The unsubscribe reason.
    pub reason: Option<String>,
    /// Forward count (forwards).
    pub forward_count: Option<String>,
}

impl Activity {
    /// An activity of `kind` with every other part absent.
    pub fn new(kind: ActivityKind) -> Activity {
        Activity {
            kind,
            at: None,
            contact_id: None,
            email: None,
            campaign_id: None,
            campaign_name: None,
            campaign_type: None,
            message_id: None,
            subject: None,
            link_id: None,
            link_url: None,
            bounce_type: None,
            bounce_code: None,
            bounce_description: None,
            reason: None,
            forward_count: None,
        }
    }

    /// The activity in the webhook's own form: the pairs ActiveCampaign would post
    /// for the same event, so both paths go through one mapping.
    pub fn to_pairs(&self) -> FormPairs {
        let mut p: Vec<(String, String)> = vec![("type".into(), self.kind.raw_type().into())];
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                p.push((k.to_owned(), v.to_owned()));
            }
        };
        put("date_time", &self.at.map(segment_timestamp));
        put("contact[id]", &self.contact_id);
        put("contact[email]", &self.email);
        put("campaign[id]", &self.campaign_id);
        put("campaign[name]", &self.campaign_name);
        put("campaign[type]", &self.campaign_type);
        put("campaign[message][id]", &self.message_id);
        put("campaign[message][subject]", &self.subject);
        put("link[id]", &self.link_id);
        put("link[url]", &self.link_url);
        put("bounce[type]", &self.bounce_type);
        put("bounce[code]", &self.bounce_code);
        put("bounce[description]", &self.bounce_description);
        put("unsubscribe[reason]", &self.reason);
        put("forward[count]", &self.forward_count);
        FormPairs(p)
    }
}

/// Maps an API-reported activity to the Segment message the webhook for the same
/// event would give: same event name, properties, identity and `messageId` (it goes
/// through the same mapping, from [`Activity::to_pairs`]). Deliveries, which have no
/// webhook, map the same way as `Email Delivered`.
pub fn map_activity(activity: &Activity, settings: &Settings) -> Result<Webhook, MapError> {
    let pairs = activity.to_pairs();
    map_kind(
        &pairs,
        settings,
        activity.kind.raw_type(),
        activity.kind.kind(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> FormPairs {
        list.iter().copied().collect()
    }

    fn unsubscribe(extra: &[(&str, &str)]) -> FormPairs {
        let mut p = vec![
            ("type", "unsubscribe"),
            ("date_time", "2024-02-28T07:10:55-06:00"),
            ("contact[id]", "36"),
            ("contact[email]", "ann@example.com"),
        ];
        p.extend_from_slice(extra);
        pairs(&p)
    }

    fn event(p: &FormPairs) -> String {
        map_webhook(p, &Settings::default())
            .unwrap()
            .mapped
            .event()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn spam_rule_reads_reason_words() {
        for reason in [
            "The emails are spam and should be reported",
            "SPAM",
            "spammy content",
            "Marked as junk",
            "abuse report",
            "complaint via ISP feedback loop",
            "FBL",
            "user complained",
        ] {
            let p = unsubscribe(&[("unsubscribe[reason]", reason)]);
            assert_eq!(event(&p), EMAIL_MARKED_AS_SPAM, "{reason:?}");
        }
    }

    #[test]
    fn ordinary_reasons_are_unsubscribes() {
        for reason in [
            "Too many emails",
            "I never signed up for this mailing list",
            "not relevant",
            "antispam policy",
            "abused", // only the exact words abuse/abusive
            "",
        ] {
            let p = unsubscribe(&[("unsubscribe[reason]", reason)]);
            assert_eq!(event(&p), EMAIL_UNSUBSCRIBED, "{reason:?}");
        }
    }

    #[test]
    fn spam_rule_reads_initiator_but_not_system_alone() {
        let p = unsubscribe(&[("initiated_from", "system"), ("initiated_by", "system")]);
        assert_eq!(event(&p), EMAIL_UNSUBSCRIBED);
        let p = unsubscribe(&[("initiated_from", "system"), ("initiated_by", "abuse")]);
        assert_eq!(event(&p), EMAIL_MARKED_AS_SPAM);
        let p = unsubscribe(&[("initiated_from", "spam_complaint")]);
        assert_eq!(event(&p), EMAIL_MARKED_AS_SPAM);
    }

    #[test]
    fn spam_rule_applies_only_to_unsubscribe() {
        let p = pairs(&[
            ("type", "open"),
            ("contact[email]", "a@example.com"),
            ("unsubscribe[reason]", "spam"),
        ]);
        assert_eq!(event(&p), EMAIL_OPENED);
    }

    #[test]
    fn counts_become_numbers_when_they_parse() {
        assert_eq!(count("1250"), json!(1250));
        assert_eq!(count("1,250"), json!(1250));
        assert_eq!(count("0"), json!(0));
        assert_eq!(count("lots"), json!("lots"));
        assert_eq!(count("-3"), json!("-3"));
        assert_eq!(count("+3"), json!("+3"));
        assert_eq!(
            count("99999999999999999999999"),
            json!("99999999999999999999999")
        );
    }

    #[test]
    fn user_id_field_spellings() {
        assert_eq!(user_id_field_key("32").as_deref(), Some("32"));
        assert_eq!(
            user_id_field_key(" %UTM_Source% ").as_deref(),
            Some("utm_source")
        );
        assert_eq!(
            user_id_field_key("contact[fields][EXT_ID]").as_deref(),
            Some("ext_id")
        );
        assert_eq!(user_id_field_key("  "), None);
        assert_eq!(user_id_field_key("%%"), None);
    }

    #[test]
    fn lists_read_scalar_and_bracketed_forms() {
        let p = pairs(&[
            ("list", "0"),
            ("list[][id]", "3"),
            ("list[][name]", "Newsletter"),
            ("list[][id]", "7"),
            ("list[1][id]", "3"),
        ]);
        let lists = Lists::read(&p);
        assert_eq!(lists.ids, ["3", "7"]);
        assert_eq!(lists.name, Some("Newsletter"));
    }

    #[test]
    fn missing_type_is_an_error_unknown_type_is_unmapped() {
        let s = Settings::default();
        assert_eq!(
            map_webhook(&pairs(&[("seriesid", "9"), ("contact[id]", " ")]), &s),
            Err(MapError::MissingType)
        );
        assert_eq!(
            map_webhook(&pairs(&[("type", "  ")]), &s),
            Err(MapError::MissingType)
        );
        let w = map_webhook(&pairs(&[("type", "deal_update")]), &s).unwrap();
        assert_eq!(w.raw_type, "deal_update");
        assert_eq!(w.mapped, Mapped::Unmapped);
    }

    #[test]
    fn type_is_matched_case_insensitively_and_kept_as_sent() {
        let p = pairs(&[("type", " Open "), ("contact[email]", "a@example.com")]);
        let w = map_webhook(&p, &Settings::default()).unwrap();
        assert_eq!(w.raw_type, "Open");
        assert_eq!(w.mapped.event(), Some(EMAIL_OPENED));
    }

    #[test]
    fn settings_deserialize_from_source_settings_json() {
        let s: Settings =
            serde_json::from_value(json!({"user_id_field": "32", "other": 1})).unwrap();
        assert_eq!(s.user_id_field.as_deref(), Some("32"));
        let s: Settings = serde_json::from_value(json!({})).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn api_open_is_the_same_message_as_the_webhook_open() {
        let form = "type=open&date_time=2024-02-28T07%3A04%3A13-06%3A00&campaign%5Bid%5D=42\
            &campaign%5Bname%5D=March&campaign%5Bmessage%5D%5Bid%5D=17\
            &campaign%5Bmessage%5D%5Bsubject%5D=Spring&contact%5Bid%5D=36\
            &contact%5Bemail%5D=ann%40example.com&initiated_from=public";
        let hook = map_webhook(
            &crate::parse_form(form.as_bytes()).unwrap(),
            &Settings::default(),
        )
        .unwrap();
        let mut a = Activity::new(ActivityKind::Open);
        a.at = parse_date_time("2024-02-28 13:04:13Z");
        a.contact_id = Some("36".into());
        a.email = Some("ann@example.com".into());
        a.campaign_id = Some("42".into());
        a.campaign_name = Some("March".into());
        a.message_id = Some("17".into());
        a.subject = Some("Spring".into());
        let api = map_activity(&a, &Settings::default()).unwrap();
        let (h, m) = (hook.message().unwrap(), api.message().unwrap());
        for k in ["messageId", "event", "anonymousId", "timestamp"] {
            assert_eq!(h[k], m[k], "{k}");
        }
        assert_eq!(h["context"]["traits"], m["context"]["traits"]);
        assert_eq!(m["properties"]["email_subject"], "Spring");
    }

    #[test]
    fn api_delivery_and_spam_unsubscribe() {
        let mut a = Activity::new(ActivityKind::Delivered);
        a.email = Some("bob@example.com".into());
        a.campaign_id = Some("7".into());
        let w = map_activity(&a, &Settings::default()).unwrap();
        assert_eq!(w.mapped.event(), Some(EMAIL_DELIVERED));
        assert_eq!(w.raw_type, DELIVERED_TYPE);
        let mut u = Activity::new(ActivityKind::Unsubscribe);
        u.email = Some("bob@example.com".into());
        u.reason = Some("This is spam".into());
        let w = map_activity(&u, &Settings::default()).unwrap();
        assert_eq!(w.mapped.event(), Some(EMAIL_MARKED_AS_SPAM));
        // A webhook cannot claim a delivery.
        let p = pairs(&[("type", "delivered"), ("contact[email]", "a@example.com")]);
        assert_eq!(
            map_webhook(&p, &Settings::default()).unwrap().mapped,
            Mapped::Unmapped
        );
    }
}

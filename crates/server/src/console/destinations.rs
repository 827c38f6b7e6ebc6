//! Destination pages: the list with delivery stats, "Add destination" per type with
//! the settings of DESIGN.md §3 and the engine's validation errors tied to their
//! fields, and a destination's page (delivered, retrying, dead letters with the
//! receiver's answer, backlog, last error; replay of dead letters with live
//! progress). Every rule is the destination engine's: the console only builds the
//! same `CreateDestination` the admin API parses.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tributary_destinations::{
    CreateDestination, DestinationError, DestinationView, PatchDestination, ReplayRequest,
};

use super::layout::{self, Nav, badge, when};
use super::session::{Form, Signed, check_form};
use super::{error_page, html, see_other};
use crate::AppState;
use crate::error::ApiError;

/// One settings field of a destination type.
struct SettingField {
    key: &'static str,
    label: &'static str,
    kind: &'static str,
    required: bool,
    hint: &'static str,
}

const fn f(
    key: &'static str,
    label: &'static str,
    kind: &'static str,
    required: bool,
    hint: &'static str,
) -> SettingField {
    SettingField {
        key,
        label,
        kind,
        required,
        hint,
    }
}

/// The types and their settings (DESIGN.md §3).
const TYPES: [(&str, &str, &[SettingField]); 3] = [
    (
        "webhook",
        "Webhook",
        &[
            f("url", "URL", "url", true, "Events are POSTed here as JSON."),
            f(
                "headers",
                "Headers",
                "textarea",
                false,
                "One per line: Name: value",
            ),
            f(
                "secret",
                "Signing secret",
                "password",
                false,
                "Signs each body: X-Tributary-Signature: sha256=…",
            ),
            f(
                "batch_size",
                "Batch size",
                "number",
                false,
                "Events per request (default 1).",
            ),
            f(
                "timeout",
                "Timeout",
                "number",
                false,
                "Seconds (default 10).",
            ),
        ],
    ),
    (
        "segment",
        "Segment-compatible API",
        &[
            f(
                "write_key",
                "Write key",
                "password",
                true,
                "The receiving source's write key.",
            ),
            f("host", "Host", "url", true, "e.g. https://api.segment.io"),
        ],
    ),
    (
        "activecampaign",
        "ActiveCampaign",
        &[
            f(
                "api_url",
                "API URL",
                "url",
                true,
                "Settings → Developer, e.g. https://ACCOUNT.api-us1.com",
            ),
            f(
                "api_key",
                "API key",
                "password",
                true,
                "Settings → Developer.",
            ),
            f(
                "actid",
                "Account id (actid)",
                "text",
                true,
                "Settings → Tracking → Event tracking.",
            ),
            f(
                "event_key",
                "Event key",
                "password",
                true,
                "Settings → Tracking → Event tracking.",
            ),
            f(
                "track_url",
                "Event tracking URL",
                "url",
                false,
                "Default https://trackcmp.net/event",
            ),
        ],
    ),
];

fn type_label(kind: &str) -> &str {
    TYPES
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, l, _)| *l)
        .unwrap_or(kind)
}

fn health(v: &DestinationView) -> (&'static str, &'static str) {
    if !v.enabled {
        ("idle", "Paused")
    } else if v.stats.dead_letters > 0 {
        ("bad", "Dead letters")
    } else if v.stats.retrying > 0 {
        ("warn", "Retrying")
    } else {
        ("ok", "Delivering")
    }
}

/// `GET /destinations`.
pub(crate) async fn list(State(state): State<Arc<AppState>>, signed: Signed) -> Response {
    let all = match state.destinations.list().await {
        Ok(v) => v,
        Err(e) => return error_page(&signed, ApiError::from(e)),
    };
    let body = html! {
        h1 { "Destinations" }
        p.actions { a.button.primary href="/destinations/new" { "Add destination" } }
        @if all.is_empty() {
            p { "No destinations yet. Add one to forward events as they arrive." }
        } @else {
            div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table {
                caption { (all.len()) " destinations" }
                thead { tr {
                    th scope="col" { "Name" } th scope="col" { "Type" } th scope="col" { "Status" }
                    th.num scope="col" { "Delivered" } th.num scope="col" { "Retrying" }
                    th.num scope="col" { "Dead letters" } th.num scope="col" { "Backlog" }
                    th scope="col" { "Last error" }
                } }
                tbody { @for d in &all {
                    @let (k, t) = health(d);
                    tr {
                        th scope="row" { a href={ "/destinations/" (d.id) } { (d.name) } }
                        td { (type_label(&d.kind)) }
                        td { (badge(k, t)) }
                        td.num { (d.stats.delivered) } td.num { (d.stats.retrying) }
                        td.num { (d.stats.dead_letters) } td.num { (d.stats.backlog) }
                        td { (d.stats.last_error.as_deref().unwrap_or("none")) }
                    }
                } }
            } }
        }
    };
    html(
        StatusCode::OK,
        layout::page(Some(&signed), Nav::Destinations, "Destinations", body),
    )
}

#[derive(Deserialize, Default)]
pub(crate) struct NewQuery {
    #[serde(default, rename = "type")]
    kind: String,
}

struct NewForm<'a> {
    form: Option<&'a Form>,
    kind: &'a str,
    /// (field id, message)
    errors: Vec<(String, String)>,
}

impl NewForm<'_> {
    fn value(&self, name: &str) -> String {
        self.form
            .map(|f| f.get(name).to_string())
            .unwrap_or_default()
    }
    fn error(&self, id: &str) -> Option<&str> {
        self.errors
            .iter()
            .find(|(f, _)| f == id)
            .map(|(_, m)| m.as_str())
    }
}

fn setting_input(kind: &str, sf: &SettingField, nf: &NewForm) -> Markup {
    let id = format!("{kind}-{}", sf.key);
    let hint_id = format!("{id}-hint");
    let err_id = format!("{id}-error");
    let err = nf.error(&id);
    let value = nf.value(&id);
    let described = format!("{hint_id} {err_id}");
    html! {
        div.field {
            label for=(id) { (sf.label) @if !sf.required { span.optional { " (optional)" } } }
            p.hint id=(hint_id) { (sf.hint) }
            @if sf.kind == "textarea" {
                textarea id=(id) name=(id) rows="3" aria-describedby=(described)
                    aria-invalid=[err.map(|_| "true")] { (value) }
            } @else {
                input id=(id) name=(id) type=(if sf.kind == "number" { "text" } else { sf.kind })
                    inputmode=[(sf.kind == "number").then_some("decimal")]
                    value=(value) autocomplete="off" required[sf.required]
                    aria-describedby=(described) aria-invalid=[err.map(|_| "true")];
            }
            p.error id=(err_id) { @if let Some(e) = err { (e) } }
        }
    }
}

fn new_form(state: &AppState, signed: &Signed, nf: &NewForm) -> Markup {
    let sources = state.control.sources();
    let chosen: Vec<String> = nf.form.map(|f| f.all("source_ids")).unwrap_or_default();
    let summary: Vec<(&str, String)> = nf
        .errors
        .iter()
        .map(|(f, m)| (f.as_str(), m.clone()))
        .collect();
    let name_err = nf.error("name");
    let start = nf.value("start");
    html! {
        h1 { "Add destination" }
        (layout::error_summary(&summary))
        form method="post" action="/destinations" novalidate {
            input type="hidden" name="csrf" value=(signed.csrf);
            fieldset {
                legend { "Destination type" }
                @for (k, label, _) in TYPES {
                    div.choice {
                        input type="radio" name="type" id={ "type-" (k) } value=(k) data-dest
                            checked[nf.kind == k];
                        label for={ "type-" (k) } { (label) }
                    }
                }
            }
            div.field {
                label for="name" { "Name" }
                p.hint id="name-hint" { "Also the key a message's integrations object can turn it off with." }
                input id="name" name="name" type="text" value=(nf.value("name")) required
                    aria-describedby="name-hint name-error" aria-invalid=[name_err.map(|_| "true")];
                p.error id="name-error" { @if let Some(e) = name_err { (e) } }
            }
            fieldset aria-describedby="sources-hint" {
                legend { "Sources" }
                p.hint id="sources-hint" { "None ticked: events of every source." }
                @if sources.is_empty() { p { "No sources yet." } }
                @for s in &sources {
                    div.choice {
                        input type="checkbox" name="source_ids" id={ "src-" (s.id) } value=(s.id)
                            checked[chosen.contains(&s.id)];
                        label for={ "src-" (s.id) } { (s.name) " (" code { (s.schema) } ")" }
                    }
                }
            }
            @for (k, label, fields) in TYPES {
                fieldset data-type=(k) {
                    legend { (label) " settings" }
                    @for sf in fields.iter() { (setting_input(k, sf, nf)) }
                }
            }
            div.field {
                label for="start" { "Start from" }
                select id="start" name="start" {
                    option value="now" selected[start != "beginning"] { "New events from now on" }
                    option value="beginning" selected[start == "beginning"] { "Every event the log still keeps" }
                }
            }
            button.primary type="submit" { "Create destination" }
        }
    }
}

/// `GET /destinations/new[?type=…]`.
pub(crate) async fn new_page(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    Query(q): Query<NewQuery>,
) -> Response {
    let kind = TYPES
        .iter()
        .map(|(k, _, _)| *k)
        .find(|k| *k == q.kind)
        .unwrap_or("webhook");
    let nf = NewForm {
        form: None,
        kind,
        errors: vec![],
    };
    html(
        StatusCode::OK,
        layout::page(
            Some(&signed),
            Nav::Destinations,
            "Add destination",
            new_form(&state, &signed, &nf),
        ),
    )
}

/// The settings object of the chosen type from the form, and the first field error
/// the console itself can tell (a number that is not a number).
fn settings_from(kind: &str, form: &Form) -> Result<Value, (String, String)> {
    let mut m = Map::new();
    let Some((_, _, fields)) = TYPES.iter().find(|(k, _, _)| *k == kind) else {
        return Ok(Value::Object(m));
    };
    for sf in fields.iter() {
        let id = format!("{kind}-{}", sf.key);
        let v = form.get(&id).trim();
        if v.is_empty() {
            continue;
        }
        let value = match (sf.key, sf.kind) {
            ("headers", _) => {
                let mut h = Map::new();
                for line in v.lines().filter(|l| !l.trim().is_empty()) {
                    let Some((name, value)) = line.split_once(':') else {
                        return Err((
                            id,
                            format!("Write each header as Name: value ({line:?} has no colon)."),
                        ));
                    };
                    h.insert(name.trim().to_string(), json!(value.trim()));
                }
                Value::Object(h)
            }
            (_, "number") => {
                let n: f64 = v
                    .parse()
                    .map_err(|_| (id.clone(), format!("{} must be a number.", sf.label)))?;
                if sf.key == "batch_size" && n.fract() == 0.0 && n >= 0.0 {
                    json!(n as u64)
                } else {
                    json!(n)
                }
            }
            _ => json!(v),
        };
        m.insert(sf.key.to_string(), value);
    }
    Ok(Value::Object(m))
}

/// Which form field an engine message is about: `"<type> settings: <field> …"`,
/// serde's `` missing field `url` `` / `` unknown field `x` ``, or `name …`.
fn field_of(kind: &str, message: &str) -> String {
    let fields: Vec<&str> = TYPES
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, _, fs)| fs.iter().map(|f| f.key).collect())
        .unwrap_or_default();
    if let Some(rest) = message.split_once("settings: ").map(|(_, r)| r) {
        let word = rest
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .find(|w| !w.is_empty() && *w != "missing" && *w != "field" && *w != "invalid")
            .unwrap_or("");
        let word = rest
            .split('`')
            .nth(1)
            .filter(|w| fields.contains(w))
            .unwrap_or(word);
        if fields.contains(&word) {
            return format!("{kind}-{word}");
        }
        if rest.contains("header") {
            return format!("{kind}-headers");
        }
    }
    if message.starts_with("name") {
        return "name".into();
    }
    if message.contains("source") {
        return "sources-hint".into();
    }
    "type-webhook".into()
}

/// `POST /destinations`.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(r) = check_form(&headers, &signed, &form) {
        return r.into_response();
    }
    let kind = form.get("type");
    let mut nf = NewForm {
        form: Some(&form),
        kind,
        errors: vec![],
    };
    if !TYPES.iter().any(|(k, _, _)| *k == kind) {
        nf.errors
            .push(("type-webhook".into(), "Choose a destination type.".into()));
    }
    if form.get("name").trim().is_empty() {
        nf.errors.push(("name".into(), "Enter a name.".into()));
    }
    let settings = match settings_from(kind, &form) {
        Ok(s) => s,
        Err(e) => {
            nf.errors.push(e);
            Value::Null
        }
    };
    if nf.errors.is_empty() {
        let sources = form.all("source_ids");
        for id in &sources {
            if state.control.source(id).is_none() {
                nf.errors.push((
                    "sources-hint".into(),
                    format!("There is no source with the id {id:?}."),
                ));
            }
        }
        let start = if form.get("start") == "beginning" {
            "beginning"
        } else {
            "now"
        };
        let req = json!({"type": kind, "name": form.get("name").trim(), "source_ids": sources,
            "settings": settings, "start": start});
        if nf.errors.is_empty() {
            match serde_json::from_value::<CreateDestination>(req) {
                Err(e) => nf.errors.push(("type-webhook".into(), e.to_string())),
                Ok(req) => match state.destinations.create(req).await {
                    Ok(v) => {
                        tracing::info!(destination = %v.id, "destination created in the console");
                        return see_other(&format!("/destinations/{}?created=1", v.id));
                    }
                    Err(DestinationError::Invalid(m)) => {
                        let field = field_of(kind, &m);
                        nf.errors.push((field, m));
                    }
                    Err(e) => return error_page(&signed, ApiError::from(e)),
                },
            }
        }
    }
    html(
        StatusCode::BAD_REQUEST,
        layout::page(
            Some(&signed),
            Nav::Destinations,
            "Add destination: fix the form",
            new_form(&state, &signed, &nf),
        ),
    )
}

#[derive(Deserialize, Default)]
pub(crate) struct ShowQuery {
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    replayed: Option<u64>,
    #[serde(default)]
    done: Option<String>,
}

fn stats_json_of(v: &DestinationView) -> Value {
    let (k, t) = health(v);
    json!({
        "delivered": v.stats.delivered,
        "retrying": v.stats.retrying,
        "dead_letters": v.stats.dead_letters,
        "backlog": v.stats.backlog,
        "in_flight": v.stats.in_flight,
        "last_error": v.stats.last_error.clone().unwrap_or_else(|| "none".into()),
        "status": t,
        "status_class": format!("badge badge-{k}"),
        "status_symbol": format!("{} ", layout::symbol(k)),
    })
}

/// `GET /destinations/{id}/stats` → the numbers the page refreshes while replaying.
pub(crate) async fn stats_json(
    State(state): State<Arc<AppState>>,
    _signed: Signed,
    Path(id): Path<String>,
) -> Response {
    match state.destinations.get(&id).await {
        Ok(v) => axum::Json(stats_json_of(&v)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `GET /destinations/{id}`.
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let v = match state.destinations.get(&id).await {
        Ok(v) => v,
        Err(e) => return error_page(&signed, ApiError::from(e)),
    };
    let dead = match state.destinations.dead_letters(&id, 100).await {
        Ok(d) => d,
        Err(e) => return error_page(&signed, ApiError::from(e)),
    };
    let (k, t) = health(&v);
    let source_names: Vec<String> = if v.source_ids.is_empty() {
        vec!["every source".into()]
    } else {
        v.source_ids
            .iter()
            .map(|s| {
                state
                    .control
                    .source(s)
                    .map(|s| s.name.clone())
                    .unwrap_or_else(|| s.clone())
            })
            .collect()
    };
    let notice = match (&q.created, q.replayed, q.done.as_deref()) {
        (Some(_), _, _) => {
            Some("The destination was created. Delivery starts within a second.".to_string())
        }
        (_, Some(n), _) => Some(format!(
            "{n} dead letters queued for replay. The counts below update as they are sent."
        )),
        (_, _, Some("enabled")) => Some("Delivery resumed.".into()),
        (_, _, Some("disabled")) => Some("Delivery paused. The position is kept.".into()),
        _ => None,
    };
    let body = html! {
        h1 { (v.name) }
        @if let Some(n) = notice { p.notice role="status" { (n) } }
        section.card aria-labelledby="stats-h" data-poll={ "/destinations/" (v.id) "/stats" } {
            h2 #stats-h { "Delivery" }
            dl.facts {
                dt { "Type" } dd { (type_label(&v.kind)) }
                dt { "Sources" } dd { (source_names.join(", ")) }
                dt { "Status" } dd { (layout::badge_field(k, t, Some("status"))) }
                dt { "Delivered" } dd data-field="delivered" { (v.stats.delivered) }
                dt { "Retrying" } dd data-field="retrying" { (v.stats.retrying) }
                dt { "Dead letters" } dd data-field="dead_letters" { (v.stats.dead_letters) }
                dt { "Backlog" } dd data-field="backlog" { (v.stats.backlog) }
                dt { "Last error" } dd data-field="last_error" { (v.stats.last_error.as_deref().unwrap_or("none")) }
                @if let Some(at) = v.stats.last_success_at {
                    dt { "Last success" } dd { (when(&at.to_rfc3339())) }
                }
            }
        }
        section aria-labelledby="dead-h" {
            h2 #dead-h { "Dead letters" }
            @if dead.is_empty() {
                p { "None: every event was delivered or is still being retried." }
            } @else {
                form method="post" action={ "/destinations/" (v.id) } {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="action" value="replay";
                    button.primary type="submit" { "Replay " (v.stats.dead_letters) " dead letters" }
                }
                div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table {
                    caption { "Newest " (dead.len()) " dead letters" }
                    thead { tr {
                        th scope="col" { "Event" } th scope="col" { "messageId" }
                        th.num scope="col" { "Attempts" } th scope="col" { "Receiver's answer" }
                        th scope="col" { "Failed at" }
                    } }
                    tbody { @for d in &dead {
                        tr {
                            td { (d.event.get("event").and_then(Value::as_str)
                                .or_else(|| d.event.get("type").and_then(Value::as_str)).unwrap_or("?"))
                                @if d.replaying { " " (badge("warn", "replaying")) } }
                            td { code { (d.message_id) } }
                            td.num { (d.attempts) }
                            td {
                                (d.error)
                                @if let Some(s) = d.last_status { br; "HTTP " (s) }
                                @if let Some(r) = &d.last_response { pre { (r) } }
                            }
                            td { (when(&d.failed_at.to_rfc3339())) }
                        }
                    } }
                } }
            }
        }
        section aria-labelledby="manage-h" {
            h2 #manage-h { "Manage" }
            form.inline method="post" action={ "/destinations/" (v.id) } {
                input type="hidden" name="csrf" value=(signed.csrf);
                @if v.enabled {
                    input type="hidden" name="action" value="disable";
                    button type="submit" { "Pause delivery" }
                } @else {
                    input type="hidden" name="action" value="enable";
                    button type="submit" { "Resume delivery" }
                }
            }
            details {
                summary { "Delete destination…" }
                form method="post" action={ "/destinations/" (v.id) } {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="action" value="delete";
                    p { "Delivery stops and its dead letters are removed." }
                    button.danger type="submit" { "Yes, delete " (v.name) }
                }
            }
        }
    };
    html(
        StatusCode::OK,
        layout::page(
            Some(&signed),
            Nav::Destinations,
            &format!("{} — destination", v.name),
            body,
        ),
    )
}

/// `POST /destinations/{id}`: `action=replay|enable|disable|delete`.
pub(crate) async fn action(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(r) = check_form(&headers, &signed, &form) {
        return r.into_response();
    }
    let e = &state.destinations;
    let to = match form.get("action") {
        "replay" => e
            .replay(
                &id,
                ReplayRequest {
                    dead_letters: true,
                    ..Default::default()
                },
            )
            .await
            .map(|o| format!("/destinations/{id}?replayed={}", o.queued)),
        "enable" | "disable" => {
            let enabled = form.get("action") == "enable";
            let patch = PatchDestination {
                enabled: Some(enabled),
                ..Default::default()
            };
            e.patch(&id, patch).await.map(|_| {
                format!(
                    "/destinations/{id}?done={}",
                    if enabled { "enabled" } else { "disabled" }
                )
            })
        }
        "delete" => e.delete(&id).await.map(|_| "/destinations".to_string()),
        other => {
            return error_page(
                &signed,
                ApiError::bad("invalid_action", format!("unknown action {other:?}")),
            );
        }
    };
    match to {
        Ok(to) => see_other(&to),
        Err(err) => error_page(&signed, ApiError::from(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_messages_point_at_their_field() {
        assert_eq!(
            field_of("webhook", "webhook settings: url is not a valid URL"),
            "webhook-url"
        );
        assert_eq!(
            field_of("webhook", "webhook settings: missing field `url`"),
            "webhook-url"
        );
        assert_eq!(
            field_of("webhook", "webhook settings: invalid header name \"a b\""),
            "webhook-headers"
        );
        assert_eq!(
            field_of("segment", "segment settings: missing field `write_key`"),
            "segment-write_key"
        );
        assert_eq!(field_of("webhook", "name is required"), "name");
    }
}

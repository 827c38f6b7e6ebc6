//! The page frame every console page shares (skip link, landmarks, navigation,
//! sign-out form) and small rendering helpers (relative times, status badges, form
//! fields with their errors tied to them).

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::assets;
use super::session::Signed;

/// Which navigation entry is the current page.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// Sources and everything under a source.
    Sources,
    /// Destinations.
    Destinations,
    /// Warehouse and SQL.
    Warehouse,
    /// The email report.
    Report,
    /// No entry (sign-in).
    None,
}

/// A whole page. `title` is unique per page (it names the thing shown).
pub fn page(signed: Option<&Signed>, nav: Nav, title: &str, body: Markup) -> Markup {
    let entries = [
        (Nav::Sources, "/sources", "Sources"),
        (Nav::Destinations, "/destinations", "Destinations"),
        (Nav::Warehouse, "/warehouse", "Warehouse"),
        (Nav::Report, "/reports/email", "Email report"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tributary" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href=(assets::css_href());
                script src=(assets::js_href()) defer {}
            }
            body {
                a.skip href="#main" { "Skip to main content" }
                header.top {
                    a.brand href="/" { "Tributary" }
                    @if let Some(s) = signed {
                        nav aria-label="Main" {
                            ul {
                                @for (n, href, label) in entries {
                                    li {
                                        @if n == nav {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        form.signout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main #main tabindex="-1" {
                    (body)
                }
            }
        }
    }
}

/// "2 minutes ago" for a time relative to `now`.
pub fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - at).num_seconds();
    let plural = |n: i64, unit: &str| {
        if n == 1 {
            format!("1 {unit} ago")
        } else {
            format!("{n} {unit}s ago")
        }
    };
    match s {
        i64::MIN..=4 => "just now".to_string(),
        5..=59 => plural(s, "second"),
        60..=3599 => plural(s / 60, "minute"),
        3600..=86_399 => plural(s / 3600, "hour"),
        _ => plural(s / 86_400, "day"),
    }
}

/// An ISO-8601 time as "2026-12-02 01:07 UTC" (or the text as given when it does
/// not parse).
pub fn when(text: &str) -> String {
    DateTime::parse_from_rfc3339(text)
        .map(|t| {
            t.with_timezone(&Utc)
                .format("%Y-%m-%d %H:%M UTC")
                .to_string()
        })
        .unwrap_or_else(|_| text.to_string())
}

/// The symbol shown before a status word of `kind`.
pub fn symbol(kind: &str) -> &'static str {
    match kind {
        "ok" => "●",
        "warn" => "◐",
        "bad" => "✕",
        _ => "○",
    }
}

/// A status badge: a symbol and a word, never colour alone.
pub fn badge(kind: &str, text: &str) -> Markup {
    badge_field(kind, text, None)
}

/// A badge whose symbol and word a polling script may replace (`data-field`
/// `NAME_symbol` and `NAME`, class from `NAME_class`).
pub fn badge_field(kind: &str, text: &str, field: Option<&str>) -> Markup {
    html! {
        span class={ "badge badge-" (kind) } {
            span aria-hidden="true" data-field=[field.map(|f| format!("{f}_symbol"))] { (symbol(kind)) " " }
            span data-field=[field] { (text) }
        }
    }
}

/// A labelled text input with its hint and error tied to it by `aria-describedby`.
pub struct Field<'a> {
    /// `name` and `id`.
    pub name: &'a str,
    /// The visible label.
    pub label: &'a str,
    /// Current value.
    pub value: &'a str,
    /// A hint under the label.
    pub hint: Option<&'a str>,
    /// The error for this field, if any.
    pub error: Option<&'a str>,
    /// `type` attribute.
    pub kind: &'a str,
    /// Whether the field is required.
    pub required: bool,
}

impl<'a> Field<'a> {
    /// A required text field.
    pub fn text(name: &'a str, label: &'a str, value: &'a str) -> Self {
        Field {
            name,
            label,
            value,
            hint: None,
            error: None,
            kind: "text",
            required: true,
        }
    }

    /// Renders it.
    pub fn render(&self) -> Markup {
        let hint_id = format!("{}-hint", self.name);
        let err_id = format!("{}-error", self.name);
        let mut described = Vec::new();
        if self.hint.is_some() {
            described.push(hint_id.clone());
        }
        described.push(err_id.clone());
        let described = described.join(" ");
        html! {
            div.field {
                label for=(self.name) {
                    (self.label)
                    @if !self.required { span.optional { " (optional)" } }
                }
                @if let Some(h) = self.hint { p.hint id=(hint_id) { (h) } }
                input id=(self.name) name=(self.name) type=(self.kind) value=(self.value)
                    required[self.required]
                    aria-invalid=[self.error.map(|_| "true")]
                    aria-describedby=(described);
                p.error id=(err_id) aria-live="polite" {
                    @if let Some(e) = self.error { (e) }
                }
            }
        }
    }
}

/// A list of errors at the top of a form, each a link to its field.
pub fn error_summary(errors: &[(&str, String)]) -> Markup {
    html! {
        @if !errors.is_empty() {
            div.error-summary role="alert" tabindex="-1" {
                h2 { "There is a problem" }
                ul {
                    @for (field, msg) in errors {
                        li { a href={ "#" (field) } { (msg) } }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_like_a_person_would_say_them() {
        let now = Utc::now();
        assert_eq!(ago(now, now), "just now");
        assert_eq!(
            ago(now - chrono::Duration::seconds(30), now),
            "30 seconds ago"
        );
        assert_eq!(
            ago(now - chrono::Duration::seconds(61), now),
            "1 minute ago"
        );
        assert_eq!(
            ago(now - chrono::Duration::seconds(150), now),
            "2 minutes ago"
        );
        assert_eq!(ago(now - chrono::Duration::hours(5), now), "5 hours ago");
        assert_eq!(ago(now - chrono::Duration::days(3), now), "3 days ago");
    }
}

//! ActiveCampaign's reports read as [`Activity`]s: what one campaign's v1 report
//! pages (`campaign_report_*_list`) say each recipient did, plus the campaign facts
//! every event carries ([`CampaignInfo`], from v3 `campaigns`, `campaigns/{id}/links`
//! and `messages/{id}`).
//!
//! Rules (DESIGN.md §5):
//! - **Delivered**: every recipient in the open list or the unopen list whose email
//!   is not in the bounce list is `Email Delivered` at the campaign's send time
//!   (`sdate`, else `ldate`).
//! - Opens, clicks (one per contact and link: v1 gives one row per contact and link
//!   with a count `times`, and its `tstamp`), bounces (`type` hard/soft, `code`,
//!   `descript`), unsubscribes (`unsubreason`; Marked as Spam by the webhook rule)
//!   and forwards map through the webhook's own mapping, so a webhook and the API
//!   give the same `messageId` for the same event.
//! - Times: `tstamp_iso` (with its offset) when present, else `tstamp` read in the
//!   account's UTC offset ([`AccountZone`]); `0000-00-00…` is missing.
//!
//! Pure: no I/O.

use std::collections::HashSet;

use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::webhook::{Activity, ActivityKind, parse_date_time_in};

/// The v1 reports a campaign is read from, in the order the sync reads them (the
/// bounce list first: a delivery is a recipient without a bounce).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// `campaign_report_bounce_list`.
    Bounces,
    /// `campaign_report_open_list`.
    Opens,
    /// `campaign_report_unopen_list` (recipients who did not open: deliveries only).
    Unopens,
    /// `campaign_report_link_list`.
    Links,
    /// `campaign_report_unsubscription_list`.
    Unsubscribes,
    /// `campaign_report_forward_list`.
    Forwards,
}

impl Report {
    /// Every report, in reading order.
    pub const ALL: [Report; 6] = [
        Report::Bounces,
        Report::Opens,
        Report::Unopens,
        Report::Links,
        Report::Unsubscribes,
        Report::Forwards,
    ];

    /// The v1 `api_action`.
    pub fn action(self) -> &'static str {
        match self {
            Report::Bounces => "campaign_report_bounce_list",
            Report::Opens => "campaign_report_open_list",
            Report::Unopens => "campaign_report_unopen_list",
            Report::Links => "campaign_report_link_list",
            Report::Unsubscribes => "campaign_report_unsubscription_list",
            Report::Forwards => "campaign_report_forward_list",
        }
    }

    /// The activities on one page of this report. `bounced` holds the campaign's
    /// bounced emails (lowercase), read before any delivery is decided.
    pub fn activities(
        self,
        rows: &[Map<String, Value>],
        campaign: &CampaignInfo,
        zone: &AccountZone,
        bounced: &HashSet<String>,
    ) -> Vec<Activity> {
        let mut out = Vec::new();
        for row in rows {
            match self {
                Report::Bounces => {
                    let mut a = campaign.activity(ActivityKind::Bounce, row, zone);
                    a.bounce_type = text(row, "type").map(|t| t.to_ascii_lowercase());
                    a.bounce_code = text(row, "code");
                    a.bounce_description = text(row, "descript").or_else(|| text(row, "reason"));
                    out.push(a);
                }
                Report::Opens | Report::Unopens => {
                    if self == Report::Opens {
                        out.push(campaign.activity(ActivityKind::Open, row, zone));
                    }
                    let email = text(row, "email").map(|e| e.to_lowercase());
                    if email.as_ref().is_some_and(|e| !bounced.contains(e)) {
                        let mut d = campaign.activity(ActivityKind::Delivered, row, zone);
                        d.at = campaign.sent_at;
                        out.push(d);
                    }
                }
                Report::Links => {
                    let url = text(row, "link");
                    // The "open" link is the read-tracking pixel, not a click.
                    if url.as_deref() == Some("open") {
                        continue;
                    }
                    let infos: Vec<&Map<String, Value>> = match row.get("info") {
                        Some(Value::Array(a)) => a.iter().filter_map(Value::as_object).collect(),
                        Some(Value::Object(o)) => o.values().filter_map(Value::as_object).collect(),
                        _ => Vec::new(),
                    };
                    for info in infos {
                        let mut a = campaign.activity(ActivityKind::Click, info, zone);
                        a.link_id = text(row, "id").or_else(|| text(row, "linkid"));
                        a.link_url = url.clone();
                        out.push(a);
                    }
                }
                Report::Unsubscribes => {
                    let mut a = campaign.activity(ActivityKind::Unsubscribe, row, zone);
                    a.reason = text(row, "unsubreason").or_else(|| text(row, "reason"));
                    out.push(a);
                }
                Report::Forwards => {
                    let mut a = campaign.activity(ActivityKind::Forward, row, zone);
                    a.forward_count = text(row, "times").or_else(|| text(row, "count"));
                    out.push(a);
                }
            }
        }
        out
    }
}

/// The bounced emails on a bounce-list page, lowercase.
pub fn bounced_emails(rows: &[Map<String, Value>]) -> impl Iterator<Item = String> + '_ {
    rows.iter()
        .filter_map(|r| text(r, "email"))
        .map(|e| e.to_lowercase())
}

/// What every event of a campaign carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CampaignInfo {
    /// `id`.
    pub id: String,
    /// `name`.
    pub name: Option<String>,
    /// `type` (`single`, …).
    pub kind: Option<String>,
    /// The campaign's message id (`email_id`), from its links.
    pub message_id: Option<String>,
    /// The message subject (`email_subject`).
    pub subject: Option<String>,
    /// When it was sent (`sdate`, else `ldate`).
    pub sent_at: Option<DateTime<Utc>>,
    /// When it last changed (the latest of `sdate`, `ldate`, `mdate`).
    pub changed_at: Option<DateTime<Utc>>,
}

impl CampaignInfo {
    /// Reads a v3 campaign object (times in `zone` when naive).
    pub fn from_v3(c: &Map<String, Value>, zone: &AccountZone) -> Option<CampaignInfo> {
        let id = text(c, "id")?;
        let at = |k: &str| text(c, k).and_then(|t| zone.parse(&t));
        let sent_at = at("sdate").or_else(|| at("ldate"));
        let changed_at = [at("sdate"), at("ldate"), at("mdate")]
            .into_iter()
            .flatten()
            .max();
        Some(CampaignInfo {
            id,
            name: text(c, "name"),
            kind: text(c, "type"),
            message_id: None,
            subject: None,
            sent_at,
            changed_at,
        })
    }

    fn activity(
        &self,
        kind: ActivityKind,
        row: &Map<String, Value>,
        zone: &AccountZone,
    ) -> Activity {
        let mut a = Activity::new(kind);
        a.at = text(row, "tstamp_iso")
            .and_then(|t| zone.parse(&t))
            .or_else(|| text(row, "tstamp").and_then(|t| zone.parse(&t)));
        a.contact_id = text(row, "subscriberid").or_else(|| text(row, "contact"));
        a.email = text(row, "email");
        a.campaign_id = Some(self.id.clone());
        a.campaign_name = self.name.clone();
        a.campaign_type = self.kind.clone();
        a.message_id = self.message_id.clone().or_else(|| text(row, "messageid"));
        a.subject = self.subject.clone();
        a
    }
}

/// The account's UTC offset, for naive timestamps.
///
/// How it is learnt: `settings.api.utc_offset` when set (e.g. `"-05:00"`);
/// otherwise the offset of the first v3 campaign timestamp that carries one (AC
/// writes v3 times in the account's zone, e.g. `2024-02-28T07:04:13-06:00`);
/// otherwise UTC. A fixed offset: naive times on the other side of a DST change are
/// read one hour off (v1 rows carry `tstamp_iso` with the right offset, which wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountZone(pub FixedOffset);

impl Default for AccountZone {
    fn default() -> Self {
        AccountZone(FixedOffset::east_opt(0).expect("zero offset"))
    }
}

impl AccountZone {
    /// A configured offset: `Z`, `UTC`, `+HH:MM`, `-HHMM` or `-HH`.
    pub fn parse_offset(raw: &str) -> Option<AccountZone> {
        let s = raw.trim();
        if s.eq_ignore_ascii_case("z") || s.eq_ignore_ascii_case("utc") {
            return Some(AccountZone::default());
        }
        let (sign, rest) = match s.as_bytes().first()? {
            b'+' => (1, &s[1..]),
            b'-' => (-1, &s[1..]),
            _ => return None,
        };
        let digits: String = rest.chars().filter(|c| *c != ':').collect();
        if !digits.bytes().all(|b| b.is_ascii_digit()) || !(digits.len() == 2 || digits.len() == 4)
        {
            return None;
        }
        let h: i32 = digits[..2].parse().ok()?;
        let m: i32 = if digits.len() == 4 {
            digits[2..].parse().ok()?
        } else {
            0
        };
        if h > 14 || m > 59 {
            return None;
        }
        FixedOffset::east_opt(sign * (h * 3600 + m * 60)).map(AccountZone)
    }

    /// The offset a timestamp carries, if any (`…-06:00`, `…+0530`, `…Z`).
    pub fn of_timestamp(raw: &str) -> Option<AccountZone> {
        let s = raw.trim();
        DateTime::parse_from_rfc3339(s)
            .ok()
            .or_else(|| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z").ok())
            .or_else(|| DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%z").ok())
            .map(|t| AccountZone(*t.offset()))
    }

    /// The zone learnt from v3 campaigns: the offset of the first `sdate`, `ldate`,
    /// `mdate` or `cdate` carrying one.
    pub fn learn(campaigns: &[Map<String, Value>]) -> Option<AccountZone> {
        campaigns.iter().find_map(|c| {
            ["sdate", "ldate", "mdate", "cdate"]
                .iter()
                .filter_map(|k| text(c, k))
                .find_map(|t| AccountZone::of_timestamp(&t))
        })
    }

    /// An ActiveCampaign timestamp as an instant: its own offset when it has one,
    /// else read in this zone; `0000-00-00…`, blanks and garbage are `None`.
    pub fn parse(&self, raw: &str) -> Option<DateTime<Utc>> {
        parse_date_time_in(raw, self.0)
    }
}

/// A row value as trimmed non-blank text (numbers as their decimal form).
fn text(row: &Map<String, Value>, key: &str) -> Option<String> {
    match row.get(key)? {
        Value::String(s) => Some(s.trim()).filter(|s| !s.is_empty()).map(str::to_owned),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(v: Value) -> Vec<Map<String, Value>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_object().unwrap().clone())
            .collect()
    }

    fn campaign() -> CampaignInfo {
        CampaignInfo {
            id: "42".into(),
            name: Some("March".into()),
            kind: Some("single".into()),
            message_id: Some("17".into()),
            subject: Some("Spring".into()),
            sent_at: "2024-02-28T12:00:00Z".parse().ok(),
            changed_at: None,
        }
    }

    #[test]
    fn zone_offsets() {
        let z = AccountZone::parse_offset("-05:00").unwrap();
        assert_eq!(z.0.local_minus_utc(), -5 * 3600);
        assert_eq!(
            AccountZone::parse_offset("+0530")
                .unwrap()
                .0
                .local_minus_utc(),
            19800
        );
        assert_eq!(
            AccountZone::parse_offset("utc"),
            Some(AccountZone::default())
        );
        for bad in ["", "5", "+5:00", "+15:00", "-05:60", "EST"] {
            assert_eq!(AccountZone::parse_offset(bad), None, "{bad:?}");
        }
        let learnt = AccountZone::learn(&rows(json!([
            {"sdate": "0000-00-00 00:00:00", "cdate": "2024-02-28T07:04:13-06:00"}
        ])))
        .unwrap();
        assert_eq!(learnt.0.local_minus_utc(), -6 * 3600);
    }

    #[test]
    fn opens_give_opens_and_deliveries_except_bounced() {
        let zone = AccountZone::parse_offset("-06:00").unwrap();
        let page = rows(json!([
            {"subscriberid": "1", "email": "a@example.com", "tstamp": "2024-02-28 07:04:13", "times": "2"},
            {"subscriberid": "2", "email": "B@example.com", "tstamp": "2024-02-28 08:00:00",
             "tstamp_iso": "2024-02-28T08:00:00+00:00"},
        ]));
        let bounced: HashSet<String> = ["b@example.com".to_string()].into();
        let acts = Report::Opens.activities(&page, &campaign(), &zone, &bounced);
        let kinds: Vec<ActivityKind> = acts.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            [
                ActivityKind::Open,
                ActivityKind::Delivered,
                ActivityKind::Open
            ]
        );
        assert_eq!(
            acts[0].at,
            "2024-02-28T13:04:13Z".parse().ok(),
            "naive read at -06:00"
        );
        assert_eq!(acts[1].at, campaign().sent_at, "delivered at the send time");
        assert_eq!(
            acts[2].at,
            "2024-02-28T08:00:00Z".parse().ok(),
            "tstamp_iso wins"
        );
    }

    #[test]
    fn links_skip_the_read_tracker_and_keep_ids() {
        let page = rows(json!([
            {"id": "1", "link": "open", "info": [{"email": "a@example.com", "tstamp": "2024-02-28 07:00:00"}]},
            {"id": "5", "link": "https://example.com/x", "info": {"0": {"subscriberid": "1",
              "email": "a@example.com", "tstamp": "2024-02-28 07:05:00", "times": "3"}}},
        ]));
        let acts =
            Report::Links.activities(&page, &campaign(), &AccountZone::default(), &HashSet::new());
        assert_eq!(acts.len(), 1);
        assert_eq!(acts[0].link_id.as_deref(), Some("5"));
        assert_eq!(acts[0].link_url.as_deref(), Some("https://example.com/x"));
    }

    #[test]
    fn bounces_and_zero_dates() {
        let page = rows(
            json!([{"email": "c@example.com", "subscriberid": "3", "tstamp": "0000-00-00",
            "type": "Hard", "code": "5.1.1", "descript": "mailbox unavailable"}]),
        );
        let acts = Report::Bounces.activities(
            &page,
            &campaign(),
            &AccountZone::default(),
            &HashSet::new(),
        );
        assert_eq!(acts[0].at, None);
        assert_eq!(acts[0].bounce_type.as_deref(), Some("hard"));
        assert_eq!(bounced_emails(&page).collect::<Vec<_>>(), ["c@example.com"]);
    }
}

//! Content-derived `messageId`s for ActiveCampaign events.
//!
//! ActiveCampaign delivers webhooks at least once and carries no event id, so the
//! `messageId` is a hash of what identifies the event; the event log dedupes on it, and
//! repeated deliveries (and API backfills that build the same [`DedupeKey`]) collapse
//! into one row.
//!
//! Invariants:
//! - Same key ⇒ same id, across processes and releases (the hash input is versioned;
//!   changing it is a breaking change for dedupe and needs a new version tag).
//! - The id is `ac-` + 32 lowercase hex characters (128 bits of SHA-256): 35 characters,
//!   well under Segment's 100-character limit.
//! - Parts are length-prefixed, so no two different keys share a hash input. Exactly:
//!   SHA-256 over, for each part, its byte length as a little-endian `u64` then its
//!   bytes; the parts are the version tag `tributary-activecampaign/message-id/v2`,
//!   the lowercased trimmed type, the trimmed contact id, the lowercased trimmed
//!   contact email, the trimmed campaign id, message id and link id, the date (below),
//!   the number of extras in decimal, then each extra.
//! - Two recipients are two events: the recipient's email is part of the key, so
//!   opens of one campaign message by five contacts in the same second stay five even
//!   when ActiveCampaign sends no `contact[id]`. (v1 had no email: v2 changed every
//!   ActiveCampaign `messageId`; events stored under v1 ids do not dedupe against
//!   redeliveries hashed with v2.)
//! - A bounce is hashed with an empty date (the mapping passes none): a message
//!   bounces once per recipient, and the API knows only the bounce's date.
//! - `date_time` is hashed as the UTC instant when it parses, so `07:04:13-06:00` and
//!   `13:04:13Z` are the same event (hashed in [`segment_timestamp`] form); otherwise the
//!   trimmed raw text is hashed.

use sha2::{Digest, Sha256};

use super::time::{parse_date_time, segment_timestamp};

/// Prefix of every ActiveCampaign-derived `messageId`.
pub const MESSAGE_ID_PREFIX: &str = "ac-";

/// Version tag mixed into every hash; see the module invariants.
const HASH_VERSION: &str = "tributary-activecampaign/message-id/v2";

/// What identifies one ActiveCampaign event. Absent parts are empty strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupeKey<'a> {
    /// The webhook `type` (`open`, `click`, …); compared case-insensitively.
    pub raw_type: &'a str,
    /// `contact[id]`.
    pub contact_id: &'a str,
    /// `contact[email]`, the recipient; compared case-insensitively.
    pub email: &'a str,
    /// `campaign[id]`.
    pub campaign_id: &'a str,
    /// `campaign[message][id]`.
    pub message_id: &'a str,
    /// `link[id]`.
    pub link_id: &'a str,
    /// `date_time`, as sent.
    pub date_time: &'a str,
    /// Further parts that tell apart distinct events sharing all of the above (e.g. the
    /// tag of a `contact_tag_added`, the lists of an `unsubscribe`); order matters.
    pub extra: Vec<&'a str>,
}

impl DedupeKey<'_> {
    /// The `messageId` for this key: `ac-` + 32 hex characters.
    pub fn message_id(&self) -> String {
        let mut hasher = Sha256::new();
        let mut part = |s: &str| {
            hasher.update((s.len() as u64).to_le_bytes());
            hasher.update(s.as_bytes());
        };
        part(HASH_VERSION);
        part(&self.raw_type.trim().to_ascii_lowercase());
        part(self.contact_id.trim());
        part(&self.email.trim().to_lowercase());
        part(self.campaign_id.trim());
        part(self.message_id.trim());
        part(self.link_id.trim());
        match parse_date_time(self.date_time) {
            Some(t) => part(&segment_timestamp(t)),
            None => part(self.date_time.trim()),
        }
        part(&self.extra.len().to_string());
        for e in &self.extra {
            part(e);
        }
        let digest = hasher.finalize();
        format!("{MESSAGE_ID_PREFIX}{}", hex::encode(&digest[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DedupeKey<'static> {
        DedupeKey {
            raw_type: "click",
            contact_id: "36",
            email: "ann.lee@example.com",
            campaign_id: "42",
            message_id: "17",
            link_id: "9",
            date_time: "2024-02-28T07:05:02-06:00",
            extra: vec![],
        }
    }

    #[test]
    fn is_stable_and_well_formed() {
        let id = key().message_id();
        assert_eq!(id, key().message_id());
        assert_eq!(id.len(), 35);
        assert!(id.starts_with("ac-"));
        assert!(
            id[3..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }

    #[test]
    fn pins_the_hash() {
        // Computed independently (Python hashlib) from the documented encoding. If this
        // changes, every stored ActiveCampaign event stops deduping against new ones.
        assert_eq!(key().message_id(), "ac-322beb74e4b672eecfec3f0766a8bb19");
    }

    #[test]
    fn each_part_changes_the_id() {
        let base = key().message_id();
        let variants = [
            DedupeKey {
                raw_type: "open",
                ..key()
            },
            DedupeKey {
                contact_id: "37",
                ..key()
            },
            DedupeKey {
                email: "bob@example.com",
                ..key()
            },
            DedupeKey {
                campaign_id: "43",
                ..key()
            },
            DedupeKey {
                message_id: "18",
                ..key()
            },
            DedupeKey {
                link_id: "10",
                ..key()
            },
            DedupeKey {
                date_time: "2024-02-28T07:05:03-06:00",
                ..key()
            },
            DedupeKey {
                extra: vec!["x"],
                ..key()
            },
        ];
        for v in variants {
            assert_ne!(v.message_id(), base, "{v:?}");
        }
    }

    #[test]
    fn parts_do_not_run_together() {
        let a = DedupeKey {
            contact_id: "3",
            campaign_id: "642",
            ..key()
        };
        let b = DedupeKey {
            contact_id: "36",
            campaign_id: "42",
            ..key()
        };
        assert_ne!(a.message_id(), b.message_id());
        let c = DedupeKey {
            extra: vec!["ab", "c"],
            ..key()
        };
        let d = DedupeKey {
            extra: vec!["a", "bc"],
            ..key()
        };
        assert_ne!(c.message_id(), d.message_id());
    }

    #[test]
    fn same_instant_in_another_offset_is_the_same_event() {
        let utc = DedupeKey {
            date_time: "2024-02-28T13:05:02Z",
            ..key()
        };
        assert_eq!(utc.message_id(), key().message_id());
    }

    #[test]
    fn ignores_case_of_type_and_whitespace_of_ids() {
        let k = DedupeKey {
            raw_type: " CLICK",
            contact_id: "36 ",
            email: " Ann.Lee@Example.com",
            ..key()
        };
        assert_eq!(k.message_id(), key().message_id());
    }
}

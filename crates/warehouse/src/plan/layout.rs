//! Table kinds and the fixed columns each kind's tables have from creation
//! (segment-spec §3.4). Invariant: `id` is first in every kind; the lists never shrink.

use crate::types::ColumnType;

/// The kind of a loaded table; decides its fixed columns and how rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableKind {
    /// `tracks`.
    Tracks,
    /// A per-event table.
    Event,
    /// `identifies`.
    Identifies,
    /// `users` (upserted on `id`).
    Users,
    /// `pages`.
    Pages,
    /// `screens`.
    Screens,
    /// `groups`.
    Groups,
    /// `aliases`.
    Aliases,
}

use ColumnType::{Text, Timestamp};

const TRACK_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("event", Text),
    ("event_text", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const IDENTIFY_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const PAGE_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("name", Text),
    ("category", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const GROUP_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("group_id", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const ALIAS_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("previous_id", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const USER_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("received_at", Timestamp),
    ("uuid_ts", Timestamp),
];

impl TableKind {
    /// The columns every table of this kind has from creation, in order.
    pub fn fixed_columns(self) -> &'static [(&'static str, ColumnType)] {
        match self {
            TableKind::Tracks | TableKind::Event => TRACK_COLUMNS,
            TableKind::Identifies => IDENTIFY_COLUMNS,
            TableKind::Users => USER_COLUMNS,
            TableKind::Pages | TableKind::Screens => PAGE_COLUMNS,
            TableKind::Groups => GROUP_COLUMNS,
            TableKind::Aliases => ALIAS_COLUMNS,
        }
    }
}

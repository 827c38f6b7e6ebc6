//! Names of warehouse schemas, tables and columns, and how they are quoted.
//!
//! Every table and column name is derived from user input (event names, property and
//! trait keys), so this module owns the rules that make any input a safe, stable
//! identifier:
//! 1. go-snakecase ([`tributary_model::snake::snakecase`]) of the raw name (for
//!    flattened keys, of the joined path);
//! 2. a name that snake-cases to nothing (`"🎉"`) becomes `_` + 8 hex digits of the
//!    SHA-256 of the raw name;
//! 3. a `_` prefix when the name starts with a digit (Segment: `3doctors` → `_3doctors`),
//!    collides with a reserved column of its table (`user_id`, `timestamp`, …, or any
//!    `context_…` name for a property or trait), collides with a system table (an event
//!    named "Tracks" → `_tracks`) or uses SQLite's reserved `sqlite_` prefix — the data
//!    is kept, under the prefixed name;
//! 4. names longer than [`MAX_IDENT_BYTES`] (PostgreSQL's 63) are cut to 54 bytes plus
//!    `_` and 8 hex digits of the SHA-256 of the full name.
//!
//! Invariants: the result is always `[a-z0-9_]`, 1–63 bytes, a pure function of the
//! input (same name on every node, backend and release); snake-cased names never start
//! with `_`, so a prefixed name cannot collide with an unprefixed one. Identifiers are
//! nevertheless always emitted through [`quote`].

use sha2::{Digest, Sha256};
use tributary_model::snake::snakecase;

/// Longest identifier in bytes (PostgreSQL's `NAMEDATALEN - 1`); the same limit is used
/// on SQLite so a schema has the same names on both backends.
pub const MAX_IDENT_BYTES: usize = 63;

/// Tables the loader creates itself; an event whose name snake-cases to one of these
/// is loaded into `_<name>` instead.
pub const SYSTEM_TABLES: &[&str] = &[
    "tracks",
    "identifies",
    "users",
    "pages",
    "screens",
    "groups",
    "aliases",
    "accounts",
    DISCARDS_TABLE,
    STATE_TABLE,
];

/// The per-schema table of values that could not be loaded.
pub const DISCARDS_TABLE: &str = "tributary_discards";

/// The per-schema loader state table (SQLite backend).
pub const STATE_TABLE: &str = "tributary_state";

/// Schema names a source may not use: SQL keywords (a schema named `select` or
/// `order` needs quoting in every query a user writes), SQLite's `main`/`temp`,
/// PostgreSQL's `public`, `information_schema` and `pg_*`, and `tributary` (the
/// loader's own state schema). The one list: the server validates sources with
/// [`validate_schema_name`] too.
pub const RESERVED_SCHEMAS: &[&str] = &[
    "all",
    "and",
    "any",
    "as",
    "asc",
    "attach",
    "between",
    "by",
    "case",
    "check",
    "column",
    "constraint",
    "create",
    "cross",
    "default",
    "delete",
    "desc",
    "detach",
    "distinct",
    "drop",
    "else",
    "end",
    "except",
    "exists",
    "false",
    "for",
    "foreign",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "in",
    "index",
    "information_schema",
    "inner",
    "insert",
    "intersect",
    "into",
    "is",
    "join",
    "left",
    "like",
    "limit",
    "main",
    "natural",
    "not",
    "null",
    "offset",
    "on",
    "or",
    "order",
    "outer",
    "pg_catalog",
    "pg_temp",
    "pg_toast",
    "primary",
    "public",
    "references",
    "right",
    "select",
    "set",
    "table",
    "temp",
    "temporary",
    "then",
    "to",
    "tributary",
    "true",
    "union",
    "unique",
    "update",
    "user",
    "using",
    "values",
    "when",
    "where",
    "with",
];

/// Checks a schema name: `[a-z_][a-z0-9_]*`, at most 63 bytes, not reserved
/// ([`RESERVED_SCHEMAS`], `pg_…`, `sqlite_…`). Sources should be validated with this
/// when they are created; the loader skips records whose schema fails it.
pub fn validate_schema_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let Some(first) = bytes.first() else {
        return Err("schema name is empty".into());
    };
    if name.len() > MAX_IDENT_BYTES {
        return Err(format!(
            "schema name is longer than {MAX_IDENT_BYTES} bytes"
        ));
    }
    if !(first.is_ascii_lowercase() || *first == b'_')
        || !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
    {
        return Err(
            "schema must match [a-z_][a-z0-9_]* (lowercase letters, digits, underscores; not starting with a digit)"
                .into(),
        );
    }
    if RESERVED_SCHEMAS.contains(&name) || name.starts_with("pg_") || name.starts_with("sqlite_") {
        return Err(format!(
            "schema {name:?} is a reserved word; choose another name"
        ));
    }
    Ok(())
}

/// Quotes an identifier for SQL (SQLite and PostgreSQL): wrapped in `"`, embedded `"`
/// doubled. Every identifier the loader emits goes through this.
pub fn quote(ident: &str) -> String {
    let mut s = String::with_capacity(ident.len() + 2);
    s.push('"');
    for c in ident.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// The table an event (track) is loaded into, besides `tracks`.
///
/// ```
/// use tributary_warehouse::naming::event_table;
/// assert_eq!(event_table("Email Delivered"), "email_delivered");
/// assert_eq!(event_table("Tracks"), "_tracks");
/// ```
pub fn event_table(event: &str) -> String {
    finish(event, snakecase(event).into_owned(), |name| {
        SYSTEM_TABLES.contains(&name)
    })
}

/// The column a flattened property, trait or context path is loaded into.
///
/// `path` is the raw joined path ([`tributary_model::flatten::flatten`]); `reserved`
/// are the fixed columns of the target table. For properties and traits
/// (`is_context == false`) any name starting with `context_` (or equal to `context`)
/// is reserved as well, so a property cannot shadow a context column.
pub fn column_name(path: &str, reserved: &[&str], is_context: bool) -> String {
    column_name_by(path, |name| reserved.contains(&name), is_context)
}

/// [`column_name`] with the reserved names given as a predicate.
pub(crate) fn column_name_by(
    path: &str,
    is_reserved: impl Fn(&str) -> bool,
    is_context: bool,
) -> String {
    finish(path, snakecase(path).into_owned(), |name| {
        is_reserved(name) || (!is_context && (name == "context" || name.starts_with("context_")))
    })
}

fn finish(raw: &str, snaked: String, collides: impl Fn(&str) -> bool) -> String {
    let mut name = if snaked.is_empty() {
        format!("_{}", short_hash(raw.as_bytes()))
    } else if snaked.as_bytes()[0].is_ascii_digit()
        || snaked.starts_with("sqlite_")
        || collides(&snaked)
    {
        format!("_{snaked}")
    } else {
        snaked
    };
    if name.len() > MAX_IDENT_BYTES {
        let hash = short_hash(name.as_bytes());
        name.truncate(MAX_IDENT_BYTES - 9);
        name.push('_');
        name.push_str(&hash);
    }
    name
}

/// First 8 hex digits of the SHA-256 of `bytes`.
fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..4])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACK_RESERVED: &[&str] = &[
        "id",
        "anonymous_id",
        "user_id",
        "event",
        "event_text",
        "received_at",
        "sent_at",
        "timestamp",
        "original_timestamp",
        "uuid_ts",
    ];

    fn is_ident(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_IDENT_BYTES
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    #[test]
    fn event_tables_are_snake_cased() {
        assert_eq!(event_table("Email Delivered"), "email_delivered");
        assert_eq!(event_table("Email Link Clicked"), "email_link_clicked");
        assert_eq!(event_table("Order Completed"), "order_completed");
        assert_eq!(event_table("signed_up"), "signed_up");
        assert_eq!(event_table("Signed Up"), "signed_up");
    }

    #[test]
    fn events_named_like_system_tables_get_a_prefix() {
        assert_eq!(event_table("Tracks"), "_tracks");
        assert_eq!(event_table("Users"), "_users");
        assert_eq!(event_table("identifies"), "_identifies");
        assert_eq!(event_table("PAGES"), "_pages");
        assert_eq!(event_table("Tributary Discards"), "_tributary_discards");
        assert_eq!(event_table("tributary state"), "_tributary_state");
        assert_eq!(event_table("SQLite Master"), "_sqlite_master");
        // Not a system table: kept as is.
        assert_eq!(event_table("Tracks Viewed"), "tracks_viewed");
    }

    #[test]
    fn leading_digits_get_a_prefix() {
        assert_eq!(event_table("101 Account Update"), "_101_account_update");
        assert_eq!(column_name("3doctors", TRACK_RESERVED, false), "_3doctors");
    }

    #[test]
    fn reserved_columns_get_a_prefix_and_are_kept() {
        assert_eq!(column_name("user_id", TRACK_RESERVED, false), "_user_id");
        assert_eq!(column_name("userId", TRACK_RESERVED, false), "_user_id");
        assert_eq!(
            column_name("timestamp", TRACK_RESERVED, false),
            "_timestamp"
        );
        assert_eq!(column_name("event", TRACK_RESERVED, false), "_event");
        assert_eq!(column_name("ID", TRACK_RESERVED, false), "_id");
        assert_eq!(
            column_name("context_ip", TRACK_RESERVED, false),
            "_context_ip"
        );
        assert_eq!(column_name("context", TRACK_RESERVED, false), "_context");
        // Context paths are allowed to start with context_.
        assert_eq!(
            column_name("context_ip", TRACK_RESERVED, true),
            "context_ip"
        );
        // Not reserved for this table.
        assert_eq!(column_name("name", TRACK_RESERVED, false), "name");
        assert_eq!(
            column_name("campaignID", TRACK_RESERVED, false),
            "campaign_id"
        );
    }

    #[test]
    fn hostile_names_become_safe_identifiers() {
        for raw in [
            "\"; DROP TABLE tracks; --",
            "a\"b",
            "Robert'); DROP TABLE Students;--",
            "名前",
            "🎉🎉",
            "",
            "   ",
            "x\u{0}y",
            "`backtick`",
            "[brackets]",
        ] {
            let t = event_table(raw);
            assert!(is_ident(&t), "{raw:?} -> {t:?}");
            let c = column_name(raw, TRACK_RESERVED, false);
            assert!(is_ident(&c), "{raw:?} -> {c:?}");
        }
        assert_eq!(
            event_table("\"; DROP TABLE tracks; --"),
            "drop_table_tracks"
        );
    }

    #[test]
    fn names_without_ascii_letters_get_a_stable_hash_name() {
        let a = event_table("🎉");
        assert_eq!(a.len(), 9);
        assert!(a.starts_with('_'));
        assert_eq!(a, event_table("🎉"));
        assert_ne!(a, event_table("🎈"));
    }

    #[test]
    fn long_names_are_cut_deterministically_with_a_hash() {
        let long = "a".repeat(300);
        let t = event_table(&long);
        assert_eq!(t.len(), MAX_IDENT_BYTES);
        assert!(t.starts_with(&"a".repeat(54)));
        assert_eq!(&t[54..55], "_");
        assert!(t[55..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(t, event_table(&long));
        // Two long names with the same first 54 bytes stay distinct.
        let other = format!("{}b", "a".repeat(299));
        assert_ne!(t, event_table(&other));
        assert_eq!(event_table(&other).len(), MAX_IDENT_BYTES);
        // Exactly 63 bytes is kept as is.
        let exact = "b".repeat(63);
        assert_eq!(event_table(&exact), exact);
        let over = "b".repeat(64);
        assert_eq!(event_table(&over).len(), 63);
        // A 300-character camel-case property.
        let prop = "someVeryLongPropertyName".repeat(13);
        let c = column_name(&prop, TRACK_RESERVED, false);
        assert!(is_ident(&c), "{c}");
        assert_eq!(c.len(), MAX_IDENT_BYTES);
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote("tracks"), "\"tracks\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote(""), "\"\"");
    }

    #[test]
    fn validates_schema_names() {
        assert!(validate_schema_name("activecampaign").is_ok());
        assert!(validate_schema_name("_web").is_ok());
        assert!(validate_schema_name("web_2").is_ok());
        for bad in [
            "",
            "2web",
            "Web",
            "web-site",
            "web site",
            "main",
            "temp",
            "public",
            "tributary",
            "pg_catalog",
            "sqlite_x",
            "information_schema",
            "wéb",
            "select",
            "order",
            "user",
        ] {
            assert!(validate_schema_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_schema_name(&"a".repeat(63)).is_ok());
        assert!(validate_schema_name(&"a".repeat(64)).is_err());
    }
}

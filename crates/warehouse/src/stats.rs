//! Counters the loader keeps inside its own load transactions, so the console and
//! the API answer from a handful of rows instead of scanning the warehouse: per table
//! its row count and last load (`table_stats`), per UTC day of `received_at` the
//! events loaded into the schema (`day_stats`, the sources list's "events today"),
//! and the email report's counts (module [`crate::report`]): per campaign and count
//! (`email_totals`), per campaign, count and day (`email_daily`), per campaign and
//! link (`email_links`), each with the set of recipients already counted
//! (`email_seen`, `email_seen_daily`, `email_link_seen`) so distinct recipients stay
//! distinct across batches.
//!
//! Where: SQLite keeps them in each schema file as `tributary__…` tables (go-snakecase
//! names never contain `__`, so no event table can collide), committed with that
//! file's rows; PostgreSQL keeps them in the state schema keyed by `schema_name`,
//! in the batch's one transaction.
//!
//! Invariants: a counter moves only by rows the same transaction inserted (the
//! `id` guard and the position already decide that), so it equals what the raw
//! tables say at every commit. The email counters are computed by the same SQL
//! expressions the raw report uses ([`crate::report::ev_parts`]), over the rows just
//! inserted, so casts, NULL rules and collations are the warehouse's own. A schema
//! loaded before these counters existed is counted from its raw tables in the first
//! load transaction that meets it (marker `built` in `stats_meta`); until then reads
//! fall back to the raw tables. A load that widens a column of an email table or
//! adds its `campaign_id` or `timestamp` recomputes the email counters from the raw
//! tables in that transaction (the raw report's text of old rows may change).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::BackendKind;
use crate::naming::quote;
use crate::report::{EMAIL_TABLES, Sql, ev_parts, literal};
use crate::types::format_timestamp;

/// Prefix of the counter tables in a SQLite schema file.
pub(crate) const SQLITE_PREFIX: &str = "tributary__";

/// True for a table of a SQLite schema file that holds counters, not events.
pub(crate) fn is_counter_table(name: &str) -> bool {
    name.starts_with(SQLITE_PREFIX)
}

/// The temporary table of ids a load just inserted into email tables.
const NEW_IDS: &str = "tributary__new_ids";

/// Where the counters of one schema live.
pub(crate) struct Scope {
    kind: BackendKind,
    schema: String,
    /// PostgreSQL: the quoted state schema.
    state: String,
}

impl Scope {
    /// The counters of a SQLite schema file.
    pub(crate) fn sqlite(schema: &str) -> Scope {
        Scope {
            kind: BackendKind::Sqlite,
            schema: schema.to_string(),
            state: String::new(),
        }
    }

    /// The counters of `schema` in the PostgreSQL state schema `state` (quoted).
    pub(crate) fn postgres(schema: &str, state: &str) -> Scope {
        Scope {
            kind: BackendKind::Postgres,
            schema: schema.to_string(),
            state: state.to_string(),
        }
    }

    fn sql(&self) -> Sql {
        Sql {
            kind: self.kind,
            schema: self.schema.clone(),
        }
    }

    /// A counter table's qualified, quoted name.
    pub(crate) fn t(&self, name: &str) -> String {
        match self.kind {
            BackendKind::Sqlite => quote(&format!("{SQLITE_PREFIX}{name}")),
            BackendKind::Postgres => format!("{}.{}", self.state, quote(name)),
        }
    }

    /// The key column list prefix (`"schema_name", ` on PostgreSQL).
    fn kc(&self) -> &'static str {
        match self.kind {
            BackendKind::Sqlite => "",
            BackendKind::Postgres => "\"schema_name\", ",
        }
    }

    /// The key value prefix (the schema literal on PostgreSQL).
    fn kv(&self) -> String {
        match self.kind {
            BackendKind::Sqlite => String::new(),
            BackendKind::Postgres => format!("{}, ", literal(&self.schema)),
        }
    }

    /// A condition on the key (`alias."schema_name" = 'x' AND ` on PostgreSQL).
    fn kw(&self, alias: &str) -> String {
        match self.kind {
            BackendKind::Sqlite => String::new(),
            BackendKind::Postgres => {
                format!("{alias}\"schema_name\" = {} AND ", literal(&self.schema))
            }
        }
    }

    /// `WHERE` for a whole counter table of this schema.
    pub(crate) fn where_all(&self) -> String {
        match self.kind {
            BackendKind::Sqlite => String::new(),
            BackendKind::Postgres => {
                format!(" WHERE \"schema_name\" = {}", literal(&self.schema))
            }
        }
    }

    /// The temporary table of new ids, qualified.
    pub(crate) fn new_ids(&self) -> String {
        match self.kind {
            BackendKind::Sqlite => format!("\"temp\".{}", quote(NEW_IDS)),
            BackendKind::Postgres => format!("pg_temp.{}", quote(NEW_IDS)),
        }
    }

    /// Creates (empty) the temporary table of new ids.
    pub(crate) fn new_ids_ddl(&self) -> String {
        match self.kind {
            BackendKind::Sqlite => format!(
                "CREATE TEMP TABLE IF NOT EXISTS {n} (\"id\" TEXT PRIMARY KEY); DELETE FROM {t};",
                n = quote(NEW_IDS),
                t = self.new_ids()
            ),
            BackendKind::Postgres => format!(
                "CREATE TEMP TABLE IF NOT EXISTS {n} (\"id\" text PRIMARY KEY) ON COMMIT DROP; DELETE FROM {t};",
                n = quote(NEW_IDS),
                t = self.new_ids()
            ),
        }
    }

    /// The row filter of an incremental update: only the ids just inserted.
    fn id_filter(&self) -> String {
        match self.kind {
            BackendKind::Sqlite => format!("\"id\" IN (SELECT \"id\" FROM {})", self.new_ids()),
            // An init plan evaluated once, then primary-key lookups.
            BackendKind::Postgres => format!(
                "\"id\" = ANY (ARRAY(SELECT \"id\" FROM {}))",
                self.new_ids()
            ),
        }
    }

    /// The counter tables (`CREATE TABLE IF NOT EXISTS`).
    pub(crate) fn ddl(&self) -> String {
        let (kd, kp) = match self.kind {
            BackendKind::Sqlite => ("", ""),
            BackendKind::Postgres => ("\"schema_name\" TEXT NOT NULL, ", "\"schema_name\", "),
        };
        let tables: [(&str, &str, &str); 8] = [
            (
                "table_stats",
                "\"table_name\" TEXT NOT NULL, \"rows\" BIGINT NOT NULL, \"last_load_at\" TEXT",
                "\"table_name\"",
            ),
            (
                "day_stats",
                "\"day\" TEXT NOT NULL, \"events\" BIGINT NOT NULL",
                "\"day\"",
            ),
            (
                "email_totals",
                "\"metric\" TEXT NOT NULL, \"campaign_id\" TEXT NOT NULL, \"recipients\" BIGINT NOT NULL, \"first_event_at\" TEXT, \"campaign_name\" TEXT",
                "\"metric\", \"campaign_id\"",
            ),
            (
                "email_daily",
                "\"metric\" TEXT NOT NULL, \"campaign_id\" TEXT NOT NULL, \"day\" TEXT NOT NULL, \"recipients\" BIGINT NOT NULL",
                "\"metric\", \"campaign_id\", \"day\"",
            ),
            (
                "email_links",
                "\"campaign_id\" TEXT NOT NULL, \"url\" TEXT NOT NULL, \"clicks\" BIGINT NOT NULL, \"unique_clickers\" BIGINT NOT NULL",
                "\"campaign_id\", \"url\"",
            ),
            (
                "email_seen",
                "\"metric\" TEXT NOT NULL, \"campaign_id\" TEXT NOT NULL, \"recipient\" TEXT NOT NULL",
                "\"metric\", \"campaign_id\", \"recipient\"",
            ),
            (
                "email_seen_daily",
                "\"metric\" TEXT NOT NULL, \"campaign_id\" TEXT NOT NULL, \"day\" TEXT NOT NULL, \"recipient\" TEXT NOT NULL",
                "\"metric\", \"campaign_id\", \"day\", \"recipient\"",
            ),
            (
                "email_link_seen",
                "\"campaign_id\" TEXT NOT NULL, \"url\" TEXT NOT NULL, \"recipient\" TEXT NOT NULL",
                "\"campaign_id\", \"url\", \"recipient\"",
            ),
        ];
        let mut out: Vec<String> = tables
            .iter()
            .map(|(name, cols, pk)| {
                format!(
                    "CREATE TABLE IF NOT EXISTS {} ({kd}{cols}, PRIMARY KEY ({kp}{pk}))",
                    self.t(name)
                )
            })
            .collect();
        out.push(format!(
            "CREATE TABLE IF NOT EXISTS {} ({kd}\"key\" TEXT NOT NULL, \"value\" TEXT NOT NULL, PRIMARY KEY ({kp}\"key\"))",
            self.t("stats_meta")
        ));
        out.join(";\n") + ";"
    }

    /// Claims the one-time count from the raw tables: affects one row when this
    /// transaction must do it (the schema was loaded before the counters existed, or
    /// is new), none when it was done.
    pub(crate) fn claim_built(&self) -> String {
        format!(
            "INSERT INTO {} ({kc}\"key\", \"value\") VALUES ({kv}'built', '1') ON CONFLICT DO NOTHING",
            self.t("stats_meta"),
            kc = self.kc(),
            kv = self.kv(),
        )
    }

    /// Whether the counters of this schema exist (else reads use the raw tables).
    pub(crate) fn is_built(&self) -> String {
        format!(
            "SELECT count(*) FROM {} WHERE {}\"key\" = 'built'",
            self.t("stats_meta"),
            self.kw("")
        )
    }

    /// Adds inserted rows to tables' counts and stamps their last load.
    pub(crate) fn bump_tables(
        &self,
        counts: &[(String, u64)],
        loaded_at: &DateTime<Utc>,
    ) -> Option<String> {
        if counts.is_empty() {
            return None;
        }
        let at = literal(&format_timestamp(loaded_at));
        let values: Vec<String> = counts
            .iter()
            .map(|(t, n)| format!("({}{}, {n}, {at})", self.kv(), literal(t)))
            .collect();
        Some(format!(
            "INSERT INTO {} AS a ({}\"table_name\", \"rows\", \"last_load_at\") VALUES {}
             ON CONFLICT ({}\"table_name\") DO UPDATE SET \"rows\" = a.\"rows\" + excluded.\"rows\",
             \"last_load_at\" = excluded.\"last_load_at\"",
            self.t("table_stats"),
            self.kc(),
            values.join(", "),
            self.kc()
        ))
    }

    /// Adds events to days (`YYYY-MM-DD` of `received_at`).
    pub(crate) fn bump_days(&self, days: &HashMap<String, u64>) -> Option<String> {
        if days.is_empty() {
            return None;
        }
        let mut days: Vec<(&String, &u64)> = days.iter().collect();
        days.sort();
        let values: Vec<String> = days
            .iter()
            .map(|(d, n)| format!("({}{}, {n})", self.kv(), literal(d)))
            .collect();
        Some(format!(
            "INSERT INTO {} AS a ({}\"day\", \"events\") VALUES {}
             ON CONFLICT ({}\"day\") DO UPDATE SET \"events\" = a.\"events\" + excluded.\"events\"",
            self.t("day_stats"),
            self.kc(),
            values.join(", "),
            self.kc()
        ))
    }

    /// Recounts everything from the raw tables: `tables` are every table of the
    /// schema with its columns (the discards table included).
    pub(crate) fn rebuild_all(&self, tables: &HashMap<String, HashSet<String>>) -> Vec<String> {
        let sql = self.sql();
        let mut out = vec![
            format!("DELETE FROM {}{}", self.t("table_stats"), self.where_all()),
            format!("DELETE FROM {}{}", self.t("day_stats"), self.where_all()),
        ];
        let mut names: Vec<&String> = tables.keys().collect();
        names.sort();
        for name in names {
            let cols = &tables[name];
            let last = if cols.contains("uuid_ts") {
                format!("MAX({})", sql.ts_text("uuid_ts"))
            } else {
                "CAST(NULL AS TEXT)".into()
            };
            out.push(format!(
                "INSERT INTO {} ({}\"table_name\", \"rows\", \"last_load_at\") SELECT {}{}, count(*), {last} FROM {}",
                self.t("table_stats"),
                self.kc(),
                self.kv(),
                literal(name),
                sql.table(name)
            ));
            if PRIMARY_TABLES.contains(&name.as_str()) && cols.contains("received_at") {
                out.push(format!(
                    "INSERT INTO {t} AS a ({kc}\"day\", \"events\")
                     SELECT {kv}substr({r}, 1, 10), count(*) FROM {src} WHERE {rc} IS NOT NULL GROUP BY substr({r}, 1, 10)
                     ON CONFLICT ({kc}\"day\") DO UPDATE SET \"events\" = a.\"events\" + excluded.\"events\"",
                    t = self.t("day_stats"),
                    kc = self.kc(),
                    kv = self.kv(),
                    r = sql.ts_text("received_at"),
                    rc = quote("received_at"),
                    src = sql.table(name),
                ));
            }
        }
        out.extend(self.email_rebuild(tables));
        out
    }

    /// Recomputes the email counters from the raw email tables (`tables`: at least
    /// the email tables that exist, with their columns).
    pub(crate) fn email_rebuild(&self, tables: &HashMap<String, HashSet<String>>) -> Vec<String> {
        let mut out: Vec<String> = [
            "email_totals",
            "email_daily",
            "email_links",
            "email_seen",
            "email_seen_daily",
            "email_link_seen",
        ]
        .iter()
        .map(|t| format!("DELETE FROM {}{}", self.t(t), self.where_all()))
        .collect();
        out.extend(self.email_update(tables, false));
        out
    }

    /// The email counters' update by the rows of `tables` (email tables with their
    /// columns): with `only_new`, the ids in the new-ids table; else every row.
    pub(crate) fn email_update(
        &self,
        tables: &HashMap<String, HashSet<String>>,
        only_new: bool,
    ) -> Vec<String> {
        let filter = only_new.then(|| self.id_filter());
        let parts = ev_parts(&self.sql(), tables, filter.as_deref(), &[]);
        if parts.is_empty() {
            return Vec::new();
        }
        let cte = format!("WITH ev AS ({}) ", parts.join(" UNION ALL "));
        let (kc, kv) = (self.kc(), self.kv());
        let seen = |name: &str, conds: &str| {
            format!(
                "NOT EXISTS (SELECT 1 FROM {} s WHERE {}{conds})",
                self.t(name),
                self.kw("s.")
            )
        };
        let keep_least = |col: &str| {
            format!(
                "\"{col}\" = CASE WHEN excluded.\"{col}\" IS NULL THEN a.\"{col}\"
                 WHEN a.\"{col}\" IS NULL OR excluded.\"{col}\" < a.\"{col}\" THEN excluded.\"{col}\" ELSE a.\"{col}\" END"
            )
        };
        let keep_greatest = |col: &str| {
            format!(
                "\"{col}\" = CASE WHEN excluded.\"{col}\" IS NULL THEN a.\"{col}\"
                 WHEN a.\"{col}\" IS NULL OR excluded.\"{col}\" > a.\"{col}\" THEN excluded.\"{col}\" ELSE a.\"{col}\" END"
            )
        };
        vec![
            // Totals first: which recipients are new is read before they are added.
            format!(
                "{cte}INSERT INTO {t} AS a ({kc}\"metric\", \"campaign_id\", \"recipients\", \"first_event_at\", \"campaign_name\")
                 SELECT {kv}k, c, COUNT(DISTINCT CASE WHEN {new} THEN r END), MIN(t), MAX(n)
                 FROM ev WHERE r IS NOT NULL GROUP BY k, c
                 ON CONFLICT ({kc}\"metric\", \"campaign_id\") DO UPDATE SET
                 \"recipients\" = a.\"recipients\" + excluded.\"recipients\", {first}, {name}",
                t = self.t("email_totals"),
                new = seen(
                    "email_seen",
                    "s.\"metric\" = ev.k AND s.\"campaign_id\" = ev.c AND s.\"recipient\" = ev.r"
                ),
                first = keep_least("first_event_at"),
                name = keep_greatest("campaign_name"),
            ),
            format!(
                "{cte}INSERT INTO {t} AS a ({kc}\"metric\", \"campaign_id\", \"day\", \"recipients\")
                 SELECT {kv}k, c, substr(t, 1, 10), COUNT(DISTINCT CASE WHEN {new} THEN r END)
                 FROM ev WHERE r IS NOT NULL AND t IS NOT NULL GROUP BY k, c, substr(t, 1, 10)
                 ON CONFLICT ({kc}\"metric\", \"campaign_id\", \"day\") DO UPDATE SET
                 \"recipients\" = a.\"recipients\" + excluded.\"recipients\"",
                t = self.t("email_daily"),
                new = seen(
                    "email_seen_daily",
                    "s.\"metric\" = ev.k AND s.\"campaign_id\" = ev.c AND s.\"day\" = substr(ev.t, 1, 10) AND s.\"recipient\" = ev.r"
                ),
            ),
            format!(
                "{cte}INSERT INTO {t} AS a ({kc}\"campaign_id\", \"url\", \"clicks\", \"unique_clickers\")
                 SELECT {kv}c, u, COUNT(*), COUNT(DISTINCT CASE WHEN r IS NOT NULL AND {new} THEN r END)
                 FROM ev WHERE k = 'clicked' AND u IS NOT NULL GROUP BY c, u
                 ON CONFLICT ({kc}\"campaign_id\", \"url\") DO UPDATE SET
                 \"clicks\" = a.\"clicks\" + excluded.\"clicks\",
                 \"unique_clickers\" = a.\"unique_clickers\" + excluded.\"unique_clickers\"",
                t = self.t("email_links"),
                new = seen(
                    "email_link_seen",
                    "s.\"campaign_id\" = ev.c AND s.\"url\" = ev.u AND s.\"recipient\" = ev.r"
                ),
            ),
            format!(
                "{cte}INSERT INTO {t} ({kc}\"metric\", \"campaign_id\", \"recipient\")
                 SELECT DISTINCT {kv}k, c, r FROM ev WHERE r IS NOT NULL ON CONFLICT DO NOTHING",
                t = self.t("email_seen"),
            ),
            format!(
                "{cte}INSERT INTO {t} ({kc}\"metric\", \"campaign_id\", \"day\", \"recipient\")
                 SELECT DISTINCT {kv}k, c, substr(t, 1, 10), r FROM ev WHERE r IS NOT NULL AND t IS NOT NULL
                 ON CONFLICT DO NOTHING",
                t = self.t("email_seen_daily"),
            ),
            format!(
                "{cte}INSERT INTO {t} ({kc}\"campaign_id\", \"url\", \"recipient\")
                 SELECT DISTINCT {kv}c, u, r FROM ev WHERE k = 'clicked' AND u IS NOT NULL AND r IS NOT NULL
                 ON CONFLICT DO NOTHING",
                t = self.t("email_link_seen"),
            ),
        ]
    }

    /// The email report's three reads from the counters (same columns and order as
    /// the raw report's).
    pub(crate) fn email_reads(&self) -> Vec<String> {
        let w = self.where_all();
        vec![
            format!(
                "SELECT \"metric\", \"campaign_id\", \"recipients\", \"first_event_at\", \"campaign_name\" FROM {}{w}
                 ORDER BY \"campaign_id\", \"metric\"",
                self.t("email_totals")
            ),
            format!(
                "SELECT \"metric\", \"campaign_id\", \"day\", \"recipients\" FROM {}{w}
                 ORDER BY \"campaign_id\", \"day\", \"metric\"",
                self.t("email_daily")
            ),
            format!(
                "SELECT \"campaign_id\", \"url\", \"clicks\", \"unique_clickers\" FROM {}{w}
                 ORDER BY \"campaign_id\", \"clicks\" DESC, \"url\"",
                self.t("email_links")
            ),
        ]
    }

    /// Row counts and last loads of the schema's tables.
    pub(crate) fn table_reads(&self) -> String {
        format!(
            "SELECT \"table_name\", \"rows\", \"last_load_at\" FROM {}{}",
            self.t("table_stats"),
            self.where_all()
        )
    }

    /// Events of one day.
    pub(crate) fn day_read(&self, day: &str) -> String {
        format!(
            "SELECT \"events\" FROM {} WHERE {}\"day\" = {}",
            self.t("day_stats"),
            self.kw(""),
            literal(day)
        )
    }
}

/// The tables that get exactly one row per event (the "events today" count).
pub(crate) const PRIMARY_TABLES: &[&str] = &[
    "tracks",
    "identifies",
    "pages",
    "screens",
    "groups",
    "aliases",
];

/// True when a table of this name feeds the email report.
pub(crate) fn is_email_table(name: &str) -> bool {
    EMAIL_TABLES.contains(&name)
}

/// Whether a load's DDL on an email table changes what the raw report reads of
/// older rows (a widened column, a new `campaign_id` or `timestamp`): then the email
/// counters are recomputed from the raw tables.
pub(crate) fn email_needs_rebuild(
    add: &[(String, crate::types::ColumnType)],
    widen: &[String],
) -> bool {
    !widen.is_empty()
        || add
            .iter()
            .any(|(n, _)| n == "campaign_id" || n == "timestamp")
}

/// `YYYY-MM-DD` of a `received_at` cell.
pub(crate) fn day_of(cell: &crate::types::Cell) -> Option<String> {
    match cell {
        crate::types::Cell::Timestamp(t) => format_timestamp(t).get(..10).map(str::to_string),
        _ => None,
    }
}

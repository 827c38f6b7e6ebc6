//! The statement allowlist of `POST /api/v1/query`, from a real SQL parser.
//!
//! Invariants: [`check`] accepts a text only when `sqlparser` (PostgreSQL or SQLite
//! dialect) reads it as exactly one statement that is a query (`SELECT`,
//! `WITH … SELECT`, `VALUES`, `TABLE`, or a parenthesised set of those) or an
//! `EXPLAIN` of one without `ANALYZE`; with no nested data-modifying statement (a
//! `WITH x AS (DELETE …)`), no `SELECT … INTO`, no row locks (`FOR UPDATE`), and no call
//! of a function (or table function) on the deny list ([`is_denied_function`]:
//! server files, large objects, advisory locks, session settings, signals, WAL and
//! replication control, `dblink`, functions that run a SQL string, SQLite's
//! extension loading). Everything else is refused. This is defence in depth: on
//! PostgreSQL the real guard is the query role's privileges, on SQLite the
//! authorizer; the parser can disagree with the engine, so neither may rely on it
//! alone.

use std::ops::ControlFlow;

use sqlparser::ast::{
    DescribeAlias, Expr, ObjectName, Query, SetExpr, Statement, TableFactor, Visit, Visitor,
};
use sqlparser::dialect::{PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;

/// Which engine's grammar a query is read with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

/// The kind of an accepted statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    /// A query: `SELECT`, `WITH … SELECT`, `VALUES`, `TABLE`, set operations of them.
    Query,
    /// `EXPLAIN` (without `ANALYZE`) of a query.
    Explain,
}

/// Why [`check`] refused a text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The text is not valid SQL for the dialect (→ 400 `bad_query`).
    #[error("syntax error: {0}")]
    Syntax(String),
    /// Valid SQL, but not a statement the endpoint runs (→ 400 `query_not_allowed`).
    #[error("{0}")]
    NotAllowed(String),
}

const ALLOWED: &str = "only one SELECT, WITH … SELECT, VALUES, TABLE or EXPLAIN (without ANALYZE) statement is allowed";

/// Deepest nesting the parser accepts (its default is 50); deeper texts are refused
/// rather than risking the stack.
const RECURSION_LIMIT: usize = 50;

/// Deepest parenthesis nesting a text may have. The parser backtracks on some
/// unclosed shapes, doubling its time with every level (`select f(f(f(…` took 1 s
/// at 20 levels and the fuzzer found a 97-byte text that took minutes): checked
/// before parsing, so the guard stays in milliseconds.
pub const MAX_NESTING: usize = 16;

/// Checks `sql` against the allowlist; `Ok` gives the kind of the one statement.
pub fn check(sql: &str, dialect: Dialect) -> Result<StatementKind, Refusal> {
    if nesting(sql) > MAX_NESTING {
        return Err(Refusal::NotAllowed(format!(
            "the query nests parentheses more than {MAX_NESTING} levels deep"
        )));
    }
    // `TABLE name …` is `SELECT * FROM name …` (PostgreSQL's grammar says so); the
    // parser knows only the long form.
    let rewritten;
    let first = first_word(sql);
    let sql = if first == "table" {
        rewritten = format!("SELECT * FROM {}", &sql.trim_start()[5..]);
        rewritten.as_str()
    } else {
        sql
    };
    let parsed = match dialect {
        Dialect::Postgres => Parser::new(&PostgreSqlDialect {})
            .with_recursion_limit(RECURSION_LIMIT)
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_statements()),
        Dialect::Sqlite => Parser::new(&SQLiteDialect {})
            .with_recursion_limit(RECURSION_LIMIT)
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_statements()),
    };
    let statements = parsed.map_err(|e| {
        // A text that does not even start like a query is refused as such; one that
        // does gets the parser's message.
        if ["select", "with", "values", "table", "explain", "("].contains(&first.as_str()) {
            Refusal::Syntax(e.to_string())
        } else {
            Refusal::NotAllowed(ALLOWED.to_string())
        }
    })?;
    let [statement] = statements.as_slice() else {
        return Err(if statements.is_empty() {
            Refusal::Syntax("the query is empty".into())
        } else {
            Refusal::NotAllowed(format!("{ALLOWED}; this text has {}", statements.len()))
        });
    };
    let kind = match statement {
        Statement::Query(q) => {
            check_query(q)?;
            StatementKind::Query
        }
        Statement::Explain {
            describe_alias: DescribeAlias::Explain,
            analyze: false,
            statement: inner,
            options,
            estimate: false,
            ..
        } => {
            if let Some(options) = options
                && options
                    .iter()
                    .any(|o| o.name.value.eq_ignore_ascii_case("analyze"))
            {
                return Err(Refusal::NotAllowed(
                    "EXPLAIN ANALYZE runs the statement and is not allowed".into(),
                ));
            }
            let Statement::Query(q) = inner.as_ref() else {
                return Err(Refusal::NotAllowed(format!(
                    "{ALLOWED}; EXPLAIN is allowed of a query only"
                )));
            };
            check_query(q)?;
            StatementKind::Explain
        }
        Statement::Explain { .. } => {
            return Err(Refusal::NotAllowed(
                "EXPLAIN ANALYZE runs the statement and is not allowed".into(),
            ));
        }
        other => {
            return Err(Refusal::NotAllowed(format!(
                "{ALLOWED}, not {}",
                statement_word(other)
            )));
        }
    };
    let mut walker = Walker { depth: 0 };
    if let ControlFlow::Break(why) = statement.visit(&mut walker) {
        return Err(Refusal::NotAllowed(why));
    }
    Ok(kind)
}

/// The fuzz and property check of [`check`] (not an API): for both dialects it must
/// not panic, and a text it accepts must, printed back by the parser and checked
/// again, be accepted as the same kind (a canonical form the parser cannot read back
/// is the parser's printing gap, not a difference), and stay refused with a second
/// statement appended.
#[doc(hidden)]
pub fn fuzz_check(sql: &str) -> Result<(), String> {
    for dialect in [Dialect::Postgres, Dialect::Sqlite] {
        let Ok(kind) = check(sql, dialect) else {
            continue;
        };
        let first = first_word(sql);
        let text = if first == "table" {
            format!("SELECT * FROM {}", &sql.trim_start()[5..])
        } else {
            sql.to_string()
        };
        let reparsed = match dialect {
            Dialect::Postgres => Parser::parse_sql(&PostgreSqlDialect {}, &text),
            Dialect::Sqlite => Parser::parse_sql(&SQLiteDialect {}, &text),
        }
        .map_err(|e| format!("{dialect:?}: accepted but does not parse again: {e}"))?;
        let canonical = reparsed
            .first()
            .ok_or_else(|| format!("{dialect:?}: accepted an empty text"))?
            .to_string();
        match check(&canonical, dialect) {
            Ok(k) if k == kind => {}
            Ok(k) => {
                return Err(format!(
                    "{dialect:?}: {kind:?} printed as {k:?}: {canonical}"
                ));
            }
            Err(Refusal::NotAllowed(why)) => {
                return Err(format!(
                    "{dialect:?}: accepted, but its printed form {canonical:?} is refused: {why}"
                ));
            }
            Err(Refusal::Syntax(_)) => {}
        }
        // A trailing `--` comment would swallow the appended statement.
        let appended = format!("{sql}\n; DELETE FROM t");
        if check(&appended, dialect).is_ok() {
            return Err(format!("{dialect:?}: accepted with a DELETE appended"));
        }
    }
    Ok(())
}

/// The deepest parenthesis nesting of `sql`, outside string literals, quoted
/// identifiers, dollar quotes and comments (a miscount only refuses, never admits:
/// the parser still reads the text).
fn nesting(sql: &str) -> usize {
    let b = sql.as_bytes();
    let (mut i, mut depth, mut max) = (0usize, 0usize, 0usize);
    let skip_to = |from: usize, end: &[u8]| -> usize {
        b[from..]
            .windows(end.len())
            .position(|w| w == end)
            .map_or(b.len(), |p| from + p + end.len())
    };
    while i < b.len() {
        match b[i] {
            b'(' => {
                depth += 1;
                max = max.max(depth);
                i += 1;
            }
            b')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            // '' inside a literal is two literals back to back: same depth.
            b'\'' => i = skip_to(i + 1, b"'"),
            b'"' => i = skip_to(i + 1, b"\""),
            b'-' if b.get(i + 1) == Some(&b'-') => i = skip_to(i + 2, b"\n"),
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_to(i + 2, b"*/"),
            b'$' => {
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if b[e] == b'$' => {
                        let tag = &b[i..=e];
                        i = skip_to(e + 1, tag);
                    }
                    _ => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    max
}

/// The lowercased first word of `sql` (or `(`), skipping leading whitespace.
fn first_word(sql: &str) -> String {
    let t = sql.trim_start();
    if t.starts_with('(') {
        return "(".into();
    }
    t.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(16)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The first word of a statement, for messages (never the whole text).
fn statement_word(s: &Statement) -> String {
    let text = s.to_string();
    text.split_whitespace()
        .next()
        .unwrap_or("this statement")
        .chars()
        .take(32)
        .collect::<String>()
        .to_ascii_uppercase()
}

fn check_query(q: &Query) -> Result<(), Refusal> {
    if !q.locks.is_empty() {
        return Err(Refusal::NotAllowed(
            "row locks (FOR UPDATE / FOR SHARE) are not allowed".into(),
        ));
    }
    check_set_expr(&q.body)
}

fn check_set_expr(body: &SetExpr) -> Result<(), Refusal> {
    match body {
        SetExpr::Select(s) => {
            if s.into.is_some() {
                return Err(Refusal::NotAllowed(
                    "SELECT … INTO creates a table and is not allowed".into(),
                ));
            }
            Ok(())
        }
        SetExpr::Query(q) => check_query(q),
        SetExpr::SetOperation { left, right, .. } => {
            check_set_expr(left)?;
            check_set_expr(right)
        }
        SetExpr::Values(_) | SetExpr::Table(_) => Ok(()),
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => Err(
            Refusal::NotAllowed(format!("{ALLOWED}; this one modifies data")),
        ),
    }
}

/// Walks the whole tree: nested statements, `SELECT INTO` and row locks anywhere,
/// denied functions and table functions.
struct Walker {
    depth: usize,
}

impl Visitor for Walker {
    type Break = String;

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<String> {
        self.depth += 1;
        // The top statement, and the query under EXPLAIN, were checked already.
        let nested_ok = self.depth == 1 || (self.depth == 2 && matches!(s, Statement::Query(_)));
        if nested_ok {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(format!(
                "{ALLOWED}; this one contains a nested {}",
                statement_word(s)
            ))
        }
    }

    fn post_visit_statement(&mut self, _s: &Statement) -> ControlFlow<String> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<String> {
        match check_query(q) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => ControlFlow::Break(e.to_string()),
        }
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<String> {
        if let Expr::Function(f) = e {
            return deny_name(&f.name);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<String> {
        match t {
            TableFactor::Table { name, .. } | TableFactor::Function { name, .. } => deny_name(name),
            _ => ControlFlow::Continue(()),
        }
    }
}

fn deny_name(name: &ObjectName) -> ControlFlow<String> {
    let Some(last) = name.0.last() else {
        return ControlFlow::Continue(());
    };
    let ident = match last.as_ident() {
        Some(i) => i.value.clone(),
        None => last.to_string(),
    };
    if is_denied_function(&ident) || is_denied_relation(&ident) {
        ControlFlow::Break(format!(
            "{} is not allowed in a query",
            ident.chars().take(63).collect::<String>()
        ))
    } else {
        ControlFlow::Continue(())
    }
}

/// Functions refused by name (any schema, any case): they read or write server
/// files, take session-level locks, change settings, signal other sessions, control
/// WAL or replication, reach other servers, run a SQL string, or load code.
pub fn is_denied_function(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "set_config",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_switch_wal",
        "pg_switch_xlog",
        "pg_promote",
        "pg_stat_file",
        "pg_notify",
        "pg_current_logfile",
        "pg_import_system_collations",
        "pg_log_backend_memory_contexts",
        "pg_nextoid",
        "loread",
        "lowrite",
        "nextval",
        "setval",
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "ts_stat",
        "txid_current",
        "pg_current_xact_id",
        // SQLite.
        "load_extension",
        "fts3_tokenizer",
        "readfile",
        "writefile",
        "edit",
        "sqlite_dbpage",
    ];
    const PREFIXES: &[&str] = &[
        "pg_read_",
        "pg_ls_",
        "pg_file_",
        "pg_advisory",
        "pg_try_advisory",
        "lo_",
        "dblink",
        "pg_stat_reset",
        "pg_replication_",
        "pg_logical_",
        "pg_create_",
        "pg_drop_",
        "pg_copy_",
        "pg_wal_",
        "pg_backup_",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_xlog_",
        "pg_stat_statements_reset",
    ];
    let name = name.to_ascii_lowercase();
    EXACT.contains(&name.as_str()) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Catalogs refused by name: password hashes and server configuration. (The query
/// role cannot read them anyway.)
fn is_denied_relation(name: &str) -> bool {
    const RELATIONS: &[&str] = &[
        "pg_authid",
        "pg_shadow",
        "pg_auth_members",
        "pg_user_mapping",
        "pg_user_mappings",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_file_settings",
        "pg_largeobject",
        "pg_largeobject_metadata",
    ];
    RELATIONS.contains(&name.to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(sql: &str) -> Result<StatementKind, Refusal> {
        check(sql, Dialect::Postgres)
    }

    #[test]
    fn accepts_queries_and_explain() {
        for sql in [
            "select 1",
            "SELECT * FROM activecampaign.email_delivered",
            "with x as (select 1 as a) select a from x",
            "with recursive r(n) as (select 1 union all select n + 1 from r where n < 5) select * from r",
            "values (1, 'a'), (2, 'b')",
            "table activecampaign.tracks",
            "(select 1) union all (select 2) order by 1 limit 1",
            "select t.id, u.email from s.tracks t join s.users u on u.id = t.user_id",
            "select count(*) from s.tracks where received_at > now() - interval '1 day'",
            "select properties::jsonb ->> 'a' from s.x",
            "select 1;",
        ] {
            assert_eq!(pg(sql), Ok(StatementKind::Query), "{sql}");
        }
        assert_eq!(pg("explain select 1"), Ok(StatementKind::Explain));
        assert_eq!(
            pg("explain (format json) select 1"),
            Ok(StatementKind::Explain)
        );
        assert_eq!(
            check("explain query plan select 1", Dialect::Sqlite),
            Ok(StatementKind::Explain)
        );
        assert_eq!(
            check("select zeroblob(10), hex(randomblob(4))", Dialect::Sqlite),
            Ok(StatementKind::Query)
        );
    }

    #[test]
    fn refuses_everything_that_is_not_a_query() {
        for sql in [
            "copy (select 1) to program 'touch /tmp/x'",
            "copy (select 1) to '/tmp/x'",
            "checkpoint",
            "lock table s.t in access exclusive mode",
            "listen x",
            "notify x",
            "select 1; drop table s.t",
            "delete from s.t",
            "insert into s.t values (1)",
            "update s.t set a = 1",
            "drop table s.t",
            "create table s.t (a int)",
            "set role postgres",
            "reset all",
            "discard all",
            "vacuum",
            "analyze s.t",
            "explain analyze select 1",
            "explain (analyze) select 1",
            "explain (analyze true, format json) select 1",
            "explain delete from s.t",
            "with d as (delete from s.t returning *) select * from d",
            "select * into s.copy from s.t",
            "select * from s.t for update",
            "select * from (select * from s.t for update) x",
            "begin",
            "commit",
            "prepare p as select 1",
            "execute p",
            "do $$ begin end $$",
            "grant select on s.t to public",
            "set statement_timeout = 0",
        ] {
            assert!(
                matches!(pg(sql), Err(Refusal::NotAllowed(_))),
                "{sql}: {:?}",
                pg(sql)
            );
        }
        for sql in [
            "attach database '/etc/passwd' as x",
            "detach database x",
            "pragma journal_mode = delete",
            "pragma user_version = 5",
            "vacuum into '/tmp/x'",
            "select load_extension('x')",
        ] {
            assert!(
                matches!(check(sql, Dialect::Sqlite), Err(Refusal::NotAllowed(_))),
                "{sql}: {:?}",
                check(sql, Dialect::Sqlite)
            );
        }
    }

    #[test]
    fn refuses_dangerous_functions_anywhere() {
        for sql in [
            "select pg_read_file('/etc/passwd')",
            "select pg_catalog.pg_read_binary_file('/etc/passwd')",
            "select * from pg_ls_dir('.')",
            "select lo_import('/etc/passwd')",
            "select pg_advisory_lock(1)",
            "select PG_ADVISORY_XACT_LOCK(1)",
            "select pg_try_advisory_lock(1)",
            "select set_config('role', 'postgres', false)",
            "select pg_terminate_backend(1)",
            "select pg_reload_conf()",
            "select pg_switch_wal()",
            "select * from dblink('host=x', 'select 1') as t(a int)",
            "select query_to_xml('copy (select 1) to program ''id''', true, true, '')",
            "select 1 where exists (select pg_sleep(0) from (select set_config('a.b', 'c', false)) x)",
            "select * from pg_authid",
            "select rolpassword from pg_catalog.pg_shadow",
            "with x as (select pg_read_file('/etc/passwd') as f) select * from x",
            "select (select lo_export(1, '/tmp/x'))",
            "explain select pg_advisory_lock(1)",
            "values (pg_reload_conf())",
            "select coalesce(null, pg_ls_waldir()::text)",
        ] {
            assert!(
                matches!(pg(sql), Err(Refusal::NotAllowed(_))),
                "{sql}: {:?}",
                pg(sql)
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused_before_the_parser_backtracks() {
        let slow = "table(h(GMAe.e(e(explain (ta[le(h(in (ta[le(h(GMAe.e(e(QRe(O(h (eOGMAe.e(e(QRe(O(h (eO(eO(with))/";
        let started = std::time::Instant::now();
        assert!(matches!(pg(slow), Err(Refusal::NotAllowed(_))));
        let unclosed = format!("select {}", "f(".repeat(40));
        assert!(matches!(pg(&unclosed), Err(Refusal::NotAllowed(_))));
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        let deep_ok = format!(
            "select {}1{}",
            "(".repeat(MAX_NESTING),
            ")".repeat(MAX_NESTING)
        );
        assert_eq!(pg(&deep_ok), Ok(StatementKind::Query));
        // Parentheses in literals, identifiers and comments do not count.
        let quoted = format!(
            "select '{0}', \"{0}\", $x${0}$x$ -- {0}\n /* {0} */",
            "(".repeat(40)
        );
        assert_eq!(pg(&quoted), Ok(StatementKind::Query));
        assert_eq!(nesting("select (('(')) , (1)"), 2);
    }

    #[test]
    fn syntax_errors_are_told_apart_from_refusals() {
        assert!(matches!(pg("select (1"), Err(Refusal::Syntax(_))));
        assert!(matches!(pg("selec 1"), Err(Refusal::NotAllowed(_))));
        assert!(pg("").is_err());
        let deep = format!("select {}1{}", "(".repeat(500), ")".repeat(500));
        assert!(pg(&deep).is_err());
    }

    /// Texts made of SQL's sharp edges: keywords, denied functions, quotes,
    /// comments, dollar quotes and semicolons.
    fn sqlish() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let token = proptest::sample::select(vec![
            "select",
            "SELECT",
            "from",
            "where",
            "with",
            "as",
            "values",
            "table",
            "explain",
            "analyze",
            "(",
            ")",
            ",",
            ";",
            "*",
            "1",
            "'x'",
            "'a;b'",
            "\"q\"",
            "t",
            "s.t",
            "union",
            "all",
            "order by 1",
            "limit 1",
            "into",
            "for update",
            "delete",
            "insert",
            "update",
            "copy",
            "to",
            "program",
            "'/tmp/x'",
            "pg_read_file(",
            "set_config(",
            "pg_advisory_lock(",
            "lo_import(",
            "dblink(",
            "pg_authid",
            "upper(",
            "count(",
            "--",
            "/*",
            "*/",
            "$$",
            "$a$",
            "\n",
            " ",
            "::text",
            "attach",
            "pragma",
            "vacuum",
            "listen",
            "notify",
            "checkpoint",
            "lock",
            "begin",
            "commit",
        ]);
        let start = proptest::sample::select(vec![
            "",
            "select",
            "select 1 from",
            "with x as (select 1) select",
            "values (",
            "explain select",
            "table",
            "(select",
        ]);
        (start, proptest::collection::vec(token, 0..24))
            .prop_map(|(start, t)| format!("{start} {}", t.join(" ")))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn accepted_texts_stay_accepted_printed_back_and_never_with_a_second_statement(sql in sqlish()) {
            let r = fuzz_check(&sql);
            proptest::prop_assert!(r.is_ok(), "{:?} for {:?}", r, sql);
        }

        #[test]
        fn arbitrary_text_never_panics(sql in "\\PC{0,200}") {
            let _ = fuzz_check(&sql);
        }
    }

    #[test]
    fn every_denied_function_is_refused_wherever_it_is_called() {
        for f in [
            "pg_read_file",
            "pg_read_binary_file",
            "pg_ls_dir",
            "pg_ls_logdir",
            "pg_stat_file",
            "lo_import",
            "lo_export",
            "lo_unlink",
            "pg_advisory_lock",
            "pg_advisory_xact_lock",
            "pg_advisory_unlock_all",
            "pg_try_advisory_lock_shared",
            "set_config",
            "pg_terminate_backend",
            "pg_cancel_backend",
            "pg_reload_conf",
            "pg_rotate_logfile",
            "pg_switch_wal",
            "pg_create_restore_point",
            "pg_promote",
            "dblink",
            "dblink_exec",
            "query_to_xml",
            "ts_stat",
            "nextval",
            "setval",
            "load_extension",
        ] {
            for sql in [
                format!("select {f}(1)"),
                format!("select * from {f}(1)"),
                format!("select 1 where 1 = (select {f}(1))"),
                format!("with x as (select {f}(1)) select * from x"),
                format!("select pg_catalog.{f}(1)"),
                format!("select \"{f}\"(1)"),
                format!("explain select {f}(1)"),
            ] {
                assert!(
                    matches!(pg(&sql), Err(Refusal::NotAllowed(_))),
                    "{sql}: {:?}",
                    pg(&sql)
                );
            }
        }
    }
}

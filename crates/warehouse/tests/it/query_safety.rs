//! What `Warehouse::query` cannot do, checked from outside: on the real PostgreSQL
//! with the test's user `postgres` a superuser (the loader's role, as in a first
//! setup), and on real SQLite files. Also what it still does: ordinary queries, and
//! answers cut to their byte cap.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tributary_warehouse::{QueryResult, TruncatedReason, Warehouse, WarehouseError};

use crate::support::{Harness, PG_URL, pg_connect, track, with_postgres};

fn refused(r: &Result<QueryResult, WarehouseError>) -> bool {
    matches!(
        r,
        Err(WarehouseError::BadQuery(_) | WarehouseError::NotAllowed(_))
    )
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos()
}

/// A warehouse with three `Viewed` tracks (a `flag` boolean, an `n` bigint) in the
/// schema called `base`.
async fn loaded(h: &Harness, base: &str) -> (Warehouse, String) {
    h.source("qs-source", base);
    let wh = h.open().await;
    let last = h
        .append(
            "qs-source",
            (0..3)
                .map(|i| {
                    track(
                        &format!("qs-{i}"),
                        "Viewed",
                        json!({"flag": i % 2 == 0, "n": i}),
                    )
                })
                .collect(),
        )
        .await;
    h.wait_loaded(&wh, last).await;
    (wh, h.schema(base))
}

/// Rendered size of an answer's rows.
fn rows_bytes(r: &QueryResult) -> usize {
    serde_json::to_string(&r.rows).expect("json").len()
}

#[tokio::test]
async fn postgres_hostile_statements_are_refused_and_leave_no_trace() {
    with_postgres(
        "postgres_hostile_statements_are_refused_and_leave_no_trace",
        async |h| {
            let (wh, s) = loaded(&h, "qs").await;
            let outside = pg_connect().await.expect("outside connection");
            let victim = pg_connect().await.expect("victim connection");
            let victim_pid: i32 = victim
                .query_one("select pg_backend_pid()", &[])
                .await
                .expect("pid")
                .get(0);
            let tag = format!("tt-qg-{}-{}", std::process::id(), nanos());
            let program_file = format!("/tmp/{tag}-program");
            let copy_file = format!("/tmp/{tag}-copy");
            let lock_key = 700_000_000i64 + i64::from(std::process::id() % 1_000_000);
            let one = async |sql: &str| -> Value {
                let row = outside.query_one(sql, &[]).await.expect(sql);
                json!(row.get::<_, String>(0))
            };
            let large_objects = one("select count(*)::text from pg_largeobject_metadata").await;
            let conf_loaded = one("select pg_conf_load_time()::text").await;

            for sql in [
                format!("copy (select 1) to program 'touch {program_file}'"),
                format!("copy (select 1) to '{copy_file}'"),
                "select pg_read_file('/etc/passwd')".to_string(),
                "select * from pg_ls_dir('.')".to_string(),
                "select lo_import('/etc/passwd')".to_string(),
                "select * from pg_authid".to_string(),
                "select rolname, rolpassword from pg_catalog.pg_authid".to_string(),
                format!("select pg_advisory_lock({lock_key})"),
                format!("select pg_terminate_backend({victim_pid})"),
                "select pg_reload_conf()".to_string(),
                "checkpoint".to_string(),
                "select pg_switch_wal()".to_string(),
                format!("lock table {s}.tracks in access exclusive mode"),
                "listen tt_qg".to_string(),
                "notify tt_qg".to_string(),
                format!("select 1; drop table {s}.tracks"),
                format!("with d as (delete from {s}.tracks returning *) select * from d"),
                "select set_config('role', 'postgres', false)".to_string(),
            ] {
                let r = wh.query(&sql).await;
                assert!(refused(&r), "{sql:?} should be refused, got {r:?}");
            }

            assert!(!Path::new(&program_file).exists(), "COPY TO PROGRAM ran");
            assert!(!Path::new(&copy_file).exists(), "COPY TO a file ran");
            assert_eq!(
                one("select count(*)::text from pg_largeobject_metadata").await,
                large_objects
            );
            assert_eq!(one("select pg_conf_load_time()::text").await, conf_loaded);
            let locks: i64 = outside
                .query_one(
                    "select count(*) from pg_locks where locktype = 'advisory' and objid = $1::bigint::oid",
                    &[&lock_key],
                )
                .await
                .expect("pg_locks")
                .get(0);
            assert_eq!(locks, 0, "an advisory lock outlived the query");
            let exclusive: i64 = outside
                .query_one(
                    "select count(*) from pg_locks l join pg_class c on c.oid = l.relation
                     join pg_namespace n on n.oid = c.relnamespace
                     where n.nspname = $1 and l.mode = 'AccessExclusiveLock'",
                    &[&s],
                )
                .await
                .expect("pg_locks")
                .get(0);
            assert_eq!(exclusive, 0);
            victim
                .query_one("select 1", &[])
                .await
                .expect("the other session was not terminated");
            assert_eq!(h.count(&wh, &format!("{s}.tracks")).await, 3);

            // After the set_config attempt, the next query still runs as the reader.
            let who = h
                .rows(
                    &wh,
                    "select current_user::text, session_user::text,
                            (select rolsuper from pg_roles where rolname = current_user)",
                )
                .await;
            let role = tributary_warehouse::query_role_name("test", &h.state_schema);
            assert_eq!(who, vec![vec![json!(role), json!(role), json!(false)]]);
            wh.shutdown().await;
        },
    )
    .await;
}

/// The guard is defence in depth: the role itself, used directly without the
/// parser's allowlist, can read the warehouse and nothing else.
#[tokio::test]
async fn postgres_the_query_role_itself_can_only_read_the_warehouse() {
    with_postgres(
        "postgres_the_query_role_itself_can_only_read_the_warehouse",
        async |h| {
            let (wh, s) = loaded(&h, "qsrole").await;
            // The role exists once a query ran.
            assert_eq!(h.count(&wh, &format!("{s}.tracks")).await, 3);
            let outside = pg_connect().await.expect("outside");
            let row = outside
                .query_one(
                    &format!(
                        "select role, password from \"{}\".query_role",
                        h.state_schema
                    ),
                    &[],
                )
                .await
                .expect("the role's password is kept in the state schema");
            let (role, password): (String, String) = (row.get(0), row.get(1));
            assert_eq!(password.len(), 64);
            let mut cfg: tokio_postgres::Config = PG_URL.parse().expect("url");
            cfg.user(&role).password(&password);
            let (reader, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("login");
            tokio::spawn(conn);
            let n: i64 = reader
                .query_one(&format!("select count(*) from {s}.tracks"), &[])
                .await
                .expect("the role reads the warehouse")
                .get(0);
            assert_eq!(n, 3);
            let file = format!("/tmp/tt-qg-role-{}-{}", std::process::id(), nanos());
            for sql in [
                format!("copy (select 1) to program 'touch {file}'"),
                format!("copy (select 1) to '{file}'"),
                "select pg_read_file('/etc/passwd')".to_string(),
                "select pg_ls_dir('.')".to_string(),
                "select lo_import('/etc/passwd')".to_string(),
                "select count(*) from pg_authid".to_string(),
                "set role postgres".to_string(),
                "select pg_reload_conf()".to_string(),
                "checkpoint".to_string(),
                "select pg_switch_wal()".to_string(),
                format!("insert into {s}.tracks (id) values ('x')"),
                format!("create table {s}.evil (a int)"),
                format!("select * from \"{}\".loader_state", h.state_schema),
                format!("select * from \"{}\".query_role", h.state_schema),
            ] {
                let r = reader.batch_execute(&sql).await;
                assert!(r.is_err(), "{sql:?} should fail for the query role");
            }
            assert!(!Path::new(&file).exists());
            // Table browsing (the loader's credentials) shows warehouse schemas only.
            for table in ["query_role", "loader_state"] {
                match wh.table(&h.state_schema, table, 10).await {
                    Err(WarehouseError::NotFound(_)) => {}
                    other => panic!("{table}: expected NotFound, got {other:?}"),
                }
            }
            assert_eq!(
                wh.table(&s, "tracks", 10).await.expect("tracks").rows.len(),
                3
            );
            wh.shutdown().await;
        },
    )
    .await;
}

#[tokio::test]
async fn postgres_a_query_url_with_more_than_read_rights_is_refused() {
    with_postgres(
        "postgres_a_query_url_with_more_than_read_rights_is_refused",
        async |h| {
            let (wh, s) = loaded(&h, "qsurl").await;
            wh.shutdown().await;
            let outside = pg_connect().await.expect("outside");
            let files_role = format!("{}files", h.prefix);
            let ok_role = format!("{}reader", h.prefix);
            outside
                .batch_execute(&format!(
                    "CREATE ROLE \"{files_role}\" LOGIN IN ROLE pg_read_server_files;
                     CREATE ROLE \"{ok_role}\" LOGIN;"
                ))
                .await
                .expect("create roles");
            let body = async {
                for (url, expect) in [
                    (PG_URL.to_string(), "SUPERUSER"),
                    (
                        format!("postgres://{files_role}@127.0.0.1:5432/test"),
                        "pg_read_server_files",
                    ),
                ] {
                    let mut config = h.config();
                    config.query_url = Some(url.clone());
                    let wh = h.open_with(config).await;
                    match wh.query("select 1").await {
                        Err(WarehouseError::QueryRoleUnsafe(m)) => {
                            assert!(m.contains(expect), "{url}: {m}")
                        }
                        other => panic!("{url}: expected QueryRoleUnsafe, got {other:?}"),
                    }
                    wh.shutdown().await;
                }
                // A plain login works, and is granted the warehouse schemas.
                let mut config = h.config();
                config.query_url = Some(format!("postgres://{ok_role}@127.0.0.1:5432/test"));
                let wh = h.open_with(config).await;
                assert_eq!(h.count(&wh, &format!("{s}.tracks")).await, 3);
                let who = h.rows(&wh, "select current_user::text").await;
                assert_eq!(who, vec![vec![json!(ok_role)]]);
                wh.shutdown().await;
            }
            .await;
            let _ = outside
                .batch_execute(&format!(
                    "DROP OWNED BY \"{files_role}\", \"{ok_role}\";
                     DROP ROLE \"{files_role}\"; DROP ROLE \"{ok_role}\";"
                ))
                .await;
            body
        },
    )
    .await;
}

#[tokio::test]
async fn postgres_huge_answers_are_cut_to_the_byte_cap() {
    with_postgres("postgres_huge_answers_are_cut_to_the_byte_cap", async |h| {
        let (wh, s) = loaded(&h, "qsbig").await;
        let cap = 16 * 1024 * 1024;
        for sql in [
            "select repeat('x', 1000000) from generate_series(1, 300)",
            "select repeat('x', 1000000) as a, 1 as b from generate_series(1, 400)",
        ] {
            let started = Instant::now();
            let r = h.query(&wh, sql).await;
            assert!(r.truncated, "{sql}");
            assert_eq!(r.truncated_reason, Some(TruncatedReason::MaxBytes));
            assert!(!r.rows.is_empty() && r.rows.len() < 17, "{}", r.rows.len());
            assert!(rows_bytes(&r) <= cap);
            assert!(started.elapsed() < Duration::from_secs(20));
        }
        // One 300 MB cell: cut in the server to half the cap.
        let r = h.query(&wh, "select repeat('x', 300000000) as big").await;
        assert_eq!(r.rows.len(), 1);
        assert_eq!(r.rows[0][0].as_str().map(str::len), Some(cap / 2));
        assert_eq!(r.truncated_reason, Some(TruncatedReason::MaxBytes));
        assert_eq!(r.columns[0].ty, "text");

        // Nothing of those statements is still running in the server.
        let outside = pg_connect().await.expect("outside");
        let role = tributary_warehouse::query_role_name("test", &h.state_schema);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let active: i64 = outside
                .query_one(
                    "select count(*) from pg_stat_activity where usename = $1 and state = 'active'",
                    &[&role],
                )
                .await
                .expect("activity")
                .get(0);
            if active == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "a cut query kept running");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Sessions stay usable, and small answers are whole.
        let r = h
            .query(&wh, &format!("select id from {s}.tracks order by id"))
            .await;
        assert_eq!(r.rows.len(), 3);
        assert!(!r.truncated);
        assert_eq!(r.truncated_reason, None);
        wh.shutdown().await;

        // A small cap cuts multi-byte text on a character boundary.
        let mut config = h.config();
        config.query_max_bytes = 10_000;
        let wh = h.open_with(config).await;
        let r = h.query(&wh, "select repeat('é', 20000) as e").await;
        assert_eq!(r.rows[0][0].as_str().map(|t| t.chars().count()), Some(2500));
        assert!(r.truncated);
        wh.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn postgres_ordinary_queries_still_work() {
    with_postgres("postgres_ordinary_queries_still_work", async |h| {
        let (wh, s) = loaded(&h, "qsok").await;
        let r = h.query(&wh, &format!("select * from {s}.viewed")).await;
        assert_eq!(r.rows.len(), 3);
        let r = h
            .query(
                &wh,
                &format!(
                    "select v.id, v.flag, v.n, t.received_at from {s}.viewed v
                     join {s}.tracks t on t.id = v.id order by v.n"
                ),
            )
            .await;
        assert_eq!(r.rows[0][0], json!("qs-0"));
        assert_eq!(r.rows[0][1], json!(true));
        assert_eq!(r.rows[1][2], json!(1));
        assert!(r.rows[0][3].as_str().is_some_and(|t| t.ends_with('Z')));
        let types: Vec<&str> = r.columns.iter().map(|c| c.ty.as_str()).collect();
        assert_eq!(types, ["text", "boolean", "bigint", "timestamp"]);
        let r = h
            .query(
                &wh,
                &format!("with x as (select n from {s}.viewed) select sum(n)::bigint as s, count(*) from x"),
            )
            .await;
        assert_eq!(r.rows, vec![vec![json!(3), json!(3)]]);
        assert_eq!(r.columns[0].name, "s");
        let r = h.query(&wh, &format!("explain select * from {s}.tracks")).await;
        assert!(r.rows[0][0].as_str().is_some_and(|p| p.contains("Scan")));
        let r = h
            .query(&wh, &format!("explain (format json) select * from {s}.tracks"))
            .await;
        assert!(r.rows[0][0].is_array(), "{:?}", r.rows);
        let r = h.query(&wh, "values (1, 'a'), (2, null)").await;
        assert_eq!(r.rows, vec![vec![json!(1), json!("a")], vec![json!(2), Value::Null]]);
        let r = h.query(&wh, &format!("table {s}.viewed")).await;
        assert_eq!(r.rows.len(), 3);
        let r = h.query(&wh, "select 1 as a, 1 as a, null::int as n, '{\"k\": 1}'::jsonb as j").await;
        assert_eq!(r.rows, vec![vec![json!(1), json!(1), Value::Null, json!({"k": 1})]]);

        // A table the loader creates after the first query is readable too.
        let last = h
            .append("qs-source", vec![track("qs-c", "Clicked", json!({}))])
            .await;
        h.wait_loaded(&wh, last).await;
        assert_eq!(h.count(&wh, &format!("{s}.clicked")).await, 1);
        wh.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn sqlite_attach_answers_the_same_for_any_path() {
    let h = Harness::sqlite().await;
    let (wh, _) = loaded(&h, "site").await;
    let real = h.dir.path().join("real.sqlite");
    let c = rusqlite::Connection::open(&real).expect("real file");
    c.execute_batch("create table secret (a text); insert into secret values ('s')")
        .expect("write");
    drop(c);
    let other = h.dir.path().join("other.txt");
    std::fs::write(&other, "not a database").expect("write");
    let missing = h.dir.path().join("missing.sqlite");
    let mut answers = Vec::new();
    for path in [&real, &other, &missing] {
        for sql in [
            format!("attach database '{}' as x", path.display()),
            format!("ATTACH '{}' AS x", path.display()),
        ] {
            match wh.query(&sql).await {
                Err(WarehouseError::NotAllowed(m)) => answers.push(m),
                other => panic!("{sql}: expected NotAllowed, got {other:?}"),
            }
        }
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert!(!missing.exists());
    wh.shutdown().await;
}

#[tokio::test]
async fn sqlite_write_pragmas_and_vacuum_into_are_refused() {
    let h = Harness::sqlite().await;
    let (wh, s) = loaded(&h, "site").await;
    let target = h.dir.path().join("copy.sqlite");
    for sql in [
        "pragma user_version = 7".to_string(),
        "pragma site.user_version = 7".to_string(),
        "pragma journal_mode = delete".to_string(),
        "pragma writable_schema = on".to_string(),
        format!("vacuum {s} into '{}'", target.display()),
        format!("vacuum into '{}'", target.display()),
        "select load_extension('/tmp/x')".to_string(),
        format!("delete from {s}.tracks"),
    ] {
        let r = wh.query(&sql).await;
        assert!(refused(&r), "{sql}: {r:?}");
    }
    assert!(!target.exists());
    let file = h.dir.path().join("warehouse").join(format!("{s}.sqlite"));
    let c = rusqlite::Connection::open(&file).expect("open schema file");
    let v: i64 = c
        .query_row("pragma user_version", [], |r| r.get(0))
        .expect("user_version");
    assert_eq!(v, 0);
    let mode: String = c
        .query_row("pragma journal_mode", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    wh.shutdown().await;
}

#[tokio::test]
async fn sqlite_huge_answers_are_cut_to_the_byte_cap() {
    let h = Harness::sqlite().await;
    let (wh, s) = loaded(&h, "site").await;
    let cap = 16 * 1024 * 1024;
    for sql in [
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 300) select randomblob(1000000) from r",
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 400) select zeroblob(1000000), n from r",
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 300) select printf('%.*c', 1000000, 'x') from r",
    ] {
        let r = h.query(&wh, sql).await;
        assert!(r.truncated, "{sql}");
        assert_eq!(r.truncated_reason, Some(TruncatedReason::MaxBytes));
        assert!(!r.rows.is_empty() && r.rows.len() < 17, "{}", r.rows.len());
        assert!(rows_bytes(&r) <= cap);
    }
    // One value over the cap is refused by SQLite's length limit before it exists.
    for sql in [
        "select zeroblob(300000000)",
        "select length(randomblob(100000000))",
    ] {
        match wh.query(sql).await {
            Err(WarehouseError::BadQuery(m)) => assert!(m.contains("limit"), "{m}"),
            other => panic!("{sql}: expected BadQuery, got {other:?}"),
        }
    }
    // A cell between the cell cap and the byte cap is cut.
    let r = h
        .query(&wh, "select printf('%.*c', 9000000, 'x') as x")
        .await;
    assert_eq!(r.rows[0][0].as_str().map(str::len), Some(cap / 2));
    assert!(r.truncated);
    let r = h
        .query(&wh, &format!("select id from {s}.tracks order by id"))
        .await;
    assert_eq!(r.rows.len(), 3);
    assert_eq!(r.truncated_reason, None);
    wh.shutdown().await;
}

#[tokio::test]
async fn sqlite_ordinary_queries_still_work() {
    let h = Harness::sqlite().await;
    let (wh, s) = loaded(&h, "site").await;
    let r = h.query(&wh, &format!("select * from {s}.viewed")).await;
    assert_eq!(r.rows.len(), 3);
    let r = h
        .query(
            &wh,
            &format!(
                "select v.id, v.flag, v.n from {s}.viewed v join {s}.tracks t on t.id = v.id order by v.n"
            ),
        )
        .await;
    assert_eq!(r.rows[0], vec![json!("qs-0"), json!(true), json!(0)]);
    let r = h
        .query(
            &wh,
            &format!("with x as (select n from {s}.viewed) select sum(n) as s, count(*) from x"),
        )
        .await;
    assert_eq!(r.rows, vec![vec![json!(3), json!(3)]]);
    let r = h
        .query(&wh, &format!("explain query plan select * from {s}.tracks"))
        .await;
    assert!(!r.rows.is_empty());
    let r = h.query(&wh, "values (1, 'a'), (2, null)").await;
    assert_eq!(r.rows.len(), 2);
    let r = h
        .query(
            &wh,
            &format!("select json_extract('{{\"a\": 2}}', '$.a'), upper(id), date('2026-01-02') from {s}.tracks limit 1"),
        )
        .await;
    assert_eq!(r.rows[0][0], json!(2));
    wh.shutdown().await;
}

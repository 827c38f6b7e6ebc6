//! Scenarios run against every backend: records go into a real event log, the
//! warehouse loads them, and assertions read what a user would see through
//! `query`, `table` and `status`.

use serde_json::{Value, json};
use tributary_warehouse::{ColumnType, WarehouseError};

use crate::support::{Harness, track};

const AC_EVENTS: &[&str] = &[
    "Email Delivered",
    "Email Delivered",
    "Email Opened",
    "Email Link Clicked",
    "Email Unsubscribed",
    "Email Bounced",
    "Email Marked as Spam",
];

fn ac_message(i: usize, event: &str) -> Value {
    let mut props = json!({
        "email_id": "e-100",
        "email_subject": "Welcome aboard",
        "campaign_id": "42",
        "campaign_name": "Onboarding",
        "list_id": "3",
        "list_name": "Customers"
    });
    if event == "Email Link Clicked" {
        props["link_url"] = json!("https://example.com/start");
        props["link_id"] = json!("7");
    }
    json!({
        "type": "track",
        "messageId": format!("ac-{i}"),
        "event": event,
        "anonymousId": format!("jane{i}@example.com"),
        "properties": props,
        "context": {
            "traits": {"email": format!("jane{i}@example.com")},
            "library": {"name": "tributary-activecampaign", "version": "0.1.0"},
            "integration": {"name": "activecampaign"}
        },
        "integrations": {},
        "timestamp": format!("2026-11-27T05:10:5{i}.123Z"),
        "originalTimestamp": format!("2026-11-27T05:10:5{i}.123Z"),
        "receivedAt": "2026-11-27T05:11:00.000Z"
    })
}

fn column_names(r: &tributary_warehouse::QueryResult) -> Vec<&str> {
    r.columns.iter().map(|c| c.name.as_str()).collect()
}

/// The seed's query: Email Delivered rows in `activecampaign.email_delivered`, the six
/// email events in their own tables and in `tracks`.
pub async fn seed_query_returns_email_events(h: &Harness) {
    h.source("ac-source", "activecampaign");
    let ac = h.schema("activecampaign");
    let wh = h.open().await;
    let messages = AC_EVENTS
        .iter()
        .enumerate()
        .map(|(i, e)| ac_message(i, e))
        .collect();
    let last = h.append("ac-source", messages).await;
    h.wait_loaded(&wh, last).await;

    let r = h
        .query(&wh, &format!("select * from {ac}.email_delivered"))
        .await;
    assert_eq!(r.rows.len(), 2, "{r:?}");
    let names = column_names(&r);
    for expected in [
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
        "context_traits_email",
        "context_library_name",
        "email_id",
        "email_subject",
        "campaign_id",
        "campaign_name",
        "list_id",
        "list_name",
    ] {
        assert!(names.contains(&expected), "missing {expected} in {names:?}");
    }

    let rows = h
        .rows(
            &wh,
            &format!(
                "select id, event, event_text, email_subject, campaign_name, context_traits_email, \"timestamp\", anonymous_id
                 from {ac}.email_delivered order by id"
            ),
        )
        .await;
    assert_eq!(
        rows,
        vec![
            vec![
                json!("ac-0"),
                json!("email_delivered"),
                json!("Email Delivered"),
                json!("Welcome aboard"),
                json!("Onboarding"),
                json!("jane0@example.com"),
                json!("2026-11-27T05:10:50.123Z"),
                json!("jane0@example.com"),
            ],
            vec![
                json!("ac-1"),
                json!("email_delivered"),
                json!("Email Delivered"),
                json!("Welcome aboard"),
                json!("Onboarding"),
                json!("jane1@example.com"),
                json!("2026-11-27T05:10:51.123Z"),
                json!("jane1@example.com"),
            ],
        ]
    );

    // Every email event has its table; tracks has them all, without properties.
    for (table, n) in [
        ("email_delivered", 2),
        ("email_opened", 1),
        ("email_link_clicked", 1),
        ("email_unsubscribed", 1),
        ("email_bounced", 1),
        ("email_marked_as_spam", 1),
    ] {
        assert_eq!(h.count(&wh, &format!("{ac}.{table}")).await, n, "{table}");
    }
    assert_eq!(h.count(&wh, &format!("{ac}.tracks")).await, 7);
    let tracks = h.query(&wh, &format!("select * from {ac}.tracks")).await;
    assert!(!column_names(&tracks).contains(&"email_subject"));
    let by_event = h
        .rows(
            &wh,
            &format!("select event, event_text, count(*) from {ac}.tracks group by event, event_text order by event"),
        )
        .await;
    assert_eq!(by_event.len(), 6);
    assert_eq!(
        by_event[0],
        vec![json!("email_bounced"), json!("Email Bounced"), json!(1)]
    );
    let clicked = h
        .rows(
            &wh,
            &format!("select link_url from {ac}.email_link_clicked"),
        )
        .await;
    assert_eq!(clicked, vec![vec![json!("https://example.com/start")]]);

    // The table API: typed columns, newest rows.
    let t = wh.table(&ac, "email_delivered", 10).await.expect("table");
    assert_eq!(t.rows.len(), 2);
    let ty = |name: &str| {
        t.columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.ty.clone())
            .unwrap_or_default()
    };
    assert_eq!(ty("id"), "text");
    assert_eq!(ty("received_at"), "timestamp");
    assert_eq!(ty("timestamp"), "timestamp");
    assert_eq!(ty("email_subject"), "text");
    assert_eq!(t.columns[0].name, "id");
    let limited = wh.table(&ac, "email_delivered", 1).await.expect("table");
    assert_eq!(limited.rows.len(), 1);

    // Status: the schema, its tables and counts, a last load, no lag.
    let status = wh.status().await.expect("status");
    let schema = status
        .schemas
        .iter()
        .find(|s| s.name == ac)
        .expect("schema listed");
    let rows_of = |name: &str| {
        schema
            .tables
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.rows)
    };
    assert_eq!(rows_of("tracks"), Some(7));
    assert_eq!(rows_of("email_delivered"), Some(2));
    assert_eq!(rows_of("tributary_discards"), Some(0));
    assert!(rows_of("tributary_state").is_none());
    assert!(status.last_load_at.is_some());
    assert_eq!(status.lag_events, 0);
    let json = serde_json::to_value(&status).expect("serialize");
    assert_eq!(json["kind"], if h.postgres { "postgres" } else { "sqlite" });
    wh.shutdown().await;
}

/// identify → identifies + users (upsert, latest non-null traits); page, screen,
/// group, alias.
pub async fn loads_identifies_users_pages_screens_groups_aliases(h: &Harness) {
    h.source("web-source", "web");
    let web = h.schema("web");
    let wh = h.open().await;
    let base = |id: &str, kind: &str| {
        json!({"type": kind, "messageId": id, "receivedAt": "2026-11-27T05:11:00.000Z",
               "timestamp": "2026-11-27T05:10:00.000Z", "context": {"ip": "198.51.100.4"}})
    };
    let mut m = Vec::new();
    let mut i1 = base("id-1", "identify");
    i1["userId"] = json!("u1");
    i1["traits"] =
        json!({"email": "a@example.com", "plan": "free", "logins": 1, "address": {"city": "Oslo"}});
    m.push(i1);
    let mut i2 = base("id-2", "identify");
    i2["userId"] = json!("u1");
    i2["traits"] = json!({"plan": "pro"});
    m.push(i2);
    let mut i3 = base("id-3", "identify");
    i3["anonymousId"] = json!("anon-9");
    i3["traits"] = json!({"plan": "anonymous"});
    m.push(i3);
    let mut i4 = base("id-4", "identify");
    i4["userId"] = json!("u2");
    i4["traits"] = json!({"email": "b@example.com"});
    m.push(i4);
    let mut p = base("pg-1", "page");
    p["anonymousId"] = json!("anon-9");
    p["name"] = json!("Home");
    p["category"] = json!("Marketing");
    p["properties"] = json!({"title": "Welcome", "url": "https://example.com/", "path": "/"});
    m.push(p);
    let mut s = base("sc-1", "screen");
    s["userId"] = json!("u1");
    s["name"] = json!("Login");
    s["properties"] = json!({"variant": "b"});
    m.push(s);
    let mut g = base("gr-1", "group");
    g["userId"] = json!("u1");
    g["groupId"] = json!("acme");
    g["traits"] = json!({"employees": 40, "plan": "enterprise"});
    m.push(g);
    let mut a = base("al-1", "alias");
    a["userId"] = json!("u1");
    a["previousId"] = json!("anon-9");
    m.push(a);
    let last = h.append("web-source", m).await;
    h.wait_loaded(&wh, last).await;

    assert_eq!(h.count(&wh, &format!("{web}.identifies")).await, 4);
    assert_eq!(
        h.rows(
            &wh,
            &format!("select id, email, plan, logins, address_city from {web}.users order by id")
        )
        .await,
        vec![
            vec![
                json!("u1"),
                json!("a@example.com"),
                json!("pro"),
                json!(1),
                json!("Oslo")
            ],
            vec![
                json!("u2"),
                json!("b@example.com"),
                Value::Null,
                Value::Null,
                Value::Null
            ],
        ]
    );
    let users = h.query(&wh, &format!("select * from {web}.users")).await;
    assert!(!column_names(&users).contains(&"anonymous_id"));
    assert_eq!(
        h.rows(&wh, &format!("select id, user_id, anonymous_id, plan, context_ip from {web}.identifies where id = 'id-3'"))
            .await,
        vec![vec![json!("id-3"), Value::Null, json!("anon-9"), json!("anonymous"), json!("198.51.100.4")]]
    );
    assert_eq!(
        h.rows(
            &wh,
            &format!("select name, category, title, url, path from {web}.pages")
        )
        .await,
        vec![vec![
            json!("Home"),
            json!("Marketing"),
            json!("Welcome"),
            json!("https://example.com/"),
            json!("/")
        ]]
    );
    assert_eq!(
        h.rows(
            &wh,
            &format!("select name, variant, user_id from {web}.screens")
        )
        .await,
        vec![vec![json!("Login"), json!("b"), json!("u1")]]
    );
    assert_eq!(
        h.rows(
            &wh,
            &format!("select group_id, employees, plan, user_id from {web}.groups")
        )
        .await,
        vec![vec![
            json!("acme"),
            json!(40),
            json!("enterprise"),
            json!("u1")
        ]]
    );
    assert_eq!(
        h.rows(
            &wh,
            &format!("select previous_id, user_id from {web}.aliases")
        )
        .await,
        vec![vec![json!("anon-9"), json!("u1")]]
    );

    // A later batch: a null trait does not erase, a new value replaces.
    let mut i5 = base("id-5", "identify");
    i5["userId"] = json!("u1");
    i5["traits"] = json!({"plan": null, "logins": 2});
    let last = h.append("web-source", vec![i5]).await;
    h.wait_loaded(&wh, last).await;
    assert_eq!(
        h.rows(
            &wh,
            &format!("select plan, logins, email from {web}.users where id = 'u1'")
        )
        .await,
        vec![vec![json!("pro"), json!(2), json!("a@example.com")]]
    );
    assert_eq!(h.count(&wh, &format!("{web}.users")).await, 2);
    wh.shutdown().await;
}

/// First type wins; bigint meets double → double; uncastable values → NULL + discards.
pub async fn widens_and_discards(h: &Harness) {
    h.source("shop-source", "shop");
    let shop = h.schema("shop");
    let wh = h.open().await;
    let last = h
        .append(
            "shop-source",
            vec![track(
                "o-1",
                "Order Completed",
                json!({"total": 10, "coupon": "SPRING", "paid": true,
                       "shipped_at": "2026-11-27T05:10:53Z", "items": ["a", "b"], "qty": 1}),
            )],
        )
        .await;
    h.wait_loaded(&wh, last).await;
    let t = wh.table(&shop, "order_completed", 10).await.expect("table");
    let ty = |t: &tributary_warehouse::TableData, name: &str| {
        t.columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.ty.clone())
            .unwrap_or_default()
    };
    assert_eq!(ty(&t, "total"), ColumnType::Bigint.as_str());
    assert_eq!(ty(&t, "paid"), "boolean");
    assert_eq!(ty(&t, "shipped_at"), "timestamp");
    assert_eq!(ty(&t, "items"), "text");

    let last = h
        .append(
            "shop-source",
            vec![
                track(
                    "o-2",
                    "Order Completed",
                    json!({"total": 12.5, "coupon": 5, "paid": "yes",
                           "shipped_at": "not a date", "qty": "3"}),
                ),
                // Within one batch: a new column meets an integer, then a float.
                track("o-3", "Order Completed", json!({"discount": 1})),
                track("o-4", "Order Completed", json!({"discount": 0.5})),
            ],
        )
        .await;
    h.wait_loaded(&wh, last).await;

    let t = wh.table(&shop, "order_completed", 10).await.expect("table");
    assert_eq!(ty(&t, "total"), "double");
    assert_eq!(ty(&t, "coupon"), "text");
    assert_eq!(ty(&t, "paid"), "boolean");
    assert_eq!(ty(&t, "shipped_at"), "timestamp");
    assert_eq!(ty(&t, "qty"), "bigint");
    assert_eq!(ty(&t, "discount"), "double");

    assert_eq!(
        h.rows(
            &wh,
            &format!("select id, total, coupon, paid, shipped_at, items, qty, discount from {shop}.order_completed order by id")
        )
        .await,
        vec![
            vec![json!("o-1"), json!(10.0), json!("SPRING"), json!(true), json!("2026-11-27T05:10:53.000Z"), json!("[\"a\",\"b\"]"), json!(1), Value::Null],
            vec![json!("o-2"), json!(12.5), json!("5"), Value::Null, Value::Null, Value::Null, json!(3), Value::Null],
            vec![json!("o-3"), Value::Null, Value::Null, Value::Null, Value::Null, Value::Null, Value::Null, json!(1.0)],
            vec![json!("o-4"), Value::Null, Value::Null, Value::Null, Value::Null, Value::Null, Value::Null, json!(0.5)],
        ]
    );
    assert_eq!(
        h.rows(
            &wh,
            &format!("select table_name, column_name, column_value, reason, row_id from {shop}.tributary_discards order by column_name")
        )
        .await,
        vec![
            vec![json!("order_completed"), json!("paid"), json!("yes"), json!("cannot cast text to boolean"), json!("o-2")],
            vec![json!("order_completed"), json!("shipped_at"), json!("not a date"), json!("cannot cast text to timestamp"), json!("o-2")],
        ]
    );
    // The discards table says when.
    let when = h
        .rows(
            &wh,
            &format!("select received_at, uuid_ts from {shop}.tributary_discards"),
        )
        .await;
    assert_eq!(when[0][0], json!("2026-11-27T05:10:54.000Z"));
    assert!(when[0][1].is_string());
    wh.shutdown().await;
}

/// Quotes, semicolons, unicode, 300-character names, events named like system tables.
pub async fn hostile_names_are_loaded_under_safe_identifiers(h: &Harness) {
    h.source("hostile-source", "hostile");
    let s = h.schema("hostile");
    let wh = h.open().await;
    let long_event = "A Really Long Event Name ".repeat(12);
    let long_prop = "someVeryLongPropertyName".repeat(13);
    let mut props = json!({
        "\"quoted\"": 1,
        "semi;colon": "x; DROP TABLE tracks; --",
        "Ünïcode": "ü",
        "user_id": "from-properties",
        "timestamp": "prop-time",
        "context": {"ip": "shadow"}
    });
    props[long_prop.as_str()] = json!("long");
    let last = h
        .append(
            "hostile-source",
            vec![
                track("h-1", "Tracks", props.clone()),
                track("h-2", "Users", json!({"a": 1})),
                track("h-3", "\"; DROP TABLE tracks; --", json!({"b": 2})),
                track("h-4", "Ünïcode name", json!({"c": 3})),
                track("h-5", &long_event, json!({"d": 4})),
                track("h-6", "select", json!({"from": "where"})),
                track("h-7", "🎉", json!({"e": 5})),
            ],
        )
        .await;
    h.wait_loaded(&wh, last).await;

    // The system tables are intact and hold every event.
    assert_eq!(h.count(&wh, &format!("{s}.tracks")).await, 7);
    assert_eq!(h.count(&wh, &format!("{s}.\"_tracks\"")).await, 1);
    assert_eq!(h.count(&wh, &format!("{s}.\"_users\"")).await, 1);
    assert_eq!(h.count(&wh, &format!("{s}.drop_table_tracks")).await, 1);
    assert_eq!(h.count(&wh, &format!("{s}.n_code_name")).await, 1);
    assert_eq!(h.count(&wh, &format!("{s}.\"select\"")).await, 1);

    let status = wh.status().await.expect("status");
    let tables: Vec<String> = status
        .schemas
        .iter()
        .find(|x| x.name == s)
        .expect("schema")
        .tables
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let long_table = tables
        .iter()
        .find(|t| t.starts_with("a_really_long_event_name"))
        .expect("long table")
        .clone();
    assert_eq!(long_table.len(), 63);
    assert_eq!(h.count(&wh, &format!("{s}.{long_table}")).await, 1);
    let emoji = tables
        .iter()
        .find(|t| t.starts_with('_') && t.len() == 9)
        .expect("hash-named table for an emoji event");
    assert_eq!(h.count(&wh, &format!("{s}.\"{emoji}\"")).await, 1);

    // Properties: reserved names prefixed, data kept, hostile keys snake-cased.
    let r = h
        .query(&wh, &format!("select * from {s}.\"_tracks\""))
        .await;
    let names = column_names(&r);
    let value = |name: &str| {
        let i = names
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no column {name} in {names:?}"));
        r.rows[0][i].clone()
    };
    assert_eq!(value("user_id"), Value::Null);
    assert_eq!(value("_user_id"), json!("from-properties"));
    assert_eq!(value("_timestamp"), json!("prop-time"));
    assert_eq!(value("timestamp"), json!("2026-11-27T05:10:53.123Z"));
    assert_eq!(value("_context_ip"), json!("shadow"));
    assert_eq!(value("context_ip"), json!("203.0.113.9"));
    assert_eq!(value("quoted"), json!(1));
    assert_eq!(value("semi_colon"), json!("x; DROP TABLE tracks; --"));
    assert_eq!(value("n_code"), json!("ü"));
    assert_eq!(value("event"), json!("_tracks"));
    assert_eq!(value("event_text"), json!("Tracks"));
    let long_col = names
        .iter()
        .find(|n| n.starts_with("some_very_long_property_name"))
        .expect("long column");
    assert_eq!(long_col.len(), 63);
    assert_eq!(value(long_col), json!("long"));
    assert_eq!(
        h.rows(
            &wh,
            &format!("select event_text from {s}.drop_table_tracks")
        )
        .await,
        vec![vec![json!("\"; DROP TABLE tracks; --")]]
    );
    assert_eq!(
        h.rows(&wh, &format!("select \"from\" from {s}.\"select\""))
            .await,
        vec![vec![json!("where")]]
    );
    wh.shutdown().await;
}

/// Drop and reopen the warehouse: nothing is loaded twice, nothing is lost; a message
/// repeated in the log (beyond its dedupe window) is one row.
pub async fn restart_loads_nothing_twice(h: &Harness) {
    h.source("app-source", "app");
    h.source("app-source-2", "app");
    let app = h.schema("app");
    let mut config = h.config();
    config.batch_max = 7; // several batches per append
    let batch = |from: usize, to: usize| -> Vec<Value> {
        (from..to)
            .map(|i| track(&format!("r-{i}"), "Song Played", json!({"n": i})))
            .collect()
    };

    let wh = h.open_with(config.clone()).await;
    let last = h.append("app-source", batch(0, 30)).await;
    h.wait_loaded(&wh, last).await;
    wh.shutdown().await;
    drop(wh);

    // Records appended while the warehouse is down wait in the log.
    let last = h.append("app-source", batch(30, 45)).await;
    let wh = h.open_with(config.clone()).await;
    h.wait_loaded(&wh, last).await;
    assert_eq!(h.count(&wh, &format!("{app}.tracks")).await, 45);
    // Dropped without shutdown, reopened at once, while more arrive.
    drop(wh);
    let wh = h.open_with(config.clone()).await;
    let last = h.append("app-source", batch(45, 60)).await;
    h.wait_loaded(&wh, last).await;

    // The same messageIds again, from another source (the log keeps both copies).
    let last = h.append("app-source-2", batch(10, 20)).await;
    h.wait_loaded(&wh, last).await;

    assert_eq!(h.count(&wh, &format!("{app}.tracks")).await, 60);
    assert_eq!(h.count(&wh, &format!("{app}.song_played")).await, 60);
    assert_eq!(
        h.rows(
            &wh,
            &format!("select count(distinct id), min(n), max(n) from {app}.song_played")
        )
        .await,
        vec![vec![json!(60), json!(0), json!(59)]]
    );
    let lag = wh.lag();
    assert_eq!(lag.events, 0);
    assert_eq!(lag.loaded_seq, lag.head);
    assert!(!lag.retrying);
    wh.shutdown().await;

    // A fresh warehouse process on the same state resumes at the end.
    let wh = h.open_with(config).await;
    let head = wh.lag().head;
    h.wait_loaded(&wh, head).await;
    assert_eq!(h.count(&wh, &format!("{app}.tracks")).await, 60);
    wh.shutdown().await;
}

/// Queries are read-only, single-statement, bounded; unknown tables are 404s.
pub async fn queries_are_read_only(h: &Harness) {
    h.source("ro-source", "ro");
    let ro = h.schema("ro");
    let mut config = h.config();
    config.query_max_rows = 5;
    let wh = h.open_with(config).await;
    let last = h
        .append(
            "ro-source",
            (0..8)
                .map(|i| track(&format!("q-{i}"), "Viewed", json!({})))
                .collect(),
        )
        .await;
    h.wait_loaded(&wh, last).await;

    for sql in [
        format!("delete from {ro}.tracks"),
        format!("drop table {ro}.tracks"),
        format!("insert into {ro}.tracks (id) values ('x')"),
        format!("update {ro}.tracks set event = 'x'"),
        format!("create table {ro}.evil (a int)"),
        format!("select 1; delete from {ro}.tracks"),
        "select nonsense from nowhere".to_string(),
    ] {
        match wh.query(&sql).await {
            Err(WarehouseError::BadQuery(_) | WarehouseError::NotAllowed(_)) => {}
            other => panic!("{sql:?} should be refused, got {other:?}"),
        }
    }
    let r = h
        .query(&wh, &format!("select id from {ro}.tracks order by id"))
        .await;
    assert_eq!(r.rows.len(), 5);
    assert!(r.truncated);
    let r = h
        .query(&wh, &format!("select count(*) as n from {ro}.tracks"))
        .await;
    assert_eq!(r.rows, vec![vec![json!(8)]]);
    assert_eq!(r.columns[0].name, "n");
    assert_eq!(r.columns[0].ty, "bigint");
    assert!(!r.truncated);

    match wh.table(&ro, "no_such_table", 10).await {
        Err(WarehouseError::NotFound(_)) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    match wh.table(&h.schema("no_such_schema"), "tracks", 10).await {
        Err(WarehouseError::NotFound(_)) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    match wh.table("Bad Schema\"", "tracks", 10).await {
        Err(WarehouseError::NotFound(_)) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    wh.shutdown().await;
}

/// A record the warehouse refuses is isolated and recorded in `tributary_discards`;
/// the records around it load; records of unknown sources are skipped.
pub async fn a_refused_record_does_not_stop_the_loader(h: &Harness) {
    h.source("p-source", "poison");
    let p = h.schema("poison");
    let wh = h.open().await;
    let mut bad = track("bad-\u{0}-id", "Signed Up", json!({"x": 1}));
    bad["userId"] = json!("u-bad");
    let last = h
        .append(
            "p-source",
            vec![
                track("good-1", "Signed Up", json!({"x": 1})),
                bad,
                track("good-2", "Signed Up", json!({"x": 2})),
            ],
        )
        .await;
    let gone = h
        .append("deleted-source", vec![track("g-1", "Signed Up", json!({}))])
        .await;
    h.wait_loaded(&wh, last.max(gone)).await;

    assert_eq!(
        h.rows(&wh, &format!("select id from {p}.signed_up order by id"))
            .await,
        vec![vec![json!("good-1")], vec![json!("good-2")]]
    );
    assert_eq!(h.count(&wh, &format!("{p}.tracks")).await, 2);
    let d = h
        .rows(
            &wh,
            &format!(
                "select table_name, column_name, reason, column_value from {p}.tributary_discards"
            ),
        )
        .await;
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0][0], json!("signed_up"));
    assert_eq!(d[0][1], json!(""));
    assert!(
        d[0][2]
            .as_str()
            .unwrap_or("")
            .starts_with("record refused by the warehouse")
    );
    assert!(d[0][3].as_str().unwrap_or("").contains("u-bad"));
    let lag = wh.lag();
    assert_eq!(lag.events, 0);
    wh.shutdown().await;
}

/// The position is rewound behind what the warehouse holds (a restored backup of the
/// state, a crash between a schema file and the global mark): the `id` guard alone
/// keeps every row, discard and `users` value single and current.
pub async fn a_rewound_position_loads_nothing_twice<F>(h: &Harness, rewind: impl FnOnce() -> F)
where
    F: std::future::Future<Output = ()>,
{
    h.source("rw-source", "rewind");
    let s = h.schema("rewind");
    let identify = |id: &str, plan: &str| {
        json!({"type": "identify", "messageId": id, "userId": "u1", "traits": {"plan": plan},
               "receivedAt": "2026-11-27T05:11:00.000Z"})
    };
    let wh = h.open().await;
    let last = h
        .append(
            "rw-source",
            vec![
                track("w-1", "Signed Up", json!({"n": 1})),
                track("w-2", "Signed Up", json!({"n": "not a number"})),
                identify("i-1", "old"),
            ],
        )
        .await;
    h.wait_loaded(&wh, last).await;
    let last = h.append("rw-source", vec![identify("i-2", "new")]).await;
    h.wait_loaded(&wh, last).await;
    wh.shutdown().await;
    drop(wh);

    rewind().await;

    let wh = h.open().await;
    let last = h
        .append(
            "rw-source",
            vec![track("w-3", "Signed Up", json!({"n": 3}))],
        )
        .await;
    h.wait_loaded(&wh, last).await;
    assert_eq!(h.count(&wh, &format!("{s}.tracks")).await, 3);
    assert_eq!(
        h.rows(&wh, &format!("select id, n from {s}.signed_up order by id"))
            .await,
        vec![
            vec![json!("w-1"), json!(1)],
            vec![json!("w-2"), Value::Null],
            vec![json!("w-3"), json!(3)],
        ]
    );
    assert_eq!(h.count(&wh, &format!("{s}.identifies")).await, 2);
    assert_eq!(h.count(&wh, &format!("{s}.tributary_discards")).await, 1);
    // Replaying the old identify did not bring its trait back.
    assert_eq!(
        h.rows(&wh, &format!("select id, plan from {s}.users"))
            .await,
        vec![vec![json!("u1"), json!("new")]]
    );
    wh.shutdown().await;
}

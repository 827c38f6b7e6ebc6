//! The scenarios on the real PostgreSQL, plus loading through an outage.

use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tributary_eventlog::EventLog;
use tributary_warehouse::{HealthState, WarehouseError};

use crate::scenarios;
use crate::support::{Harness, track, with_postgres};

#[tokio::test]
async fn postgres_seed_query_returns_email_events() {
    with_postgres("postgres_seed_query_returns_email_events", async |h| {
        scenarios::seed_query_returns_email_events(&h).await
    })
    .await;
}

#[tokio::test]
async fn postgres_loads_identifies_users_pages_screens_groups_aliases() {
    with_postgres(
        "postgres_loads_identifies_users_pages_screens_groups_aliases",
        async |h| scenarios::loads_identifies_users_pages_screens_groups_aliases(&h).await,
    )
    .await;
}

#[tokio::test]
async fn postgres_widens_and_discards() {
    with_postgres("postgres_widens_and_discards", async |h| {
        scenarios::widens_and_discards(&h).await
    })
    .await;
}

#[tokio::test]
async fn postgres_hostile_names_are_loaded_under_safe_identifiers() {
    with_postgres(
        "postgres_hostile_names_are_loaded_under_safe_identifiers",
        async |h| scenarios::hostile_names_are_loaded_under_safe_identifiers(&h).await,
    )
    .await;
}

#[tokio::test]
async fn postgres_restart_loads_nothing_twice() {
    with_postgres("postgres_restart_loads_nothing_twice", async |h| {
        scenarios::restart_loads_nothing_twice(&h).await
    })
    .await;
}

#[tokio::test]
async fn postgres_queries_are_read_only() {
    with_postgres("postgres_queries_are_read_only", async |h| {
        scenarios::queries_are_read_only(&h).await;
        // A session setting changed by a query does not outlive it.
        let wh = h.open().await;
        let _ = wh
            .query("select set_config('default_transaction_read_only', 'off', false)")
            .await;
        for _ in 0..6 {
            match wh
                .query(&format!("create table {}.evil (a int)", h.schema("ro")))
                .await
            {
                Err(WarehouseError::BadQuery(_)) => {}
                other => panic!("create should be refused, got {other:?}"),
            }
        }
        wh.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn postgres_a_refused_record_does_not_stop_the_loader() {
    with_postgres(
        "postgres_a_refused_record_does_not_stop_the_loader",
        async |h| scenarios::a_refused_record_does_not_stop_the_loader(&h).await,
    )
    .await;
}

/// A TCP forwarder to PostgreSQL that can be cut and restored, standing in for a
/// database restart or a network partition.
struct Proxy {
    port: u16,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    async fn start(port: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Proxy {
            port,
            task: Some(task),
        }
    }

    /// Closes the listener and every forwarded connection.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// PostgreSQL goes away mid-load: ingest continues, the loader retries, lag shows,
/// and once it is back every record is loaded exactly once.
#[tokio::test]
async fn postgres_outage_is_retried_and_caught_up_exactly_once() {
    with_postgres(
        "postgres_outage_is_retried_and_caught_up_exactly_once",
        async |h| {
            let mut proxy = Proxy::start(0).await;
            let mut config = h.config();
            config.url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port);
            h.source("o", "outage");
            let s = h.schema("outage");
            let wh = h.open_with(config.clone()).await;
            let batch = |from: usize, to: usize| -> Vec<serde_json::Value> {
                (from..to)
                    .map(|i| track(&format!("o-{i}"), "Tick", json!({"i": i})))
                    .collect()
            };
            let last = h.append("o", batch(0, 20)).await;
            h.wait_loaded(&wh, last).await;

            proxy.cut();
            let last = h.append("o", batch(20, 40)).await;
            // The loader notices and retries; the records wait in the log.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !wh.lag().retrying {
                assert!(
                    std::time::Instant::now() < deadline,
                    "loader never reported retrying"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(wh.lag().events >= 1);
            assert!(matches!(
                wh.query("select 1").await,
                Err(WarehouseError::Unavailable(_))
            ));

            let _proxy = Proxy::start(proxy.port).await;
            h.wait_loaded(&wh, last).await;
            assert!(!wh.lag().retrying);
            assert_eq!(h.count(&wh, &format!("{s}.tick")).await, 40);
            assert_eq!(
                h.rows(
                    &wh,
                    &format!("select count(distinct id), min(i), max(i) from {s}.tick")
                )
                .await,
                vec![vec![json!(40), json!(0), json!(39)]]
            );
            wh.shutdown().await;
        },
    )
    .await;
}

/// An unreachable server does not fail startup; reads answer 503.
#[tokio::test]
async fn postgres_unreachable_at_start_is_retried_not_fatal() {
    // Only the log and catalog of the harness are used; the URL points nowhere.
    let h = Harness::sqlite().await;
    let mut config = h.config();
    // Nothing listens on port 1.
    config.url = "postgres://postgres@127.0.0.1:1/test".into();
    h.source("x", "unreach");
    let _ = h
        .append(
            "x",
            vec![
                track("u-1", "Tick", json!({})),
                track("u-2", "Tick", json!({})),
                track("u-3", "Tick", json!({})),
            ],
        )
        .await;
    // An earlier run loaded up to seq 1 and left that hint in the log.
    h.log
        .commit("warehouse", &h.log.start(0).at(1))
        .await
        .expect("commit hint");
    let wh = h.open_with(config).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !wh.lag().retrying {
        assert!(
            std::time::Instant::now() < deadline,
            "loader never reported retrying"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Lag is estimated from the log's hint while the warehouse cannot be asked.
    let lag = wh.lag();
    assert_eq!(lag.loaded_seq, 1);
    assert_eq!(lag.events, 2);
    assert!(lag.seconds > 0.0);
    // The status still answers, naming the cause (PostgreSQL's text, not `db error`).
    let status = wh.status().await.expect("status while failing");
    assert!(status.schemas.is_empty());
    assert_eq!(status.health.state, HealthState::Retrying);
    let error = status.health.last_error.expect("last error");
    assert!(error.contains("Connection refused"), "{error}");
    assert!(status.health.failing_since.is_some());
    assert!(matches!(
        wh.query("select 1").await,
        Err(WarehouseError::Unavailable(_))
    ));
    wh.shutdown().await;
}

/// Load throughput of a 20-property event into PostgreSQL (two rows per event:
/// `tracks` and the event table). Prints a figure; asserts only correctness.
/// Run with `cargo test -p tributary-warehouse --test it -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "throughput figure, run on demand"]
async fn postgres_load_throughput() {
    with_postgres("postgres_load_throughput", async |h| {
        h.source("perf", "perf");
        let s = h.schema("perf");
        let n = 50_000usize;
        let mut last = 0;
        for chunk in 0..(n / 5_000) {
            let batch = (chunk * 5_000..(chunk + 1) * 5_000)
                .map(|i| {
                    let mut props = serde_json::Map::new();
                    for p in 0..20 {
                        props.insert(
                            format!("prop{p}"),
                            match p % 4 {
                                0 => json!(i),
                                1 => json!(i as f64 * 0.5),
                                2 => json!(format!("value-{i}-{p}")),
                                _ => json!(i % 2 == 0),
                            },
                        );
                    }
                    track(
                        &format!("t-{i}"),
                        "Perf Event",
                        serde_json::Value::Object(props),
                    )
                })
                .collect();
            last = h.append("perf", batch).await;
        }
        let started = std::time::Instant::now();
        let wh = h.open().await;
        h.wait_loaded(&wh, last).await;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "postgres load: {n} events ({} rows) in {secs:.2} s = {:.0} rows/s",
            2 * n,
            (2 * n) as f64 / secs
        );
        assert_eq!(h.count(&wh, &format!("{s}.perf_event")).await, n as i64);
        wh.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn postgres_a_rewound_position_loads_nothing_twice() {
    with_postgres(
        "postgres_a_rewound_position_loads_nothing_twice",
        async |h| {
            let state = h.state_schema.clone();
            scenarios::a_rewound_position_loads_nothing_twice(&h, || async move {
                let client = crate::support::pg_connect().await.expect("connect");
                client
                    .execute(&format!("UPDATE \"{state}\".loader_state SET seq = 0"), &[])
                    .await
                    .expect("rewind");
            })
            .await
        },
    )
    .await;
}

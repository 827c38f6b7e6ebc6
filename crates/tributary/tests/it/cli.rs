//! The command line as a user reads it: `sources list` and `destinations list` print
//! aligned tables by default, and `--json` prints the API's JSON instead.

use serde_json::{Value, json};

use crate::harness::Server;

/// Runs `tributary ARGS` against `s`; panics unless it succeeds; returns stdout.
pub(crate) async fn cli(s: &Server, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(args)
        .env("TRIBUTARY_SERVER", &s.url)
        .env("TRIBUTARY_ADMIN_TOKEN", &s.token)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "tributary {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Byte offsets where each header word of the table's first line starts.
fn column_starts(header: &str) -> Vec<usize> {
    let mut starts = vec![0];
    let b = header.as_bytes();
    for i in 2..b.len() {
        if b[i] != b' ' && b[i - 1] == b' ' && b[i - 2] == b' ' {
            starts.push(i);
        }
    }
    starts
}

/// Every cell of every row begins at its header's column, and the cells before it
/// end with at least one space: the columns line up and never run together.
fn assert_aligned(table: &str, first_cells: &[&str]) {
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let starts = column_starts(header);
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), first_cells.len(), "{table}");
    for (row, first) in rows.iter().zip(first_cells) {
        assert!(row.starts_with(first), "{table}");
        for &s in &starts[1..] {
            assert!(
                row.len() > s && row.as_bytes()[s - 1] == b' ' && row.as_bytes()[s] != b' ',
                "column at {s} misaligned in {row:?}:\n{table}"
            );
        }
    }
}

#[tokio::test]
async fn sources_and_destinations_list_as_aligned_tables_or_json() {
    let s = Server::start();
    let a = s
        .create_source(
            "activecampaign",
            "ActiveCampaign account with a long name",
            "ac",
        )
        .await;
    let b = s
        .create_source("http", "Web", "a_rather_long_schema_name")
        .await;
    let table = cli(&s, &["sources", "list"]).await;
    assert!(table.starts_with("ID  "), "{table}");
    assert_aligned(
        &table,
        &[a["id"].as_str().unwrap(), b["id"].as_str().unwrap()],
    );
    let v: Value = serde_json::from_str(&cli(&s, &["sources", "list", "--json"]).await).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);

    let created = cli(
        &s,
        &[
            "destinations",
            "create",
            "--type",
            "webhook",
            "--name",
            "My hook",
            "--settings",
            &json!({"url": "http://127.0.0.1:9/hook"}).to_string(),
        ],
    )
    .await;
    assert!(created.contains("name:         My hook"), "{created}");
    let id = created
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .unwrap()
        .trim()
        .to_string();
    let table = cli(&s, &["destinations", "list"]).await;
    assert!(
        table.lines().next().unwrap().contains("DELIVERED"),
        "{table}"
    );
    assert_aligned(&table, &[&id]);
    let v: Value =
        serde_json::from_str(&cli(&s, &["destinations", "list", "--json"]).await).unwrap();
    assert_eq!(v[0]["id"], id.as_str(), "{v}");
    let v: Value =
        serde_json::from_str(&cli(&s, &["destinations", "show", &id, "--json"]).await).unwrap();
    assert_eq!(v["settings"]["url"], "http://127.0.0.1:9/hook");
}

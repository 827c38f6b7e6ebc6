//! Configuration as the binary reads it: the one environment rule, unknown variables
//! warned about (not fatal), a unit-less duration refused at start with the
//! variable's name.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Server, free_port};

#[tokio::test]
async fn unknown_variables_are_warned_about_and_the_server_still_starts() {
    let s = Server::start_with(vec![
        ("TRIBUTARY_NOPE_SETTING".into(), "1".into()),
        ("TRIBUTARY_LOG_RETENTION".into(), "36h".into()),
        ("TRIBUTARY_WAREHOUSE_BATCH_MAX".into(), "5".into()),
        ("TRIBUTARY_WAREHOUSE_BATCH_INTERVAL".into(), "250ms".into()),
    ]);
    let log = s.log();
    assert!(
        log.contains("TRIBUTARY_NOPE_SETTING") && log.contains("names no setting"),
        "{log}"
    );
    for known in [
        "TRIBUTARY_LOG_RETENTION",
        "TRIBUTARY_WAREHOUSE_BATCH_MAX",
        "TRIBUTARY_WAREHOUSE_BATCH_INTERVAL",
    ] {
        assert!(!log.contains(known), "{known} warned about: {log}");
    }
}

#[tokio::test]
async fn a_duration_without_a_unit_stops_the_start_and_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("TRIBUTARY_LOG_RETENTION", "36")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started with a unit-less duration");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read as _;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("TRIBUTARY_LOG_RETENTION") && stderr.contains("no unit"),
        "{stderr}"
    );
}

//! The differential check behind the `warehouse_plan` fuzz target and the planner's
//! proptests (compiled for tests and with the `fuzz` feature only).

use tributary_eventlog::Record;

use super::parse::Msg;
use super::{Names, plan_msg, plan_record_with};

/// For the `warehouse_plan` fuzz target, not an API: plans `payload` both ways — the
/// fast path [`plan_record_with`] takes and the general parse alone — and describes
/// the first difference.
#[doc(hidden)]
pub fn fuzz_plan_differential(payload: &str) -> Result<(), String> {
    let record = Record {
        partition: 0,
        seq: 1,
        source_id: "src".into(),
        message_id: "m".into(),
        call_type: tributary_eventlog::CallType::Track,
        event: None,
        user_id: None,
        anonymous_id: None,
        received_at_ms: 1_800_000_000_000,
        payload: payload.into(),
    };
    let uuid_ts = "2027-01-15T08:00:01.000Z";
    let mut fast = Vec::new();
    let fast_result = plan_record_with(&record, uuid_ts, &mut Names::default(), &mut fast);
    let Ok(msg) = Msg::parse_general(payload) else {
        // Text a `serde_json::Value` cannot hold — a number beyond `f64` in a
        // field the loader never reads, say — may still plan on the fast path,
        // which only skips such fields: more lenient, nothing lost. (The log only
        // holds payloads ingest serialized from a `Value`, so none are like this.)
        return Ok(());
    };
    let mut general = Vec::new();
    let general_ok = plan_msg(&record, msg, uuid_ts, &mut Names::default(), &mut general).is_ok();
    if fast_result.is_ok() != general_ok {
        return Err(format!(
            "fast path {fast_result:?}, general parse ok: {general_ok}"
        ));
    }
    if general_ok && fast != general {
        return Err(format!("rows differ:\n{fast:?}\n{general:?}"));
    }
    Ok(())
}

//! The warehouse planner's one-pass text path against its general parse: any
//! payload must plan to the same rows both ways (or be refused by both), and
//! neither may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(payload) = std::str::from_utf8(data)
        && let Err(difference) = tributary_warehouse::fuzz_plan_differential(payload)
    {
        panic!("{difference}\npayload: {payload}");
    }
});

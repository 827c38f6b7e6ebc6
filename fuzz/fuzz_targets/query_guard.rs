//! The query endpoint's statement allowlist on arbitrary text: it must not panic,
//! and whatever it accepts must print back (through the parser) to a text it accepts
//! as the same kind, and be refused with a second statement appended.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data)
        && let Err(difference) = tributary_warehouse::query::guard::fuzz_check(sql)
    {
        panic!("{difference}\nsql: {sql:?}");
    }
});

//! Integration tests of the event logs against real servers: the JetStream log on
//! real `nats-server` processes (skipped with a `SKIP` line when the binary is not
//! installed, failing instead under `TRIBUTARY_TEST_REQUIRE=all`).

mod jetstream;
mod nats;
mod retention;

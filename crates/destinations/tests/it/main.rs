//! End-to-end tests of the destinations crate: a real `SqliteLog`, the `Engine`,
//! and HTTP receivers on 127.0.0.1 (one binary to keep link time down).

mod activecampaign;
mod delivery;
mod restart;
mod retention;
mod segment;
mod support;

//! End-to-end tests of the `tributary` binary: real processes on real sockets, real
//! SQLite files, real SDK clients. One test binary for the crate (link time).
//!
//! Tests that need an outside service (Python, Node, PostgreSQL) print `SKIP …` with
//! the reason when it is absent, and fail instead when `TRIBUTARY_TEST_REQUIRE=all`.

mod ac_api;
mod activecampaign;
mod browser;
mod cli;
mod cluster;
mod cluster_ops;
mod config;
mod control_plane;
mod crash;
mod destinations;
mod diskfull;
mod harness;
mod hostile;
mod poison;
mod query_safety;
mod report;
mod retention;
mod sdk;
mod startup;
mod sync;
mod tracking;
mod warehouse;

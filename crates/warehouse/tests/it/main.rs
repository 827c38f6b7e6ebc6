//! Integration tests of the warehouse: a real `SqliteLog`, real SQLite files and the
//! real PostgreSQL at 127.0.0.1:5432 (skipped with a `SKIP` line when it is not
//! reachable, unless `TRIBUTARY_TEST_REQUIRE=all`).

mod counters;
mod fencing;
mod positions;
mod postgres;
mod query_safety;
mod scenarios;
mod sqlite;
mod support;

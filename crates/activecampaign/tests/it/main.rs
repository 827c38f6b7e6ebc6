//! Integration tests for `tributary-activecampaign`, in one binary (STYLE.md §8):
//! every shared fixture body, variants of them, malformed input, and property tests
//! that parsing and mapping never panic.

mod fixtures;
mod ingest;
mod properties;
mod support;
mod variants;

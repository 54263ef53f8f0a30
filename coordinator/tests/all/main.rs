//! Integration tests of the run coordinator: real HTTP servers on 127.0.0.1:0, real SQLite files
//! and PostgreSQL databases (`JARVIS_TEST_DATABASE=postgres` runs the suite on PostgreSQL).

// Helpers are `pub` for the test modules; nothing here is a public API.
#![allow(unreachable_pub)]

mod api;
mod cluster;
mod e2e;
mod executors;
mod faults;
mod latency;
mod peers;
mod proxy;
mod retention;
mod support;

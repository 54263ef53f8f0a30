//! Integration tests of the run coordinator: real HTTP servers on 127.0.0.1:0, real SQLite files.

// Helpers are `pub` for the test modules; nothing here is a public API.
#![allow(unreachable_pub)]

mod api;
mod e2e;
mod executors;
mod faults;
mod latency;
mod peers;
mod retention;
mod support;

//! Integration tests: real executors on 127.0.0.1:0 running real components.

mod api;
mod containment;
mod limits;
mod packs;
mod retries;
mod support;

//! Integration tests: real executors on 127.0.0.1:0 running real components.

mod api;
mod bounds;
mod containment;
mod gates;
mod grants;
mod limits;
mod metrics;
mod needs;
mod packs;
mod reload;
mod retries;
mod support;

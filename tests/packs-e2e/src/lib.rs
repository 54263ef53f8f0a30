//! End-to-end tests of the node packs: the packs built from source in
//! `nodepacks/` (the jarvis.core pack, the Python example pack, a freshly
//! scaffolded pack) served by the real executor on 127.0.0.1:0.
//!
//! The tests live in `tests/all/`; this crate has no code of its own. They
//! need the built packs (`nodepacks/build-all.sh`). Without them a test says
//! `SKIPPED` and why on stderr, unless `JARVIS_REQUIRE_PACKS` is set, in which
//! case it fails: CI sets it after building the packs.
//!
//! # Layout
//! - `tests/all/support.rs`: finding the packs, starting executors, requests.
//! - `tests/all/core.rs`: jarvis.core against the Python reference's recorded behaviour.
//! - `tests/all/python.rs`: the Python example pack.
//! - `tests/all/scaffold.rs`: `jarvis-pack new` then `build`, in one go.
//! - `reference/`: the reference's behaviour, recorded by `generate.py`.

//! End-to-end tests of the node packs in the executor; see `tests/`.

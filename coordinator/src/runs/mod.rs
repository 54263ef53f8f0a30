//! Runs and NodeRuns: the domain rules, apart from HTTP and from the store's SQL.

pub mod create;
pub mod error;
pub mod lifecycle;

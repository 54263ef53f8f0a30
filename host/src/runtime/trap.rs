//! The errors a guest call is stopped with, which the executor tells apart from traps.

/// Marker error raised into the guest when it asks for more memory than the
/// execution may hold; the executor maps it to `memory_limit_exceeded`.
#[derive(Debug, thiserror::Error)]
#[error("linear memory limit of {limit} bytes exceeded (asked for {desired})")]
pub struct MemoryLimitExceeded {
    pub limit: usize,
    pub desired: usize,
}

/// How a guest call was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    #[error("time limit reached")]
    Timeout,
    #[error("canceled")]
    Canceled,
}

/// The error a guest call fails with when it was interrupted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InterruptedError(pub Interrupted);

//! Why a run operation was refused: one variant per stable error code.

use crate::store::StoreError;

/// A refused or failed run operation. The API maps each to an HTTP status and an
/// ARP `ErrorEnvelope` carrying [`RunError::code`] and the `Display` text.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The request is malformed; the text names the field.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("Run '{0}' not found")]
    RunNotFound(String),
    #[error("NodeRun '{0}' not found")]
    NodeRunNotFound(String),
    #[error("Parent NodeRun '{0}' not found")]
    ParentNotFound(String),
    #[error("Run '{0}' already exists")]
    RunAlreadyExists(String),
    #[error("Parent NodeRun does not belong to the requested run")]
    ParentMismatch,
    #[error("Parent NodeRun must be composite to create child NodeRuns")]
    ParentNotComposite,
    #[error("Run '{run_id}' is {state}; no NodeRuns can be created in it")]
    RunNotActive { run_id: String, state: &'static str },
    #[error("Parent NodeRun '{0}' has already ended")]
    ParentTerminal(String),
    /// A structural constraint (`max_depth`, ...) the new NodeRuns would break.
    #[error("{0} constraint violated")]
    ConstraintViolation(&'static str),
    /// The key was used before for a NodeRun that differs in what this names.
    #[error("Idempotency key already used for a different {0}")]
    IdempotencyConflict(&'static str),
    #[error("NodeRun '{node_run_id}' has already ended ({state})")]
    NodeRunAlreadyTerminal {
        node_run_id: String,
        state: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RunError {
    /// The stable code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::RunNotFound(_) => "run_not_found",
            Self::NodeRunNotFound(_) => "node_run_not_found",
            Self::ParentNotFound(_) => "parent_node_run_not_found",
            Self::RunAlreadyExists(_) => "run_already_exists",
            Self::ParentMismatch => "parent_node_run_mismatch",
            Self::ParentNotComposite => "parent_node_run_invalid",
            Self::RunNotActive { .. } => "run_not_active",
            Self::ParentTerminal(_) => "parent_node_run_terminal",
            Self::ConstraintViolation(_) => "constraint_violation",
            Self::IdempotencyConflict(_) => "idempotency_conflict",
            Self::NodeRunAlreadyTerminal { .. } => "node_run_already_terminal",
            Self::Store(_) => "internal_error",
        }
    }
}

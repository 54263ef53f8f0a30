//! Run events as clients see them: NDJSON streams that follow runs live.

mod stream;
mod watchers;

pub use stream::{Scope, StreamRequest, ndjson};
pub use watchers::RunWatchers;

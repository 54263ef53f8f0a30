//! Who follows which run: commits (this process's, or another's through the store)
//! wake the streams following the runs they changed. A leaf: it knows nothing of
//! the store or the API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Wakes the streams following a run when a commit adds events to it. Only runs
/// with followers have an entry, so a commit costs one map lookup per run.
#[derive(Debug, Default)]
pub struct RunWatchers {
    by_run: Mutex<HashMap<String, Arc<Notify>>>,
}

impl RunWatchers {
    pub fn notify(&self, run_id: &str) {
        if let Some(notify) = self.by_run.lock().unwrap().get(run_id) {
            notify.notify_waiters();
        }
    }

    pub(super) fn watch(self: &Arc<Self>, run_id: &str) -> Watch {
        let notify = self
            .by_run
            .lock()
            .unwrap()
            .entry(run_id.to_owned())
            .or_default()
            .clone();
        Watch {
            watchers: self.clone(),
            run_id: run_id.to_owned(),
            notify,
        }
    }
}

/// One follower's registration; the entry goes when its last follower does.
pub(super) struct Watch {
    watchers: Arc<RunWatchers>,
    run_id: String,
    pub(super) notify: Arc<Notify>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut by_run = self.watchers.by_run.lock().unwrap();
        // The map's reference plus ours: we are the last follower.
        if Arc::strong_count(&self.notify) == 2 {
            by_run.remove(&self.run_id);
        }
    }
}

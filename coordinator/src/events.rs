//! NDJSON event streams: stored events in seq order, then live ones until the run is terminal.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::broadcast;

use crate::coordinator::Coordinator;
use crate::store::{self, StoreError};

/// Events read per store round trip.
const PAGE: usize = 512;
/// A follower re-checks the store at least this often even without a notification.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Which events of the run a stream carries.
#[derive(Debug, Clone)]
pub enum Scope {
    Run,
    /// This NodeRun and its descendants (run-level events excluded).
    NodeRun(String),
}

#[derive(Debug, Clone)]
pub struct StreamRequest {
    pub run_id: String,
    pub scope: Scope,
    /// Resume: only events with a greater seq.
    pub after_seq: Option<u64>,
    /// Keep the stream open until the run is terminal.
    pub follow: bool,
}

struct Cursor {
    coord: Arc<Coordinator>,
    req: StreamRequest,
    changes: broadcast::Receiver<Arc<str>>,
    done: bool,
}

/// The stream of NDJSON chunks (one or more whole lines each).
pub fn ndjson(
    coord: Arc<Coordinator>,
    req: StreamRequest,
) -> impl Stream<Item = Result<Bytes, StoreError>> {
    // Subscribe before the first read so no change between the read and the wait is missed.
    let changes = coord.run_changed.subscribe();
    let cursor = Cursor {
        coord,
        req,
        changes,
        done: false,
    };
    futures_util::stream::unfold(cursor, |mut cursor| async move {
        if cursor.done {
            return None;
        }
        match next_chunk(&mut cursor).await {
            Ok(Some(chunk)) => Some((Ok(chunk), cursor)),
            Ok(None) => None,
            Err(err) => {
                cursor.done = true;
                Some((Err(err), cursor))
            }
        }
    })
}

struct Page {
    terminal: bool,
    events: Vec<store::StoredEvent>,
    scope_ids: Option<HashSet<String>>,
}

async fn next_chunk(cursor: &mut Cursor) -> Result<Option<Bytes>, StoreError> {
    loop {
        let (run_id, after, scope) = (
            cursor.req.run_id.clone(),
            cursor.req.after_seq,
            cursor.req.scope.clone(),
        );
        let page = cursor
            .coord
            .store
            .read(move |conn| {
                // The state is read first: if it is terminal, the events read
                // next include run_completed, committed with that state.
                let terminal =
                    store::load_run(conn, &run_id)?.is_none_or(|r| r.state.is_terminal());
                let events = store::events_after(conn, &run_id, after, PAGE)?;
                let scope_ids = match (&scope, events.is_empty()) {
                    (Scope::NodeRun(root), false) => Some(descendants(conn, &run_id, root)?),
                    _ => None,
                };
                Ok(Page {
                    terminal,
                    events,
                    scope_ids,
                })
            })
            .await?;
        if let Some(last) = page.events.last() {
            cursor.req.after_seq = Some(last.seq);
            let mut chunk = Vec::new();
            for event in &page.events {
                let in_scope = match &page.scope_ids {
                    None => true,
                    Some(ids) => event
                        .node_run_id
                        .as_ref()
                        .is_some_and(|id| ids.contains(id)),
                };
                if in_scope {
                    chunk.extend_from_slice(event.line.as_bytes());
                    chunk.push(b'\n');
                }
            }
            if !chunk.is_empty() {
                return Ok(Some(Bytes::from(chunk)));
            }
            continue;
        }
        if page.terminal || !cursor.req.follow {
            return Ok(None);
        }
        wait_for_change(&mut cursor.changes, &cursor.req.run_id).await;
    }
}

async fn wait_for_change(changes: &mut broadcast::Receiver<Arc<str>>, run_id: &str) {
    let _ = tokio::time::timeout(IDLE_RECHECK, async {
        loop {
            match changes.recv().await {
                Ok(changed) if &*changed == run_id => return,
                Ok(_) => continue,
                // Missed notifications may include ours: look at the store again.
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await;
                }
            }
        }
    })
    .await;
}

fn descendants(
    conn: &rusqlite::Connection,
    run_id: &str,
    root: &str,
) -> Result<HashSet<String>, StoreError> {
    let tree = store::node_run_tree(conn, run_id)?;
    let mut ids = HashSet::from([root.to_owned()]);
    // Children are created after their parents, but ids carry no order: sweep to a fixed point.
    loop {
        let before = ids.len();
        for (id, parent) in &tree {
            if parent.as_ref().is_some_and(|p| ids.contains(p)) {
                ids.insert(id.clone());
            }
        }
        if ids.len() == before {
            return Ok(ids);
        }
    }
}

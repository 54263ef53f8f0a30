//! An NDJSON event stream: stored events in seq order, then live ones until the run is terminal.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

use crate::coordinator::Coordinator;
use crate::store::{EventPageRequest, StoreError, StoredEvent};

use super::watchers::Watch;

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
    watch: Watch,
    done: bool,
}

/// The stream of NDJSON chunks (one or more whole lines each).
pub fn ndjson(
    coord: Arc<Coordinator>,
    req: StreamRequest,
) -> impl Stream<Item = Result<Bytes, StoreError>> {
    let watch = coord.watchers.watch(&req.run_id);
    let cursor = Cursor {
        coord,
        req,
        watch,
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
    events: Vec<StoredEvent>,
    scope_ids: Option<HashSet<String>>,
}

async fn next_chunk(cursor: &mut Cursor) -> Result<Option<Bytes>, StoreError> {
    loop {
        // Registered before the read, so a commit between the read and the wait still wakes us.
        let notify = cursor.watch.notify.clone();
        let changed = notify.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let req = &cursor.req;
        let scope_root = match &req.scope {
            Scope::NodeRun(root) => Some(root.as_str()),
            Scope::Run => None,
        };
        let stored = cursor
            .coord
            .store
            .event_page(EventPageRequest {
                run_id: &req.run_id,
                after_seq: req.after_seq,
                limit: PAGE,
                with_tree: scope_root.is_some(),
            })
            .await?;
        // The state is read first: if it is terminal, the events include run_completed.
        let page = Page {
            terminal: stored.terminal.unwrap_or(true),
            scope_ids: scope_root
                .zip(stored.tree.as_deref())
                .map(|(root, tree)| descendants(tree, root)),
            events: stored.events,
        };
        // Nothing can follow a short page of a terminal run (its last event is
        // in it) or of a stream that does not follow: no need to read again.
        let last_page = page.events.len() < PAGE && (page.terminal || !req.follow);
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
        if let Some(last) = page.events.last() {
            cursor.req.after_seq = Some(last.seq);
        }
        if !chunk.is_empty() {
            cursor.done = last_page;
            return Ok(Some(Bytes::from(chunk)));
        }
        if last_page {
            return Ok(None);
        }
        if !page.events.is_empty() {
            continue;
        }
        // The timeout is a safety net only; commits wake followers.
        let _ = tokio::time::timeout(IDLE_RECHECK, changed).await;
    }
}

fn descendants(tree: &[(String, Option<String>)], root: &str) -> HashSet<String> {
    let mut ids = HashSet::from([root.to_owned()]);
    // Children are created after their parents, but ids carry no order: sweep to a fixed point.
    loop {
        let before = ids.len();
        for (id, parent) in tree {
            if parent.as_ref().is_some_and(|p| ids.contains(p)) {
                ids.insert(id.clone());
            }
        }
        if ids.len() == before {
            return ids;
        }
    }
}

//! Several Atomic Executors behind one coordinator: what each serves, which are healthy, which gets a NodeRun.
//!
//! Each executor's `GET /v1/node-types` is fetched one at a time per executor and
//! served stale while it is refreshed, so no caller waits on a listing it already had.
//! A NodeRun goes to the healthy executors that list its node type and version
//! (else those listing the id, else any healthy one, which gives its own verdict),
//! the one with the fewest calls in flight first. An executor leaves the rotation
//! when a call to it fails (connect refused, reset, 502/503/504/429) or when its
//! `GET /v1/health` probe fails twice in a row (5xx, refused, or no answer within
//! the probe timeout); calls in flight on it are then given up and sent to another
//! executor under the same `node_run_id`, which executors dedupe. It comes back at
//! its first good probe. No lock is held across a call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arp_types::{AtomicExecuteRequest, AtomicExecuteResult, NodeType, NodeTypeRef};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::catalog::{Cached, LOOKUP_WAIT, Listing, MISS_REFETCH, NodeTypeInfo, TTL, find_listed};
use crate::clients::{AtomicExecutorClient, CallError, Http};

/// Consecutive failed probes that take an executor out of rotation: one slow answer
/// on a loaded machine is not an outage.
const PROBE_FAILURES_DOWN: u32 = 2;

/// How executors are watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probing {
    /// How often each executor's `GET /v1/health` is asked.
    pub interval: Duration,
    /// A probe not answered within this counts as failed.
    pub timeout: Duration,
}

impl Default for Probing {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        }
    }
}

/// The Atomic Executors configured, with their listings and health.
#[derive(Debug)]
pub struct AtomicExecutors {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
}

#[derive(Debug)]
struct Inner {
    members: Vec<Member>,
    probing: Probing,
    /// Bumped after every listing fetch ends, for callers waiting on a first answer.
    fetched: watch::Sender<u64>,
    /// Where ties in load start, so equal executors take turns.
    turn: AtomicUsize,
    /// The executors each NodeRun was sent to while its call is in flight: cancels go there.
    sent_to: Mutex<HashMap<String, Vec<usize>>>,
    /// Probers and listing fetches; [`AtomicExecutors::shutdown`] (or drop) ends them.
    tasks: Mutex<JoinSet<()>>,
}

#[derive(Debug)]
struct Member {
    url: String,
    client: AtomicExecutorClient,
    in_flight: AtomicUsize,
    /// Held only to read or record, never across a call.
    state: Mutex<MemberState>,
    /// Bumped when probes find the executor gone: calls in flight on it give up.
    outage: watch::Sender<u64>,
}

#[derive(Debug)]
struct MemberState {
    listing: Cached<MemberListing>,
    in_rotation: bool,
    failed_probes: u32,
}

/// What one executor's `GET /v1/node-types` said.
#[derive(Debug)]
enum MemberListing {
    Listed(Listing),
    /// It answered with an error (it has no listing): it may serve anything.
    Refused,
}

/// What the listings say about a node type, for the node kind catalog.
#[derive(Debug, Clone, Default)]
pub struct ListingLookup {
    pub listed: Option<NodeTypeInfo>,
    /// Nothing lists it yet, but a fetch that may is in flight.
    pub pending: bool,
    /// An executor's last listing fetch could not reach it.
    pub unreachable: bool,
}

/// Where a call goes next.
enum Route {
    Member(usize),
    /// A first listing is on its way: wait for it, then route again.
    Wait,
    /// Nobody to send it to now; worth asking again later.
    Unavailable(String),
}

impl AtomicExecutors {
    /// Starts probing every executor in `urls`; call within a Tokio runtime.
    pub fn new(urls: &[String], http: &Http, probing: Probing) -> Self {
        let members = urls
            .iter()
            .map(|url| Member {
                url: url.clone(),
                client: AtomicExecutorClient::new(url.clone(), http.clone()),
                in_flight: AtomicUsize::new(0),
                state: Mutex::new(MemberState {
                    listing: Cached::default(),
                    in_rotation: true,
                    failed_probes: 0,
                }),
                outage: watch::channel(0).0,
            })
            .collect();
        let inner = Arc::new(Inner {
            members,
            probing,
            fetched: watch::channel(0).0,
            turn: AtomicUsize::new(0),
            sent_to: Mutex::default(),
            tasks: Mutex::default(),
        });
        let (stop, stopped) = watch::channel(false);
        for i in 0..inner.members.len() {
            let probe = inner.clone().probe_loop(i, stopped.clone());
            inner.tasks.lock().unwrap().spawn(probe);
            inner.spawn_fetch_if_due(i, Duration::ZERO);
        }
        Self { inner, stop }
    }

    /// The executors' base URLs, in configuration order.
    pub fn urls(&self) -> Vec<&str> {
        self.inner.members.iter().map(|m| m.url.as_str()).collect()
    }

    /// What a NodeRun's `executor_binding.endpoint` says until an executor answers
    /// (then its URL): the URL, or the list of them.
    pub fn endpoint(&self) -> String {
        self.urls().join(",")
    }

    /// Which executors are in rotation now, by URL.
    pub fn in_rotation(&self) -> Vec<(String, bool)> {
        self.inner
            .members
            .iter()
            .map(|m| (m.url.clone(), m.state.lock().unwrap().in_rotation))
            .collect()
    }

    /// Bumped after every listing fetch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.fetched.subscribe()
    }

    /// What the executors' listings say about the type, stale answers included;
    /// starts the fetches that are due and never waits on one.
    pub fn lookup(&self, r: &NodeTypeRef) -> ListingLookup {
        let mut answer = ListingLookup::default();
        let mut exact = None;
        let mut any = None;
        for member in &self.inner.members {
            let state = member.state.lock().unwrap();
            answer.unreachable |= state.listing.unreachable;
            if let Some(MemberListing::Listed(listing)) = &state.listing.value
                && let Some(info) = find_listed(listing, r)
            {
                // The exact version's constraints win over another version's kind alone.
                if listing_has(listing, r) {
                    exact.get_or_insert(info);
                } else {
                    any.get_or_insert(info);
                }
            }
        }
        answer.listed = exact.or(any);
        // A type nobody lists may have been added since: ask again soon, not after the TTL.
        let max_age = if answer.listed.is_some() {
            TTL
        } else {
            MISS_REFETCH
        };
        for i in 0..self.inner.members.len() {
            self.inner.spawn_fetch_if_due(i, max_age);
            if answer.listed.is_none() {
                answer.pending |= self.inner.members[i]
                    .state
                    .lock()
                    .unwrap()
                    .listing
                    .in_flight;
            }
        }
        answer
    }

    /// Sends the request to an executor that serves its node type, and on a
    /// transient failure to the next one; the error is the last executor's.
    /// Sends the NodeRun to an executor that lists its node type; answers with the
    /// result and the URL of the executor that gave it.
    pub async fn execute(
        &self,
        request: &AtomicExecuteRequest,
        timeout: Duration,
    ) -> Result<(AtomicExecuteResult, String), CallError> {
        let started = Instant::now();
        let r = &request.node_type_ref;
        let _sent = SentGuard {
            inner: &self.inner,
            node_run_id: &request.node_run_id,
        };
        let mut tried = Vec::new();
        let mut waited = false;
        let mut last = None;
        loop {
            let i = match self.inner.route(r, &tried) {
                Route::Member(i) => i,
                Route::Wait if !waited => {
                    waited = true;
                    self.wait_for_first_listings(LOOKUP_WAIT).await;
                    continue;
                }
                Route::Wait => {
                    return Err(last.unwrap_or_else(|| CallError::Transient {
                        reason: format!(
                            "no atomic executor has answered its node listing yet (asked: {})",
                            self.endpoint()
                        ),
                        retry_after: Some(self.inner.probing.interval),
                    }));
                }
                Route::Unavailable(reason) => {
                    return Err(last.unwrap_or(CallError::Transient {
                        reason,
                        retry_after: Some(self.inner.probing.interval),
                    }));
                }
            };
            tried.push(i);
            let Some(remaining) = timeout.checked_sub(started.elapsed()) else {
                return Err(last.unwrap_or_else(|| CallError::Transient {
                    reason: "atomic executor call timed out".into(),
                    retry_after: None,
                }));
            };
            match self.inner.call(i, request, remaining).await {
                Err(CallError::Transient {
                    reason,
                    retry_after,
                }) => {
                    self.inner.take_out(i, &reason);
                    last = Some(CallError::Transient {
                        reason,
                        retry_after,
                    });
                }
                other => return other.map(|result| (result, self.inner.members[i].url.clone())),
            }
        }
    }

    /// Tells the executors that were sent the NodeRun to stop it; when none is
    /// known (the call ended, or another process made it), all of them. Unknown
    /// ids are no error to an executor.
    pub async fn cancel(&self, node_run_id: &str) -> Result<(), CallError> {
        let known = self.inner.sent_to.lock().unwrap().get(node_run_id).cloned();
        let targets = known.unwrap_or_else(|| (0..self.inner.members.len()).collect());
        let calls = targets
            .into_iter()
            .map(|i| self.inner.members[i].client.cancel(node_run_id));
        let results = futures_util::future::join_all(calls).await;
        // One executor that took the cancel is enough; the others never had the NodeRun.
        if results.iter().any(Result::is_ok) {
            return Ok(());
        }
        results
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }

    /// Stops the probers and listing fetches and waits for them.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let mut tasks = std::mem::take(&mut *self.inner.tasks.lock().unwrap());
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    async fn wait_for_first_listings(&self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        let mut fetched = self.subscribe();
        while self.inner.first_listing_pending() {
            if tokio::time::timeout_at(deadline, fetched.changed())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

impl Drop for AtomicExecutors {
    fn drop(&mut self) {
        // The tasks hold the inner state, not this handle: end them with it.
        self.inner.tasks.lock().unwrap().abort_all();
    }
}

/// Forgets where a NodeRun was sent once its call has ended.
struct SentGuard<'a> {
    inner: &'a Inner,
    node_run_id: &'a str,
}

impl Drop for SentGuard<'_> {
    fn drop(&mut self) {
        self.inner.sent_to.lock().unwrap().remove(self.node_run_id);
    }
}

/// Counts a call in flight on its executor for as long as it lasts.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Inner {
    /// The executor for the next attempt, preferring those that list the exact
    /// version, then the id, then any; among them the least loaded in rotation.
    fn route(&self, r: &NodeTypeRef, tried: &[usize]) -> Route {
        // Not yet tried and in rotation: (exact version, id only, unlisted or refused);
        // then, as a last resort, those a failed call took out but whose probes pass.
        let mut tiers: [Vec<usize>; 4] = Default::default();
        let mut listed_but_out = Vec::new();
        let mut first_pending = false;
        for (i, member) in self.members.iter().enumerate() {
            let state = member.state.lock().unwrap();
            first_pending |= state.listing.first_answer_pending();
            let tier = match &state.listing.value {
                Some(MemberListing::Listed(listing)) if listing_has(listing, r) => 0,
                Some(MemberListing::Listed(listing)) if listing.contains_key(&r.node_type_id) => 1,
                _ => 2,
            };
            if tried.contains(&i) {
                continue;
            }
            if state.in_rotation {
                tiers[tier].push(i);
            } else if state.failed_probes == 0 {
                tiers[3].push(i);
            } else if tier < 2 {
                listed_but_out.push(member.url.as_str());
            }
        }
        let lists_it = !tiers[0].is_empty() || !tiers[1].is_empty();
        if !lists_it && first_pending {
            return Route::Wait;
        }
        for tier in &tiers {
            if let Some(i) = self.least_loaded(tier) {
                return Route::Member(i);
            }
        }
        let out = if listed_but_out.is_empty() {
            String::new()
        } else {
            format!("; out of rotation: {}", listed_but_out.join(", "))
        };
        Route::Unavailable(format!(
            "no atomic executor in rotation for {}@{}{out}",
            r.node_type_id, r.version
        ))
    }

    fn least_loaded(&self, candidates: &[usize]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % candidates.len();
        (0..candidates.len())
            .map(|k| candidates[(start + k) % candidates.len()])
            .min_by_key(|&i| self.members[i].in_flight.load(Ordering::Relaxed))
    }

    async fn call(
        &self,
        i: usize,
        request: &AtomicExecuteRequest,
        timeout: Duration,
    ) -> Result<AtomicExecuteResult, CallError> {
        let member = &self.members[i];
        self.sent_to
            .lock()
            .unwrap()
            .entry(request.node_run_id.clone())
            .or_default()
            .push(i);
        member.in_flight.fetch_add(1, Ordering::Relaxed);
        let _counted = InFlight(&member.in_flight);
        let mut outage = member.outage.subscribe();
        outage.borrow_and_update();
        tokio::select! {
            result = member.client.execute(request, timeout) => result,
            _ = outage.changed() => Err(CallError::Transient {
                reason: format!("atomic executor {} stopped answering", member.url),
                retry_after: None,
            }),
        }
    }

    /// A call failed in a way that says the executor is unavailable: no new calls
    /// go there until a probe succeeds (at most a probe interval for a healthy one).
    fn take_out(&self, i: usize, reason: &str) {
        let member = &self.members[i];
        let mut state = member.state.lock().unwrap();
        if state.in_rotation {
            state.in_rotation = false;
            tracing::warn!(executor = %member.url, reason, "atomic executor out of rotation");
        }
    }

    fn first_listing_pending(&self) -> bool {
        self.members
            .iter()
            .any(|m| m.state.lock().unwrap().listing.first_answer_pending())
    }

    /// Starts a fetch of member `i`'s listing if its answer is older than `max_age`
    /// and no fetch is in flight or started within a second.
    fn spawn_fetch_if_due(self: &Arc<Self>, i: usize, max_age: Duration) {
        let due = self.members[i].state.lock().unwrap().listing.claim(max_age);
        if due {
            let mut tasks = self.tasks.lock().unwrap();
            while tasks.try_join_next().is_some() {}
            tasks.spawn(self.clone().fetch_listing(i));
        }
    }

    async fn fetch_listing(self: Arc<Self>, i: usize) {
        let member = &self.members[i];
        let result = member.client.node_types().await;
        {
            let mut state = member.state.lock().unwrap();
            let listing = &mut state.listing;
            listing.in_flight = false;
            listing.unreachable = matches!(result, Err(CallError::Transient { .. }));
            match result {
                Ok(types) => {
                    listing.value = Some(MemberListing::Listed(index(types)));
                    listing.fetched_at = Some(Instant::now());
                }
                // Keep what an unreachable executor listed before.
                Err(CallError::Transient { reason, .. }) => {
                    tracing::debug!(executor = %member.url, reason, "node types unavailable");
                }
                Err(CallError::Terminal(error)) => {
                    tracing::debug!(executor = %member.url, code = error.code, "node types refused");
                    listing.value = Some(MemberListing::Refused);
                    listing.fetched_at = Some(Instant::now());
                }
            }
        }
        self.fetched.send_modify(|n| *n = n.wrapping_add(1));
    }

    async fn probe_loop(self: Arc<Self>, i: usize, mut stopped: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.probing.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            let member = &self.members[i];
            let probed = member.client.health(self.probing.timeout).await;
            let back = {
                let mut state = member.state.lock().unwrap();
                match &probed {
                    Ok(()) => {
                        state.failed_probes = 0;
                        let back = !state.in_rotation;
                        state.in_rotation = true;
                        back
                    }
                    Err(err) => {
                        state.failed_probes = state.failed_probes.saturating_add(1);
                        if state.failed_probes >= PROBE_FAILURES_DOWN {
                            if state.in_rotation {
                                state.in_rotation = false;
                                tracing::warn!(executor = %member.url, error = %err, "atomic executor out of rotation: its health probes fail");
                            }
                            // Also when a failed call took it out first: calls hung on it give up.
                            if state.failed_probes == PROBE_FAILURES_DOWN {
                                member.outage.send_modify(|n| *n = n.wrapping_add(1));
                            }
                        }
                        false
                    }
                }
            };
            if back {
                tracing::info!(executor = %member.url, "atomic executor back in rotation");
                // What it serves may have changed while it was away.
                self.spawn_fetch_if_due(i, Duration::ZERO);
            } else {
                self.spawn_fetch_if_due(i, TTL);
            }
        }
    }
}

/// The listing lists the node type at exactly this version.
fn listing_has(listing: &Listing, r: &NodeTypeRef) -> bool {
    listing
        .get(&r.node_type_id)
        .is_some_and(|versions| versions.iter().any(|t| t.version == r.version))
}

fn index(types: Vec<NodeType>) -> Listing {
    let mut listed = Listing::new();
    for t in types {
        listed.entry(t.node_type_id.clone()).or_default().push(t);
    }
    listed
}

//! Keeps the registry in step with the packs directory: files added, replaced or removed take effect without a restart.
//!
//! Changes are noticed by the platform's file watcher (`notify`) and, as a
//! safety net for events it misses (network file systems, overflowed queues,
//! a directory created later), by a periodic rescan. A file is loaded only
//! once its size and modification time have held still for the settle time,
//! so a pack copied in pieces is not loaded half-written; a write-then-rename
//! simply appears complete. A file that fails to load is retried when it
//! changes, and meanwhile its previous good version keeps serving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::Watcher as _;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::registry::PackRegistry;

/// Packs compiling and describing at once: compilation is CPU-bound and
/// already parallel, and each `describe` takes an instance from the pool.
const MAX_CONCURRENT_LOADS: usize = 4;
use crate::grants::log::Sanitized;

/// How the packs directory is watched.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// How long a file's size and modification time must hold still before
    /// it is loaded.
    pub settle: Duration,
    /// How often the whole directory is listed even without events.
    pub rescan: Duration,
    /// Size of one pack file; a larger one is skipped unread.
    pub max_file_bytes: u64,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            settle: Duration::from_millis(500),
            rescan: Duration::from_secs(5),
            max_file_bytes: 256 << 20,
        }
    }
}

/// The background task watching the packs directory. Dropping it stops the
/// task; [`PackWatcher::shutdown`] also waits for it to end.
#[derive(Debug)]
pub struct PackWatcher {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl PackWatcher {
    /// Counts the packs already in `dir` as loading, so lookups wait for
    /// them, then loads them and keeps watching. Must run inside a tokio
    /// runtime.
    pub fn start(registry: Arc<PackRegistry>, dir: PathBuf, settings: WatchSettings) -> Self {
        let (initial, listing_failed) = match list(&dir) {
            Ok(files) => (files, false),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the packs directory; serving built-ins until it appears");
                (Vec::new(), true)
            }
        };
        tracing::info!(dir = %dir.display(), files = initial.len(), "loading packs");
        registry.begin_loading(initial.len());
        let wake = Arc::new(Notify::new());
        let events = notify_watcher(&dir, wake.clone());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut watch = DirWatch {
                registry,
                dir,
                settings,
                files: HashMap::new(),
                listing_failed,
                wake,
                events,
                loads: JoinSet::new(),
            };
            watch.run(initial, stopped).await;
        });
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops watching, abandons the loads in progress and waits for the
    /// watcher to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for PackWatcher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Wakes the scanner on any change in `dir`. Without it (no watcher on this
/// platform, or the directory is missing) the periodic rescan still works.
fn notify_watcher(dir: &Path, wake: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    if !dir.is_dir() {
        // Reported by the listing; the watcher is set up when it appears.
        return None;
    }
    let handler = move |event: notify::Result<notify::Event>| {
        // Our own reads of the directory and its files are no change.
        if let Ok(event) = &event
            && matches!(event.kind, notify::EventKind::Access(_))
        {
            return;
        }
        wake.notify_one();
    };
    let started = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match started {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the packs directory; relying on the periodic rescan");
            None
        }
    }
}

/// What a file looked like when last listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    len: u64,
    modified: Option<SystemTime>,
}

#[derive(Debug)]
struct Tracked {
    stat: Stat,
    /// When `stat` was first seen.
    since: Instant,
    /// The stat last loaded (or failed), so each version loads once.
    done: Option<Stat>,
}

struct DirWatch {
    registry: Arc<PackRegistry>,
    dir: PathBuf,
    settings: WatchSettings,
    files: HashMap<String, Tracked>,
    /// Whether the last listing failed, so the warning is logged once.
    listing_failed: bool,
    wake: Arc<Notify>,
    /// Owned here, so events stop when the task ends. `None` until the
    /// directory can be watched.
    events: Option<notify::RecommendedWatcher>,
    /// Loads in progress, drained on stop.
    loads: JoinSet<()>,
}

impl DirWatch {
    /// Loads the files found at start at once: they are taken as complete.
    async fn load_initial(&mut self, initial: Vec<(String, Stat)>) {
        let now = Instant::now();
        for (name, stat) in &initial {
            self.files.insert(
                name.clone(),
                Tracked {
                    stat: *stat,
                    since: now,
                    done: Some(*stat),
                },
            );
        }
        // Already counted as pending by `start`.
        self.load(initial.into_iter().map(|(name, _)| name).collect(), false)
            .await;
    }

    /// Loads `initial`, then rescans on every event and tick until
    /// `stopped`, which also abandons the loads in progress.
    async fn run(&mut self, initial: Vec<(String, Stat)>, mut stopped: oneshot::Receiver<()>) {
        tokio::select! {
            _ = &mut stopped => return self.loads.shutdown().await,
            () = self.load_initial(initial) => {}
        }
        let wake = self.wake.clone();
        loop {
            let settling = self.files.values().any(|f| f.done != Some(f.stat));
            let wait = if settling {
                self.settings.settle.min(self.settings.rescan)
            } else {
                self.settings.rescan
            };
            tokio::select! {
                biased;
                _ = &mut stopped => return,
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
            tokio::select! {
                _ = &mut stopped => return self.loads.shutdown().await,
                () = self.scan() => {}
            }
        }
    }

    /// Lists the directory, drops the packs of files gone, and loads the
    /// files that changed and have since held still for the settle time.
    async fn scan(&mut self) {
        let dir = self.dir.clone();
        let listing = match tokio::task::spawn_blocking(move || list(&dir)).await {
            Ok(Ok(listing)) => {
                if std::mem::take(&mut self.listing_failed) {
                    tracing::info!(dir = %self.dir.display(), "the packs directory is readable");
                    // It appeared (or came back): watch it from now on.
                    self.events = notify_watcher(&self.dir, self.wake.clone());
                }
                listing
            }
            Ok(Err(e)) => {
                if !std::mem::replace(&mut self.listing_failed, true) {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the packs directory; serving what is loaded");
                }
                return;
            }
            Err(_) => return,
        };
        let now = Instant::now();
        let present: HashMap<String, Stat> = listing.into_iter().collect();
        self.files.retain(|name, _| {
            if present.contains_key(name) {
                return true;
            }
            if self.registry.remove(name) {
                tracing::info!(file = %Sanitized(name), "pack removed");
            }
            false
        });
        let mut ready = Vec::new();
        for (name, stat) in present {
            let tracked = self.files.entry(name.clone()).or_insert(Tracked {
                stat,
                since: now,
                done: None,
            });
            if tracked.stat != stat {
                tracked.stat = stat;
                tracked.since = now;
            } else if tracked.done != Some(stat)
                && now.duration_since(tracked.since) >= self.settings.settle
            {
                tracked.done = Some(stat);
                ready.push(name);
            }
        }
        if !ready.is_empty() {
            self.registry.begin_loading(ready.len());
            self.load(ready, true).await;
        }
    }

    /// Loads `names` side by side, each counted as pending until done.
    async fn load(&mut self, names: Vec<String>, reload: bool) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_LOADS));
        for name in names {
            let registry = self.registry.clone();
            let path = self.dir.join(&name);
            let slots = slots.clone();
            let max_bytes = self.settings.max_file_bytes;
            self.loads.spawn(async move {
                let _done = registry.loading_guard();
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                load_one(&registry, &name, &path, max_bytes, reload).await;
            });
        }
        while self.loads.join_next().await.is_some() {}
    }
}

async fn load_one(registry: &PackRegistry, name: &str, path: &Path, max_bytes: u64, reload: bool) {
    let bytes = match read_pack(path, max_bytes).await {
        PackFile::Bytes(bytes) => bytes,
        // Gone since it was listed: the next scan removes it.
        PackFile::Gone => return,
        PackFile::Unreadable(reason) => {
            registry.record_failure(name, reason);
            return;
        }
    };
    let Ok((bytes, hash)) = tokio::task::spawn_blocking(move || {
        let hash = PackRegistry::hash(&bytes);
        (bytes, hash)
    })
    .await
    else {
        return;
    };
    if registry.loaded_hash(name) == Some(hash) {
        // Touched or rewritten with the same bytes: nothing to reload, but
        // a failure recorded since no longer describes the file.
        registry.clear_failure(name);
        return;
    }
    match registry.prepare_hashed(name, bytes, hash).await {
        Ok(loaded) => {
            let nodes = registry.install(loaded);
            registry.metrics().pack_loaded(reload);
            let message = if reload {
                "pack reloaded"
            } else {
                "pack loaded"
            };
            tracing::info!(file = %Sanitized(name), nodes = ?nodes, "{message}");
        }
        Err(e) => registry.record_failure(name, e.to_string()),
    }
}

/// A pack file as read from the packs directory.
#[derive(Debug)]
pub(crate) enum PackFile {
    Bytes(Vec<u8>),
    /// Removed since it was listed.
    Gone,
    /// Too large or unreadable, with the reason recorded for the file.
    Unreadable(String),
}

/// Reads a pack file within `max_bytes`.
pub(crate) async fn read_pack(path: &Path, max_bytes: u64) -> PackFile {
    match read_at_most(path, max_bytes).await {
        Ok(Some(bytes)) => PackFile::Bytes(bytes),
        Ok(None) => PackFile::Unreadable(format!(
            "the file is larger than the limit of {max_bytes} bytes"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PackFile::Gone,
        Err(e) => PackFile::Unreadable(format!("cannot read the file: {e}")),
    }
}

/// The file's bytes, or `None` if it holds more than `max` (checked while
/// reading: the file may grow after it was listed).
async fn read_at_most(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let file = std::fs::File::open(&path)?;
        let len = file.metadata()?.len();
        if len > max {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
        Ok((bytes.len() as u64 <= max).then_some(bytes))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Every `*.wasm` file in `dir` (links followed) with its size and mtime.
pub(crate) fn list(dir: &Path) -> std::io::Result<Vec<(String, Stat)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "wasm") {
            continue;
        }
        // A file removed between listing and stat is simply not there.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        files.push((
            name,
            Stat {
                len: meta.len(),
                modified: meta.modified().ok(),
            },
        ));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

//! Command line and environment configuration, validated into one [`Config`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use jarvis_auth::AuthSettings;

use crate::executor::{ExecutorConfig, OutputLimits};
use crate::grants::{Grants, HttpEnv};
use crate::packs::spec::PackLimits;
use crate::packs::watch::WatchSettings;
use crate::runtime::{GuestThreads, RuntimeLimits};

/// Raw arguments, as typed. Environment variables use the names the Python
/// JARVIS executor already reads where it has one.
#[derive(Debug, Parser)]
#[command(
    name = "jarvis-atomic-executor",
    version,
    about = "ARP Atomic Executor serving WebAssembly node packs"
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8082)]
    pub port: u16,

    /// Directory of node packs: every `*.wasm` in it is loaded at start, and
    /// files added, replaced or removed later take effect without a restart.
    #[arg(long, env = "JARVIS_PACKS_DIR", default_value = "./nodepacks")]
    pub packs: PathBuf,

    /// Milliseconds a new or changed pack file must stay the same size and
    /// age before it is loaded, so a file still being copied is not.
    #[arg(long, env = "JARVIS_PACKS_SETTLE_MS", default_value_t = 500)]
    pub packs_settle_ms: u64,

    /// Seconds between full listings of the packs directory, a safety net
    /// for changes the file watcher did not report.
    #[arg(long, env = "JARVIS_PACKS_RESCAN_SECS", default_value_t = 5)]
    pub packs_rescan_secs: u64,

    /// Size of one pack file, in MiB; a larger file is skipped unread.
    #[arg(long, env = "JARVIS_MAX_PACK_FILE_MIB", default_value_t = 256)]
    pub max_pack_file_mib: u64,

    /// Time limit of an execution, in seconds, unless the request or the
    /// node asks for less.
    #[arg(long, env = "JARVIS_DEFAULT_TIMEOUT_SECS", default_value_t = 30.0)]
    pub default_timeout_secs: f64,

    /// Executions running at once [default: 256 per CPU].
    #[arg(long, env = "JARVIS_MAX_CONCURRENCY")]
    pub max_concurrency: Option<usize>,

    /// Requests that may wait for a free slot; beyond, 503 `overloaded`
    /// [default: same as the concurrency].
    #[arg(long, env = "JARVIS_MAX_QUEUE")]
    pub max_queue: Option<usize>,

    /// Longest a request waits for a free slot, in milliseconds.
    #[arg(long, env = "JARVIS_QUEUE_TIMEOUT_MS", default_value_t = 2000)]
    pub queue_timeout_ms: u64,

    /// Linear memory one execution may use, in MiB.
    #[arg(long, env = "JARVIS_MAX_MEMORY_MIB", default_value_t = 128)]
    pub max_memory_mib: usize,

    /// Seconds a finished result is kept for retries of the same node_run_id.
    #[arg(long, env = "JARVIS_RESULT_RETENTION_SECS", default_value_t = 300)]
    pub result_retention_secs: u64,

    /// Finished results kept for retries, at most.
    #[arg(long, env = "JARVIS_RESULT_RETENTION_MAX", default_value_t = 10_000)]
    pub result_retention_max: usize,

    /// Bytes of finished results (their JSON) kept for retries, at most; the
    /// oldest are dropped first.
    #[arg(
        long,
        env = "JARVIS_RESULT_RETENTION_MAX_BYTES",
        default_value_t = 256 << 20
    )]
    pub result_retention_max_bytes: usize,

    /// Largest outputs (JSON text) a node may return, in bytes; larger ones
    /// fail `invalid_outputs`.
    #[arg(long, env = "JARVIS_MAX_OUTPUT_BYTES", default_value_t = 4 << 20)]
    pub max_output_bytes: usize,

    /// Longest node error message passed on, in bytes; longer ones are
    /// truncated.
    #[arg(long, env = "JARVIS_MAX_ERROR_MESSAGE_BYTES", default_value_t = 64 << 10)]
    pub max_error_message_bytes: usize,

    /// Largest node error details (JSON text) passed on, in bytes; larger
    /// ones are dropped.
    #[arg(long, env = "JARVIS_MAX_ERROR_DETAILS_BYTES", default_value_t = 64 << 10)]
    pub max_error_details_bytes: usize,

    /// Threads guests run on, apart from the API's, in each of the two
    /// tiers (short calls, long calls) [default: one per CPU].
    #[arg(long, env = "JARVIS_GUEST_THREADS")]
    pub guest_threads: Option<usize>,

    /// Nice value added to the threads that run long calls (Linux): a call
    /// still running 0.1 ms after it started moves there at its next epoch
    /// tick (1 ms), so that however many guests spin, a thread woken for the
    /// API takes the CPU from them when it wakes. 0 keeps long calls at the
    /// API's priority (0 to 19).
    #[arg(long, env = "JARVIS_LONG_CALL_NICE", default_value_t = 19)]
    pub long_call_nice: i32,

    /// Run the guests' threads under SCHED_BATCH (Linux): a guest thread
    /// handed a call waits for the scheduler's tick instead of preempting
    /// the API's thread, so calls cross to the guests in batches (results
    /// come back in batches by `runtime::handoff`). The API's threads keep
    /// the default policy. `false` keeps it for the guests' too.
    #[arg(long, env = "JARVIS_SCHED_BATCH", default_value_t = true, action = clap::ArgAction::Set)]
    pub sched_batch: bool,

    /// Let the kernel back this process's memory with transparent huge pages
    /// where the allocator asks for them (Linux). Off by default: faulting in
    /// a fresh 2 MiB page zeroes all of it on the thread that touched it, and
    /// a burst of new connections then stalls the API's threads for tens of
    /// milliseconds; 4 KiB pages spread that cost over the requests.
    #[arg(long, env = "JARVIS_TRANSPARENT_HUGE_PAGES", default_value_t = false, action = clap::ArgAction::Set)]
    pub transparent_huge_pages: bool,

    /// Log lines one execution may write; the rest are counted and dropped.
    #[arg(long, env = "JARVIS_MAX_GUEST_LOG_LINES", default_value_t = 100)]
    pub max_guest_log_lines: u32,

    /// Directory for compiled packs, so restarts skip compilation
    /// [default: the user's cache directory].
    #[arg(long, env = "JARVIS_COMPILE_CACHE_DIR")]
    pub compile_cache_dir: Option<PathBuf>,

    /// Compile packs at every start instead of caching them.
    #[arg(long, env = "JARVIS_NO_COMPILE_CACHE")]
    pub no_compile_cache: bool,

    /// Nodes one pack may declare; a pack declaring more is skipped.
    #[arg(long, env = "JARVIS_MAX_NODES_PER_PACK", default_value_t = 1000)]
    pub max_nodes_per_pack: usize,

    /// Size of one input or output schema's text, in KiB.
    #[arg(long, env = "JARVIS_MAX_SCHEMA_KIB", default_value_t = 256)]
    pub max_schema_kib: usize,

    /// Size of all the text one pack's `describe` returns, in MiB.
    #[arg(long, env = "JARVIS_MAX_DESCRIBE_MIB", default_value_t = 8)]
    pub max_describe_mib: usize,

    /// Nesting of subschemas in one schema, `$ref`s followed.
    #[arg(long, env = "JARVIS_MAX_SCHEMA_DEPTH", default_value_t = 64)]
    pub max_schema_depth: usize,

    /// Subschemas of one schema with every `$ref` inlined.
    #[arg(long, env = "JARVIS_MAX_SCHEMA_NODES", default_value_t = 10_000)]
    pub max_schema_nodes: u64,

    /// Require authentication on `GET /metrics` too; by default it is open,
    /// like `/v1/health`, for scrapers without a token.
    #[arg(long, env = "JARVIS_METRICS_REQUIRE_AUTH")]
    pub metrics_require_auth: bool,
    /// TOML file of what each pack may reach and read (destinations, config
    /// values, secrets, limits, a sha256 pin); without it packs get nothing.
    #[arg(long, env = "JARVIS_GRANTS_FILE")]
    pub grants: Option<PathBuf>,

    /// Hosts `jarvis.web.fetch` (pack `jarvis.core`) may reach, comma
    /// separated: `host` (any port), `host:port`, `*.suffix` or `*` (every
    /// public host). A named host may be private or loopback. Unset, the
    /// grants file alone decides, and without one nothing is reachable (the
    /// Python reference allows every host when this is unset).
    #[arg(long, env = "JARVIS_ATOMIC_HTTP_ALLOWED_HOSTS")]
    pub http_allowed_hosts: Option<String>,

    /// Hosts no pack may reach, whatever the grants say: `host` or `host:port`,
    /// comma separated.
    #[arg(long, env = "JARVIS_ATOMIC_HTTP_BLOCKED_HOSTS")]
    pub http_blocked_hosts: Option<String>,

    /// `jarvis.web.fetch`'s default timeout in seconds (10 unset), handed to
    /// the pack as config value `jarvis.http.timeout_seconds`.
    #[arg(long, env = "JARVIS_ATOMIC_HTTP_TIMEOUT_SECONDS")]
    pub http_timeout_seconds: Option<String>,

    /// `jarvis.web.fetch`'s default `max_bytes` (1 MiB unset), handed to the
    /// pack as config value `jarvis.http.max_bytes`.
    #[arg(long, env = "JARVIS_ATOMIC_HTTP_MAX_BYTES")]
    pub http_max_bytes: Option<String>,

    /// Seconds to let in-flight requests finish after SIGTERM or ctrl-c.
    #[arg(long, env = "JARVIS_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

/// Everything the service needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub packs_dir: Option<PathBuf>,
    /// How the packs directory is watched for changes.
    pub watch: WatchSettings,
    pub executor: ExecutorConfig,
    pub runtime: RuntimeLimits,
    /// Bounds on what a pack may declare.
    pub pack_limits: PackLimits,
    pub guest_threads: GuestThreads,
    /// Whether the process may use transparent huge pages (see
    /// [`crate::runtime::disable_transparent_huge_pages`]).
    pub transparent_huge_pages: bool,
    pub compile_cache_dir: Option<PathBuf>,
    pub shutdown_grace: Duration,
    /// Inbound authentication, from the `ARP_AUTH_*` variables.
    pub auth: AuthSettings,
    /// Whether `GET /metrics` needs authentication (otherwise it is exempt).
    pub metrics_require_auth: bool,
    /// What each pack is granted, from the grants file (nothing without one).
    pub grants: Arc<Grants>,
}

impl Config {
    /// Defaults suitable for tests: port 0, no packs dir, no compile cache,
    /// authentication off (whatever the environment says).
    pub fn for_tests() -> Self {
        let auth = AuthSettings::from_vars([("ARP_AUTH_PROFILE", "dev-insecure")])
            .expect("the dev-insecure profile is valid");
        Args::parse_from([
            "jarvis-atomic-executor",
            "--port",
            "0",
            "--no-compile-cache",
        ])
        .validate_with(auth)
        .map(|mut c| {
            c.packs_dir = None;
            c
        })
        .expect("default arguments are valid")
    }
}

impl Args {
    /// Checks the arguments, with authentication from the `ARP_AUTH_*` variables.
    pub fn validate(self) -> Result<Config, String> {
        let auth = AuthSettings::from_env().map_err(|e| format!("authentication: {e}"))?;
        self.validate_with(auth)
    }

    pub fn validate_with(self, auth: AuthSettings) -> Result<Config, String> {
        auth.validate()
            .map_err(|e| format!("authentication: {e}"))?;
        if !(self.default_timeout_secs.is_finite() && self.default_timeout_secs > 0.0) {
            return Err(format!(
                "JARVIS_DEFAULT_TIMEOUT_SECS / --default-timeout-secs must be a number of seconds > 0, got {}",
                self.default_timeout_secs
            ));
        }
        let default_timeout = Duration::try_from_secs_f64(self.default_timeout_secs)
            .map_err(|_| "JARVIS_DEFAULT_TIMEOUT_SECS is too large".to_owned())?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max_concurrency = self.max_concurrency.unwrap_or(256 * cpus);
        within("JARVIS_MAX_CONCURRENCY", max_concurrency, 1..=100_000)?;
        within("JARVIS_MAX_MEMORY_MIB", self.max_memory_mib, 1..=4096)?;
        within(
            "JARVIS_MAX_NODES_PER_PACK",
            self.max_nodes_per_pack,
            1..=100_000,
        )?;
        within("JARVIS_MAX_SCHEMA_KIB", self.max_schema_kib, 1..=64 << 10)?;
        within("JARVIS_MAX_DESCRIBE_MIB", self.max_describe_mib, 1..=1024)?;
        within("JARVIS_MAX_SCHEMA_DEPTH", self.max_schema_depth, 1..=1024)?;
        within(
            "JARVIS_MAX_SCHEMA_NODES",
            self.max_schema_nodes,
            1..=10_000_000,
        )?;
        within("JARVIS_PACKS_SETTLE_MS", self.packs_settle_ms, 0..=60_000)?;
        within("JARVIS_PACKS_RESCAN_SECS", self.packs_rescan_secs, 1..=3600)?;
        within("JARVIS_MAX_PACK_FILE_MIB", self.max_pack_file_mib, 1..=4096)?;
        let guest_threads = self.guest_threads.unwrap_or(cpus);
        within("JARVIS_GUEST_THREADS", guest_threads, 1..=1024)?;
        within("JARVIS_LONG_CALL_NICE", self.long_call_nice, 0..=19)?;
        for (name, value) in [
            ("JARVIS_MAX_OUTPUT_BYTES", self.max_output_bytes),
            (
                "JARVIS_MAX_ERROR_MESSAGE_BYTES",
                self.max_error_message_bytes,
            ),
            (
                "JARVIS_MAX_ERROR_DETAILS_BYTES",
                self.max_error_details_bytes,
            ),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        let grants = match &self.grants {
            Some(path) => Grants::load(path).map_err(|e| format!("JARVIS_GRANTS_FILE: {e}"))?,
            None => Grants::default(),
        };
        let grants = grants
            .with_http_env(&HttpEnv {
                allowed_hosts: self.http_allowed_hosts,
                blocked_hosts: self.http_blocked_hosts,
                timeout_seconds: self.http_timeout_seconds,
                max_bytes: self.http_max_bytes,
            })
            .map_err(|e| format!("JARVIS_ATOMIC_HTTP_*: {e}"))?;
        let compile_cache_dir = if self.no_compile_cache {
            None
        } else {
            self.compile_cache_dir.or_else(default_cache_dir)
        };
        Ok(Config {
            host: self.host,
            port: self.port,
            packs_dir: Some(self.packs),
            watch: WatchSettings {
                settle: Duration::from_millis(self.packs_settle_ms),
                rescan: Duration::from_secs(self.packs_rescan_secs),
                max_file_bytes: self.max_pack_file_mib << 20,
            },
            executor: ExecutorConfig {
                default_timeout,
                max_concurrency,
                max_queue: self.max_queue.unwrap_or(max_concurrency),
                queue_timeout: Duration::from_millis(self.queue_timeout_ms),
                retention: Duration::from_secs(self.result_retention_secs),
                retention_max: self.result_retention_max,
                retention_max_bytes: self.result_retention_max_bytes,
                outputs: OutputLimits {
                    max_output_bytes: self.max_output_bytes,
                    max_error_message_bytes: self.max_error_message_bytes,
                    max_error_details_bytes: self.max_error_details_bytes,
                },
            },
            runtime: RuntimeLimits {
                max_memory_bytes: self.max_memory_mib << 20,
                max_instances: u32::try_from(max_concurrency).unwrap_or(u32::MAX),
                max_log_lines: self.max_guest_log_lines,
            },
            pack_limits: PackLimits {
                max_nodes: self.max_nodes_per_pack,
                max_schema_bytes: self.max_schema_kib << 10,
                max_describe_bytes: self.max_describe_mib << 20,
                max_schema_depth: self.max_schema_depth,
                max_schema_nodes: self.max_schema_nodes,
            },
            guest_threads: GuestThreads {
                threads: guest_threads,
                long_nice: self.long_call_nice,
                batch: self.sched_batch,
            },
            transparent_huge_pages: self.transparent_huge_pages,
            compile_cache_dir,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            auth,
            metrics_require_auth: self.metrics_require_auth,
            grants: Arc::new(grants),
        })
    }
}

/// Checks that the variable `name` holds a value within `range`.
fn within<T: PartialOrd + std::fmt::Display>(
    name: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{name} must be between {} and {}, got {value}",
            range.start(),
            range.end()
        ))
    }
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("jarvis-atomic-executor"))
}

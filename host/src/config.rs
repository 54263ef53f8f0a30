//! Command line and environment configuration, validated into one [`Config`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::executor::ExecutorConfig;
use crate::runtime::RuntimeLimits;

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

    /// Directory of node packs: every `*.wasm` in it is loaded at start.
    #[arg(long, env = "JARVIS_PACKS_DIR", default_value = "./nodepacks")]
    pub packs: PathBuf,

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
    pub executor: ExecutorConfig,
    pub runtime: RuntimeLimits,
    pub compile_cache_dir: Option<PathBuf>,
    pub shutdown_grace: Duration,
}

impl Config {
    /// Defaults suitable for tests: port 0, no packs dir, no compile cache.
    pub fn for_tests() -> Self {
        Args::parse_from([
            "jarvis-atomic-executor",
            "--port",
            "0",
            "--no-compile-cache",
        ])
        .validate()
        .map(|mut c| {
            c.packs_dir = None;
            c
        })
        .expect("default arguments are valid")
    }
}

impl Args {
    pub fn validate(self) -> Result<Config, String> {
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
        if max_concurrency == 0 || max_concurrency > 100_000 {
            return Err(format!(
                "JARVIS_MAX_CONCURRENCY must be between 1 and 100000, got {max_concurrency}"
            ));
        }
        if self.max_memory_mib == 0 || self.max_memory_mib > 4096 {
            return Err(format!(
                "JARVIS_MAX_MEMORY_MIB must be between 1 and 4096, got {}",
                self.max_memory_mib
            ));
        }
        let compile_cache_dir = if self.no_compile_cache {
            None
        } else {
            self.compile_cache_dir.or_else(default_cache_dir)
        };
        Ok(Config {
            host: self.host,
            port: self.port,
            packs_dir: Some(self.packs),
            executor: ExecutorConfig {
                default_timeout,
                max_concurrency,
                max_queue: self.max_queue.unwrap_or(max_concurrency),
                queue_timeout: Duration::from_millis(self.queue_timeout_ms),
                retention: Duration::from_secs(self.result_retention_secs),
                retention_max: self.result_retention_max,
            },
            runtime: RuntimeLimits {
                max_memory_bytes: self.max_memory_mib << 20,
                max_instances: u32::try_from(max_concurrency).unwrap_or(u32::MAX),
                max_log_lines: self.max_guest_log_lines,
            },
            compile_cache_dir,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
        })
    }
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("jarvis-atomic-executor"))
}

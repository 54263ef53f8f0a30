//! Command line and environment: raw arguments, validated into one [`Config`].

use anyhow::Context as _;
use jarvis_auth::{AuthSettings, OutboundAuth};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// The ARP Run Coordinator: durable runs in SQLite, dispatched to atomic and composite executors.
#[derive(Debug, Parser)]
#[command(name = "jarvis-run-coordinator", version)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "JARVIS_RUN_COORDINATOR_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free port).
    #[arg(long, env = "JARVIS_RUN_COORDINATOR_PORT", default_value_t = 8081)]
    pub port: u16,
    /// SQLite database file holding runs, node runs, events and the dispatch queue.
    /// Default: $XDG_DATA_HOME/jarvis/run-coordinator.sqlite3 (or ~/.local/share/...).
    #[arg(long, env = "JARVIS_RUN_COORDINATOR_DB")]
    pub db: Option<PathBuf>,
    /// Atomic Executor base URL (fallback: ARP_ATOMIC_EXECUTOR_URL).
    #[arg(long, env = "JARVIS_ATOMIC_EXECUTOR_URL")]
    pub atomic_executor_url: Option<String>,
    /// Composite Executor base URL (fallback: ARP_COMPOSITE_EXECUTOR_URL).
    #[arg(long, env = "JARVIS_COMPOSITE_EXECUTOR_URL")]
    pub composite_executor_url: Option<String>,
    /// Node Registry base URL, used to resolve node kinds and constraints (fallback: ARP_NODE_REGISTRY_URL).
    #[arg(long, env = "JARVIS_NODE_REGISTRY_URL")]
    pub node_registry_url: Option<String>,
    /// Policy Decision Point base URL (fallback: ARP_PDP_URL). Without one, policy denies
    /// unless the profile is `dev-allow`.
    #[arg(long, env = "JARVIS_PDP_URL")]
    pub pdp_url: Option<String>,
    /// Policy profile used when no PDP is configured: `dev-allow` allows everything.
    #[arg(long, env = "JARVIS_POLICY_PROFILE")]
    pub policy_profile: Option<String>,
    /// URL at which composite executors reach this coordinator (fallback:
    /// JARVIS_RUN_COORDINATOR_URL, then http://HOST:PORT).
    #[arg(long, env = "JARVIS_RUN_COORDINATOR_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Dispatch new NodeRuns automatically (`false` leaves them queued).
    #[arg(
        long,
        env = "JARVIS_RUN_COORDINATOR_AUTO_DISPATCH",
        default_value = "true"
    )]
    pub auto_dispatch: String,
    /// Deadline of a NodeRun whose constraints set no `budgets.max_wall_time_ms`.
    #[arg(long, env = "JARVIS_NODE_RUN_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    pub node_run_timeout: Duration,
    /// How many NodeRuns may be in dispatch at once.
    #[arg(long, env = "JARVIS_DISPATCH_CONCURRENCY", default_value_t = 1024)]
    pub dispatch_concurrency: usize,
    /// Seconds a dispatcher owns a NodeRun without renewing it (renewed every third of
    /// it while the executor call is in flight); an expired lease is taken up again.
    #[arg(long, env = "JARVIS_RUN_COORDINATOR_LEASE_SECS", default_value_t = 15)]
    pub lease_secs: u64,
    /// How long terminal runs are kept (with their NodeRuns and events) before they
    /// are deleted; `off` keeps them forever.
    #[arg(long, env = "JARVIS_RUN_COORDINATOR_RETENTION", default_value = "7d", value_parser = parse_retention)]
    pub retention: Retention,
    /// `flush`: a change is acknowledged once it is on disk (fsync). `fast`: once it is
    /// in the operating system, safe against a process crash but not a power loss.
    #[arg(
        long,
        env = "JARVIS_RUN_COORDINATOR_DURABILITY",
        default_value = "flush"
    )]
    pub durability: Durability,
}

/// How long terminal runs are kept; `None` keeps them forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

fn parse_retention(value: &str) -> Result<Retention, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "off" | "0" | "none" | "forever" => Ok(Retention(None)),
        v => match humantime::parse_duration(v) {
            Ok(d) if d.is_zero() => Ok(Retention(None)),
            Ok(d) => Ok(Retention(Some(d))),
            Err(e) => Err(format!("{e} (a duration like `7d`, `12h`, or `off`)")),
        },
    }
}

/// When a committed change counts as durable, i.e. when it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced before anything is acknowledged;
    /// survives power loss. Group commit shares one fsync among all waiting requests.
    #[default]
    Flush,
    /// `synchronous=NORMAL`: survives a process crash; an OS crash or power loss may
    /// drop the last commits (the WAL is fsynced only at checkpoints).
    Fast,
}

impl std::str::FromStr for Durability {
    type Err = String;

    /// For settings read outside clap (benches): `flush` or `fast`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as clap::ValueEnum>::from_str(s.trim(), true)
    }
}

/// Intervals of the background work; shorter in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often the poller takes up expired leases and fails overdue NodeRuns.
    pub poll_interval: Duration,
    /// How long after its deadline an open NodeRun is failed by the poller (the
    /// executor enforces the wall time itself and normally reports first).
    pub deadline_grace: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            deadline_grace: Duration::from_secs(10),
        }
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub db_path: PathBuf,
    pub atomic_executor_url: Option<String>,
    pub composite_executor_url: Option<String>,
    pub node_registry_url: Option<String>,
    pub pdp_url: Option<String>,
    pub policy: LocalPolicy,
    pub public_url: Option<String>,
    pub auto_dispatch: bool,
    pub node_run_timeout: Duration,
    pub dispatch_concurrency: usize,
    /// How long a dispatcher owns a NodeRun between renewals.
    pub lease: Duration,
    /// Terminal runs older than this are deleted; `None` keeps them.
    pub retention: Option<Duration>,
    pub durability: Durability,
    pub timing: Timing,
    /// Inbound authentication (`ARP_AUTH_*`).
    pub auth: AuthSettings,
    /// Client-credentials tokens for the services the coordinator calls.
    pub outbound: OutboundAuth,
}

/// The decision taken when no PDP is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalPolicy {
    /// `JARVIS_POLICY_PROFILE=dev-allow` (or legacy `ARP_POLICY_MODE=allow_all`).
    AllowAll,
    DenyAll,
}

impl Config {
    pub fn from_args(args: Args) -> anyhow::Result<Self> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let url = |primary: Option<String>, fallback: &str| {
            primary
                .filter(|v| !v.trim().is_empty())
                .or_else(|| env(fallback))
                .map(|u| normalize_url(&u))
        };
        let profile = args
            .policy_profile
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let legacy = env("ARP_POLICY_MODE")
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let policy = if profile == "dev-allow" || legacy == "allow_all" {
            LocalPolicy::AllowAll
        } else {
            LocalPolicy::DenyAll
        };
        let listen = format!("{}:{}", args.host, args.port);
        let auto_dispatch = !matches!(
            args.auto_dispatch.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "no" | "off"
        );
        if args.dispatch_concurrency == 0 {
            anyhow::bail!("--dispatch-concurrency must be at least 1");
        }
        if args.lease_secs == 0 {
            anyhow::bail!("--lease-secs must be at least 1");
        }
        Ok(Self {
            listen,
            db_path: args.db.unwrap_or_else(default_db_path),
            atomic_executor_url: url(args.atomic_executor_url, "ARP_ATOMIC_EXECUTOR_URL"),
            composite_executor_url: url(args.composite_executor_url, "ARP_COMPOSITE_EXECUTOR_URL"),
            node_registry_url: url(args.node_registry_url, "ARP_NODE_REGISTRY_URL"),
            pdp_url: url(args.pdp_url, "ARP_PDP_URL"),
            policy,
            public_url: url(args.public_url, "JARVIS_RUN_COORDINATOR_URL"),
            auto_dispatch,
            node_run_timeout: args.node_run_timeout,
            dispatch_concurrency: args.dispatch_concurrency,
            lease: Duration::from_secs(args.lease_secs),
            retention: args.retention.0,
            durability: args.durability,
            timing: Timing::default(),
            auth: AuthSettings::from_env().context("authentication")?,
            outbound: OutboundAuth::from_env().context("outbound authentication")?,
        })
    }

    /// Authentication off both ways, as `ARP_AUTH_PROFILE=dev-insecure` (tests, benches).
    pub fn insecure_auth() -> (AuthSettings, OutboundAuth) {
        let settings = AuthSettings::from_vars([("ARP_AUTH_PROFILE", "dev-insecure")])
            .expect("the dev-insecure profile is valid");
        (settings, OutboundAuth::disabled())
    }

    /// The public URL, or one derived from the bound address when none was configured.
    pub fn public_url_or(&self, bound: SocketAddr) -> String {
        self.public_url.clone().unwrap_or_else(|| {
            let host = if bound.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                bound.ip().to_string()
            };
            format!("http://{host}:{}", bound.port())
        })
    }
}

/// Strips whitespace, a trailing slash and a trailing `/v1`, as the Python services do.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    url.strip_suffix("/v1").unwrap_or(url).to_owned()
}

fn default_db_path() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    match base {
        Some(base) => base.join("jarvis").join("run-coordinator.sqlite3"),
        None => PathBuf::from("jarvis-run-coordinator.sqlite3"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_and_durability_parse() {
        assert_eq!(parse_retention("off"), Ok(Retention(None)));
        assert_eq!(parse_retention("0"), Ok(Retention(None)));
        assert_eq!(
            parse_retention("7d"),
            Ok(Retention(Some(Duration::from_secs(7 * 86_400))))
        );
        assert!(parse_retention("soon").is_err());
        assert_eq!("FAST".parse(), Ok(Durability::Fast));
        assert_eq!("flush".parse(), Ok(Durability::Flush));
        let args = Args::parse_from(["jarvis-run-coordinator"]);
        assert_eq!(args.durability, Durability::Flush);
        assert_eq!(args.lease_secs, 15);
    }

    #[test]
    fn urls_are_normalized_like_the_python_services() {
        assert_eq!(
            normalize_url(" http://127.0.0.1:8082/v1/ "),
            "http://127.0.0.1:8082"
        );
        assert_eq!(
            normalize_url("http://127.0.0.1:8082"),
            "http://127.0.0.1:8082"
        );
    }
}

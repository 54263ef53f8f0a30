//! Command line and environment: raw arguments, validated into one [`Config`].

use anyhow::Context as _;
use jarvis_auth::{AuthSettings, OutboundAuth};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::executors::Probing;

/// Where `--help` lists the variable names of the Python services, read when the
/// JARVIS_* name (or its flag) is not set.
const FALLBACKS: &str = "Fallbacks (older variable names, used when the one above is unset)";

/// The ARP Run Coordinator: durable runs in SQLite, dispatched to atomic and composite executors.
///
/// Every flag can be set by the environment variable named with it; for the executor,
/// registry and PDP URLs and the policy profile the Python services' names work too
/// (listed under Fallbacks), resolved in `Config::from_args`.
#[derive(Debug, Parser)]
#[command(
    name = "jarvis-run-coordinator",
    version,
    after_help = "Inbound authentication is configured by the ARP_AUTH_* variables and \
                  outbound tokens by ARP_AUTH_CLIENT_ID/ARP_AUTH_CLIENT_SECRET/ARP_AUTH_TOKEN_ENDPOINT \
                  and JARVIS_*_AUDIENCE, as in every JARVIS service (see the repository README)."
)]
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
    /// PostgreSQL instead of SQLite (`postgres://user@host:port/database`; no TLS).
    /// Several coordinators may share one database and its work.
    #[arg(long, env = "JARVIS_RUN_COORDINATOR_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// Atomic Executor base URL, or a comma-separated list of them. A NodeRun goes to
    /// the executors whose `GET /v1/node-types` lists its node type and version, the
    /// least busy first; one that fails, answers 5xx or stops answering leaves the
    /// rotation within seconds and returns when its `GET /v1/health` answers again.
    #[arg(long, env = "JARVIS_ATOMIC_EXECUTOR_URL", value_name = "URL[,URL...]")]
    pub atomic_executor_url: Option<String>,
    /// Composite Executor base URL.
    #[arg(long, env = "JARVIS_COMPOSITE_EXECUTOR_URL", value_name = "URL")]
    pub composite_executor_url: Option<String>,
    /// Node Registry base URL, used to resolve node kinds and constraints.
    #[arg(long, env = "JARVIS_NODE_REGISTRY_URL", value_name = "URL")]
    pub node_registry_url: Option<String>,
    /// Policy Decision Point base URL. Without one, policy denies unless the profile
    /// is `dev-allow`.
    #[arg(long, env = "JARVIS_PDP_URL", value_name = "URL")]
    pub pdp_url: Option<String>,
    /// Policy profile used when no PDP is configured: `dev-allow` allows everything.
    #[arg(long, env = "JARVIS_POLICY_PROFILE")]
    pub policy_profile: Option<String>,
    /// URL at which composite executors reach this coordinator (default:
    /// http://HOST:PORT as bound).
    #[arg(long, env = "JARVIS_RUN_COORDINATOR_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
    /// Log filter: `info`, `debug`, `jarvis_run_coordinator=debug`, ...
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
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

    /// Fallback of --atomic-executor-url (a URL or comma-separated list).
    #[arg(long, env = "ARP_ATOMIC_EXECUTOR_URL", value_name = "URL[,URL...]", help_heading = FALLBACKS)]
    pub arp_atomic_executor_url: Option<String>,
    /// Fallback of --composite-executor-url.
    #[arg(long, env = "ARP_COMPOSITE_EXECUTOR_URL", value_name = "URL", help_heading = FALLBACKS)]
    pub arp_composite_executor_url: Option<String>,
    /// Fallback of --node-registry-url.
    #[arg(long, env = "ARP_NODE_REGISTRY_URL", value_name = "URL", help_heading = FALLBACKS)]
    pub arp_node_registry_url: Option<String>,
    /// Fallback of --pdp-url.
    #[arg(long, env = "ARP_PDP_URL", value_name = "URL", help_heading = FALLBACKS)]
    pub arp_pdp_url: Option<String>,
    /// Legacy policy switch: `allow_all` acts as `--policy-profile dev-allow`.
    #[arg(long, env = "ARP_POLICY_MODE", help_heading = FALLBACKS)]
    pub arp_policy_mode: Option<String>,
    /// Fallback of --public-url.
    #[arg(long, env = "JARVIS_RUN_COORDINATOR_URL", value_name = "URL", help_heading = FALLBACKS)]
    pub run_coordinator_url: Option<String>,
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
    /// Health probes of the atomic executors.
    pub probing: Probing,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            deadline_grace: Duration::from_secs(10),
            probing: Probing::default(),
        }
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub database: Database,
    /// Empty when none is configured: atomic NodeRuns then fail `atomic_executor_unconfigured`.
    pub atomic_executor_urls: Vec<String>,
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

/// Where runs are stored.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file: one coordinator process.
    Sqlite(PathBuf),
    /// A PostgreSQL URL: any number of coordinator processes.
    Postgres(String),
}

impl Database {
    /// How logs name it: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => path.display().to_string(),
            Database::Postgres(url) => match url::Url::parse(url) {
                Ok(mut parsed) if parsed.password().is_some() => {
                    let _ = parsed.set_password(Some("***"));
                    parsed.to_string()
                }
                Ok(parsed) => parsed.to_string(),
                Err(_) => "postgres (unparsed URL)".to_owned(),
            },
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The decision taken when no PDP is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalPolicy {
    /// `JARVIS_POLICY_PROFILE=dev-allow` (or legacy `ARP_POLICY_MODE=allow_all`).
    AllowAll,
    DenyAll,
}

/// The first value that is set and not blank: a flag or variable, then its fallback.
fn either(primary: Option<String>, fallback: Option<String>) -> Option<String> {
    primary
        .filter(|v| !v.trim().is_empty())
        .or(fallback.filter(|v| !v.trim().is_empty()))
}

impl Config {
    /// Validates the arguments, with authentication from the `ARP_AUTH_*` variables.
    pub fn from_args(args: Args) -> anyhow::Result<Self> {
        let auth = AuthSettings::from_env().context("authentication")?;
        let outbound = OutboundAuth::from_env().context("outbound authentication")?;
        Self::from_args_with(args, (auth, outbound))
    }

    /// Validates the arguments; every fallback is resolved here.
    pub fn from_args_with(
        args: Args,
        (auth, outbound): (AuthSettings, OutboundAuth),
    ) -> anyhow::Result<Self> {
        let url = |primary, fallback| either(primary, fallback).map(|u| normalize_url(&u));
        let atomic_executor_urls =
            match either(args.atomic_executor_url, args.arp_atomic_executor_url) {
                Some(list) => parse_url_list(&list).context("--atomic-executor-url")?,
                None => Vec::new(),
            };
        let profile = args
            .policy_profile
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let legacy = args
            .arp_policy_mode
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
        let database = match either(args.database_url, None) {
            Some(url) => {
                let url = url.trim().to_owned();
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    anyhow::bail!("--database-url must be a postgres:// or postgresql:// URL");
                }
                Database::Postgres(url)
            }
            None => Database::Sqlite(args.db.unwrap_or_else(default_db_path)),
        };
        Ok(Self {
            listen,
            database,
            atomic_executor_urls,
            composite_executor_url: url(
                args.composite_executor_url,
                args.arp_composite_executor_url,
            ),
            node_registry_url: url(args.node_registry_url, args.arp_node_registry_url),
            pdp_url: url(args.pdp_url, args.arp_pdp_url),
            policy,
            public_url: url(args.public_url, args.run_coordinator_url),
            auto_dispatch,
            node_run_timeout: args.node_run_timeout,
            dispatch_concurrency: args.dispatch_concurrency,
            lease: Duration::from_secs(args.lease_secs),
            retention: args.retention.0,
            durability: args.durability,
            timing: Timing::default(),
            auth,
            outbound,
        })
    }

    /// What tests and benches start from: port 0 on 127.0.0.1, the database at
    /// `db_path`, no peers, `dev-allow` policy, authentication off, a 60 s NodeRun
    /// timeout; the rest as the binary's defaults. Nothing is read from the environment.
    pub fn for_tests(db_path: &Path) -> Self {
        let (auth, outbound) = Self::insecure_auth();
        Self {
            listen: "127.0.0.1:0".into(),
            database: Database::Sqlite(db_path.to_owned()),
            atomic_executor_urls: Vec::new(),
            composite_executor_url: None,
            node_registry_url: None,
            pdp_url: None,
            policy: LocalPolicy::AllowAll,
            public_url: None,
            auto_dispatch: true,
            node_run_timeout: Duration::from_secs(60),
            dispatch_concurrency: 256,
            lease: Duration::from_secs(15),
            retention: None,
            durability: Durability::Flush,
            timing: Timing::default(),
            auth,
            outbound,
        }
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

/// A comma-separated list of http(s) base URLs, each normalized, duplicates dropped.
pub fn parse_url_list(list: &str) -> anyhow::Result<Vec<String>> {
    let mut urls: Vec<String> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let url = normalize_url(item);
        let parsed = reqwest::Url::parse(&url).with_context(|| format!("`{item}`"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            anyhow::bail!("`{item}` is not an http(s) URL");
        }
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    if urls.is_empty() {
        anyhow::bail!("no URL in `{list}`");
    }
    Ok(urls)
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
    fn a_database_url_chooses_postgresql_and_its_password_is_never_shown() {
        let parse = |argv: &[&str]| {
            let args = Args::parse_from(["jarvis-run-coordinator"].iter().chain(argv));
            Config::from_args_with(args, Config::insecure_auth())
        };
        let config = parse(&["--db", "/tmp/x.sqlite3"]).unwrap();
        assert_eq!(config.database, Database::Sqlite("/tmp/x.sqlite3".into()));
        let config = parse(&[
            "--db",
            "/tmp/x.sqlite3",
            "--database-url",
            "postgres://jarvis:s3cret@db:5432/runs",
        ])
        .unwrap();
        assert_eq!(
            config.database,
            Database::Postgres("postgres://jarvis:s3cret@db:5432/runs".into())
        );
        let shown = format!("{} {:?}", config.database.describe(), config);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(parse(&["--database-url", "mysql://db/runs"]).is_err());
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

    #[test]
    fn the_atomic_executor_url_takes_a_comma_separated_list() {
        assert_eq!(
            parse_url_list(
                " http://127.0.0.1:8082/v1/ ,, http://10.0.0.2:8082,http://127.0.0.1:8082"
            )
            .unwrap(),
            ["http://127.0.0.1:8082", "http://10.0.0.2:8082"]
        );
        assert!(parse_url_list("ftp://127.0.0.1").is_err());
        assert!(parse_url_list("127.0.0.1:8082").is_err());
        assert!(parse_url_list(" , ").is_err());
    }

    #[test]
    fn a_fallback_is_used_only_when_its_primary_is_unset() {
        let parse = |argv: &[&str]| {
            let args = Args::parse_from(["jarvis-run-coordinator"].iter().chain(argv));
            Config::from_args_with(args, Config::insecure_auth()).unwrap()
        };
        let config = parse(&["--arp-atomic-executor-url", "http://a:1,http://b:2/v1"]);
        assert_eq!(config.atomic_executor_urls, ["http://a:1", "http://b:2"]);
        let config = parse(&[
            "--atomic-executor-url",
            "http://c:3",
            "--arp-atomic-executor-url",
            "http://a:1",
            "--arp-pdp-url",
            "http://pdp:9/",
            "--run-coordinator-url",
            "http://me:8081",
        ]);
        assert_eq!(config.atomic_executor_urls, ["http://c:3"]);
        assert_eq!(config.pdp_url.as_deref(), Some("http://pdp:9"));
        assert_eq!(config.public_url.as_deref(), Some("http://me:8081"));
        let config = parse(&["--pdp-url", " ", "--arp-pdp-url", "http://pdp:9"]);
        assert_eq!(config.pdp_url.as_deref(), Some("http://pdp:9"));
        let config = parse(&["--arp-policy-mode", "allow_all"]);
        assert_eq!(config.policy, LocalPolicy::AllowAll);
    }

    /// Every variable named in the README's Configuration section, as `--help` must list it.
    fn readme_variables() -> Vec<String> {
        let readme = include_str!("../README.md");
        let start = readme
            .find("## Configuration")
            .expect("a Configuration section");
        let section = &readme[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
        let mut names: Vec<String> = section
            .split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .filter(|w| w.contains('_') && w.len() > 3 && !w.starts_with('_') && !w.ends_with('_'))
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn help_names_every_variable_the_readme_documents() {
        use clap::CommandFactory as _;
        let help = Args::command().render_long_help().to_string();
        let names = readme_variables();
        assert!(names.len() >= 20, "{names:?}");
        for name in &names {
            assert!(
                help.contains(name.as_str()),
                "--help does not name {name}:\n{help}"
            );
        }
    }
}

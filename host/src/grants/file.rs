//! The operator's grants file: what each pack (and optionally each node) may
//! reach and read. Deny by default: a pack the file does not name gets
//! nothing.
//!
//! ```toml
//! [packs."jarvis.core"]
//! sha256 = "9f86d08188…"                  # optional pin of the pack file
//! allow = ["https://api.example.com", "https://*.example.com:443", "http://127.0.0.1:8080"]
//! config = { region = "eu" }
//! secrets = { token = { env = "EXAMPLE_TOKEN" }, key = { file = "/run/secrets/key" } }
//! max_response_bytes = 1048576
//! max_outbound_calls = 8
//!
//! [packs."jarvis.core".nodes."jarvis.web.fetch"]
//! allow = ["https://*"]                   # added to the pack's grants for this node
//! ```
//!
//! The reference's `JARVIS_ATOMIC_HTTP_ALLOWED_HOSTS` and
//! `JARVIS_ATOMIC_HTTP_BLOCKED_HOSTS` join the file ([`Grants::with_http_env`]):
//! each allowed entry grants pack `jarvis.core` that host over http and https,
//! and a blocked host is refused to every pack whatever its grants say.
//!
//! A node's table adds to its pack's: destinations are joined, its config
//! values and secrets win over the pack's of the same name, and its limits
//! replace the pack's. Secret values are read once, when the file is loaded,
//! and are never written to logs, errors or `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// Largest grants file read, in bytes.
pub const MAX_GRANTS_FILE_BYTES: u64 = 1 << 20;
/// Largest secret file read, in bytes.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;
/// Response bytes one outbound call may read unless the grant says otherwise.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 10 << 20;
/// The largest `max_response_bytes` a grant may set.
pub const MAX_RESPONSE_BYTES_LIMIT: u64 = 1 << 30;
/// Outbound calls one execution may make unless the grant says otherwise.
pub const DEFAULT_MAX_OUTBOUND_CALLS: u32 = 16;
/// The largest `max_outbound_calls` a grant may set.
pub const MAX_OUTBOUND_CALLS_LIMIT: u32 = 10_000;

/// Why a grants file was refused. Never carries a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum GrantsError {
    #[error("cannot read the grants file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the grants file is larger than {MAX_GRANTS_FILE_BYTES} bytes")]
    TooLarge,
    #[error("the grants file is not valid: {0}")]
    Syntax(String),
    #[error("pack {pack}: {reason}")]
    Pack { pack: String, reason: String },
}

/// The pack the reference's `JARVIS_ATOMIC_HTTP_*` variables apply to.
pub const CORE_PACK: &str = "jarvis.core";

/// Every grant of the file, by pack id, and the hosts no pack may reach.
#[derive(Debug, Default)]
pub struct Grants {
    packs: BTreeMap<String, PackGrants>,
    blocked: Arc<[BlockedHost]>,
}

/// The reference's `JARVIS_ATOMIC_HTTP_*` variables as the operator set them
/// (comma-separated host lists, a number of seconds, a number of bytes).
#[derive(Debug, Clone, Default)]
pub struct HttpEnv {
    pub allowed_hosts: Option<String>,
    pub blocked_hosts: Option<String>,
    pub timeout_seconds: Option<String>,
    pub max_bytes: Option<String>,
}

/// A host no pack may reach: on any port, or on one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedHost {
    /// Normalized like [`normalize_host`].
    host: String,
    port: Option<u16>,
}

#[derive(Debug)]
struct PackGrants {
    sha256: Option<[u8; 32]>,
    base: GrantSet,
    nodes: BTreeMap<String, GrantSet>,
}

/// Grants as written in one table, before defaults apply.
#[derive(Debug, Default, Clone)]
struct GrantSet {
    allow: Vec<Destination>,
    config: BTreeMap<String, String>,
    secrets: BTreeMap<String, Secret>,
    max_response_bytes: Option<u64>,
    max_outbound_calls: Option<u32>,
}

/// What one node of one pack is granted, with defaults applied.
#[derive(Debug, Clone)]
pub struct NodeGrants {
    /// Destinations outbound requests may go to.
    pub allow: Vec<Destination>,
    /// Config values the guest may read by key.
    pub config: BTreeMap<String, String>,
    /// Secrets the guest may read by name.
    pub secrets: BTreeMap<String, Secret>,
    /// Response bytes one outbound call may read.
    pub max_response_bytes: u64,
    /// Outbound calls one execution may make.
    pub max_outbound_calls: u32,
    /// Hosts refused whatever `allow` says.
    pub blocked: Arc<[BlockedHost]>,
}

impl Default for NodeGrants {
    /// Nothing granted.
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            config: BTreeMap::new(),
            secrets: BTreeMap::new(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_outbound_calls: DEFAULT_MAX_OUTBOUND_CALLS,
            blocked: Arc::new([]),
        }
    }
}

impl NodeGrants {
    /// The grant allowing `scheme://host:port`, if any. An explicit grant
    /// (one naming this host rather than matching it by wildcard) is
    /// preferred, since it may reach a private address.
    pub fn destination(&self, scheme: Scheme, host: &str, port: u16) -> Option<Reach> {
        let host = normalize_host(host).ok()?;
        let mut found = None;
        for destination in &self.allow {
            match destination.matches(scheme, &host, port) {
                Some(Reach::Explicit) => return Some(Reach::Explicit),
                Some(Reach::Public) => found = Some(Reach::Public),
                None => {}
            }
        }
        found
    }

    /// Whether `host:port` is blocked for every pack.
    pub fn is_blocked(&self, host: &str, port: u16) -> bool {
        let Ok(host) = normalize_host(host) else {
            return false;
        };
        self.blocked
            .iter()
            .any(|b| b.host == host && b.port.is_none_or(|p| p == port))
    }
}

impl NodeGrants {
    /// Whether some granted destination covers `need` (see [`Destination::covers`]).
    pub fn covers(&self, need: &Destination) -> bool {
        self.allow.iter().any(|granted| granted.covers(need))
    }
}

/// How far a matching grant reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Matched by a wildcard: public addresses only.
    Public,
    /// The grant names this host: any address it resolves to, private ones
    /// included.
    Explicit,
}

/// A secret value: never printed, only handed to the guest it is granted to.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// The value itself, for handing to the guest.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Some(Self::Http),
            "https" => Some(Self::Https),
            _ => None,
        }
    }
}

/// One allowed destination: `scheme://host[:port]`, where host may be an
/// exact name or address, `*.suffix` (any name below `suffix`, not `suffix`
/// itself) or `*` (any public host), and port may be `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    scheme: Scheme,
    host: HostPattern,
    /// `None` for any port.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    Below(String),
    Any,
}

impl Destination {
    /// Parses `scheme://host[:port]`; anything more (a path, user info, a
    /// query) is refused so that a pattern never looks narrower than it is.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("destination {pattern:?}: {why}");
        let (scheme, rest) = pattern
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://host[:port]"))?;
        let scheme =
            Scheme::parse(scheme).ok_or_else(|| bad("the scheme must be http or https"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(bad("only scheme://host[:port] is allowed, no path or user"));
        }
        let (host, port) = split_host_port(rest).ok_or_else(|| bad("malformed host or port"))?;
        let port = match port {
            None => Some(scheme.default_port()),
            Some("*") => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("the port must be 1-65535 or *"))?,
            ),
        };
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            let suffix = normalize_host(suffix).map_err(|e| bad(&e))?;
            if suffix.parse::<IpAddr>().is_ok() || suffix.starts_with('[') {
                return Err(bad("a wildcard applies to names, not addresses"));
            }
            HostPattern::Below(suffix)
        } else if host.contains('*') {
            return Err(bad(
                "a wildcard must be the whole host or its first label (*.example.com)",
            ));
        } else {
            HostPattern::Exact(normalize_host(host).map_err(|e| bad(&e))?)
        };
        Ok(Self { scheme, host, port })
    }

    /// Whether this grant allows `scheme://host:port`, `host` normalized.
    fn matches(&self, scheme: Scheme, host: &str, port: u16) -> Option<Reach> {
        if self.scheme != scheme || self.port.is_some_and(|p| p != port) {
            return None;
        }
        match &self.host {
            HostPattern::Exact(h) => (h == host).then_some(Reach::Explicit),
            HostPattern::Below(suffix) => is_below(host, suffix).then_some(Reach::Public),
            HostPattern::Any => Some(Reach::Public),
        }
    }

    /// Whether this grant allows every destination `need` names, as far as
    /// the need would reach: a declared address (not a name) is covered only
    /// by a grant naming that address, since a wildcard grant does not reach
    /// private addresses.
    pub fn covers(&self, need: &Destination) -> bool {
        if self.scheme != need.scheme {
            return false;
        }
        match (self.port, need.port) {
            (None, _) => {}
            (Some(granted), Some(needed)) if granted == needed => {}
            _ => return false,
        }
        match (&self.host, &need.host) {
            (HostPattern::Exact(granted), HostPattern::Exact(needed)) => granted == needed,
            (HostPattern::Exact(_), _) => false,
            (_, HostPattern::Exact(needed)) if is_address(needed) => false,
            (HostPattern::Below(suffix), HostPattern::Exact(needed)) => is_below(needed, suffix),
            (HostPattern::Below(suffix), HostPattern::Below(needed)) => {
                needed == suffix || is_below(needed, suffix)
            }
            (HostPattern::Below(_), HostPattern::Any) => false,
            (HostPattern::Any, _) => true,
        }
    }
}

/// Whether the name `host` lies below `suffix` (`a.example.com` below
/// `example.com`; not `example.com` itself, nor `badexample.com`).
fn is_below(host: &str, suffix: &str) -> bool {
    host.strip_suffix(suffix)
        .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
}

/// Whether a normalized host is an address rather than a name.
fn is_address(host: &str) -> bool {
    host.starts_with('[') || host.parse::<IpAddr>().is_ok()
}

/// Splits `host[:port]`, with IPv6 addresses in brackets.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if s.starts_with('[') {
        let end = s.find(']')?;
        let (host, rest) = s.split_at(end + 1);
        return match rest {
            "" => Some((host, None)),
            _ => Some((host, Some(rest.strip_prefix(':')?))),
        };
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host, Some(port))),
        Some(_) => None,
        None if !s.is_empty() => Some((s, None)),
        None => None,
    }
}

/// A host as the URL standard reads it: names lowercased and IDNA-mapped,
/// IPv4 addresses in any spelling (`0x7f.1`, `2130706433`) written as
/// dotted quads, IPv6 in brackets, compressed; a trailing dot dropped.
pub fn normalize_host(host: &str) -> Result<String, String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    match url::Host::parse(host) {
        Ok(url::Host::Domain(d)) if !d.is_empty() => Ok(d),
        Ok(url::Host::Domain(_)) => Err("empty host".into()),
        Ok(url::Host::Ipv4(ip)) => Ok(ip.to_string()),
        Ok(url::Host::Ipv6(ip)) => Ok(format!("[{ip}]")),
        Err(e) => Err(format!("invalid host: {e}")),
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    packs: BTreeMap<String, RawPack>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPack {
    sha256: Option<String>,
    #[serde(flatten)]
    grants: RawGrants,
    #[serde(default)]
    nodes: BTreeMap<String, RawGrants>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrants {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    secrets: BTreeMap<String, SecretSource>,
    max_response_bytes: Option<u64>,
    max_outbound_calls: Option<u32>,
}

/// Where a secret's value comes from.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum SecretSource {
    /// An environment variable of the executor.
    Env(String),
    /// A file (its content, one trailing newline removed).
    File(PathBuf),
}

impl Grants {
    /// Reads and checks the grants file at `path`.
    pub fn load(path: &Path) -> Result<Self, GrantsError> {
        let read_error = |error| GrantsError::Read {
            path: path.to_owned(),
            error,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut text = String::new();
        file.take(MAX_GRANTS_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() as u64 > MAX_GRANTS_FILE_BYTES {
            return Err(GrantsError::TooLarge);
        }
        Self::parse(&text, &|name| std::env::var(name).ok())
    }

    /// Parses a grants file's text; `env` looks environment variables up.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, GrantsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| GrantsError::Syntax(e.to_string()))?;
        let mut packs = BTreeMap::new();
        for (pack, raw) in raw.packs {
            let err = |reason: String| GrantsError::Pack {
                pack: pack.clone(),
                reason,
            };
            let sha256 = raw
                .sha256
                .as_deref()
                .map(parse_sha256)
                .transpose()
                .map_err(err)?;
            let base = GrantSet::check(raw.grants, env).map_err(err)?;
            let mut nodes = BTreeMap::new();
            for (node, grants) in raw.nodes {
                let set = GrantSet::check(grants, env)
                    .map_err(|reason| err(format!("node {node}: {reason}")))?;
                nodes.insert(node, set);
            }
            packs.insert(
                pack,
                PackGrants {
                    sha256,
                    base,
                    nodes,
                },
            );
        }
        Ok(Self {
            packs,
            blocked: Arc::new([]),
        })
    }

    /// Adds the reference's `JARVIS_ATOMIC_HTTP_*` variables: each entry of
    /// `allowed_hosts` (`host`, `host:port`, `*.suffix` or `*`; a host
    /// without a port means any port, as in the reference) grants pack
    /// [`CORE_PACK`] that host over http and https; a named host is an
    /// explicit grant, so `127.0.0.1:8080` may reach loopback, while `*`
    /// and `*.suffix` reach public addresses only. Each entry of
    /// `blocked_hosts` (`host` or `host:port`) is refused to every pack.
    /// The raw values are also config values of [`CORE_PACK`]
    /// (`jarvis.http.allowed_hosts`, `.blocked_hosts`, `.timeout_seconds`,
    /// `.max_bytes`) unless the file sets those keys, so `jarvis.web.fetch`
    /// can answer as the reference does.
    pub fn with_http_env(mut self, env: &HttpEnv) -> Result<Self, GrantsError> {
        let err = |reason: String| GrantsError::Pack {
            pack: CORE_PACK.to_owned(),
            reason,
        };
        let mut blocked = Vec::new();
        for entry in csv_entries(env.blocked_hosts.as_deref()) {
            let bad =
                |why: &str| format!("JARVIS_ATOMIC_HTTP_BLOCKED_HOSTS entry {entry:?}: {why}");
            let (host, port) = split_host_port(&entry).ok_or_else(|| err(bad("malformed")))?;
            let port = port
                .map(|p| p.parse::<u16>().ok().filter(|p| *p != 0))
                .map(|p| p.ok_or_else(|| err(bad("the port must be 1-65535"))))
                .transpose()?;
            let host = normalize_host(host).map_err(|e| err(bad(&e)))?;
            blocked.push(BlockedHost { host, port });
        }
        self.blocked = blocked.into();

        let values = [
            ("jarvis.http.allowed_hosts", &env.allowed_hosts),
            ("jarvis.http.blocked_hosts", &env.blocked_hosts),
            ("jarvis.http.timeout_seconds", &env.timeout_seconds),
            ("jarvis.http.max_bytes", &env.max_bytes),
        ];
        if values.iter().all(|(_, v)| v.is_none()) {
            return Ok(self);
        }
        let pack = self
            .packs
            .entry(CORE_PACK.to_owned())
            .or_insert_with(|| PackGrants {
                sha256: None,
                base: GrantSet::default(),
                nodes: BTreeMap::new(),
            });
        for entry in csv_entries(env.allowed_hosts.as_deref()) {
            let (host, port) = split_host_port(&entry).ok_or_else(|| {
                err(format!(
                    "JARVIS_ATOMIC_HTTP_ALLOWED_HOSTS entry {entry:?}: malformed"
                ))
            })?;
            for scheme in ["http", "https"] {
                let pattern = format!("{scheme}://{host}:{}", port.unwrap_or("*"));
                let destination = Destination::parse(&pattern).map_err(|e| {
                    err(format!(
                        "JARVIS_ATOMIC_HTTP_ALLOWED_HOSTS entry {entry:?}: {e}"
                    ))
                })?;
                if !pack.base.allow.contains(&destination) {
                    pack.base.allow.push(destination);
                }
            }
        }
        for (key, value) in values {
            if let Some(value) = value {
                pack.base
                    .config
                    .entry(key.to_owned())
                    .or_insert_with(|| value.clone());
            }
        }
        Ok(self)
    }

    /// The SHA-256 the file of pack `pack_id` must have, if pinned.
    pub fn pin(&self, pack_id: &str) -> Option<[u8; 32]> {
        self.packs.get(pack_id).and_then(|p| p.sha256)
    }

    /// What node `node_type_id` of pack `pack_id` is granted (nothing if the
    /// file does not name the pack).
    pub fn for_node(&self, pack_id: &str, node_type_id: &str) -> NodeGrants {
        let Some(pack) = self.packs.get(pack_id) else {
            return NodeGrants {
                blocked: self.blocked.clone(),
                ..NodeGrants::default()
            };
        };
        let mut set = pack.base.clone();
        if let Some(node) = pack.nodes.get(node_type_id) {
            for d in &node.allow {
                if !set.allow.contains(d) {
                    set.allow.push(d.clone());
                }
            }
            set.config
                .extend(node.config.iter().map(|(k, v)| (k.clone(), v.clone())));
            set.secrets
                .extend(node.secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
            set.max_response_bytes = node.max_response_bytes.or(set.max_response_bytes);
            set.max_outbound_calls = node.max_outbound_calls.or(set.max_outbound_calls);
        }
        NodeGrants {
            allow: set.allow,
            config: set.config,
            secrets: set.secrets,
            max_response_bytes: set.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
            max_outbound_calls: set.max_outbound_calls.unwrap_or(DEFAULT_MAX_OUTBOUND_CALLS),
            blocked: self.blocked.clone(),
        }
    }
}

impl GrantSet {
    fn check(raw: RawGrants, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let allow = raw
            .allow
            .iter()
            .map(|p| Destination::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(n) = raw.max_response_bytes
            && !(1..=MAX_RESPONSE_BYTES_LIMIT).contains(&n)
        {
            return Err(format!(
                "max_response_bytes must be between 1 and {MAX_RESPONSE_BYTES_LIMIT}, got {n}"
            ));
        }
        if let Some(n) = raw.max_outbound_calls
            && n > MAX_OUTBOUND_CALLS_LIMIT
        {
            return Err(format!(
                "max_outbound_calls must be at most {MAX_OUTBOUND_CALLS_LIMIT}, got {n}"
            ));
        }
        let mut secrets = BTreeMap::new();
        for (name, source) in raw.secrets {
            // The errors name the secret and its source, never its value.
            let value = match source {
                SecretSource::Env(var) => env(&var).ok_or_else(|| {
                    format!("secret {name}: the environment variable {var} is not set")
                })?,
                SecretSource::File(path) => read_secret_file(&path)
                    .map_err(|e| format!("secret {name}: {}: {e}", path.display()))?,
            };
            secrets.insert(name, Secret(Arc::from(value)));
        }
        Ok(Self {
            allow,
            config: raw.config,
            secrets,
            max_response_bytes: raw.max_response_bytes,
            max_outbound_calls: raw.max_outbound_calls,
        })
    }
}

/// The entries of a comma-separated list, trimmed and lowercased, empty
/// ones skipped (the reference's `_env_csv`).
fn csv_entries(raw: Option<&str>) -> Vec<String> {
    raw.unwrap_or("")
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .collect()
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!("larger than {MAX_SECRET_FILE_BYTES} bytes"));
    }
    let mut text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

fn parse_sha256(hex: &str) -> Result<[u8; 32], String> {
    let bad = || format!("sha256 must be 64 hexadecimal digits, got {hex:?}");
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut out = [0; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// `bytes` as lowercase hexadecimal.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn grants(allow: &[&str]) -> NodeGrants {
        NodeGrants {
            allow: allow
                .iter()
                .map(|p| Destination::parse(p).unwrap())
                .collect(),
            ..NodeGrants::default()
        }
    }

    #[test]
    fn an_exact_host_is_explicit_and_wildcards_reach_public_addresses_only() {
        let g = grants(&["https://api.example.com", "https://*.example.org"]);
        assert_eq!(
            g.destination(Scheme::Https, "API.Example.com.", 443),
            Some(Reach::Explicit)
        );
        assert_eq!(
            g.destination(Scheme::Https, "a.b.example.org", 443),
            Some(Reach::Public)
        );
        // `*.example.org` is below the name, not the name itself.
        assert_eq!(g.destination(Scheme::Https, "example.org", 443), None);
        assert_eq!(g.destination(Scheme::Https, "badexample.org", 443), None);
        // Scheme and port are part of the grant.
        assert_eq!(g.destination(Scheme::Http, "api.example.com", 80), None);
        assert_eq!(g.destination(Scheme::Https, "api.example.com", 8443), None);
        assert_eq!(g.destination(Scheme::Https, "other.com", 443), None);
    }

    #[test]
    fn ports_default_to_the_scheme_and_may_be_any() {
        let g = grants(&["http://127.0.0.1:8080", "https://*:*"]);
        assert_eq!(
            g.destination(Scheme::Http, "127.0.0.1", 8080),
            Some(Reach::Explicit)
        );
        assert_eq!(g.destination(Scheme::Http, "127.0.0.1", 8081), None);
        assert_eq!(
            g.destination(Scheme::Https, "anything.net", 9000),
            Some(Reach::Public)
        );
        let g = grants(&["http://example.com"]);
        assert!(g.destination(Scheme::Http, "example.com", 80).is_some());
        assert!(g.destination(Scheme::Http, "example.com", 8080).is_none());
    }

    #[test]
    fn addresses_match_whatever_their_spelling() {
        let g = grants(&["http://127.0.0.1:8080", "http://[::1]:8080"]);
        for spelling in ["0x7f.0.0.1", "2130706433", "127.1", "0177.0.0.1"] {
            assert_eq!(
                g.destination(Scheme::Http, spelling, 8080),
                Some(Reach::Explicit),
                "{spelling}"
            );
        }
        assert_eq!(
            g.destination(Scheme::Http, "[0:0:0:0:0:0:0:1]", 8080),
            Some(Reach::Explicit)
        );
        // A name is not its address: `localhost` is not granted by 127.0.0.1.
        assert_eq!(g.destination(Scheme::Http, "localhost", 8080), None);
    }

    #[test]
    fn a_declared_destination_is_covered_by_a_grant_as_wide_or_wider() {
        let covered = |granted: &str, needed: &str| {
            Destination::parse(granted)
                .unwrap()
                .covers(&Destination::parse(needed).unwrap())
        };
        // The same pattern, however it is spelled.
        assert!(covered(
            "https://api.example.com",
            "https://API.example.com:443"
        ));
        // A suffix or any host, same scheme and port, or any port.
        assert!(covered("https://*.example.com", "https://api.example.com"));
        assert!(covered("https://*.example.com", "https://*.eu.example.com"));
        assert!(covered("https://*.example.com", "https://*.example.com"));
        assert!(covered("https://*", "https://api.example.com"));
        assert!(covered("https://*:*", "https://*:8443"));
        assert!(covered(
            "https://api.example.com:*",
            "https://api.example.com:8443"
        ));
        // Anything narrower does not cover.
        assert!(!covered("https://*.example.com", "https://example.com"));
        assert!(!covered("https://*.example.com", "https://*"));
        assert!(!covered("https://api.example.com", "https://*.example.com"));
        assert!(!covered(
            "https://api.example.com",
            "http://api.example.com"
        ));
        assert!(!covered(
            "https://api.example.com",
            "https://api.example.com:8443"
        ));
        assert!(!covered(
            "https://api.example.com",
            "https://api.example.com:*"
        ));
        assert!(!covered("https://*", "https://*:*"));
        // An address is covered only by a grant naming it.
        assert!(covered("http://127.0.0.1:8080", "http://0x7f.1:8080"));
        assert!(!covered("http://*:*", "http://127.0.0.1:8080"));
        assert!(!covered("http://*:*", "http://[::1]:8080"));
    }

    #[test]
    fn malformed_destinations_are_refused() {
        for bad in [
            "api.example.com",
            "ftp://example.com",
            "https://example.com/path",
            "https://user@example.com",
            "https://ex*ample.com",
            "https://a.*.example.com",
            "https://*.10.0.0.1",
            "https://example.com:0",
            "https://example.com:99999",
            "https://:443",
            "https://",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
        assert!(Destination::parse("https://example.com/").is_ok());
    }

    #[test]
    fn a_node_table_adds_to_its_packs_grants() {
        let text = r#"
            [packs."acme.tools"]
            allow = ["https://api.acme.com"]
            config = { region = "eu", tier = "free" }
            max_outbound_calls = 4

            [packs."acme.tools".nodes."acme.tools.fetch"]
            allow = ["https://*.acme.net"]
            config = { tier = "paid" }
            max_response_bytes = 1000
        "#;
        let grants = Grants::parse(text, &no_env).unwrap();
        let node = grants.for_node("acme.tools", "acme.tools.fetch");
        assert_eq!(node.allow.len(), 2);
        assert_eq!(node.config["region"], "eu");
        assert_eq!(node.config["tier"], "paid");
        assert_eq!(node.max_response_bytes, 1000);
        assert_eq!(node.max_outbound_calls, 4);
        let other = grants.for_node("acme.tools", "acme.tools.other");
        assert_eq!(other.allow.len(), 1);
        assert_eq!(other.config["tier"], "free");
        assert_eq!(other.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);
        // Deny by default.
        let stranger = grants.for_node("someone.else", "someone.else.node");
        assert!(stranger.allow.is_empty() && stranger.config.is_empty());
        assert!(stranger.secrets.is_empty());
    }

    #[test]
    fn secrets_come_from_the_environment_or_a_file_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "from-file-value\n").unwrap();
        let text = format!(
            r#"
            [packs.p]
            secrets = {{ token = {{ env = "TOKEN_VAR" }}, key = {{ file = {path:?} }} }}
            "#
        );
        let env = |name: &str| (name == "TOKEN_VAR").then(|| "from-env-value".to_owned());
        let grants = Grants::parse(&text, &env).unwrap();
        let node = grants.for_node("p", "p.node");
        assert_eq!(node.secrets["token"].expose(), "from-env-value");
        assert_eq!(node.secrets["key"].expose(), "from-file-value");
        let printed = format!("{grants:?} {node:?}");
        assert!(!printed.contains("from-env-value"), "{printed}");
        assert!(!printed.contains("from-file-value"), "{printed}");

        let missing = Grants::parse(&text, &no_env).unwrap_err().to_string();
        assert!(missing.contains("TOKEN_VAR is not set"), "{missing}");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let cases = [
            ("[packs.p]\nallow = [\"example.com\"]", "scheme://host"),
            ("[packs.p]\nunknown = 1", "unknown field"),
            ("[packs.p]\nsha256 = \"abc\"", "64 hexadecimal digits"),
            ("[packs.p]\nmax_response_bytes = 0", "max_response_bytes"),
            (
                "[packs.p]\nmax_outbound_calls = 100000",
                "max_outbound_calls",
            ),
            (
                "[packs.p]\nsecrets = { s = { path = \"/x\" } }",
                "unknown variant",
            ),
            ("[packs.p.nodes.n]\nallow = [\"https://a*\"]", "node n"),
        ];
        for (text, expected) in cases {
            let error = Grants::parse(text, &no_env).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn a_pin_is_read_as_hex() {
        let hash = [0xab; 32];
        let text = format!("[packs.p]\nsha256 = \"{}\"", to_hex(&hash).to_uppercase());
        let grants = Grants::parse(&text, &no_env).unwrap();
        assert_eq!(grants.pin("p"), Some(hash));
        assert_eq!(grants.pin("q"), None);
    }

    #[test]
    fn the_reference_http_variables_grant_jarvis_core_and_block_every_pack() {
        let env = HttpEnv {
            allowed_hosts: Some(" API.example.com , 127.0.0.1:8080,*.docs.example.org".into()),
            blocked_hosts: Some("evil.example.com,api.example.com:8443".into()),
            timeout_seconds: Some("2.5".into()),
            max_bytes: None,
        };
        let grants = Grants::parse("[packs.other]\nallow = [\"https://*\"]", &no_env)
            .unwrap()
            .with_http_env(&env)
            .unwrap();
        let core = grants.for_node(CORE_PACK, "jarvis.web.fetch");
        let reach = |s, h, p| core.destination(s, h, p);
        assert_eq!(
            reach(Scheme::Https, "api.example.com", 443),
            Some(Reach::Explicit)
        );
        assert_eq!(
            reach(Scheme::Http, "api.example.com", 9000),
            Some(Reach::Explicit)
        );
        assert_eq!(
            reach(Scheme::Http, "127.0.0.1", 8080),
            Some(Reach::Explicit)
        );
        assert_eq!(reach(Scheme::Http, "127.0.0.1", 8081), None);
        assert_eq!(
            reach(Scheme::Https, "a.docs.example.org", 443),
            Some(Reach::Public)
        );
        assert_eq!(reach(Scheme::Https, "example.net", 443), None);
        assert_eq!(
            core.config["jarvis.http.allowed_hosts"],
            env.allowed_hosts.clone().unwrap()
        );
        assert_eq!(core.config["jarvis.http.timeout_seconds"], "2.5");
        assert!(!core.config.contains_key("jarvis.http.max_bytes"));

        let other = grants.for_node("other", "other.node");
        assert!(other.is_blocked("EVIL.example.com.", 443));
        assert!(other.is_blocked("api.example.com", 8443));
        assert!(!other.is_blocked("api.example.com", 443));
        assert!(core.is_blocked("evil.example.com", 80));
        assert!(other.config.is_empty());
        assert!(
            grants
                .for_node("unnamed", "n")
                .is_blocked("evil.example.com", 1)
        );

        let star = HttpEnv {
            allowed_hosts: Some("*".into()),
            ..HttpEnv::default()
        };
        let core = Grants::default()
            .with_http_env(&star)
            .unwrap()
            .for_node(CORE_PACK, "x");
        assert_eq!(
            core.destination(Scheme::Http, "example.com", 81),
            Some(Reach::Public)
        );

        let bad = HttpEnv {
            allowed_hosts: Some("a b".into()),
            ..HttpEnv::default()
        };
        let error = Grants::default()
            .with_http_env(&bad)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("JARVIS_ATOMIC_HTTP_ALLOWED_HOSTS"),
            "{error}"
        );
    }
}

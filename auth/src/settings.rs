//! `ARP_AUTH_*` environment → validated [`AuthSettings`], with the profiles of arp-standard-server.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use reqwest::Url;

/// Issuer the `dev-secure-keycloak` profile (and a service started with no `ARP_AUTH_*`
/// variable at all) trusts, as in the Python JARVIS services.
pub const DEFAULT_DEV_KEYCLOAK_ISSUER: &str = "http://localhost:8080/realms/arp-dev";

/// How strictly inbound requests are authenticated (`ARP_AUTH_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every non-exempt request needs a valid bearer token.
    Required,
    /// No header → anonymous principal; a header that is present must be valid.
    Optional,
    /// No checks; every request runs as the dev subject.
    Disabled,
}

impl AuthMode {
    fn parse(raw: &str) -> Result<Self, SettingsError> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "required" => Ok(Self::Required),
            "optional" => Ok(Self::Optional),
            "disabled" => Ok(Self::Disabled),
            _ => Err(SettingsError::InvalidMode(raw.to_owned())),
        }
    }

    /// The spelling used in `ARP_AUTH_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Required => "required",
            Self::Optional => "optional",
            Self::Disabled => "disabled",
        }
    }
}

/// A named bundle of defaults (`ARP_AUTH_PROFILE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthProfile {
    /// Auth off (`dev-insecure`, alias `dev`).
    DevInsecure,
    /// Local Keycloak realm `arp-dev` (`dev-secure-keycloak`, aliases `dev-secure`, `keycloak`).
    DevSecureKeycloak,
    /// Required auth against the configured IdP (`enterprise`, aliases `prod`, `production`).
    Enterprise,
}

impl AuthProfile {
    fn parse(raw: &str) -> Result<Self, SettingsError> {
        // Same normalisation as the reference: case-insensitive, `_` and `-` interchangeable.
        match raw.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "dev-insecure" | "dev" => Ok(Self::DevInsecure),
            "dev-secure-keycloak" | "dev-secure" | "keycloak" => Ok(Self::DevSecureKeycloak),
            "enterprise" | "prod" | "production" => Ok(Self::Enterprise),
            _ => Err(SettingsError::InvalidProfile(raw.to_owned())),
        }
    }

    fn default_mode(self) -> AuthMode {
        match self {
            Self::DevInsecure => AuthMode::Disabled,
            Self::DevSecureKeycloak | Self::Enterprise => AuthMode::Required,
        }
    }
}

/// A configuration that cannot work; the message names the variable to set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    #[error(
        "Invalid ARP_AUTH_PROFILE: {0:?} (set dev-insecure, dev-secure-keycloak or enterprise)"
    )]
    InvalidProfile(String),
    #[error("Invalid ARP_AUTH_MODE: {0:?} (set required, optional or disabled)")]
    InvalidMode(String),
    #[error("Invalid {var}: {value:?} ({expected})")]
    InvalidValue {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "ARP_AUTH_ALGORITHMS: {0:?} is not allowed (use asymmetric algorithms such as RS256, \
         PS256, ES256 or EdDSA; `none` and HMAC (HS*) are refused because keys come from a public JWKS)"
    )]
    ForbiddenAlgorithm(String),
    #[error("ARP_AUTH_ALGORITHMS must include at least one algorithm (for example: RS256)")]
    NoAlgorithms,
    #[error(
        "JWT auth requires ARP_AUTH_JWKS_URI or ARP_AUTH_ISSUER/ARP_AUTH_OIDC_DISCOVERY_URL when \
         ARP_AUTH_MODE is not 'disabled' (for a local run without tokens set ARP_AUTH_PROFILE=dev-insecure)"
    )]
    MissingKeySource,
    #[error("Dev-Secure-Keycloak profile requires ARP_AUTH_AUDIENCE or ARP_AUTH_SERVICE_ID")]
    AudienceRequired,
    #[error(
        "ARP_AUTH_CLIENT_ID and ARP_AUTH_CLIENT_SECRET are required for outbound auth \
         (or set ARP_AUTH_PROFILE=dev-insecure to call other services without tokens)"
    )]
    MissingClientCredentials,
    #[error(
        "Outbound auth requires ARP_AUTH_TOKEN_ENDPOINT, ARP_AUTH_ISSUER or ARP_AUTH_OIDC_DISCOVERY_URL"
    )]
    MissingTokenEndpoint,
    #[error("{var} must be an http(s) URL, got {value:?}")]
    InvalidUrl { var: &'static str, value: String },
    #[error("building the HTTP client for the identity provider failed: {0}")]
    HttpClient(String),
}

/// Validated inbound authentication settings.
///
/// Built by [`AuthSettings::from_env`] or [`AuthSettings::from_vars`]; fields are public so a
/// service (or a test) can adjust them before handing them to
/// [`Authenticator::new`](crate::Authenticator::new), which validates again.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AuthSettings {
    /// `ARP_AUTH_PROFILE`, when set.
    pub profile: Option<AuthProfile>,
    pub mode: AuthMode,
    /// Expected `iss`; also the base of OIDC discovery.
    pub issuer: Option<String>,
    /// Expected `aud` (`ARP_AUTH_AUDIENCE`, else `ARP_AUTH_SERVICE_ID`).
    pub audience: Option<String>,
    pub jwks_uri: Option<String>,
    pub oidc_discovery_url: Option<String>,
    /// Accepted `alg` values; never `none`, never HMAC.
    pub algorithms: Vec<Algorithm>,
    /// Leeway for `exp` and `nbf`.
    pub clock_skew: Duration,
    /// Paths answered without authentication (exact match).
    pub exempt_paths: Vec<String>,
    /// Subject of every request when the mode is `disabled`.
    pub dev_subject: String,
    /// Subject of a request without a token when the mode is `optional`.
    pub anonymous_subject: String,
    /// Bound on each discovery/JWKS HTTP request, so a dead IdP costs a request this long at most.
    pub jwks_timeout: Duration,
    /// Age after which the key set is refreshed in the background.
    pub jwks_cache_ttl: Duration,
    /// Minimum time between two fetches caused by unknown `kid`s or failures; within it such
    /// requests are answered from what is known, without touching the network.
    pub jwks_refresh_cooldown: Duration,
    /// How many verified tokens to remember (0: verify every request in full).
    pub verified_token_cache: usize,
}

/// Variables read from the process environment, as `(name, value)` pairs.
pub(crate) fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
}

/// Environment lookups with the reference's rule that an empty value counts as unset.
pub(crate) struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    pub(crate) fn new<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, _)| k.starts_with("ARP_AUTH_") || k.starts_with("JARVIS_"))
            .collect();
        Self { vars }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn has_any_auth_var(&self) -> bool {
        self.vars.keys().any(|k| k.starts_with("ARP_AUTH_"))
    }

    pub(crate) fn seconds(
        &self,
        var: &'static str,
        default: f64,
    ) -> Result<Duration, SettingsError> {
        let Some(raw) = self.get(var) else {
            return Ok(Duration::from_secs_f64(default));
        };
        raw.parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| SettingsError::InvalidValue {
                var,
                value: raw.to_owned(),
                expected: "a non-negative number of seconds",
            })
    }

    /// Profile and mode, resolved the way arp-standard-server resolves them.
    pub(crate) fn profile_and_mode(
        &self,
    ) -> Result<(Option<AuthProfile>, AuthMode), SettingsError> {
        let profile = self
            .get("ARP_AUTH_PROFILE")
            .map(AuthProfile::parse)
            .transpose()?;
        let mode = match self.get("ARP_AUTH_MODE") {
            Some(raw) => AuthMode::parse(raw)?,
            None => profile.map_or(AuthMode::Required, AuthProfile::default_mode),
        };
        Ok((profile, mode))
    }

    /// `ARP_AUTH_ISSUER`, else the issuer the profile implies.
    pub(crate) fn issuer(&self, profile: Option<AuthProfile>) -> Option<String> {
        self.get("ARP_AUTH_ISSUER").map(str::to_owned).or_else(|| {
            (profile == Some(AuthProfile::DevSecureKeycloak))
                .then(|| DEFAULT_DEV_KEYCLOAK_ISSUER.to_owned())
        })
    }
}

impl AuthSettings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_vars(process_env())
    }

    /// Reads an explicit set of variables (all of them: whether *any* `ARP_AUTH_*` is present
    /// changes the defaults).
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, SettingsError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self::from_parsed_env(&Env::new(vars))
    }

    fn from_parsed_env(env: &Env) -> Result<Self, SettingsError> {
        // The JARVIS services start in required mode against the local Keycloak realm when no
        // ARP_AUTH_* variable is set at all (`auth_settings_from_env_or_dev_secure`).
        let untouched = !env.has_any_auth_var();
        let (profile, mode) = env.profile_and_mode()?;

        let clock_skew = match env.get("ARP_AUTH_CLOCK_SKEW_SECONDS") {
            None => Duration::from_secs(60),
            Some(raw) => Duration::from_secs(raw.parse::<u64>().map_err(|_| {
                SettingsError::InvalidValue {
                    var: "ARP_AUTH_CLOCK_SKEW_SECONDS",
                    value: raw.to_owned(),
                    expected: "a whole number of seconds, for example 60",
                }
            })?),
        };

        let algorithms = parse_algorithms(env.get("ARP_AUTH_ALGORITHMS").unwrap_or("RS256"))?;

        let mut exempt_paths = split_list(env.get("ARP_AUTH_EXEMPT_PATHS").unwrap_or(""));
        if exempt_paths.is_empty() {
            exempt_paths = vec!["/v1/health".to_owned(), "/v1/version".to_owned()];
        }

        let issuer = if untouched {
            Some(DEFAULT_DEV_KEYCLOAK_ISSUER.to_owned())
        } else {
            env.issuer(profile)
        };
        let audience = env
            .get("ARP_AUTH_AUDIENCE")
            .or_else(|| env.get("ARP_AUTH_SERVICE_ID"))
            .map(str::to_owned);

        let settings = Self {
            profile,
            mode,
            issuer,
            audience,
            jwks_uri: env.get("ARP_AUTH_JWKS_URI").map(str::to_owned),
            oidc_discovery_url: env.get("ARP_AUTH_OIDC_DISCOVERY_URL").map(str::to_owned),
            algorithms,
            clock_skew,
            exempt_paths,
            dev_subject: env.get("ARP_AUTH_DEV_SUBJECT").unwrap_or("dev").to_owned(),
            anonymous_subject: env
                .get("ARP_AUTH_ANONYMOUS_SUBJECT")
                .unwrap_or("anonymous")
                .to_owned(),
            jwks_timeout: env.seconds("ARP_AUTH_JWKS_TIMEOUT_SECONDS", 5.0)?,
            jwks_cache_ttl: env.seconds("ARP_AUTH_JWKS_CACHE_SECONDS", 300.0)?,
            jwks_refresh_cooldown: env.seconds("ARP_AUTH_JWKS_REFRESH_COOLDOWN_SECONDS", 10.0)?,
            verified_token_cache: match env.get("ARP_AUTH_TOKEN_CACHE_SIZE") {
                None => 4096,
                Some(raw) => raw.parse().map_err(|_| SettingsError::InvalidValue {
                    var: "ARP_AUTH_TOKEN_CACHE_SIZE",
                    value: raw.to_owned(),
                    expected: "a whole number of tokens, 0 to turn the cache off",
                })?,
            },
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks that these settings can work; called again by `Authenticator::new`.
    pub fn validate(&self) -> Result<(), SettingsError> {
        for alg in &self.algorithms {
            if alg.family() == AlgorithmFamily::Hmac {
                return Err(SettingsError::ForbiddenAlgorithm(format!("{alg:?}")));
            }
        }
        if self.mode == AuthMode::Disabled {
            return Ok(());
        }
        if self.algorithms.is_empty() {
            return Err(SettingsError::NoAlgorithms);
        }
        if self.profile == Some(AuthProfile::DevSecureKeycloak) && self.audience.is_none() {
            return Err(SettingsError::AudienceRequired);
        }
        self.key_source().map(|_| ())
    }

    /// Where the verification keys come from.
    pub(crate) fn key_source(&self) -> Result<KeySource, SettingsError> {
        if let Some(uri) = &self.jwks_uri {
            return Ok(KeySource::Jwks(http_url("ARP_AUTH_JWKS_URI", uri)?));
        }
        discovery_url(self.oidc_discovery_url.as_deref(), self.issuer.as_deref())?
            .map(KeySource::Discovery)
            .ok_or(SettingsError::MissingKeySource)
    }
}

/// The JWKS location, known directly or found through OIDC discovery.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    Jwks(Url),
    Discovery(Url),
}

/// `ARP_AUTH_OIDC_DISCOVERY_URL`, else the issuer's `.well-known/openid-configuration`.
pub(crate) fn discovery_url(
    explicit: Option<&str>,
    issuer: Option<&str>,
) -> Result<Option<Url>, SettingsError> {
    if let Some(url) = explicit {
        return http_url("ARP_AUTH_OIDC_DISCOVERY_URL", url).map(Some);
    }
    issuer
        .map(|issuer| {
            let url = format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            );
            http_url("ARP_AUTH_ISSUER", &url)
        })
        .transpose()
}

pub(crate) fn http_url(var: &'static str, raw: &str) -> Result<Url, SettingsError> {
    Url::parse(raw)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| SettingsError::InvalidUrl {
            var,
            value: raw.to_owned(),
        })
}

fn split_list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_algorithms(raw: &str) -> Result<Vec<Algorithm>, SettingsError> {
    let names = split_list(raw);
    if names.is_empty() {
        return Err(SettingsError::NoAlgorithms);
    }
    names
        .iter()
        .map(|name| {
            if name.eq_ignore_ascii_case("none") {
                return Err(SettingsError::ForbiddenAlgorithm(name.clone()));
            }
            let alg: Algorithm = name.parse().map_err(|_| SettingsError::InvalidValue {
                var: "ARP_AUTH_ALGORITHMS",
                value: name.clone(),
                expected: "comma-separated JWS algorithms such as RS256,PS256,ES256",
            })?;
            if alg.family() == AlgorithmFamily::Hmac {
                return Err(SettingsError::ForbiddenAlgorithm(name.clone()));
            }
            Ok(alg)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<AuthSettings, SettingsError> {
        AuthSettings::from_vars(vars.iter().map(|&(k, v)| (k, v)))
    }

    #[test]
    fn no_auth_variable_means_required_against_local_keycloak() {
        let s = settings(&[("PATH", "/bin")]).unwrap();
        assert_eq!(s.mode, AuthMode::Required);
        assert_eq!(s.issuer.as_deref(), Some(DEFAULT_DEV_KEYCLOAK_ISSUER));
        assert_eq!(s.algorithms, vec![Algorithm::RS256]);
        assert_eq!(s.clock_skew, Duration::from_secs(60));
        assert_eq!(s.exempt_paths, ["/v1/health", "/v1/version"]);
    }

    #[test]
    fn profiles_and_aliases() {
        for alias in ["dev-insecure", "dev", "DEV_INSECURE"] {
            let s = settings(&[("ARP_AUTH_PROFILE", alias)]).unwrap();
            assert_eq!(
                (s.profile, s.mode),
                (Some(AuthProfile::DevInsecure), AuthMode::Disabled)
            );
        }
        for alias in ["dev-secure-keycloak", "dev-secure", "keycloak"] {
            let s =
                settings(&[("ARP_AUTH_PROFILE", alias), ("ARP_AUTH_SERVICE_ID", "svc")]).unwrap();
            assert_eq!(s.mode, AuthMode::Required);
            assert_eq!(s.issuer.as_deref(), Some(DEFAULT_DEV_KEYCLOAK_ISSUER));
            assert_eq!(s.audience.as_deref(), Some("svc"));
        }
        let s = settings(&[
            ("ARP_AUTH_PROFILE", "prod"),
            ("ARP_AUTH_JWKS_URI", "https://idp/k"),
        ])
        .unwrap();
        assert_eq!(
            (s.profile, s.mode),
            (Some(AuthProfile::Enterprise), AuthMode::Required)
        );
        let err = settings(&[("ARP_AUTH_PROFILE", "staging")]).unwrap_err();
        assert!(err.to_string().contains("ARP_AUTH_PROFILE"), "{err}");
    }

    #[test]
    fn misconfigurations_name_what_to_set() {
        let err = settings(&[("ARP_AUTH_PROFILE", "keycloak")]).unwrap_err();
        assert_eq!(err, SettingsError::AudienceRequired);
        let err = settings(&[("ARP_AUTH_PROFILE", "enterprise")]).unwrap_err();
        assert!(err.to_string().contains("ARP_AUTH_JWKS_URI"), "{err}");
        assert!(err.to_string().contains("dev-insecure"), "{err}");
        let err = settings(&[("ARP_AUTH_MODE", "sometimes")]).unwrap_err();
        assert!(err.to_string().contains("ARP_AUTH_MODE"), "{err}");
        let err = settings(&[("ARP_AUTH_CLOCK_SKEW_SECONDS", "-5")]).unwrap_err();
        assert!(
            err.to_string().contains("ARP_AUTH_CLOCK_SKEW_SECONDS"),
            "{err}"
        );
        let err = settings(&[("ARP_AUTH_JWKS_URI", "file:///etc/keys")]).unwrap_err();
        assert!(err.to_string().contains("ARP_AUTH_JWKS_URI"), "{err}");
    }

    #[test]
    fn none_and_hmac_algorithms_are_refused() {
        for algs in ["none", "RS256,none", "HS256", "RS256,HS512"] {
            let err = settings(&[("ARP_AUTH_MODE", "disabled"), ("ARP_AUTH_ALGORITHMS", algs)])
                .unwrap_err();
            assert!(
                matches!(err, SettingsError::ForbiddenAlgorithm(_)),
                "{algs}: {err}"
            );
        }
        let s = settings(&[
            ("ARP_AUTH_JWKS_URI", "http://127.0.0.1:1/jwks"),
            ("ARP_AUTH_ALGORITHMS", " RS256 , ES256,PS512 "),
        ])
        .unwrap();
        assert_eq!(
            s.algorithms,
            vec![Algorithm::RS256, Algorithm::ES256, Algorithm::PS512]
        );
    }

    #[test]
    fn explicit_mode_overrides_profile_and_empty_values_count_as_unset() {
        let s = settings(&[
            ("ARP_AUTH_PROFILE", "dev-insecure"),
            ("ARP_AUTH_MODE", "optional"),
            ("ARP_AUTH_ISSUER", "http://127.0.0.1:9/realms/x"),
            ("ARP_AUTH_AUDIENCE", ""),
            ("ARP_AUTH_SERVICE_ID", "svc"),
            ("ARP_AUTH_EXEMPT_PATHS", " /a , ,/b "),
        ])
        .unwrap();
        assert_eq!(s.mode, AuthMode::Optional);
        assert_eq!(s.audience.as_deref(), Some("svc"));
        assert_eq!(s.exempt_paths, ["/a", "/b"]);
    }
}

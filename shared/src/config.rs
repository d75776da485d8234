//! Configuration comes only from environment variables, parsed once at start-up into types.
//!
//! Every variable has a default that works against the local services, except provider secrets.
//! A bad value is reported as one line naming the variable, and the program exits non-zero.

use std::collections::HashMap;
use std::fmt::Display;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// One bad configuration variable: `NAME: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub fn new(name: &'static str, reason: impl Into<String>) -> Self {
        Self {
            name,
            reason: reason.into(),
        }
    }
}

/// A snapshot of the environment. Tests build one from pairs instead of mutating the process's.
#[derive(Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl std::fmt::Debug for Env {
    // Values may be secrets: only the names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("Env").field("names", &names).finish()
    }
}

impl Env {
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars().collect(),
        }
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The raw value; an empty value counts as unset.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Every set variable whose name starts with `prefix`, as (the rest of the name, value),
    /// sorted by name: for families such as `SMS_TEMPLATE_<LANG>`.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let mut found: Vec<(String, String)> = self
            .vars
            .iter()
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix(prefix)?;
                let value = value.trim();
                (!rest.is_empty() && !value.is_empty()).then(|| (rest.to_owned(), value.to_owned()))
            })
            .collect();
        found.sort();
        found
    }

    pub fn string(&self, name: &'static str, default: &str) -> String {
        self.raw(name).unwrap_or(default).to_owned()
    }

    pub fn optional_string(&self, name: &'static str) -> Option<String> {
        self.raw(name).map(str::to_owned)
    }

    pub fn secret(&self, name: &'static str) -> Option<SecretString> {
        self.raw(name).map(|v| SecretString::from(v.to_owned()))
    }

    /// Parses `name` with `FromStr`, or returns `default` when unset.
    pub fn parse<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.raw(name) {
            None => Ok(default),
            Some(value) => value
                .parse()
                .map_err(|e| ConfigError::new(name, format!("cannot parse {value:?}: {e}"))),
        }
    }

    /// Like [`Env::parse`] for integers that must lie in `range`.
    pub fn integer_in<T>(
        &self,
        name: &'static str,
        default: T,
        range: RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Display + Copy,
        T::Err: Display,
    {
        let value = self.parse(name, default)?;
        if !range.contains(&value) {
            return Err(ConfigError::new(
                name,
                format!(
                    "{value} is out of range; expected {} to {}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(value)
    }

    /// A duration written in whole seconds (`*_SECS`), within `range` seconds.
    pub fn seconds(
        &self,
        name: &'static str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.integer_in(name, default, range)
            .map(Duration::from_secs)
    }

    /// A duration written in whole milliseconds (`*_MS`), within `range` milliseconds.
    pub fn millis(
        &self,
        name: &'static str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.integer_in(name, default, range)
            .map(Duration::from_millis)
    }

    pub fn boolean(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(other) => Err(ConfigError::new(
                name,
                format!("{other:?} is not a boolean; use true or false"),
            )),
        }
    }
}

/// How the two AMQP queues are declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated Raft queue: survives the loss of a node in a cluster.
    Quorum,
    Classic,
}

impl FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "quorum" => Ok(Self::Quorum),
            "classic" => Ok(Self::Classic),
            _ => Err("expected quorum or classic".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            _ => Err("expected pretty or json".into()),
        }
    }
}

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_NAMESPACE: &str = "otp";

/// What both programs read: where the shared services are and how they are named.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// May carry a password, hence secret.
    pub redis_url: SecretString,
    /// What `REDIS_URL` names: one server or a Redis Cluster's seed nodes.
    pub redis: crate::redis_connection::RedisTarget,
    /// The broker's nodes (`AMQP_URL`: one URI, or a comma-separated list for a cluster). They
    /// carry the broker password, hence secret.
    pub amqp: crate::amqp::nodes::BrokerNodes,
    /// Prefix of every exchange, queue and Redis key.
    pub namespace: String,
    pub queue_type: QueueType,
    pub log_format: LogFormat,
}

impl CommonConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let redis_url = env.string("REDIS_URL", DEFAULT_REDIS_URL);
        if ![
            "redis://",
            "rediss://",
            "redis+cluster://",
            "rediss+cluster://",
        ]
        .iter()
        .any(|scheme| redis_url.starts_with(scheme))
        {
            return Err(ConfigError::new(
                "REDIS_URL",
                "must start with redis:// or rediss:// (one server), or redis+cluster:// or rediss+cluster:// (a Redis Cluster's nodes, host:port separated by commas)",
            ));
        }
        let redis_url = SecretString::from(redis_url);
        let redis = crate::redis_connection::RedisTarget::parse(&redis_url)
            .map_err(|e| ConfigError::new("REDIS_URL", e))?;
        let amqp_url = env.string("AMQP_URL", DEFAULT_AMQP_URL);
        let amqp = crate::amqp::nodes::BrokerNodes::parse(&amqp_url.into())
            .map_err(|e| ConfigError::new("AMQP_URL", e))?;
        let namespace = env.string("NAMESPACE", DEFAULT_NAMESPACE);
        validate_namespace(&namespace)?;
        Ok(Self {
            redis_url,
            redis,
            amqp,
            namespace,
            queue_type: env.parse("AMQP_QUEUE_TYPE", QueueType::Quorum)?,
            log_format: env.parse("LOG_FORMAT", LogFormat::Pretty)?,
        })
    }

    pub fn topology(&self) -> crate::Topology {
        crate::Topology::new(&self.namespace, self.queue_type)
            .with_quorum_group_size(self.amqp.len())
    }
}

fn validate_namespace(namespace: &str) -> Result<(), ConfigError> {
    let ok = namespace.len() <= 64
        && namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            "NAMESPACE",
            "use at most 64 letters, digits, '-', '_' or '.'",
        ))
    }
}

/// A URL with its password replaced, fit for a log line.
pub fn redact_url(url: &SecretString) -> String {
    let url = url.expose_secret();
    // A list of nodes (AMQP_URL), each with its own password: every piece has a scheme. A comma
    // inside a password leaves a piece without one, and the URL is redacted whole.
    let pieces: Vec<&str> = url.split(',').collect();
    if pieces.len() > 1 && pieces.iter().all(|piece| piece.contains("://")) {
        return url
            .split(',')
            .map(|one| redact_url(&SecretString::from(one.trim().to_owned())))
            .collect::<Vec<_>>()
            .join(",");
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        // Malformed (`amqp:user:password@host`): whatever comes before the `@` may be a password.
        (_, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_with_an_empty_environment() {
        let config = CommonConfig::from_env(&Env::default()).expect("defaults are valid");
        assert_eq!(config.namespace, "otp");
        assert_eq!(config.queue_type, QueueType::Quorum);
        assert_eq!(config.log_format, LogFormat::Pretty);
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let env = Env::from_pairs([("AMQP_QUEUE_TYPE", "stream")]);
        let err = CommonConfig::from_env(&env).unwrap_err();
        assert_eq!(err.name, "AMQP_QUEUE_TYPE");
        assert!(err.to_string().contains("AMQP_QUEUE_TYPE"));

        let env = Env::from_pairs([("NAMESPACE", "a b")]);
        assert_eq!(CommonConfig::from_env(&env).unwrap_err().name, "NAMESPACE");

        let env = Env::from_pairs([("X", "11")]);
        assert_eq!(env.integer_in("X", 6u32, 4..=10).unwrap_err().name, "X");
        assert_eq!(env.integer_in("Y", 6u32, 4..=10), Ok(6));
        assert_eq!(env.seconds("X", 1, 0..=20), Ok(Duration::from_secs(11)));
        assert_eq!(
            env.millis("Y", 250, 1..=1_000),
            Ok(Duration::from_millis(250))
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let env = Env::from_pairs([("AMQP_URL", "amqp://user:hunter2@rabbit:5672/%2f")]);
        let config = CommonConfig::from_env(&env).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(!format!("{env:?}").contains("hunter2"));
        assert_eq!(config.amqp.redacted(), "amqp://user:***@rabbit:5672/%2f");
        // A comma inside a password is not a list separator.
        for url in [
            "redis://u:hun,ter2@r1:6379",
            "redis+cluster://u:hun,ter2@r1:7001,r2:7002",
            // Malformed, without "//": still no password.
            "amqp:guest:hun,ter2@rmq",
        ] {
            let redacted = redact_url(&SecretString::from(url.to_owned()));
            assert!(!redacted.contains("ter2"), "{redacted}");
        }
    }
}

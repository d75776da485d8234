//! The worker's configuration, read once from the environment and validated (the variables are
//! listed in README.md#configuration).

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
use shared::{CommonConfig, ConfigError, Env};

pub const DEFAULT_WORKER_ADDR: &str = "127.0.0.1:9091";
pub const DEFAULT_TWILIO_BASE_URL: &str = "https://api.twilio.com";
pub const DEFAULT_SMS_TEMPLATE: &str =
    "Your {app} code is {code}. It expires in {minutes} minutes.";
pub const DEFAULT_APP_NAME: &str = "Cheershare";

/// Everything `sms-worker` needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    /// `WORKER_ADDR`: `/healthz`, `/readyz`, `/metrics`. Port 0 picks a free port.
    pub addr: SocketAddr,
    pub provider: ProviderConfig,
    pub message: MessageConfig,
    /// `WORKER_CONCURRENCY`: AMQP prefetch, so also the number of sends in flight.
    pub concurrency: u16,
    /// `SEND_TIMEOUT_SECS`: one provider call.
    pub send_timeout: Duration,
    /// `RETRY_MAX_ELAPSED_SECS`: retrying stops after this, or when the OTP expires if sooner.
    pub retry_max_elapsed: Duration,
    /// `SMS_RETRY_MIN_DELAY_MS` (advanced): first backoff delay; it doubles up to `retry_max_delay`.
    pub retry_min_delay: Duration,
    /// `SMS_RETRY_MAX_DELAY_MS` (advanced): cap of one backoff delay (before jitter).
    pub retry_max_delay: Duration,
    /// `SMS_CLAIM_LEASE_MS` (advanced): how long a send claim in Redis outlives its worker. A
    /// redelivered copy of a message whose worker died waits at most this long before taking over.
    pub claim_lease: Duration,
    /// `SHUTDOWN_GRACE_SECS` (advanced): on SIGTERM, how long in-flight sends may take to finish
    /// before the rest is handed back to the queue.
    pub shutdown_grace: Duration,
}

/// What the SMS body looks like.
#[derive(Debug, Clone)]
pub struct MessageConfig {
    /// `SMS_TEMPLATE`, with `{app}`, `{code}` and `{minutes}`.
    pub template: String,
    /// `APP_NAME`.
    pub app_name: String,
    /// `WEBOTP_DOMAIN`: appends `@DOMAIN #CODE` so browsers and Android can fill the code in.
    pub webotp_domain: Option<String>,
}

#[derive(Debug, Clone)]
pub enum ProviderConfig {
    /// Writes a masked copy of the SMS to the log instead of sending it (development).
    Log,
    Twilio(TwilioConfig),
}

/// Twilio's Messages API. Debug output never shows the secrets (`SecretString` redacts them).
#[derive(Debug, Clone)]
pub struct TwilioConfig {
    pub account_sid: String,
    pub auth: TwilioAuth,
    pub from: Option<String>,
    pub messaging_service_sid: Option<String>,
    /// Without a trailing slash.
    pub base_url: String,
}

#[derive(Debug, Clone)]
pub enum TwilioAuth {
    /// Basic auth as `AccountSid:AuthToken`.
    AuthToken(SecretString),
    /// Basic auth as `ApiKeySid:ApiKeySecret`: revocable without rotating the account's token.
    ApiKey { sid: String, secret: SecretString },
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env)?;
        let addr = env.parse("WORKER_ADDR", parse_addr(DEFAULT_WORKER_ADDR))?;
        let provider = match env
            .string("SMS_PROVIDER", "log")
            .to_ascii_lowercase()
            .as_str()
        {
            "log" => ProviderConfig::Log,
            "twilio" => ProviderConfig::Twilio(TwilioConfig::from_env(env)?),
            other => {
                return Err(ConfigError::new(
                    "SMS_PROVIDER",
                    format!("{other:?} is not a provider; use twilio or log"),
                ));
            }
        };
        let message = MessageConfig::from_env(env)?;
        let send_timeout = env.seconds("SEND_TIMEOUT_SECS", 10, 1..=300)?;
        let retry_min_delay = env.millis("SMS_RETRY_MIN_DELAY_MS", 250, 1..=60_000)?;
        let retry_max_delay = env.millis("SMS_RETRY_MAX_DELAY_MS", 20_000, 1..=600_000)?;
        if retry_max_delay < retry_min_delay {
            return Err(ConfigError::new(
                "SMS_RETRY_MAX_DELAY_MS",
                "must not be smaller than SMS_RETRY_MIN_DELAY_MS",
            ));
        }
        Ok(Self {
            common,
            addr,
            provider,
            message,
            concurrency: env.integer_in("WORKER_CONCURRENCY", 64, 1..=10_000)?,
            send_timeout,
            retry_max_elapsed: env.seconds("RETRY_MAX_ELAPSED_SECS", 120, 0..=86_400)?,
            retry_min_delay,
            retry_max_delay,
            claim_lease: env.millis("SMS_CLAIM_LEASE_MS", 10_000, 500..=600_000)?,
            shutdown_grace: env.seconds(
                "SHUTDOWN_GRACE_SECS",
                send_timeout.as_secs() + 5,
                0..=3_600,
            )?,
        })
    }
}

impl MessageConfig {
    fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let template = env.string("SMS_TEMPLATE", DEFAULT_SMS_TEMPLATE);
        if !template.contains("{code}") {
            return Err(ConfigError::new("SMS_TEMPLATE", "must contain {code}"));
        }
        // Twilio refuses bodies over 1,600 characters; leave room for the substitutions.
        if template.chars().count() > 1_400 {
            return Err(ConfigError::new(
                "SMS_TEMPLATE",
                "longer than 1,400 characters",
            ));
        }
        let webotp_domain = env.optional_string("WEBOTP_DOMAIN");
        if let Some(domain) = &webotp_domain {
            let valid = domain.len() <= 253
                && domain.contains('.')
                && domain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
            if !valid {
                return Err(ConfigError::new(
                    "WEBOTP_DOMAIN",
                    "expected a bare host name such as example.com (no scheme, no path)",
                ));
            }
        }
        Ok(Self {
            template,
            app_name: env.string("APP_NAME", DEFAULT_APP_NAME),
            webotp_domain,
        })
    }
}

impl TwilioConfig {
    fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let account_sid = env.optional_string("TWILIO_ACCOUNT_SID").ok_or_else(|| {
            ConfigError::new("TWILIO_ACCOUNT_SID", "required with SMS_PROVIDER=twilio")
        })?;
        check_sid("TWILIO_ACCOUNT_SID", &account_sid, "AC")?;

        let key_sid = env.optional_string("TWILIO_API_KEY_SID");
        let key_secret = env.secret("TWILIO_API_KEY_SECRET");
        let auth = match (key_sid, key_secret, env.secret("TWILIO_AUTH_TOKEN")) {
            (Some(sid), Some(secret), _) => {
                check_sid("TWILIO_API_KEY_SID", &sid, "SK")?;
                TwilioAuth::ApiKey { sid, secret }
            }
            (Some(_), None, _) => {
                return Err(ConfigError::new(
                    "TWILIO_API_KEY_SECRET",
                    "required with TWILIO_API_KEY_SID",
                ));
            }
            (None, Some(_), _) => {
                return Err(ConfigError::new(
                    "TWILIO_API_KEY_SID",
                    "required with TWILIO_API_KEY_SECRET",
                ));
            }
            (None, None, Some(token)) => TwilioAuth::AuthToken(token),
            (None, None, None) => {
                return Err(ConfigError::new(
                    "TWILIO_AUTH_TOKEN",
                    "required with SMS_PROVIDER=twilio (or TWILIO_API_KEY_SID and TWILIO_API_KEY_SECRET)",
                ));
            }
        };

        let from = env.optional_string("TWILIO_FROM");
        let messaging_service_sid = env.optional_string("TWILIO_MESSAGING_SERVICE_SID");
        if let Some(sid) = &messaging_service_sid {
            check_sid("TWILIO_MESSAGING_SERVICE_SID", sid, "MG")?;
        }
        if from.is_none() && messaging_service_sid.is_none() {
            return Err(ConfigError::new(
                "TWILIO_FROM",
                "required with SMS_PROVIDER=twilio (or TWILIO_MESSAGING_SERVICE_SID)",
            ));
        }

        let base_url = env.string("TWILIO_BASE_URL", DEFAULT_TWILIO_BASE_URL);
        match reqwest::Url::parse(&base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(ConfigError::new(
                    "TWILIO_BASE_URL",
                    "expected an http(s) URL",
                ));
            }
        }
        Ok(Self {
            account_sid,
            auth,
            from,
            messaging_service_sid,
            base_url: base_url.trim_end_matches('/').to_owned(),
        })
    }
}

/// Twilio SIDs are two letters and 32 hex digits; a typo here would only show up as a 401 or
/// 404 on the first send.
fn check_sid(name: &'static str, value: &str, prefix: &str) -> Result<(), ConfigError> {
    let valid = value.len() == 34
        && value.starts_with(prefix)
        && value[2..].chars().all(|c| c.is_ascii_hexdigit());
    if valid {
        Ok(())
    } else {
        Err(ConfigError::new(
            name,
            format!("expected {prefix} followed by 32 hex digits"),
        ))
    }
}

fn parse_addr(addr: &str) -> SocketAddr {
    addr.parse().expect("a literal socket address")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "AC0123456789abcdef0123456789abcdef";

    fn twilio(extra: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut pairs = vec![("SMS_PROVIDER", "twilio"), ("TWILIO_ACCOUNT_SID", SID)];
        pairs.extend_from_slice(extra);
        Config::from_env(&Env::from_pairs(pairs))
    }

    #[test]
    fn defaults_need_no_configuration() {
        let config = Config::from_env(&Env::default()).unwrap();
        assert!(matches!(config.provider, ProviderConfig::Log));
        assert_eq!(config.addr.to_string(), DEFAULT_WORKER_ADDR);
        assert_eq!(config.concurrency, 64);
        assert_eq!(config.send_timeout, Duration::from_secs(10));
        assert_eq!(config.retry_max_elapsed, Duration::from_secs(120));
        assert_eq!(config.message.template, DEFAULT_SMS_TEMPLATE);
        assert_eq!(config.message.app_name, "Cheershare");
    }

    #[test]
    fn twilio_needs_credentials_and_a_sender() {
        assert_eq!(
            Config::from_env(&Env::from_pairs([("SMS_PROVIDER", "twilio")]))
                .unwrap_err()
                .name,
            "TWILIO_ACCOUNT_SID"
        );
        assert_eq!(twilio(&[]).unwrap_err().name, "TWILIO_AUTH_TOKEN");
        assert_eq!(
            twilio(&[("TWILIO_AUTH_TOKEN", "t")]).unwrap_err().name,
            "TWILIO_FROM"
        );
        assert_eq!(
            twilio(&[("TWILIO_API_KEY_SID", "SK0123456789abcdef0123456789abcdef")])
                .unwrap_err()
                .name,
            "TWILIO_API_KEY_SECRET"
        );
        assert_eq!(
            twilio(&[
                ("TWILIO_AUTH_TOKEN", "t"),
                ("TWILIO_MESSAGING_SERVICE_SID", "MG12")
            ])
            .unwrap_err()
            .name,
            "TWILIO_MESSAGING_SERVICE_SID"
        );
        assert_eq!(
            Config::from_env(&Env::from_pairs([
                ("SMS_PROVIDER", "twilio"),
                ("TWILIO_ACCOUNT_SID", "AC123"),
            ]))
            .unwrap_err()
            .name,
            "TWILIO_ACCOUNT_SID"
        );
        assert_eq!(
            twilio(&[
                ("TWILIO_AUTH_TOKEN", "t"),
                ("TWILIO_FROM", "+1"),
                ("TWILIO_BASE_URL", "ftp://x")
            ])
            .unwrap_err()
            .name,
            "TWILIO_BASE_URL"
        );

        let config = twilio(&[
            ("TWILIO_AUTH_TOKEN", "s3cr3t-token"),
            ("TWILIO_FROM", "+15005550006"),
            ("TWILIO_BASE_URL", "http://127.0.0.1:9099/"),
        ])
        .unwrap();
        let ProviderConfig::Twilio(twilio_config) = &config.provider else {
            panic!("twilio expected");
        };
        assert_eq!(twilio_config.base_url, "http://127.0.0.1:9099");
        assert!(!format!("{config:?}").contains("s3cr3t-token"));

        let config = twilio(&[
            ("TWILIO_API_KEY_SID", "SK0123456789abcdef0123456789abcdef"),
            ("TWILIO_API_KEY_SECRET", "key-s3cr3t"),
            (
                "TWILIO_MESSAGING_SERVICE_SID",
                "MG0123456789abcdef0123456789abcdef",
            ),
        ])
        .unwrap();
        assert!(!format!("{config:?}").contains("key-s3cr3t"));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("SMS_PROVIDER", "carrier-pigeon"),
            ("WORKER_ADDR", "localhost"),
            ("WORKER_CONCURRENCY", "0"),
            ("SEND_TIMEOUT_SECS", "ten"),
            ("RETRY_MAX_ELAPSED_SECS", "-1"),
            ("SMS_TEMPLATE", "Hello {app}"),
            ("WEBOTP_DOMAIN", "https://example.com"),
            ("AMQP_QUEUE_TYPE", "stream"),
        ] {
            let err = Config::from_env(&Env::from_pairs([(name, value)])).unwrap_err();
            assert_eq!(err.name, name, "{err}");
            assert!(err.to_string().contains(name));
        }
    }
}

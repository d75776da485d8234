//! The worker's configuration, read once from the environment and validated (the variables are
//! listed in README.md#configuration).

mod providers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use shared::fraud_guard::FraudGuardPolicy;
use shared::serve::ServerLimits;
use shared::{CommonConfig, ConfigError, Env};

pub use providers::{
    BreakerConfig, DEFAULT_TWILIO_BASE_URL, InfobipAuth, InfobipConfig, ProviderConfig, TwilioAuth,
    TwilioConfig, UnrecognisedRefusals,
};

use crate::seal::SealKey;

pub const DEFAULT_WORKER_ADDR: &str = "127.0.0.1:9091";
/// Connections at most on the receipts port (the HTTP port takes at most 64). Half of the 1,024
/// open files a process gets by default (systemd's soft limit), so that, with the HTTP port's,
/// a flood of connections to the public receipts port leaves about 440 descriptors for the
/// worker's own calls to the providers.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
pub const DEFAULT_SMS_TEMPLATE: &str =
    "Your {app} code is {code}. It expires in {minutes} minutes.";
/// Neutral, so that an SMS from a deployment that did not set `APP_NAME` reads naturally:
/// "Your sign-in code is 123456."
pub const DEFAULT_APP_NAME: &str = "sign-in";

/// Everything `sms-worker` needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    /// `WORKER_ADDR`: `/healthz`, `/readyz`, `/metrics`. Port 0 picks a free port.
    pub addr: SocketAddr,
    /// `SMS_PROVIDERS`, in failover order.
    pub providers: Vec<ProviderConfig>,
    pub breaker: BreakerConfig,
    /// `SMS_UNRECOGNISED_REFUSALS`: whether a refusal the worker cannot place fails over or
    /// dead-letters.
    pub unrecognised_refusals: UnrecognisedRefusals,
    /// `WORKER_SEAL_KEY`: seals what the worker keeps in Redis that must stay secret.
    pub seal_key: Option<SealKey>,
    /// Delivery receipts, when `CALLBACK_ADDR` is set.
    pub callbacks: Option<CallbackConfig>,
    /// `OTP_FRAUD_GUARD*`, as the api reads them: the worker asks the guard (counting nothing)
    /// before a resend a receipt earns, and in `enforce` a tripped calling code gets none.
    pub fraud_guard: FraudGuardPolicy,
    /// Slow-client limits of both ports (`HTTP_HEADER_TIMEOUT_SECS`, `HTTP_IDLE_TIMEOUT_SECS`,
    /// `HTTP_MAX_CONNECTIONS`, for the receipts port), as in the api.
    pub server: ServerLimits,
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
    /// `SMS_DEAD_LETTERS_HELD_MAX` (advanced): dead-letter copies a RabbitMQ alarm may hold in
    /// the worker's memory (their originals acknowledged); past it, dead letters wait for the
    /// alarm to end, their originals unacknowledged.
    pub dead_letters_held_max: usize,
}

/// Where providers report delivery (`CALLBACK_ADDR`, `CALLBACK_BASE_URL`).
#[derive(Debug, Clone)]
pub struct CallbackConfig {
    /// The listener for `POST /v1/callbacks/{twilio,infobip}`.
    pub addr: SocketAddr,
    /// The public base URL providers call, without a trailing slash (e.g.
    /// `https://sms-hooks.example.com`). Twilio signs the exact URL it calls, so this must be the
    /// URL the provider sees, not an internal one.
    pub base_url: String,
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
    /// `SMS_TEMPLATE_<LANG>`: templates by language, keyed by the lower-case tag with `-`
    /// (`es`, `pt-br`), used for events whose `locale` asks for them.
    pub templates: HashMap<String, String>,
    /// `ANDROID_APP_HASH`: the 11-character hash Android's SMS Retriever looks for at the end
    /// of the message.
    pub android_app_hash: Option<String>,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env)?;
        let addr = env.parse("WORKER_ADDR", parse_addr(DEFAULT_WORKER_ADDR))?;
        let providers = providers::providers_from_env(env)?;
        let seal_key = env
            .secret("WORKER_SEAL_KEY")
            .map(|key| {
                SealKey::from_base64(&key).map_err(|e| ConfigError::new("WORKER_SEAL_KEY", e))
            })
            .transpose()?;
        let oauth = providers.iter().any(|p| {
            matches!(
                p,
                ProviderConfig::Infobip(InfobipConfig {
                    auth: InfobipAuth::OAuth { .. },
                    ..
                })
            )
        });
        let callbacks = match env.optional_string("CALLBACK_ADDR") {
            None => None,
            Some(addr) => {
                let addr = addr
                    .parse::<SocketAddr>()
                    .map_err(|_| ConfigError::new("CALLBACK_ADDR", "expected HOST:PORT"))?;
                let base_url = env.optional_string("CALLBACK_BASE_URL").ok_or_else(|| {
                    ConfigError::new(
                        "CALLBACK_BASE_URL",
                        "required with CALLBACK_ADDR: the public URL providers call",
                    )
                })?;
                match reqwest::Url::parse(&base_url) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                    }
                    _ => {
                        return Err(ConfigError::new(
                            "CALLBACK_BASE_URL",
                            "expected an http(s) URL",
                        ));
                    }
                }
                if seal_key.is_none() {
                    return Err(ConfigError::new(
                        "WORKER_SEAL_KEY",
                        "required with CALLBACK_ADDR: messages awaiting receipts are kept in Redis sealed under it",
                    ));
                }
                let unsigned = providers.iter().any(|p| {
                    matches!(
                        p,
                        ProviderConfig::Twilio(TwilioConfig {
                            auth_token: None,
                            ..
                        })
                    )
                });
                if unsigned {
                    return Err(ConfigError::new(
                        "TWILIO_AUTH_TOKEN",
                        "required with CALLBACK_ADDR: Twilio signs its status callbacks with the account's auth token",
                    ));
                }
                Some(CallbackConfig {
                    addr,
                    base_url: base_url.trim_end_matches('/').to_owned(),
                })
            }
        };
        if oauth && seal_key.is_none() {
            return Err(ConfigError::new(
                "WORKER_SEAL_KEY",
                "required with an OAuth provider (INFOBIP_CLIENT_ID): the provider token is kept in Redis sealed under it; make one with `openssl rand -base64 32`, the same on every worker",
            ));
        }
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
            providers,
            breaker: BreakerConfig::from_env(env)?,
            unrecognised_refusals: UnrecognisedRefusals::from_env(env)?,
            seal_key,
            callbacks,
            fraud_guard: FraudGuardPolicy::from_env(env)?,
            server: ServerLimits::from_env(env, DEFAULT_MAX_CONNECTIONS)?,
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
            dead_letters_held_max: env.integer_in(
                "SMS_DEAD_LETTERS_HELD_MAX",
                1_000,
                1..=1_000_000,
            )?,
        })
    }
}

impl MessageConfig {
    fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let template = env.string("SMS_TEMPLATE", DEFAULT_SMS_TEMPLATE);
        check_template("SMS_TEMPLATE", "SMS_TEMPLATE", &template)?;
        let mut templates = HashMap::new();
        for (lang, text) in env.with_prefix("SMS_TEMPLATE_") {
            let name = format!("SMS_TEMPLATE_{lang}");
            let valid_tag = lang.split('_').enumerate().all(|(i, part)| {
                let len_ok = if i == 0 {
                    (2..=3).contains(&part.len())
                } else {
                    (1..=8).contains(&part.len())
                };
                len_ok && part.bytes().all(|b| b.is_ascii_alphanumeric())
            });
            if !valid_tag {
                return Err(ConfigError::new(
                    "SMS_TEMPLATE_<LANG>",
                    format!(
                        "{name}: expected a language such as SMS_TEMPLATE_ES or SMS_TEMPLATE_PT_BR"
                    ),
                ));
            }
            check_template("SMS_TEMPLATE_<LANG>", &name, &text)?;
            templates.insert(lang.to_ascii_lowercase().replace('_', "-"), text);
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
        let android_app_hash = env.optional_string("ANDROID_APP_HASH");
        if let Some(hash) = &android_app_hash {
            let valid = hash.len() == 11
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/'));
            if !valid {
                return Err(ConfigError::new(
                    "ANDROID_APP_HASH",
                    "expected the 11-character hash of your app's package and signing key (AppSignatureHelper)",
                ));
            }
        }
        Ok(Self {
            template,
            app_name: env.string("APP_NAME", DEFAULT_APP_NAME),
            webotp_domain,
            templates,
            android_app_hash,
        })
    }
}

/// A template must carry the code, and leave room for the substitutions under Twilio's 1,600
/// characters.
fn check_template(variable: &'static str, name: &str, template: &str) -> Result<(), ConfigError> {
    if !template.contains("{code}") {
        return Err(ConfigError::new(
            variable,
            format!("{name} must contain {{code}}"),
        ));
    }
    if template.chars().count() > 1_400 {
        return Err(ConfigError::new(
            variable,
            format!("{name} is longer than 1,400 characters"),
        ));
    }
    Ok(())
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
        assert!(matches!(config.providers.as_slice(), [ProviderConfig::Log]));
        assert_eq!(config.addr.to_string(), DEFAULT_WORKER_ADDR);
        assert_eq!(config.concurrency, 64);
        assert_eq!(config.send_timeout, Duration::from_secs(10));
        assert_eq!(config.retry_max_elapsed, Duration::from_secs(120));
        assert_eq!(config.message.template, DEFAULT_SMS_TEMPLATE);
        assert_eq!(config.message.app_name, "sign-in");
        assert_eq!(config.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.server.header_timeout, Duration::from_secs(5));
        assert_eq!(config.server.idle_timeout, Duration::from_secs(75));
        assert_eq!(config.unrecognised_refusals, UnrecognisedRefusals::FailOver);
    }

    #[test]
    fn unrecognised_refusals_can_be_dead_lettered() {
        let config = Config::from_env(&Env::from_pairs([(
            "SMS_UNRECOGNISED_REFUSALS",
            "Dead_Letter",
        )]))
        .unwrap();
        assert_eq!(
            config.unrecognised_refusals,
            UnrecognisedRefusals::DeadLetter
        );
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
        let [ProviderConfig::Twilio(twilio_config)] = config.providers.as_slice() else {
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
            ("HTTP_MAX_CONNECTIONS", "0"),
            ("HTTP_HEADER_TIMEOUT_SECS", "0"),
            ("HTTP_IDLE_TIMEOUT_SECS", "forever"),
            ("SMS_UNRECOGNISED_REFUSALS", "drop"),
        ] {
            let err = Config::from_env(&Env::from_pairs([(name, value)])).unwrap_err();
            assert_eq!(err.name, name, "{err}");
            assert!(err.to_string().contains(name));
        }
    }

    const SEAL_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    fn infobip(extra: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut pairs = vec![
            ("SMS_PROVIDERS", "twilio,infobip"),
            ("TWILIO_ACCOUNT_SID", SID),
            ("TWILIO_AUTH_TOKEN", "t"),
            ("TWILIO_FROM", "+15005550006"),
            ("INFOBIP_BASE_URL", "https://xyz.api.infobip.com/"),
            ("INFOBIP_SENDER", "OTPAuth"),
        ];
        pairs.extend_from_slice(extra);
        Config::from_env(&Env::from_pairs(pairs))
    }

    #[test]
    fn providers_come_in_failover_order_each_with_its_configuration() {
        let config = infobip(&[
            ("INFOBIP_CLIENT_ID", "user"),
            ("INFOBIP_CLIENT_SECRET", "pa55word-secret"),
            ("WORKER_SEAL_KEY", SEAL_KEY),
        ])
        .unwrap();
        let names: Vec<_> = config.providers.iter().map(ProviderConfig::name).collect();
        assert_eq!(names, ["twilio", "infobip"]);
        let ProviderConfig::Infobip(infobip_config) = &config.providers[1] else {
            panic!("infobip second");
        };
        assert_eq!(infobip_config.base_url, "https://xyz.api.infobip.com");
        assert!(matches!(infobip_config.auth, InfobipAuth::OAuth { .. }));
        let debug = format!("{config:?}");
        assert!(!debug.contains("pa55word-secret"), "{debug}");
        assert!(!debug.contains(SEAL_KEY), "{debug}");

        let keyed = infobip(&[("INFOBIP_API_KEY", "k3y")]).unwrap();
        let ProviderConfig::Infobip(keyed) = &keyed.providers[1] else {
            panic!("infobip second");
        };
        assert!(matches!(keyed.auth, InfobipAuth::ApiKey(_)));
        assert!(!keyed.idempotent, "only where the operator says so");
        assert_eq!(config.breaker.failures, 5);
    }

    #[test]
    fn bad_provider_settings_name_their_variable() {
        // OAuth keeps its token in Redis: sealed, so the key is required.
        assert_eq!(
            infobip(&[("INFOBIP_CLIENT_ID", "u"), ("INFOBIP_CLIENT_SECRET", "p")])
                .unwrap_err()
                .name,
            "WORKER_SEAL_KEY"
        );
        for (name, value, extra) in [
            ("WORKER_SEAL_KEY", "c2hvcnQ=", ("INFOBIP_API_KEY", "k")),
            ("INFOBIP_CLIENT_SECRET", "", ("INFOBIP_CLIENT_ID", "u")),
            ("INFOBIP_CLIENT_ID", "", ("INFOBIP_API_KEY", "")),
            ("INFOBIP_BASE_URL", "ftp://x", ("INFOBIP_API_KEY", "k")),
            (
                "INFOBIP_SENDER",
                "far-too-long-sender-id",
                ("INFOBIP_API_KEY", "k"),
            ),
            ("PROVIDER_BREAKER_FAILURES", "0", ("INFOBIP_API_KEY", "k")),
            ("INFOBIP_IDEMPOTENT", "maybe", ("INFOBIP_API_KEY", "k")),
        ] {
            let err = infobip(&[(name, value), extra]).unwrap_err();
            assert_eq!(err.name, name, "{err}");
        }
        for list in ["twilio,twilio", "log,twilio", "carrier-pigeon", ","] {
            let err = Config::from_env(&Env::from_pairs([("SMS_PROVIDERS", list)])).unwrap_err();
            assert_eq!(err.name, "SMS_PROVIDERS", "{list}: {err}");
        }
        // SMS_PROVIDER keeps working as a list of one.
        let config = Config::from_env(&Env::from_pairs([("SMS_PROVIDER", "log")])).unwrap();
        assert_eq!(config.providers.len(), 1);
    }
}

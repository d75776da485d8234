//! The SMS providers, in failover order, and how each is reached (README.md#providers-and-failover).

use std::time::Duration;

use secrecy::SecretString;
use shared::{ConfigError, Env};

pub const DEFAULT_TWILIO_BASE_URL: &str = "https://api.twilio.com";

#[derive(Debug, Clone)]
pub enum ProviderConfig {
    /// Writes a masked copy of the SMS to the log instead of sending it (development).
    Log,
    Twilio(TwilioConfig),
    Infobip(InfobipConfig),
}

impl ProviderConfig {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Twilio(_) => "twilio",
            Self::Infobip(_) => "infobip",
        }
    }
}

/// Twilio's Messages API. Debug output never shows the secrets (`SecretString` redacts them).
#[derive(Debug, Clone)]
pub struct TwilioConfig {
    pub account_sid: String,
    pub auth: TwilioAuth,
    /// `TWILIO_AUTH_TOKEN`, also when sending with an API key: Twilio signs its status callbacks
    /// with the account's auth token only.
    pub auth_token: Option<SecretString>,
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

/// Infobip's SMS API v3.
#[derive(Debug, Clone)]
pub struct InfobipConfig {
    /// The account's own base URL (`https://xxxxx.api.infobip.com`), without a trailing slash.
    pub base_url: String,
    pub sender: String,
    pub auth: InfobipAuth,
    /// `INFOBIP_IDEMPOTENT`: the operator says Infobip's idempotency is enabled for the account,
    /// so a repeat of a `messageId` it has taken sends nothing (docs/messaging.md).
    pub idempotent: bool,
}

#[derive(Debug, Clone)]
pub enum InfobipAuth {
    /// OAuth 2.0 client credentials: short-lived bearer tokens from `/auth/1/oauth2/token`,
    /// shared by every worker through Redis.
    OAuth {
        client_id: String,
        client_secret: SecretString,
    },
    /// `Authorization: App <key>`.
    ApiKey(SecretString),
}

/// When a provider is taken out of rotation, and when it is tried again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// `PROVIDER_BREAKER_FAILURES` provider-side failures within `window` open the breaker.
    pub failures: u32,
    pub window: Duration,
    /// An open breaker lets one probe send through after this.
    pub cooldown: Duration,
    /// Delivery receipts open the breaker too: when more than this fraction of the provider's
    /// receipts in the window say the carrier dropped the message…
    pub delivery_failure_ratio: f64,
    /// …over at least this many receipts.
    pub delivery_min_samples: u32,
}

impl BreakerConfig {
    pub(super) fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let delivery_failure_ratio: f64 = env.parse("PROVIDER_DELIVERY_FAILURE_RATIO", 0.5)?;
        if !(0.0..=1.0).contains(&delivery_failure_ratio) || delivery_failure_ratio == 0.0 {
            return Err(ConfigError::new(
                "PROVIDER_DELIVERY_FAILURE_RATIO",
                format!(
                    "{delivery_failure_ratio} is out of range; expected a fraction above 0 and at most 1"
                ),
            ));
        }
        Ok(Self {
            failures: env.integer_in("PROVIDER_BREAKER_FAILURES", 5, 1..=10_000)?,
            window: env.seconds("PROVIDER_BREAKER_WINDOW_SECS", 30, 1..=3_600)?,
            cooldown: env.seconds("PROVIDER_BREAKER_COOLDOWN_SECS", 30, 1..=3_600)?,
            delivery_failure_ratio,
            delivery_min_samples: env.integer_in(
                "PROVIDER_DELIVERY_MIN_SAMPLES",
                20,
                1..=1_000_000,
            )?,
        })
    }
}

/// `SMS_UNRECOGNISED_REFUSALS`: what becomes of an event a provider refused with a reason the
/// worker cannot place (see [`crate::provider::Failure::Unrecognised`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnrecognisedRefusals {
    /// `fail_over` (the default): the next provider is tried. A user is not locked out when a
    /// provider starts answering with a code the worker was not taught, at the price of a
    /// second paid call when the code was a policy block about the number.
    FailOver,
    /// `dead_letter`: the event is dead-lettered, as for a refusal of the recipient. For a
    /// deployment that would rather read new codes in `sms-worker dlq list` than pay for numbers
    /// a provider refused for a reason no one looked at.
    DeadLetter,
}

impl UnrecognisedRefusals {
    pub(super) fn from_env(env: &Env) -> Result<Self, ConfigError> {
        const NAME: &str = "SMS_UNRECOGNISED_REFUSALS";
        match env.string(NAME, "fail_over").to_ascii_lowercase().as_str() {
            "fail_over" => Ok(Self::FailOver),
            "dead_letter" => Ok(Self::DeadLetter),
            other => Err(ConfigError::new(
                NAME,
                format!("{other:?}: use fail_over or dead_letter"),
            )),
        }
    }
}

/// `SMS_PROVIDERS` (comma-separated, in failover order), or `SMS_PROVIDER` (a list of one);
/// `log` when neither is set.
pub(super) fn providers_from_env(env: &Env) -> Result<Vec<ProviderConfig>, ConfigError> {
    let (name, list) = match (
        env.optional_string("SMS_PROVIDERS"),
        env.optional_string("SMS_PROVIDER"),
    ) {
        (Some(list), _) => ("SMS_PROVIDERS", list),
        (None, Some(one)) => ("SMS_PROVIDER", one),
        (None, None) => ("SMS_PROVIDERS", "log".to_owned()),
    };
    let names: Vec<String> = list
        .split(',')
        .map(|p| p.trim().to_ascii_lowercase())
        .filter(|p| !p.is_empty())
        .collect();
    if names.is_empty() {
        return Err(ConfigError::new(name, "lists no provider"));
    }
    for (i, provider) in names.iter().enumerate() {
        if names[..i].contains(provider) {
            return Err(ConfigError::new(
                name,
                format!("{provider} is listed twice"),
            ));
        }
    }
    if names.len() > 1 && names.iter().any(|p| p == "log") {
        return Err(ConfigError::new(
            name,
            "log sends nothing, so it cannot be combined with real providers",
        ));
    }
    let mut providers = Vec::new();
    for provider in &names {
        providers.push(match provider.as_str() {
            "log" => ProviderConfig::Log,
            "twilio" => ProviderConfig::Twilio(TwilioConfig::from_env(env)?),
            "infobip" => ProviderConfig::Infobip(InfobipConfig::from_env(env)?),
            other => {
                return Err(ConfigError::new(
                    name,
                    format!("{other:?} is not a provider; use twilio, infobip or log"),
                ));
            }
        });
    }
    Ok(providers)
}

impl TwilioConfig {
    fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let account_sid = env.optional_string("TWILIO_ACCOUNT_SID").ok_or_else(|| {
            ConfigError::new("TWILIO_ACCOUNT_SID", "required with the twilio provider")
        })?;
        check_sid("TWILIO_ACCOUNT_SID", &account_sid, "AC")?;

        let auth_token = env.secret("TWILIO_AUTH_TOKEN");
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
                    "required with the twilio provider (or TWILIO_API_KEY_SID and TWILIO_API_KEY_SECRET)",
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
                "required with the twilio provider (or TWILIO_MESSAGING_SERVICE_SID)",
            ));
        }

        Ok(Self {
            account_sid,
            auth,
            auth_token,
            from,
            messaging_service_sid,
            base_url: base_url(env, "TWILIO_BASE_URL", Some(DEFAULT_TWILIO_BASE_URL))?,
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

impl InfobipConfig {
    fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let base_url = base_url(env, "INFOBIP_BASE_URL", None)?;
        let sender = env.optional_string("INFOBIP_SENDER").ok_or_else(|| {
            ConfigError::new("INFOBIP_SENDER", "required with the infobip provider")
        })?;
        // Alphanumeric sender IDs are at most 11 characters; numeric ones up to 16 digits.
        if sender.chars().count() > 16
            || !sender
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == ' ')
        {
            return Err(ConfigError::new(
                "INFOBIP_SENDER",
                "expected a phone number or an alphanumeric sender ID of at most 11 characters",
            ));
        }
        let auth = match (
            env.optional_string("INFOBIP_CLIENT_ID"),
            env.secret("INFOBIP_CLIENT_SECRET"),
            env.secret("INFOBIP_API_KEY"),
        ) {
            (Some(client_id), Some(client_secret), _) => InfobipAuth::OAuth {
                client_id,
                client_secret,
            },
            (Some(_), None, _) => {
                return Err(ConfigError::new(
                    "INFOBIP_CLIENT_SECRET",
                    "required with INFOBIP_CLIENT_ID",
                ));
            }
            (None, Some(_), _) => {
                return Err(ConfigError::new(
                    "INFOBIP_CLIENT_ID",
                    "required with INFOBIP_CLIENT_SECRET",
                ));
            }
            (None, None, Some(key)) => InfobipAuth::ApiKey(key),
            (None, None, None) => {
                return Err(ConfigError::new(
                    "INFOBIP_CLIENT_ID",
                    "required with the infobip provider (with INFOBIP_CLIENT_SECRET), or INFOBIP_API_KEY",
                ));
            }
        };
        Ok(Self {
            base_url,
            sender,
            auth,
            idempotent: env.boolean("INFOBIP_IDEMPOTENT", false)?,
        })
    }
}

/// An http(s) URL without its trailing slash.
fn base_url(env: &Env, name: &'static str, default: Option<&str>) -> Result<String, ConfigError> {
    let value = match (env.optional_string(name), default) {
        (Some(value), _) => value,
        (None, Some(default)) => default.to_owned(),
        (None, None) => return Err(ConfigError::new(name, "required with its provider")),
    };
    match reqwest::Url::parse(&value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            Ok(value.trim_end_matches('/').to_owned())
        }
        _ => Err(ConfigError::new(name, "expected an http(s) URL")),
    }
}

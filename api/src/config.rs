//! The api's configuration, parsed once at start-up (the variables are listed in
//! README.md#configuration).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use phonenumber::country;
use secrecy::{ExposeSecret, SecretString};
use shared::{CommonConfig, ConfigError, Env};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/otp_auth";
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:8080";
/// Used when `OTP_SECRET` is unset, with a warning at start-up: fine for a laptop, never for
/// production, where every replica must share a real secret.
pub const DEV_OTP_SECRET: &str = "dev-only-otp-secret-change-me-in-production";

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub common: CommonConfig,
    pub database_url: SecretString,
    pub api_addr: SocketAddr,
    pub otp: OtpPolicy,
    /// Key of the HMAC under which OTPs are stored in Redis.
    pub otp_secret: SecretString,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// `DATABASE_POOL_SIZE`: PostgreSQL connections per api process.
    pub database_pool_size: u32,
    pub phone: PhonePolicy,
    /// Take the client IP from `X-Forwarded-For` (only behind a proxy that sets it).
    pub trust_proxy: bool,
}

/// How OTPs are made and how often they may be asked for.
#[derive(Debug, Clone)]
pub struct OtpPolicy {
    pub length: u32,
    pub ttl: Duration,
    pub max_attempts: u32,
    pub resend_gap: Duration,
    pub per_phone_per_hour: u32,
    pub per_ip_per_hour: u32,
}

/// Which numbers are accepted.
#[derive(Debug, Clone, Default)]
pub struct PhonePolicy {
    /// Region for numbers written without `+`; none: only E.164 is accepted.
    pub default_region: Option<country::Id>,
    /// Regions that may receive OTPs; none: all.
    pub allowed_countries: Option<HashSet<country::Id>>,
}

impl ApiConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env)?;
        let database_url = env.string("DATABASE_URL", DEFAULT_DATABASE_URL);
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "must start with postgres:// or postgresql://",
            ));
        }
        let api_addr = parse_addr(&env.string("API_ADDR", DEFAULT_API_ADDR))
            .ok_or_else(|| ConfigError::new("API_ADDR", "expected HOST:PORT or :PORT"))?;
        let otp = OtpPolicy {
            length: env.integer_in("OTP_LENGTH", 6, 4..=10)?,
            ttl: env.seconds("OTP_TTL_SECS", 300, 1..=86_400)?,
            max_attempts: env.integer_in("OTP_MAX_ATTEMPTS", 5, 1..=1_000)?,
            resend_gap: env.seconds("OTP_RESEND_SECS", 30, 0..=86_400)?,
            per_phone_per_hour: env.integer_in("OTP_PER_PHONE_PER_HOUR", 5, 1..=1_000_000)?,
            per_ip_per_hour: env.integer_in("OTP_PER_IP_PER_HOUR", 30, 1..=100_000_000)?,
        };
        let otp_secret = match env.secret("OTP_SECRET") {
            Some(secret) if secret.expose_secret().len() < 16 => {
                return Err(ConfigError::new("OTP_SECRET", "use at least 16 characters"));
            }
            Some(secret) => secret,
            None => SecretString::from(DEV_OTP_SECRET),
        };
        let phone = PhonePolicy {
            default_region: env
                .optional_string("DEFAULT_REGION")
                .map(|r| parse_region("DEFAULT_REGION", &r))
                .transpose()?,
            allowed_countries: env
                .optional_string("ALLOWED_COUNTRIES")
                .map(|list| {
                    list.split(',')
                        .map(str::trim)
                        .filter(|r| !r.is_empty())
                        .map(|r| parse_region("ALLOWED_COUNTRIES", r))
                        .collect::<Result<HashSet<_>, _>>()
                })
                .transpose()?,
        };
        Ok(Self {
            common,
            database_url: database_url.into(),
            api_addr,
            otp,
            otp_secret,
            access_token_ttl: env.seconds("ACCESS_TOKEN_TTL_SECS", 86_400, 1..=31_536_000)?,
            refresh_token_ttl: env.seconds("REFRESH_TOKEN_TTL_SECS", 2_592_000, 1..=315_360_000)?,
            database_pool_size: env.integer_in("DATABASE_POOL_SIZE", 10, 1..=1_000)?,
            phone,
            trust_proxy: env.boolean("TRUST_PROXY", false)?,
        })
    }

    pub fn uses_dev_otp_secret(&self) -> bool {
        self.otp_secret.expose_secret() == DEV_OTP_SECRET
    }
}

/// `HOST:PORT`, or `:PORT` for every interface.
fn parse_addr(value: &str) -> Option<SocketAddr> {
    if let Some(port) = value.strip_prefix(':') {
        return Some(SocketAddr::from(([0, 0, 0, 0], port.parse().ok()?)));
    }
    value.parse().ok()
}

fn parse_region(name: &'static str, value: &str) -> Result<country::Id, ConfigError> {
    value
        .to_ascii_uppercase()
        .parse()
        .map_err(|_| ConfigError::new(name, format!("{value:?} is not an ISO 3166 region code")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_environment() {
        let config = ApiConfig::from_env(&Env::default()).expect("defaults are valid");
        assert_eq!(config.api_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.otp.length, 6);
        assert!(config.uses_dev_otp_secret());
        assert!(config.phone.default_region.is_none());
    }

    #[test]
    fn every_bad_variable_is_named() {
        for (name, value) in [
            ("OTP_LENGTH", "3"),
            ("OTP_LENGTH", "six"),
            ("API_ADDR", "nowhere"),
            ("DATABASE_URL", "mysql://x"),
            ("OTP_SECRET", "short"),
            ("DEFAULT_REGION", "XX1"),
            ("ALLOWED_COUNTRIES", "US,Narnia"),
            ("TRUST_PROXY", "maybe"),
            ("OTP_TTL_SECS", "0"),
            ("DATABASE_POOL_SIZE", "abc"),
            ("DATABASE_POOL_SIZE", "0"),
        ] {
            let err = ApiConfig::from_env(&Env::from_pairs([(name, value)])).unwrap_err();
            assert_eq!(err.name, name, "{err}");
        }
    }

    #[test]
    fn parses_regions_and_port_only_addresses() {
        let env = Env::from_pairs([
            ("DEFAULT_REGION", "in"),
            ("ALLOWED_COUNTRIES", "US, IN"),
            ("API_ADDR", ":0"),
            ("OTP_SECRET", "0123456789abcdef-secret"),
        ]);
        let config = ApiConfig::from_env(&env).unwrap();
        assert_eq!(config.phone.default_region, Some(country::Id::IN));
        assert_eq!(
            config.phone.allowed_countries.as_ref().map(|c| c.len()),
            Some(2)
        );
        assert_eq!(config.api_addr.port(), 0);
        assert!(!format!("{config:?}").contains("0123456789abcdef-secret"));
    }
}

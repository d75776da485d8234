//! The api's configuration, parsed once at start-up (the variables are listed in
//! README.md#configuration).

mod policies;

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use shared::serve::ServerLimits;
use shared::{CommonConfig, ConfigError, Env};

pub use policies::{OtpPolicy, PhonePolicy, SendLimits, SessionPolicy, VerifyLimits};
pub use shared::fraud_guard::{FraudGuardMode, FraudGuardPolicy};

use crate::client_ip::ClientIpPolicy;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/otp_auth";
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:8080";
/// Client connections at most (`HTTP_MAX_CONNECTIONS`), lowered at start to what the open-file
/// limit leaves (`shared::serve`'s `open_files.rs`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Used when `OTP_SECRET` is unset, with a warning at start-up: fine for a laptop, never for
/// production, where every replica must share a real secret. Anyone who reads Redis and knows
/// this value can try every code of every live OTP offline in seconds, so the api refuses it on
/// an address other machines can reach unless told otherwise.
pub const DEV_OTP_SECRET: &str = "dev-only-otp-secret-change-me-in-production";

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub common: CommonConfig,
    pub database_url: SecretString,
    pub api_addr: SocketAddr,
    pub otp: OtpPolicy,
    /// Key of the HMAC under which OTPs are stored in Redis.
    pub otp_secret: SecretString,
    pub send_limits: SendLimits,
    pub verify_limits: VerifyLimits,
    pub fraud_guard: FraudGuardPolicy,
    pub sessions: SessionPolicy,
    /// `DATABASE_POOL_SIZE`: PostgreSQL connections per api process.
    pub database_pool_size: u32,
    /// `DATABASE_STATEMENT_TIMEOUT_MS`: PostgreSQL's `statement_timeout`, set on each of the
    /// api's connections; zero leaves it to the server (a role's setting behind PgBouncer in
    /// transaction pooling, where a connection's `SET` would land on any server connection).
    pub database_statement_timeout: Duration,
    /// Slow-client limits of the HTTP server.
    pub server: ServerLimits,
    /// `SHUTDOWN_GRACE_SECS`: after SIGTERM, in-flight requests get this long.
    pub shutdown_grace: Duration,
    pub phone: PhonePolicy,
    pub client_ip: ClientIpPolicy,
    /// `DEMO_PAGE`: serve the sign-in demo page at `/demo`.
    pub demo_page: bool,
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
        let otp_secret = match env.secret("OTP_SECRET") {
            Some(secret) if secret.expose_secret().len() < 16 => {
                return Err(ConfigError::new("OTP_SECRET", "use at least 16 characters"));
            }
            Some(secret) => secret,
            None => SecretString::from(DEV_OTP_SECRET),
        };
        let allow_dev_secret = env.boolean("OTP_SECRET_ALLOW_DEV", false)?;
        if otp_secret.expose_secret() == DEV_OTP_SECRET
            && !api_addr.ip().is_loopback()
            && !allow_dev_secret
        {
            return Err(ConfigError::new(
                "OTP_SECRET",
                format!(
                    "not set, and the built-in development value is refused on API_ADDR {api_addr}, which is not a loopback address: set OTP_SECRET (the same on every replica), or OTP_SECRET_ALLOW_DEV=true for a throwaway deployment"
                ),
            ));
        }
        let otp = OtpPolicy::from_env(env)?;
        let mut phone = PhonePolicy::from_env(env)?;
        phone.test_numbers = policies::test_numbers(env, otp.length)?;
        Ok(Self {
            common,
            database_url: database_url.into(),
            api_addr,
            otp,
            otp_secret,
            send_limits: SendLimits::from_env(env)?,
            verify_limits: VerifyLimits::from_env(env)?,
            fraud_guard: FraudGuardPolicy::from_env(env)?,
            sessions: SessionPolicy::from_env(env)?,
            database_pool_size: env.integer_in("DATABASE_POOL_SIZE", 10, 1..=1_000)?,
            database_statement_timeout: env.millis(
                "DATABASE_STATEMENT_TIMEOUT_MS",
                3_000,
                0..=600_000,
            )?,
            server: ServerLimits::from_env(env, DEFAULT_MAX_CONNECTIONS)?,
            shutdown_grace: env.seconds("SHUTDOWN_GRACE_SECS", 10, 0..=300)?,
            phone,
            client_ip: policies::client_ip_policy(env)?,
            demo_page: env.boolean("DEMO_PAGE", false)?,
        })
    }

    pub fn uses_dev_otp_secret(&self) -> bool {
        self.otp_secret.expose_secret() == DEV_OTP_SECRET
    }

    /// `X-Forwarded-For` believed from any peer (`TRUST_PROXY` without `TRUSTED_PROXIES`) on an
    /// address other clients can reach: one that connects to the api directly (another pod, a
    /// second listener, the host's IPv6) then names its own address for every per-IP limit.
    pub fn believes_any_forwarder(&self) -> bool {
        self.client_ip.trusted_hops > 0
            && self.client_ip.trusted_proxies.is_none()
            && !self.api_addr.ip().is_loopback()
    }
}

/// `HOST:PORT`, or `:PORT` for every interface.
fn parse_addr(value: &str) -> Option<SocketAddr> {
    if let Some(port) = value.strip_prefix(':') {
        return Some(SocketAddr::from(([0, 0, 0, 0], port.parse().ok()?)));
    }
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use phonenumber::country;

    use super::*;

    #[test]
    fn defaults_need_no_environment() {
        let config = ApiConfig::from_env(&Env::default()).expect("defaults are valid");
        assert_eq!(config.api_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.otp.length, 6);
        assert!(config.uses_dev_otp_secret());
        assert!(config.phone.default_region.is_none());
        assert_eq!(config.send_limits.per_phone_per_day, 10);
        assert_eq!(config.verify_limits.fails_per_ip_per_hour, 60);
        assert_eq!(config.verify_limits.fails_per_phone_per_day, 20);
        assert_eq!(config.send_limits.per_country_per_hour, None);
        assert_eq!(config.fraud_guard.mode, FraudGuardMode::Monitor);
        assert_eq!(config.client_ip.trusted_hops, 0);
        assert_eq!(config.sessions.reuse_grace.as_secs(), 10);
        assert_eq!(config.sessions.max_lifetime.as_secs(), 90 * 24 * 3600);
        assert_eq!(config.sessions.refreshes_per_day, 100);
        assert_eq!(config.database_statement_timeout.as_millis(), 3_000);
        let off = ApiConfig::from_env(&Env::from_pairs([("DATABASE_STATEMENT_TIMEOUT_MS", "0")]))
            .expect("zero leaves the server's");
        assert!(off.database_statement_timeout.is_zero());
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
            ("TRUST_PROXY", "-1"),
            ("TRUSTED_PROXIES", "10.0.0.0/40"),
            ("OTP_TTL_SECS", "0"),
            ("DATABASE_POOL_SIZE", "abc"),
            ("DATABASE_POOL_SIZE", "0"),
            ("DATABASE_STATEMENT_TIMEOUT_MS", "3s"),
            ("OTP_ALLOWED_NUMBER_TYPES", "mobile,satellite_phone"),
            ("OTP_FRAUD_GUARD", "paranoid"),
            ("OTP_FRAUD_GUARD_RATIO", "0"),
            ("OTP_PER_COUNTRY_PER_HOUR", "0"),
            ("OTP_GLOBAL_PER_MINUTE", "lots"),
            ("OTP_PER_PHONE_PER_DAY", "0"),
            ("OTP_VERIFY_FAILS_PER_IP_PER_HOUR", "x"),
            ("REFRESH_REUSE_GRACE_SECS", "3601"),
            ("SESSION_MAX_LIFETIME_SECS", "1"),
            ("HTTP_HEADER_TIMEOUT_SECS", "0"),
            ("OTP_SECRET_ALLOW_DEV", "perhaps"),
        ] {
            let err = ApiConfig::from_env(&Env::from_pairs([(name, value)])).unwrap_err();
            assert_eq!(err.name, name, "{value}: {err}");
        }
    }

    #[test]
    fn the_daily_refresh_cap_follows_short_access_tokens_unless_set() {
        let per_day = |pairs: &[(&str, &str)]| {
            ApiConfig::from_env(&Env::from_pairs(pairs.iter().copied()))
                .unwrap()
                .sessions
                .refreshes_per_day
        };
        // Refreshed at half their life, 5-minute tokens take 576 refreshes a day: twice that.
        assert_eq!(per_day(&[("ACCESS_TOKEN_TTL_SECS", "300")]), 1_152);
        assert_eq!(per_day(&[("ACCESS_TOKEN_TTL_SECS", "3600")]), 100);
        assert_eq!(per_day(&[("ACCESS_TOKEN_TTL_SECS", "1")]), 345_600);
        assert_eq!(
            per_day(&[
                ("ACCESS_TOKEN_TTL_SECS", "300"),
                ("REFRESH_PER_SESSION_PER_DAY", "20")
            ]),
            20
        );
        let err = ApiConfig::from_env(&Env::from_pairs([("REFRESH_PER_SESSION_PER_DAY", "0")]))
            .unwrap_err();
        assert_eq!(err.name, "REFRESH_PER_SESSION_PER_DAY");
    }

    #[test]
    fn the_dev_secret_is_refused_where_others_can_connect() {
        for addr in ["0.0.0.0:8080", ":0", "192.0.2.10:8080", "[::]:8080"] {
            let err = ApiConfig::from_env(&Env::from_pairs([("API_ADDR", addr)])).unwrap_err();
            assert_eq!(err.name, "OTP_SECRET", "{addr}");
            assert!(err.to_string().contains("OTP_SECRET_ALLOW_DEV"), "{err}");
        }
        for addr in ["127.0.0.1:0", "[::1]:8080"] {
            assert!(ApiConfig::from_env(&Env::from_pairs([("API_ADDR", addr)])).is_ok());
        }
        let allowed =
            Env::from_pairs([("API_ADDR", "0.0.0.0:0"), ("OTP_SECRET_ALLOW_DEV", "true")]);
        assert!(ApiConfig::from_env(&allowed).is_ok());
        let real = Env::from_pairs([
            ("API_ADDR", "0.0.0.0:0"),
            ("OTP_SECRET", "a-real-secret-0123456789"),
        ]);
        assert!(ApiConfig::from_env(&real).is_ok());
    }

    #[test]
    fn parses_regions_types_proxies_and_port_only_addresses() {
        let env = Env::from_pairs([
            ("DEFAULT_REGION", "in"),
            ("ALLOWED_COUNTRIES", "US, IN"),
            ("API_ADDR", ":0"),
            ("OTP_SECRET", "0123456789abcdef-secret"),
            ("OTP_ALLOWED_NUMBER_TYPES", "Mobile, fixed_line"),
            ("TRUST_PROXY", "2"),
            ("TRUSTED_PROXIES", "10.0.0.0/8, ::1"),
            ("OTP_PER_COUNTRY_PER_HOUR", "500"),
        ]);
        let config = ApiConfig::from_env(&env).unwrap();
        assert_eq!(config.phone.default_region, Some(country::Id::IN));
        assert_eq!(
            config.phone.allowed_countries.as_ref().map(|c| c.len()),
            Some(2)
        );
        assert_eq!(
            config.phone.allowed_types,
            ["mobile", "fixed_line"].into_iter().collect()
        );
        assert_eq!(config.client_ip.trusted_hops, 2);
        assert_eq!(
            config.client_ip.trusted_proxies.as_ref().map(Vec::len),
            Some(2)
        );
        assert_eq!(config.send_limits.per_country_per_hour, Some(500));
        assert_eq!(config.api_addr.port(), 0);
        assert!(!format!("{config:?}").contains("0123456789abcdef-secret"));
        let one = Env::from_pairs([("TRUST_PROXY", "true")]);
        assert_eq!(ApiConfig::from_env(&one).unwrap().client_ip.trusted_hops, 1);
    }

    #[test]
    fn forwarded_addresses_from_any_peer_on_a_public_address_are_flagged() {
        let config = |pairs: &[(&str, &str)]| {
            let mut all = vec![("OTP_SECRET_ALLOW_DEV", "true")];
            all.extend_from_slice(pairs);
            ApiConfig::from_env(&Env::from_pairs(all)).unwrap()
        };
        let public = ("API_ADDR", "0.0.0.0:8080");
        assert!(config(&[public, ("TRUST_PROXY", "1")]).believes_any_forwarder());
        assert!(
            !config(&[
                public,
                ("TRUST_PROXY", "1"),
                ("TRUSTED_PROXIES", "10.0.0.0/8")
            ])
            .believes_any_forwarder()
        );
        assert!(!config(&[public]).believes_any_forwarder());
        assert!(
            !config(&[("API_ADDR", "127.0.0.1:8080"), ("TRUST_PROXY", "1")])
                .believes_any_forwarder()
        );
    }
}

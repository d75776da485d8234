//! The policies the api enforces, as typed values read once from the environment.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use phonenumber::country;
use shared::{ConfigError, Env};

use crate::client_ip::{ClientIpPolicy, IpNet};

/// How codes are made and used.
#[derive(Debug, Clone)]
pub struct OtpPolicy {
    pub length: u32,
    pub ttl: Duration,
    /// Wrong guesses per code, counted separately with and without its `challenge_id`.
    pub max_attempts: u32,
    pub resend_gap: Duration,
}

/// How many codes may be sent, and for whom (docs/api.md#request-limits).
#[derive(Debug, Clone)]
pub struct SendLimits {
    pub per_phone_per_hour: u32,
    pub per_phone_per_day: u32,
    pub per_ip_per_hour: u32,
    /// Codes per IPv6 /48 (a site: 65,536 /64s) per hour; off when unset.
    pub per_ipv6_48_per_hour: Option<u32>,
    /// Off when unset.
    pub per_country_per_hour: Option<u32>,
    /// Off when unset.
    pub global_per_minute: Option<u32>,
}

/// How many wrong guesses are tolerated beyond one code's own budget.
#[derive(Debug, Clone)]
pub struct VerifyLimits {
    pub fails_per_ip_per_hour: u32,
    pub fails_per_phone_per_day: u32,
}

/// Which numbers may receive codes.
#[derive(Debug, Clone)]
pub struct PhonePolicy {
    /// Region for numbers written without `+`; none: only E.164 is accepted.
    pub default_region: Option<country::Id>,
    /// Regions that may receive OTPs; none: all.
    pub allowed_countries: Option<HashSet<country::Id>>,
    /// Number type names (see [`crate::phone::NUMBER_TYPES`]).
    pub allowed_types: HashSet<&'static str>,
    /// `OTP_TEST_NUMBERS`: E.164 number → its fixed code. These numbers get no SMS, skip the
    /// number checks (Twilio's `+1500555…` magic numbers are not valid numbers) and accept
    /// their fixed code.
    pub test_numbers: HashMap<String, String>,
}

impl Default for PhonePolicy {
    fn default() -> Self {
        Self {
            default_region: None,
            allowed_countries: None,
            allowed_types: HashSet::from(["mobile", "fixed_line_or_mobile"]),
            test_numbers: HashMap::new(),
        }
    }
}

impl PhonePolicy {
    /// The fixed code of a test number.
    pub fn test_code(&self, phone: &shared::PhoneNumber) -> Option<&str> {
        self.test_numbers.get(phone.as_str()).map(String::as_str)
    }
}

/// `OTP_TEST_NUMBERS`: `+15005550100=123456,+15005550101=654321`.
pub(super) fn test_numbers(
    env: &Env,
    otp_length: u32,
) -> Result<HashMap<String, String>, ConfigError> {
    const NAME: &str = "OTP_TEST_NUMBERS";
    let Some(list) = env.optional_string(NAME) else {
        return Ok(HashMap::new());
    };
    let mut numbers = HashMap::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((number, code)) = entry.split_once('=') else {
            return Err(ConfigError::new(
                NAME,
                "expected +NUMBER=CODE pairs separated by commas, e.g. +15005550006=123456",
            ));
        };
        let number = shared::PhoneNumber::parse(number.trim()).map_err(|_| {
            ConfigError::new(
                NAME,
                format!(
                    "{} is not an E.164 number",
                    shared::mask_phone(number.trim())
                ),
            )
        })?;
        let code = code.trim();
        if code.len() != otp_length as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ConfigError::new(
                NAME,
                format!("the code of {number} must be OTP_LENGTH ({otp_length}) digits"),
            ));
        }
        numbers.insert(number.as_str().to_owned(), code.to_owned());
    }
    Ok(numbers)
}

/// Lifetimes and limits of sign-in sessions (docs/api.md#tokens).
#[derive(Debug, Clone)]
pub struct SessionPolicy {
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// After this, counted from sign-in, refresh fails and the user signs in again.
    pub max_lifetime: Duration,
    /// A just-rotated refresh token presented again within this does not revoke the family.
    pub reuse_grace: Duration,
    pub refreshes_per_minute: u32,
    /// Refreshes one session may make in a (sliding) day; past it a session with two holders is
    /// revoked, and one client alone waits. It bounds the rotated tokens a session keeps (and a
    /// thief's rotations), where the per-minute rate alone allowed 14,400 a day.
    pub refreshes_per_day: u32,
}

/// `REFRESH_PER_SESSION_PER_DAY`'s default: 100, or twice the refreshes a client makes in a day
/// when it refreshes each access token at half its life, if that is more. So shortening
/// `ACCESS_TOKEN_TTL_SECS` alone never leaves clients refused the refreshes they need.
fn default_refreshes_per_day(access_ttl: Duration) -> u32 {
    const DAY_SECS: u64 = 86_400;
    let per_access_lifetime = DAY_SECS.div_ceil(access_ttl.as_secs().max(1));
    u32::try_from(per_access_lifetime.saturating_mul(4))
        .unwrap_or(u32::MAX)
        .max(100)
}

impl OtpPolicy {
    pub(super) fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            length: env.integer_in("OTP_LENGTH", 6, 4..=10)?,
            ttl: env.seconds("OTP_TTL_SECS", 300, 1..=86_400)?,
            max_attempts: env.integer_in("OTP_MAX_ATTEMPTS", 5, 1..=1_000)?,
            resend_gap: env.seconds("OTP_RESEND_SECS", 30, 0..=86_400)?,
        })
    }
}

impl SendLimits {
    pub(super) fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let per_phone_per_hour = env.integer_in("OTP_PER_PHONE_PER_HOUR", 5, 1..=1_000_000)?;
        let per_phone_per_day = env.integer_in("OTP_PER_PHONE_PER_DAY", 10, 1..=1_000_000)?;
        Ok(Self {
            per_phone_per_hour,
            per_phone_per_day,
            per_ip_per_hour: env.integer_in("OTP_PER_IP_PER_HOUR", 30, 1..=100_000_000)?,
            per_ipv6_48_per_hour: optional_limit(env, "OTP_PER_IPV6_48_PER_HOUR")?,
            per_country_per_hour: optional_limit(env, "OTP_PER_COUNTRY_PER_HOUR")?,
            global_per_minute: optional_limit(env, "OTP_GLOBAL_PER_MINUTE")?,
        })
    }
}

impl VerifyLimits {
    pub(super) fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            fails_per_ip_per_hour: env.integer_in(
                "OTP_VERIFY_FAILS_PER_IP_PER_HOUR",
                60,
                1..=100_000_000,
            )?,
            fails_per_phone_per_day: env.integer_in(
                "OTP_VERIFY_FAILS_PER_PHONE_PER_DAY",
                20,
                1..=1_000_000,
            )?,
        })
    }
}

impl PhonePolicy {
    pub(super) fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let allowed_types = match env.optional_string("OTP_ALLOWED_NUMBER_TYPES") {
            None => Self::default().allowed_types,
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| {
                    crate::phone::NUMBER_TYPES
                        .iter()
                        .find(|known| known.eq_ignore_ascii_case(t))
                        .copied()
                        .ok_or_else(|| {
                            ConfigError::new(
                                "OTP_ALLOWED_NUMBER_TYPES",
                                format!(
                                    "{t:?} is not a number type; use {}",
                                    crate::phone::NUMBER_TYPES.join(", ")
                                ),
                            )
                        })
                })
                .collect::<Result<HashSet<_>, _>>()?,
        };
        Ok(Self {
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
            allowed_types,
            test_numbers: HashMap::new(),
        })
    }
}

impl SessionPolicy {
    pub(super) fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let access_ttl = env.seconds("ACCESS_TOKEN_TTL_SECS", 86_400, 1..=31_536_000)?;
        Ok(Self {
            access_ttl,
            refresh_ttl: env.seconds("REFRESH_TOKEN_TTL_SECS", 2_592_000, 1..=315_360_000)?,
            max_lifetime: env.seconds("SESSION_MAX_LIFETIME_SECS", 7_776_000, 60..=315_360_000)?,
            reuse_grace: env.seconds("REFRESH_REUSE_GRACE_SECS", 10, 0..=300)?,
            refreshes_per_minute: env.integer_in(
                "REFRESH_PER_SESSION_PER_MINUTE",
                10,
                1..=10_000,
            )?,
            refreshes_per_day: env.integer_in(
                "REFRESH_PER_SESSION_PER_DAY",
                default_refreshes_per_day(access_ttl),
                1..=u32::MAX,
            )?,
        })
    }
}

/// `TRUST_PROXY` (`false`, `true` = 1, or a number of hops) and `TRUSTED_PROXIES`.
pub(super) fn client_ip_policy(env: &Env) -> Result<ClientIpPolicy, ConfigError> {
    let trusted_hops = match env
        .raw("TRUST_PROXY")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("false" | "no" | "off" | "0") => 0,
        Some("true" | "yes" | "on") => 1,
        Some(other) => other
            .parse::<usize>()
            .ok()
            .filter(|hops| *hops <= 10)
            .ok_or_else(|| {
                ConfigError::new(
                    "TRUST_PROXY",
                    format!("{other:?}: use false, true, or the number of proxy hops (1 to 10)"),
                )
            })?,
    };
    let trusted_proxies = env
        .optional_string("TRUSTED_PROXIES")
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| {
                    n.parse::<IpNet>()
                        .map_err(|e| ConfigError::new("TRUSTED_PROXIES", e))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(ClientIpPolicy {
        trusted_hops,
        trusted_proxies,
    })
}

fn optional_limit(env: &Env, name: &'static str) -> Result<Option<u32>, ConfigError> {
    env.raw(name)
        .map(|_| env.integer_in(name, 0, 1..=1_000_000_000))
        .transpose()
}

fn parse_region(name: &'static str, value: &str) -> Result<country::Id, ConfigError> {
    value
        .to_ascii_uppercase()
        .parse()
        .map_err(|_| ConfigError::new(name, format!("{value:?} is not an ISO 3166 region code")))
}

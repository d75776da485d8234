//! Phone numbers in, E.164 out, and the number-type guard against toll fraud.

use phonenumber::Type;
use phonenumber::country::Id;
use shared::PhoneNumber;
use shared::fraud_guard::GuardZone;

use crate::config::PhonePolicy;
use crate::error::ApiError;

/// Longer input is not a phone number; refusing it early keeps the parser's work bounded.
const MAX_INPUT_LEN: usize = 32;

/// Every number type `OTP_ALLOWED_NUMBER_TYPES` may name: libphonenumber's, plus
/// `non_geographic`.
pub const NUMBER_TYPES: &[&str] = &[
    "mobile",
    "fixed_line_or_mobile",
    "fixed_line",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "personal_number",
    "voip",
    "pager",
    "uan",
    "emergency",
    "voicemail",
    "short_code",
    "standard_rate",
    "carrier",
    "no_international",
    "unknown",
    "non_geographic",
];

/// A number that may receive a code, with what the per-country limits are keyed on.
#[derive(Debug, Clone)]
pub struct Destination {
    pub phone: PhoneNumber,
    /// The country calling code (`1`, `44`, `881`…): `OTP_PER_COUNTRY_PER_HOUR`'s key.
    pub calling_code: u16,
    /// The country (or, for a number of none, the calling code): the fraud guard's key.
    pub guard_zone: GuardZone,
}

/// Parses `input` (E.164, or national format when `DEFAULT_REGION` is set), checks it is a valid
/// number of an allowed country and type, and returns it in E.164. This is the only way the api
/// makes a [`PhoneNumber`].
pub fn normalize(input: &str, policy: &PhonePolicy) -> Result<Destination, ApiError> {
    let invalid = || ApiError::InvalidPhoneNumber {
        default_region: policy.default_region.map(|r| format!("{r:?}")),
    };
    let input = input.trim();
    if input.is_empty() || input.len() > MAX_INPUT_LEN {
        return Err(invalid());
    }
    if let Ok(phone) = PhoneNumber::parse(input)
        && policy.test_code(&phone).is_some()
        && let Some(calling_code) = phone.calling_code()
    {
        // A test number need not be a valid one (+1 555…), and gets no SMS: counted apart,
        // under its calling code, so that a synthetic check's codes weigh on no country.
        return Ok(Destination {
            phone,
            calling_code,
            guard_zone: GuardZone::CallingCode(calling_code),
        });
    }
    let region = if input.starts_with('+') {
        None
    } else {
        Some(policy.default_region.ok_or_else(invalid)?)
    };
    let number = phonenumber::parse(region, input).map_err(|_| invalid())?;
    if !phonenumber::is_valid(&number) {
        return Err(invalid());
    }
    // Each of `is_valid`, `country().id()` and `number_type` walks the patterns of every region
    // sharing the calling code (25 for +1); each is called once. They are not merged into one
    // walk: they disagree on Italian leading zeros (`is_valid` keeps them, the others drop
    // them), and this guard keeps their answers.
    let country = number.country().id();
    if let Some(allowed) = &policy.allowed_countries
        && !country.is_some_and(|c| allowed.contains(&c))
    {
        return Err(ApiError::CountryNotAllowed);
    }
    if !policy.allowed_types.contains(number_type(&number, country)) {
        return Err(ApiError::NumberTypeNotAllowed);
    }
    // E.164 written out directly: phonenumber's formatter picks a national layout (walking the
    // region's format patterns) even for E.164, where it is not used.
    let calling_code = number.code().value();
    let phone = PhoneNumber::parse(&format!("+{calling_code}{}", number.national()))
        .map_err(|_| invalid())?;
    Ok(Destination {
        phone,
        calling_code,
        guard_zone: GuardZone::new(country, calling_code),
    })
}

/// How many compiled patterns phonenumber may keep. Its metadata compiles each pattern when it is
/// first used and keeps at most 100 in an LRU cache, but checking one +1 number alone walks the
/// patterns of all 25 regions that share the calling code: with 100, the patterns of every
/// request pushed out those the next one needed, and the api recompiled regular expressions on
/// every request (`regex_syntax` and SipHash over the patterns topped its profile). The
/// patterns of the numbers a deployment actually sees fit easily; each costs a few KiB.
const PHONE_PATTERN_CACHE: usize = 2_000;

/// Makes phonenumber's pattern cache large enough for the numbers it checks (see
/// [`PHONE_PATTERN_CACHE`]). Call once, at start-up.
pub fn enlarge_pattern_cache() {
    let cache = phonenumber::metadata::DATABASE.cache();
    *cache.lock().unwrap_or_else(|e| e.into_inner()) =
        regex_cache::RegexCache::new(PHONE_PATTERN_CACHE);
}

/// libphonenumber's type, except that numbers of non-geographic calling codes (satellite
/// networks such as Iridium's +881, Inmarsat's +870, international networks +882/+883,
/// international freephone and premium +800/+808/+979) are `non_geographic` whatever it says:
/// it types +881 numbers as `mobile`, yet they are priced like premium lines and are a classic
/// toll-fraud destination.
/// `country` is the number's region, `None` for a non-geographic calling code.
fn number_type(number: &phonenumber::PhoneNumber, country: Option<Id>) -> &'static str {
    if country.is_none() {
        return "non_geographic";
    }
    type_name(number.number_type(&phonenumber::metadata::DATABASE))
}

fn type_name(kind: Type) -> &'static str {
    match kind {
        Type::Mobile => "mobile",
        Type::FixedLineOrMobile => "fixed_line_or_mobile",
        Type::FixedLine => "fixed_line",
        Type::TollFree => "toll_free",
        Type::PremiumRate => "premium_rate",
        Type::SharedCost => "shared_cost",
        Type::PersonalNumber => "personal_number",
        Type::Voip => "voip",
        Type::Pager => "pager",
        Type::Uan => "uan",
        Type::Emergency => "emergency",
        Type::Voicemail => "voicemail",
        Type::ShortCode => "short_code",
        Type::StandardRate => "standard_rate",
        Type::Carrier => "carrier",
        Type::NoInternational => "no_international",
        Type::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use phonenumber::Mode;

    use super::*;

    fn e164_only() -> PhonePolicy {
        PhonePolicy::default()
    }

    fn any_type() -> PhonePolicy {
        PhonePolicy {
            allowed_types: NUMBER_TYPES.iter().copied().collect(),
            ..PhonePolicy::default()
        }
    }

    fn e164(input: &str, policy: &PhonePolicy) -> String {
        normalize(input, policy).unwrap().phone.as_str().to_owned()
    }

    #[test]
    fn accepts_e164_numbers() {
        assert_eq!(e164("+14155550100", &e164_only()), "+14155550100");
        assert_eq!(e164(" +44 20 7946 0958 ", &any_type()), "+442079460958");
        assert_eq!(e164("+919876543210", &e164_only()), "+919876543210");
        let destination = normalize("+447911123456", &e164_only()).unwrap();
        assert_eq!(destination.calling_code, 44);
    }

    #[test]
    fn national_numbers_need_a_default_region() {
        assert!(matches!(
            normalize("9876543210", &e164_only()),
            Err(ApiError::InvalidPhoneNumber { .. })
        ));
        let india = PhonePolicy {
            default_region: Some(Id::IN),
            ..PhonePolicy::default()
        };
        assert_eq!(e164("9876543210", &india), "+919876543210");
    }

    #[test]
    fn refuses_what_is_not_a_number() {
        for bad in [
            "",
            "+",
            "hello",
            "+1",
            "+999999999999",
            "+1415555010012345678901234567890123",
        ] {
            assert!(
                matches!(
                    normalize(bad, &e164_only()),
                    Err(ApiError::InvalidPhoneNumber { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn enforces_allowed_countries() {
        let us_only = PhonePolicy {
            allowed_countries: Some(HashSet::from([Id::US])),
            ..PhonePolicy::default()
        };
        assert!(normalize("+14155550100", &us_only).is_ok());
        assert!(matches!(
            normalize("+919876543210", &us_only),
            Err(ApiError::CountryNotAllowed)
        ));
    }

    #[test]
    fn premium_satellite_and_landline_numbers_get_no_code_by_default() {
        // US premium rate, Iridium (libphonenumber calls it mobile), UK premium, UK landline.
        for number in [
            "+19002345678",
            "+881631234567",
            "+449098790123",
            "+442079460958",
        ] {
            assert!(
                matches!(
                    normalize(number, &e164_only()),
                    Err(ApiError::NumberTypeNotAllowed)
                ),
                "{number}"
            );
        }
        // Mobile and "cannot tell" (the whole North American plan) pass.
        for number in ["+447911123456", "+14155550100", "+33612345678"] {
            assert!(normalize(number, &e164_only()).is_ok(), "{number}");
        }
        let with_satellites = PhonePolicy {
            allowed_types: ["mobile", "non_geographic"].into_iter().collect(),
            ..PhonePolicy::default()
        };
        assert!(normalize("+881631234567", &with_satellites).is_ok());
    }

    /// E.164 written out directly is what phonenumber's formatter writes, for numbers of every
    /// kind: shared calling codes, non-geographic codes, Italian leading zeros.
    #[test]
    fn e164_written_directly_matches_phonenumbers_formatter() {
        let numbers = [
            "+14155550100",
            "+12125550123",
            "+16135550123",
            "+18765550123",
            "+19002345678",
            "+18005550100",
            "+17875550123",
            "+442079460958",
            "+447911123456",
            "+449098790123",
            "+441534123456",
            "+33612345678",
            "+33123456789",
            "+393123456789",
            "+390612345678",
            "+919876543210",
            "+81312345678",
            "+8613812345678",
            "+61412345678",
            "+5511912345678",
            "+79161234567",
            "+77012345678",
            "+881631234567",
            "+870773111632",
            "+80012345678",
            "+882345678901",
            "+4915112345678",
            "+4930123456",
            "+27821234567",
            "+2348031234567",
        ];
        for input in numbers {
            let number = phonenumber::parse(None, input).unwrap();
            assert_eq!(
                format!("+{}{}", number.code().value(), number.national()),
                number.format().mode(Mode::E164).to_string(),
                "{input}"
            );
        }
    }

    /// The worker places a number in its fraud guard's zone from the E.164 alone, before a
    /// resend; the api from what it parsed. They must name the same zone, or the worker asks a
    /// guard the api never counts in.
    #[test]
    fn the_worker_places_each_number_in_the_zone_the_api_counts_it_in() {
        let jamaica = PhonePolicy {
            default_region: Some(Id::JM),
            ..any_type()
        };
        let italy = PhonePolicy {
            default_region: Some(Id::IT),
            ..any_type()
        };
        for (input, policy, zone) in [
            ("+14155550100", &any_type(), "US"),
            ("+16135550123", &any_type(), "CA"),
            ("+18762101234", &any_type(), "JM"),
            ("876 210 1234", &jamaica, "JM"),
            ("+447781123456", &any_type(), "GG"),
            ("+447911123456", &any_type(), "GG"),
            ("+442079460958", &any_type(), "GB"),
            ("+77012345678", &any_type(), "KZ"),
            ("+390612345678", &any_type(), "IT"),
            ("06 1234 5678", &italy, "IT"),
            ("+393123456789", &any_type(), "IT"),
            ("+881631234567", &any_type(), "+881"),
            ("+870773111632", &any_type(), "+870"),
        ] {
            let destination = normalize(input, policy).expect(input);
            assert_eq!(destination.guard_zone.to_string(), zone, "{input}");
            assert_eq!(
                GuardZone::of(&destination.phone),
                Some(destination.guard_zone),
                "{input}"
            );
        }
    }
}

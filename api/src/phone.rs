//! Phone numbers in, E.164 out.

use phonenumber::Mode;
use shared::PhoneNumber;

use crate::config::PhonePolicy;
use crate::error::ApiError;

/// Longer input is not a phone number; refusing it early keeps the parser's work bounded.
const MAX_INPUT_LEN: usize = 32;

/// Parses `input` (E.164, or national format when `DEFAULT_REGION` is set), checks it is a valid
/// number of an allowed country, and returns it in E.164. This is the only way the api makes a
/// [`PhoneNumber`].
pub fn normalize(input: &str, policy: &PhonePolicy) -> Result<PhoneNumber, ApiError> {
    let input = input.trim();
    if input.is_empty() || input.len() > MAX_INPUT_LEN {
        return Err(ApiError::InvalidPhoneNumber);
    }
    let region = if input.starts_with('+') {
        None
    } else {
        Some(policy.default_region.ok_or(ApiError::InvalidPhoneNumber)?)
    };
    let number = phonenumber::parse(region, input).map_err(|_| ApiError::InvalidPhoneNumber)?;
    if !phonenumber::is_valid(&number) {
        return Err(ApiError::InvalidPhoneNumber);
    }
    if let Some(allowed) = &policy.allowed_countries {
        let country = number.country().id();
        if !country.is_some_and(|c| allowed.contains(&c)) {
            return Err(ApiError::CountryNotAllowed);
        }
    }
    PhoneNumber::parse(&number.format().mode(Mode::E164).to_string())
        .map_err(|_| ApiError::InvalidPhoneNumber)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use phonenumber::country::Id;

    use super::*;

    fn e164_only() -> PhonePolicy {
        PhonePolicy::default()
    }

    #[test]
    fn accepts_e164_numbers() {
        assert_eq!(
            normalize("+14155550100", &e164_only()).unwrap().as_str(),
            "+14155550100"
        );
        assert_eq!(
            normalize(" +44 20 7946 0958 ", &e164_only())
                .unwrap()
                .as_str(),
            "+442079460958"
        );
        assert_eq!(
            normalize("+919876543210", &e164_only()).unwrap().as_str(),
            "+919876543210"
        );
    }

    #[test]
    fn national_numbers_need_a_default_region() {
        assert!(matches!(
            normalize("9876543210", &e164_only()),
            Err(ApiError::InvalidPhoneNumber)
        ));
        let india = PhonePolicy {
            default_region: Some(Id::IN),
            allowed_countries: None,
        };
        assert_eq!(
            normalize("9876543210", &india).unwrap().as_str(),
            "+919876543210"
        );
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
                    Err(ApiError::InvalidPhoneNumber)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn enforces_allowed_countries() {
        let us_only = PhonePolicy {
            default_region: None,
            allowed_countries: Some(HashSet::from([Id::US])),
        };
        assert!(normalize("+14155550100", &us_only).is_ok());
        assert!(matches!(
            normalize("+919876543210", &us_only),
            Err(ApiError::CountryNotAllowed)
        ));
    }
}

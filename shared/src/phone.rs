//! Phone numbers: the [`PhoneNumber`] type, and the mask every log line uses.

use serde::{Deserialize, Serialize};

/// A phone number in E.164: `+`, then the country code and the subscriber number, 7 to 15
/// digits, the first not 0 (the shortest numbers in use, such as Niue's, have 7).
///
/// The api makes one only by normalising what a client typed (`api::phone::normalize`, which
/// knows the numbering plans); the worker only by reading an event, where a value that is not
/// E.164 makes the whole event unreadable. Either way, holding a `PhoneNumber` means the text was
/// checked. `Debug` and `Display` show it masked, so a number cannot reach a log by accident;
/// [`PhoneNumber::as_str`] is the full number, for the provider and the database.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneNumber(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an E.164 phone number")]
pub struct NotE164;

impl PhoneNumber {
    /// Checks the E.164 syntax; it says nothing about whether the number exists.
    pub fn parse(text: &str) -> Result<Self, NotE164> {
        let digits = text.strip_prefix('+').ok_or(NotE164)?;
        let valid = (7..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(NotE164)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `+1415*****00`: country and area code readable, the subscriber part not.
    pub fn masked(&self) -> String {
        mask_phone(&self.0)
    }
}

impl TryFrom<String> for PhoneNumber {
    type Error = NotE164;
    fn try_from(text: String) -> Result<Self, NotE164> {
        Self::parse(&text)
    }
}

impl From<PhoneNumber> for String {
    fn from(phone: PhoneNumber) -> Self {
        phone.0
    }
}

impl std::fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PhoneNumber({})", self.masked())
    }
}

impl std::fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}

/// Masks a phone number for logs: `+14155550100` becomes `+1415*****00`.
///
/// The country and area code stay readable for debugging; the subscriber part does not.
pub fn mask_phone(phone: &str) -> String {
    let chars: Vec<char> = phone.chars().collect();
    let (head, tail) = if chars.len() >= 10 {
        (5, 2)
    } else if chars.len() >= 6 {
        (2, 2)
    } else {
        (0, 0)
    };
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i < head || i >= chars.len() - tail {
                *c
            } else {
                '*'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_subscriber_part() {
        assert_eq!(mask_phone("+14155550100"), "+1415*****00");
        assert_eq!(mask_phone("+919876543210"), "+9198******10");
        assert_eq!(mask_phone("1234567"), "12***67");
        assert_eq!(mask_phone("123"), "***");
        assert_eq!(mask_phone(""), "");
    }

    #[test]
    fn only_e164_text_makes_a_phone_number() {
        let phone = PhoneNumber::parse("+14155550100").unwrap();
        assert_eq!(phone.as_str(), "+14155550100");
        assert_eq!(phone.to_string(), "+1415*****00");
        assert!(!format!("{phone:?}").contains("4155550100"));
        for bad in [
            "",
            "+",
            "14155550100",
            "+0123",
            "+1415555010012345",
            "+1 415",
            "+1٤",
        ] {
            assert_eq!(PhoneNumber::parse(bad), Err(NotE164), "{bad}");
        }
        let json = serde_json::to_string(&phone).unwrap();
        assert_eq!(json, "\"+14155550100\"");
        assert!(serde_json::from_str::<PhoneNumber>("\"hello\"").is_err());
    }
}

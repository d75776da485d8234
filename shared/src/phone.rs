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

    /// The country calling code (`1`, `44`, `881`…): the assigned code the number starts with.
    /// E.164 calling codes are prefix-free, so at most one of them matches.
    pub fn calling_code(&self) -> Option<u16> {
        let digits = &self.0[1..];
        (1..=3)
            .filter_map(|len| digits.get(..len)?.parse::<u16>().ok())
            .find(|code| CALLING_CODES.binary_search(code).is_ok())
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

/// Every assigned country calling code, sorted (libphonenumber's metadata).
const CALLING_CODES: &[u16] = &[
    1, 7, 20, 27, 30, 31, 32, 33, 34, 36, 39, 40, 41, 43, 44, 45, 46, 47, 48, 49, 51, 52, 53, 54,
    55, 56, 57, 58, 60, 61, 62, 63, 64, 65, 66, 81, 82, 84, 86, 90, 91, 92, 93, 94, 95, 98, 211,
    212, 213, 216, 218, 220, 221, 222, 223, 224, 225, 226, 227, 228, 229, 230, 231, 232, 233, 234,
    235, 236, 237, 238, 239, 240, 241, 242, 243, 244, 245, 246, 247, 248, 249, 250, 251, 252, 253,
    254, 255, 256, 257, 258, 260, 261, 262, 263, 264, 265, 266, 267, 268, 269, 290, 291, 297, 298,
    299, 350, 351, 352, 353, 354, 355, 356, 357, 358, 359, 370, 371, 372, 373, 374, 375, 376, 377,
    378, 380, 381, 382, 383, 385, 386, 387, 389, 420, 421, 423, 500, 501, 502, 503, 504, 505, 506,
    507, 508, 509, 590, 591, 592, 593, 594, 595, 596, 597, 598, 599, 670, 672, 673, 674, 675, 676,
    677, 678, 679, 680, 681, 682, 683, 685, 686, 687, 688, 689, 690, 691, 692, 800, 808, 850, 852,
    853, 855, 856, 870, 878, 880, 881, 882, 883, 886, 888, 960, 961, 962, 963, 964, 965, 966, 967,
    968, 970, 971, 972, 973, 974, 975, 976, 977, 979, 992, 993, 994, 995, 996, 998,
];

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
        assert!(CALLING_CODES.windows(2).all(|pair| pair[0] < pair[1]));
        for (number, code) in [
            ("+14155550100", 1),
            ("+447911123456", 44),
            ("+881631234567", 881),
            ("+3557123456", 355),
            ("+79161234567", 7),
        ] {
            assert_eq!(
                PhoneNumber::parse(number).unwrap().calling_code(),
                Some(code),
                "{number}"
            );
        }
    }
}

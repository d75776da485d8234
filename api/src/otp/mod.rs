//! One-time passwords: drawn from a CSPRNG without bias, kept in Redis only as an HMAC,
//! each bound to a random `challenge_id` (docs/api.md#otp-lifecycle). [`store`] keeps them.

pub mod store;

use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use shared::PhoneNumber;

/// A fresh code of `length` digits, uniform over all 10^length of them.
///
/// Rejection sampling, so "no modulo bias" holds exactly: a draw from the top sliver of the u64
/// range that does not fill a whole multiple of 10^length is thrown away and drawn again (for
/// six digits that happens once in about 10^13 draws).
///
/// The draws come from rand's thread-local CSPRNG (ChaCha12, seeded from the OS and reseeded
/// as it goes): as unpredictable as asking the kernel, without a `getrandom` system call per
/// draw, which was the api's most frequent system call.
pub fn generate_code(length: u32) -> String {
    let mut rng = rand::rng();
    let n = uniform_below(10u64.pow(length), || rng.next_u64());
    format!("{n:0width$}", width = length as usize)
}

/// A uniform draw from `0..upper`, given uniform u64 draws.
fn uniform_below(upper: u64, mut draw: impl FnMut() -> u64) -> u64 {
    // 2^64 mod upper: the draws at the very top of the u64 range that do not complete a whole
    // multiple of `upper`. Keeping them would make the low remainders more likely.
    let incomplete = (u64::MAX % upper + 1) % upper;
    loop {
        let value = draw();
        if incomplete == 0 || value <= u64::MAX - incomplete {
            return value % upper;
        }
    }
}

/// Whether `otp` is exactly `length` ASCII digits.
pub fn is_well_formed(otp: &str, length: u32) -> bool {
    otp.len() == length as usize && otp.bytes().all(|b| b.is_ascii_digit())
}

/// HMAC-SHA256 keyed by `OTP_SECRET`. The phone number is part of the message, so one code's
/// digest says nothing about another phone's.
#[derive(Clone)]
pub struct OtpHasher {
    /// Keyed once: cloning a keyed HMAC is cheaper than setting the key up per request.
    keyed: Hmac<Sha256>,
}

impl OtpHasher {
    pub fn new(key: &SecretString) -> Self {
        Self {
            keyed: <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose_secret().as_bytes())
                .expect("HMAC accepts keys of any length"),
        }
    }

    pub fn digest(&self, phone: &PhoneNumber, code: &str) -> CodeDigest {
        let mut mac = self.keyed.clone();
        mac.update(phone.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(code.as_bytes());
        CodeDigest(hex(&mac.finalize().into_bytes()))
    }
}

/// What Redis keeps of a code: its HMAC, in hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeDigest(String);

impl CodeDigest {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// The handle of one code, given to whoever requested it: 16 random bytes, base32. Guesses
/// that carry it are told apart from a stranger's, so strangers cannot burn the code.
pub struct ChallengeId(String);

impl ChallengeId {
    pub fn generate() -> Self {
        Self(crate::tokens::random_base32())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// What Redis keeps: the SHA-256 of the text a client sends back, so Redis alone does not
    /// hand out a code's handle.
    pub fn fingerprint(text: &str) -> String {
        hex(&Sha256::digest(text.as_bytes()))
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_the_asked_length_and_only_digits() {
        for length in 4..=10 {
            let code = generate_code(length);
            assert!(is_well_formed(&code, length), "{code}");
        }
        assert!(!is_well_formed("12345", 6));
        assert!(!is_well_formed("12345a", 6));
        assert!(!is_well_formed("１２３４５６", 6));
    }

    #[test]
    fn codes_are_spread_over_all_digits() {
        let mut seen = [0u32; 10];
        for _ in 0..2_000 {
            let code = generate_code(4);
            seen[usize::from(code.as_bytes()[0] - b'0')] += 1;
        }
        assert!(seen.iter().all(|&n| n > 100), "first digits: {seen:?}");
    }

    #[test]
    fn draws_beyond_the_last_whole_multiple_are_rejected() {
        // 2^64 = 18446744073709551616: the last whole multiple of 10^6 below it starts at
        // 18446744073709000000, so those draws (which would favour 0..551615) are drawn again.
        let mut draws = [
            u64::MAX,
            18_446_744_073_709_000_000,
            18_446_744_073_708_999_999,
        ]
        .into_iter();
        assert_eq!(uniform_below(1_000_000, || draws.next().unwrap()), 999_999);
        let mut draws = [7u64].into_iter();
        assert_eq!(uniform_below(10, || draws.next().unwrap()), 7);
        // A power of two divides 2^64: nothing is rejected.
        assert_eq!(uniform_below(1 << 32, || u64::MAX), u64::from(u32::MAX));
    }

    #[test]
    fn digests_depend_on_key_phone_and_code() {
        let a = OtpHasher::new(&"key-one-0123456789".into());
        let b = OtpHasher::new(&"key-two-0123456789".into());
        let phone = PhoneNumber::parse("+14155550100").unwrap();
        let other = PhoneNumber::parse("+14155550101").unwrap();
        let d = a.digest(&phone, "123456");
        assert_eq!(d.0.len(), 64);
        assert_eq!(d, a.digest(&phone, "123456"));
        assert_ne!(d, b.digest(&phone, "123456"));
        assert_ne!(d, a.digest(&other, "123456"));
        assert_ne!(d, a.digest(&phone, "123457"));
        assert!(!d.0.contains("123456"));
    }

    #[test]
    fn challenge_ids_are_random_and_stored_as_fingerprints() {
        let a = ChallengeId::generate().into_string();
        let b = ChallengeId::generate().into_string();
        assert_eq!(a.len(), 26);
        assert_ne!(a, b);
        let fingerprint = ChallengeId::fingerprint(&a);
        assert_eq!(fingerprint.len(), 64);
        assert!(!fingerprint.contains(&a));
    }
}

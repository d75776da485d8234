//! Opaque bearer tokens: 16 bytes from a CSPRNG, shown once as 26 characters of base32;
//! PostgreSQL keeps only the SHA-256 of that text.

use rand::Rng;
use sha2::{Digest, Sha256};

pub const TOKEN_LEN: usize = 26;

/// A token as handed to the client. Debug never shows it.
pub struct PlainToken(String);

impl std::fmt::Debug for PlainToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlainToken([REDACTED])")
    }
}

impl PlainToken {
    pub fn generate() -> Self {
        Self(random_base32())
    }

    pub fn hash(&self) -> Vec<u8> {
        hash(&self.0)
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// 16 bytes from rand's thread-local CSPRNG (see [`crate::otp::generate_code`]) as 26
/// characters of base32 (no padding).
pub fn random_base32() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    base32::encode(base32::Alphabet::Rfc4648 { padding: false }, &bytes)
}

pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Whether `token` could be one of ours; anything else is refused without a database look-up.
pub fn is_well_formed(token: &str) -> bool {
    token.len() == TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_26_base32_characters_and_unique() {
        let a = PlainToken::generate();
        let b = PlainToken::generate();
        assert_eq!(a.0.len(), TOKEN_LEN);
        assert!(is_well_formed(&a.0), "{}", a.0);
        assert_ne!(a.0, b.0);
        assert_eq!(a.hash().len(), 32);
        assert!(!format!("{a:?}").contains(&a.0));
        assert!(!is_well_formed("abc"));
        assert!(!is_well_formed(&a.0.to_lowercase()));
    }
}

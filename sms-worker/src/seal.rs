//! Sealing what the worker keeps in Redis that must stay secret (provider tokens, messages
//! awaiting their delivery receipts): AES-256-GCM under `WORKER_SEAL_KEY`, so reading Redis
//! alone reveals nothing. Each value is bound to its Redis key, so a sealed value copied under
//! another key does not open.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};

/// 32 bytes, the same on every worker. Debug never shows it.
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey([REDACTED])")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the sealed value is damaged, sealed under another key, or for another Redis key")]
    Open,
    #[error("sealing failed")]
    Seal,
}

impl SealKey {
    /// From standard base64 (e.g. `openssl rand -base64 32`).
    pub fn from_base64(text: &SecretString) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.expose_secret().trim())
            .map_err(|_| "not standard base64".to_owned())?;
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!("{} bytes; expected 32 (openssl rand -base64 32)", b.len())
        })?;
        Ok(Self(key))
    }

    /// The key's bytes, to derive other keys from it.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn cipher(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.0).expect("a 32-byte key fits AES-256"),
        )
    }

    /// A random nonce, then the ciphertext and tag. `context` (the Redis key) is authenticated.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Seal)?;
        let mut sealed = plaintext.to_vec();
        self.cipher()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| SealError::Seal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut buffer = ciphertext.to_vec();
        let plaintext = self
            .cipher()
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buffer)
            .map_err(|_| SealError::Open)?;
        Ok(plaintext.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SealKey {
        SealKey([byte; 32])
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let sealed = key(1).seal("ns:token", b"bearer-abc").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"bearer-abc"));
        assert_eq!(key(1).open("ns:token", &sealed).unwrap(), b"bearer-abc");
        assert_eq!(key(2).open("ns:token", &sealed), Err(SealError::Open));
        assert_eq!(key(1).open("ns:other", &sealed), Err(SealError::Open));
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(key(1).open("ns:token", &tampered), Err(SealError::Open));
        assert_eq!(key(1).open("ns:token", b"short"), Err(SealError::Open));
        // A fresh nonce every time.
        assert_ne!(sealed, key(1).seal("ns:token", b"bearer-abc").unwrap());
    }

    #[test]
    fn the_key_is_32_bytes_of_standard_base64() {
        let ok = SealKey::from_base64(&"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".into());
        assert!(ok.is_ok());
        assert!(!format!("{:?}", ok.unwrap()).contains("MDEy"));
        assert!(
            SealKey::from_base64(&"c2hvcnQ=".into())
                .unwrap_err()
                .contains("5 bytes")
        );
        assert!(SealKey::from_base64(&"not base64!".into()).is_err());
    }
}

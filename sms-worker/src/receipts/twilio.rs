//! Twilio's status callbacks: `application/x-www-form-urlencoded` POSTs signed with
//! `X-Twilio-Signature`, base64 HMAC-SHA1 keyed with the account's auth token over the full URL
//! Twilio called followed by every POST parameter, sorted by name, as name then value.

use aws_lc_rs::{constant_time, hmac};
use base64::Engine as _;

use super::{Receipt, Status};

/// Whether `signature` could be one at all: base64 of an HMAC-SHA1, 20 bytes. Checked before the
/// form is parsed, so that a caller without one costs the port no parsing and no HMAC (the body,
/// at most 16 KiB, has been read by then).
pub fn signature_is_well_formed(signature: &str) -> bool {
    decoded(signature).is_some()
}

fn decoded(signature: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .ok()
        .filter(|bytes| {
            bytes.len()
                == hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY
                    .digest_algorithm()
                    .output_len
        })
}

/// Whether `signature` signs `params` for one of the forms of `url` Twilio's own SDKs accept:
/// as configured, without its port, and with the scheme's default port made explicit.
pub fn signature_is_valid(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    signature: &str,
) -> bool {
    let Some(given) = decoded(signature) else {
        return false;
    };
    url_forms(url).iter().any(|form| {
        let expected = sign(auth_token, form, params);
        constant_time::verify_slices_are_equal(&expected, &given).is_ok()
    })
}

/// The HMAC of one URL form with the parameters.
fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> Vec<u8> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut message = url.to_owned();
    for (name, value) in sorted {
        message.push_str(name);
        message.push_str(value);
    }
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth_token.as_bytes());
    hmac::sign(&key, message.as_bytes()).as_ref().to_vec()
}

/// `url` as given, without an explicit port, and with the default port added.
fn url_forms(url: &str) -> Vec<String> {
    let mut forms = vec![url.to_owned()];
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return forms;
    };
    let mut without = parsed.clone();
    if without.set_port(None).is_ok() {
        forms.push(without.to_string());
    }
    if let Some(default) = parsed.port_or_known_default() {
        // Url drops a default port when it is set, so the explicit form is spliced in by hand.
        let host = parsed.host_str().unwrap_or_default();
        let bare = without.to_string();
        let prefix = format!("{}://{host}", parsed.scheme());
        if let Some(rest) = bare.strip_prefix(&prefix) {
            forms.push(format!("{prefix}:{default}{rest}"));
        }
    }
    forms.sort();
    forms.dedup();
    forms
}

/// A status callback's parameters as a receipt.
pub fn receipt(params: &[(String, String)], dedupe: Option<String>) -> Option<Receipt> {
    let field = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let message_id = field("MessageSid").or_else(|| field("SmsSid"))?.to_owned();
    let status = match field("MessageStatus").or_else(|| field("SmsStatus"))? {
        "accepted" | "scheduled" | "queued" | "sending" => Status::Queued,
        "sent" => Status::Sent,
        "delivered" | "read" => Status::Delivered,
        "undelivered" => Status::Undelivered,
        "failed" | "canceled" => Status::Failed,
        _ => return None,
    };
    let error_code = field("ErrorCode").and_then(|c| c.trim().parse().ok());
    let carrier_side = status.is_failure() && carrier_side(error_code);
    Some(Receipt {
        provider: "twilio",
        message_id,
        status,
        error_code,
        carrier_side,
        counts_against_route: carrier_side && error_code != Some(UNREACHABLE_HANDSET),
        dedupe,
    })
}

/// 30003, "unreachable destination handset": switched off or out of coverage, or trouble
/// downstream at the carrier. It may be either, so it earns the resend (the route may be at
/// fault) but no sample in the provider's breaker (a handset off may be, and whoever holds
/// switched-off SIMs must not be able to open a breaker for everyone with them).
const UNREACHABLE_HANDSET: i64 = 30003;

/// Whether a delivery error lies with the carrier or route, where another provider may get
/// through, rather than with the recipient. Twilio advises against logic on error codes, so an
/// unknown code counts as carrier-side: one resend is cheap insurance for a sign-in.
fn carrier_side(code: Option<i64>) -> bool {
    !matches!(
        code,
        // Blocked, unknown or landline destinations, unsubscribed or invalid numbers, and
        // Twilio's own pumping protection: another provider must not be used to get around them.
        Some(30004 | 30005 | 30006 | 21211 | 21610 | 21614 | 21635 | 30450)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Twilio's own SDK test vector (twilio-python, tests/unit/test_request_validator.py).
    #[test]
    fn validates_twilios_reference_signature() {
        let p = params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]);
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert!(signature_is_valid(
            "12345",
            url,
            &p,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        // Twilio signed the form with the explicit port; we were configured without it.
        assert!(signature_is_valid(
            "12345",
            url,
            &p,
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        ));
        // And the other way round.
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        assert!(signature_is_valid(
            "12345",
            with_port,
            &p,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        // A wrong key, a changed parameter, another URL: refused.
        assert!(!signature_is_valid(
            "54321",
            url,
            &p,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        let mut changed = p.clone();
        changed[2].1 = "9999".to_owned();
        assert!(!signature_is_valid(
            "12345",
            url,
            &changed,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!signature_is_valid(
            "12345",
            "https://evil.example/myapp.php?foo=1&bar=2",
            &p,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!signature_is_valid("12345", url, &p, "not base64!"));
    }

    #[test]
    fn repeated_parameters_are_signed_once_each_in_order() {
        let p = params(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]);
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert!(signature_is_valid(
            "12345",
            url,
            &p,
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        ));
    }

    #[test]
    fn reads_statuses_and_sorts_errors() {
        let r = receipt(
            &params(&[
                ("MessageSid", "SM1"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "30007"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(r.status, Status::Undelivered);
        assert!(r.carrier_side);
        let landline = receipt(
            &params(&[
                ("MessageSid", "SM1"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "30006"),
            ]),
            None,
        )
        .unwrap();
        assert!(!landline.carrier_side);
        let switched_off = receipt(
            &params(&[
                ("MessageSid", "SM1"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "30003"),
            ]),
            None,
        )
        .unwrap();
        assert!(
            switched_off.carrier_side,
            "resent: the route may be at fault"
        );
        assert!(!switched_off.counts_against_route, "no breaker sample");
        assert!(r.counts_against_route);
        let sent = receipt(
            &params(&[("MessageSid", "SM1"), ("MessageStatus", "sent")]),
            None,
        )
        .unwrap();
        assert_eq!((sent.status, sent.carrier_side), (Status::Sent, false));
        assert!(receipt(&params(&[("MessageStatus", "sent")]), None).is_none());
    }
}

//! Infobip's delivery reports: JSON `{"results": [...]}`, one report per message (a long message
//! split into parts still has one), batched. Infobip signs nothing sent to a per-message URL, so
//! the URL carries a secret only the workers know (see [`callback_secret`]).

use aws_lc_rs::hmac;
use serde::Deserialize;

use super::{Receipt, Status};
use crate::seal::SealKey;

#[derive(Deserialize)]
pub struct Reports {
    #[serde(default)]
    pub results: Vec<Report>,
}

#[derive(Deserialize)]
pub struct Report {
    #[serde(rename = "messageId")]
    pub message_id: Option<String>,
    pub status: Option<StatusObject>,
    pub error: Option<ErrorObject>,
}

#[derive(Deserialize)]
pub struct StatusObject {
    #[serde(rename = "groupName")]
    pub group_name: Option<String>,
    pub id: Option<i64>,
}

#[derive(Deserialize)]
pub struct ErrorObject {
    pub id: Option<i64>,
}

/// The secret of the callback URL every worker gives Infobip (and checks): derived from
/// `WORKER_SEAL_KEY`, so it is the same on every worker and changes with the key.
pub fn callback_secret(seal: &SealKey) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, seal.bytes());
    let tag = hmac::sign(&key, b"infobip delivery report callback");
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Infobip's status id of a message id it has taken before, in a send's answer or a report.
pub(crate) const REJECTED_DUPLICATE_MESSAGE_ID: i64 = 23;

impl Report {
    /// Whether this reports a repeat of the message id refused as a duplicate (status 23, in
    /// whichever group), not the message itself.
    pub fn is_duplicate_request(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.id == Some(REJECTED_DUPLICATE_MESSAGE_ID))
    }

    pub fn receipt(&self) -> Option<Receipt> {
        let message_id = self.message_id.clone()?;
        let status = self.status.as_ref()?;
        let status_id = status.id;
        if self.is_duplicate_request() {
            // A later request with this message id, refused as a duplicate (Infobip's
            // idempotency rejects it as it is processed, and reports that under the same id):
            // it says nothing of the message sent first. Taken as that message's failure, it
            // would earn a resend through the next provider (the very second SMS idempotency
            // is for), count against Infobip's route, and, as a final status, keep the real
            // outcome from being recorded.
            return None;
        }
        let status = match status.group_name.as_deref()?.to_ascii_uppercase().as_str() {
            "PENDING" | "ACCEPTED" => Status::Queued,
            // DELIVERED_TO_OPERATOR (2) is on its way; DELIVERED_TO_HANDSET (5) arrived.
            "DELIVERED" if status_id == Some(2) => Status::Sent,
            "DELIVERED" => Status::Delivered,
            "UNDELIVERABLE" | "EXPIRED" => Status::Undelivered,
            "REJECTED" => Status::Failed,
            _ => return None,
        };
        let error_id = self.error.as_ref().and_then(|e| e.id).filter(|id| *id != 0);
        let carrier_side = status.is_failure() && carrier_side(status_id, error_id);
        Some(Receipt {
            provider: "infobip",
            message_id,
            status,
            error_code: error_id.or(status_id.filter(|_| status.is_failure())),
            carrier_side,
            // A handset out of reach is the recipient's here already: no resend, no sample.
            counts_against_route: carrier_side,
            dedupe: None,
        })
    }
}

/// Whether the failure lies with the carrier or the route (another provider may get through).
/// Infobip's error *groups* do not say (many "handset" codes are network failures), so this
/// goes by id; unknown ids count as carrier-side.
fn carrier_side(status_id: Option<i64>, error_id: Option<i64>) -> bool {
    match error_id {
        // Unknown, invalid, barred or deactivated subscribers; blocklisted destinations;
        // opt-outs and anti-fraud or flooding blocks, which another provider must not bypass.
        Some(
            1 | 5 | 9 | 10 | 11 | 12 | 13 | 15 | 351 | 352 | 568 | 569 | 573 | 603 | 604 | 608
            | 629 | 2049 | 2050 | 2052 | 3041 | 4103 | 4104,
        ) => false,
        // The phone is off, out of coverage, busy or full: another provider reaches the same
        // handset no sooner.
        Some(6 | 7 | 27 | 31 | 33 | 256 | 581 | 628) => false,
        Some(_) => true,
        // No error object: by status, invalid or blocked destinations are the recipient's.
        None => !matches!(status_id, Some(8 | 10 | 14 | 20 | 52 | 87)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(json: &str) -> Receipt {
        let reports: Reports = serde_json::from_str(json).unwrap();
        reports.results[0].receipt().unwrap()
    }

    #[test]
    fn reads_infobip_reports() {
        let delivered = report(
            r#"{"results":[{"messageId":"m1","status":{"groupId":3,"groupName":"DELIVERED","id":5,"name":"DELIVERED_TO_HANDSET"},"error":{"groupId":0,"groupName":"OK","id":0,"name":"NO_ERROR","permanent":false},"messageCount":2}]}"#,
        );
        assert_eq!(delivered.status, Status::Delivered);
        assert_eq!(delivered.error_code, None);
        let to_operator =
            report(r#"{"results":[{"messageId":"m1","status":{"groupName":"DELIVERED","id":2}}]}"#);
        assert_eq!(to_operator.status, Status::Sent);
        let dropped = report(
            r#"{"results":[{"messageId":"m1","status":{"groupName":"UNDELIVERABLE","id":4},"error":{"id":2,"name":"EC_UNKNOWN_BASE_STATION"}}]}"#,
        );
        assert_eq!(
            (dropped.status, dropped.carrier_side),
            (Status::Undelivered, true)
        );
        let unknown_subscriber = report(
            r#"{"results":[{"messageId":"m1","status":{"groupName":"UNDELIVERABLE","id":9},"error":{"id":1}}]}"#,
        );
        assert!(!unknown_subscriber.carrier_side);
    }

    #[test]
    fn a_report_of_a_duplicate_request_is_no_receipt() {
        let reports: Reports = serde_json::from_str(
            r#"{"results":[{"messageId":"m1","status":{"groupId":5,"groupName":"REJECTED","id":23,"name":"REJECTED_DUPLICATE_MESSAGE_ID"},"error":{"groupId":0,"groupName":"OK","id":0,"name":"NO_ERROR","permanent":false}}]}"#,
        )
        .unwrap();
        assert_eq!(reports.results[0].receipt(), None);
        // By its id, in whichever group it comes.
        let reports: Reports = serde_json::from_str(
            r#"{"results":[{"messageId":"m1","status":{"groupName":"UNDELIVERABLE","id":23}}]}"#,
        )
        .unwrap();
        assert!(reports.results[0].is_duplicate_request());
        assert_eq!(reports.results[0].receipt(), None);
        // Other refusals are the message's.
        let refused = report(
            r#"{"results":[{"messageId":"m1","status":{"groupName":"REJECTED","id":14,"name":"REJECTED_DESTINATION"}}]}"#,
        );
        assert_eq!(refused.status, Status::Failed);
    }

    #[test]
    fn the_callback_secret_follows_the_seal_key() {
        let a =
            SealKey::from_base64(&"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".into()).unwrap();
        let b =
            SealKey::from_base64(&"ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=".into()).unwrap();
        assert_eq!(callback_secret(&a), callback_secret(&a));
        assert_ne!(callback_secret(&a), callback_secret(&b));
        assert_eq!(callback_secret(&a).len(), 32);
    }
}

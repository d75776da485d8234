//! `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`: checks what Twilio checks (the account
//! SID in the path, HTTP basic auth with the auth token or an API key, the form fields) and
//! answers as Twilio does: 201 with a message resource, or `{"code", "message", "more_info",
//! "status"}`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use time::OffsetDateTime;

use super::carrier::Accepted;
use super::store::{RecordedMessage, SmsProvider};
use super::{FakeSmsConfig, FakeState};

pub(super) async fn create_message(
    State(state): State<Arc<FakeState>>,
    Path(account_sid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&headers, &body);
    let received_at = OffsetDateTime::now_utc();
    let latency = Duration::from_millis(state.latency_ms(SmsProvider::Twilio));
    let answer = answer(&state, &account_sid, &headers, &form, received_at);
    if let (Some(sid), Some(url)) = (&answer.sid, &form.status_callback) {
        state.play_carrier(Accepted {
            provider: SmsProvider::Twilio,
            message_id: sid.clone(),
            to: form.to.clone().unwrap_or_default(),
            from: form.from.clone(),
            callback_url: url.clone(),
        });
    }
    let id = state.record_request(
        SmsProvider::Twilio,
        form.to.clone(),
        answer.status,
        answer.code,
        received_at,
    );
    // The message is accepted (and recorded) before the delay, as with Twilio: a client that
    // gives up waiting does not un-send it.
    if latency > Duration::ZERO {
        tokio::time::sleep(latency).await;
    }
    state.mark_responded(id);
    let (padding, trickles) = state.answer_padding(SmsProvider::Twilio);
    super::faults::pad_answer(answer.response, padding, trickles).await
}

struct Answer {
    response: Response,
    status: u16,
    /// The Twilio error code, for an error.
    code: Option<i64>,
    /// The message's SID, when it was accepted.
    sid: Option<String>,
}

impl Answer {
    fn error(status: u16, code: i64, message: &str, retry_after: Option<u64>) -> Self {
        Self {
            response: twilio_error(status, code, message, retry_after),
            status,
            code: Some(code),
            sid: None,
        }
    }
}

/// Decides the answer, and records the message when it is accepted.
fn answer(
    state: &FakeState,
    account_sid: &str,
    headers: &HeaderMap,
    form: &Form,
    received_at: OffsetDateTime,
) -> Answer {
    let config = &state.config;
    let error = |status, code, message: &str| Answer::error(status, code, message, None);

    if !is_sid(account_sid, "AC") {
        let message = format!(
            "The requested resource /2010-04-01/Accounts/{account_sid}/Messages.json was not found"
        );
        return error(404, 20404, &message);
    }
    if !authorized(config, headers) || account_sid != config.account_sid {
        return error(401, 20003, "Authenticate");
    }

    let Some(to) = form.to.clone() else {
        return error(400, 21604, "A 'To' phone number is required.");
    };
    if !is_e164(&to) {
        return error(400, 21211, &format!("Invalid 'To' Phone Number: {to}"));
    }
    if form.from.is_none() && form.messaging_service_sid.is_none() {
        return error(400, 21603, "A 'From' phone number is required.");
    }
    if let Some(sid) = &form.messaging_service_sid
        && !is_sid(sid, "MG")
    {
        return error(
            400,
            21701,
            &format!("The Messaging Service Sid {sid} is invalid."),
        );
    }
    let Some(body) = form.body.clone() else {
        return error(400, 21602, "Message body is required.");
    };
    if body.chars().count() > 1_600 {
        return error(
            400,
            21617,
            "The concatenated message body exceeds the 1600 character limit.",
        );
    }
    let validity_period = match &form.validity_period {
        None => None,
        Some(value) => match value.parse::<u32>() {
            Ok(v) if (1..=36_000).contains(&v) => Some(v),
            _ => {
                return error(
                    400,
                    21624,
                    "Validity period can only be set to integers between 1 and 36,000 seconds.",
                );
            }
        },
    };

    if let Some(injected) = state.take_injected(SmsProvider::Twilio, &to) {
        let code = injected
            .code
            .unwrap_or_else(|| default_code(injected.status));
        let message = injected
            .message
            .clone()
            .unwrap_or_else(|| default_message(injected.status, code).to_owned());
        return Answer::error(injected.status, code, &message, injected.retry_after_secs);
    }

    let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
    state.record_message(RecordedMessage {
        provider: SmsProvider::Twilio,
        sid: sid.clone(),
        to: to.clone(),
        from: form.from.clone(),
        messaging_service_sid: form.messaging_service_sid.clone(),
        body: body.clone(),
        validity_period,
        callback_url: form.status_callback.clone(),
        received_at,
    });
    let date = received_at
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let uri = format!("/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json");
    let resource = json!({
        "account_sid": account_sid,
        "api_version": "2010-04-01",
        "body": body,
        "date_created": date,
        "date_sent": null,
        "date_updated": date,
        "direction": "outbound-api",
        "error_code": null,
        "error_message": null,
        "from": form.from,
        "messaging_service_sid": form.messaging_service_sid,
        "num_media": "0",
        "num_segments": segments(&body).to_string(),
        "price": null,
        "price_unit": "USD",
        "sid": &sid,
        // With a Messaging Service, Twilio first answers "accepted" and picks a sender later.
        "status": if form.messaging_service_sid.is_some() { "accepted" } else { "queued" },
        "subresource_uris": {"media": format!("/2010-04-01/Accounts/{account_sid}/Messages/{sid}/Media.json")},
        "to": to,
        "uri": uri,
    });
    Answer {
        response: (StatusCode::CREATED, axum::Json(resource)).into_response(),
        status: 201,
        code: None,
        sid: Some(sid),
    }
}

/// A Twilio-shaped error answer.
fn twilio_error(status: u16, code: i64, message: &str, retry_after: Option<u64>) -> Response {
    let status_code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status,
    });
    let mut response = (status_code, axum::Json(body)).into_response();
    if let Some(secs) = retry_after
        && let Ok(value) = secs.to_string().parse()
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    if status == 401
        && let Ok(value) = "Basic realm=\"Twilio API\"".parse()
    {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn default_code(status: u16) -> i64 {
    match status {
        401 => 20003,
        404 => 20404,
        429 => 20429,
        503 => 20503,
        s if s >= 500 => 20500,
        _ => 21211,
    }
}

/// Twilio's text for the errors tests inject most, else a generic one by status.
fn default_message(status: u16, code: i64) -> &'static str {
    match code {
        21211 => return "Invalid 'To' Phone Number",
        21610 => return "Attempt to send to unsubscribed recipient",
        21614 => return "'To' number is not a valid mobile number",
        _ => {}
    }
    match status {
        401 => "Authenticate",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        s if s >= 500 => "Internal Server Error",
        _ => "Injected error",
    }
}

/// The form fields of a CreateMessage request.
#[derive(Default)]
struct Form {
    to: Option<String>,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    body: Option<String>,
    validity_period: Option<String>,
    status_callback: Option<String>,
}

fn parse_form(headers: &HeaderMap, body: &[u8]) -> Form {
    // Like Twilio, a body in another encoding is simply a request without fields.
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Form::default();
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let mut form = Form::default();
    for (name, value) in pairs {
        let value = Some(value).filter(|v| !v.is_empty());
        match name.as_str() {
            "To" => form.to = value,
            "From" => form.from = value,
            "MessagingServiceSid" => form.messaging_service_sid = value,
            "Body" => form.body = value,
            "ValidityPeriod" => form.validity_period = value,
            "StatusCallback" => form.status_callback = value,
            _ => {}
        }
    }
    form
}

fn authorized(config: &FakeSmsConfig, headers: &HeaderMap) -> bool {
    let Some(credentials) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| decode_base64(b64.trim()))
    else {
        return false;
    };
    let Some((user, password)) = credentials.split_once(':') else {
        return false;
    };
    (user == config.account_sid && password == config.auth_token)
        || (user == config.api_key_sid && password == config.api_key_secret)
}

fn decode_base64(input: &str) -> Option<String> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits: u32 = 0;
    let mut count = 0;
    let mut out = Vec::new();
    for byte in input.bytes().filter(|b| *b != b'=') {
        let value = u32::try_from(ALPHABET.iter().position(|c| *c == byte)?).ok()?;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push(u8::try_from((bits >> count) & 0xff).ok()?);
        }
    }
    String::from_utf8(out).ok()
}

fn is_e164(number: &str) -> bool {
    number.strip_prefix('+').is_some_and(|digits| {
        (7..=15).contains(&digits.len())
            && digits.chars().all(|c| c.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

fn is_sid(value: &str, prefix: &str) -> bool {
    value.len() == 34
        && value.starts_with(prefix)
        && value[2..].chars().all(|c| c.is_ascii_hexdigit())
}

/// GSM-7 fits 160 characters in one SMS (153 per part when split); anything else is UCS-2
/// (70, 67 per part). Close enough for a fake.
fn segments(body: &str) -> usize {
    let chars = body.chars().count();
    let (single, part) = if body.is_ascii() {
        (160, 153)
    } else {
        (70, 67)
    };
    if chars <= single {
        1
    } else {
        chars.div_ceil(part)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DEFAULT_ACCOUNT_SID, DEFAULT_API_KEY_SID};
    use super::*;

    #[test]
    fn decodes_basic_auth() {
        // "user:pass"
        assert_eq!(decode_base64("dXNlcjpwYXNz").as_deref(), Some("user:pass"));
        assert_eq!(decode_base64("!!"), None);
    }

    #[test]
    fn checks_numbers_and_sids() {
        assert!(is_e164("+14155550100"));
        assert!(!is_e164("14155550100"));
        assert!(!is_e164("+1415"));
        assert!(is_sid(DEFAULT_ACCOUNT_SID, "AC"));
        assert!(is_sid(DEFAULT_API_KEY_SID, "SK"));
        assert_eq!(segments("hi"), 1);
        assert_eq!(segments(&"a".repeat(161)), 2);
    }
}

//! The public listener for delivery receipts (`CALLBACK_ADDR`): `POST /v1/callbacks/twilio` and
//! `POST /v1/callbacks/infobip`. Anyone on the internet can reach it, so nothing is believed
//! before it is authenticated: Twilio's callbacks by their `X-Twilio-Signature`, Infobip's by the
//! secret only our workers put in the URL they gave Infobip. A request that fails the check is
//! answered 403 and changes nothing; one that passes is applied by [`super::resend::apply`], on
//! a task of its own ([`ReceiptTasks`]).
//!
//! Answers: 204 when applied (or harmlessly ignored), 403 forged, 400 unreadable, 415 not the
//! provider's content type, 503 when Redis is away or every place is still applying receipts (the
//! provider sends it again later), all errors as `application/problem+json`.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::constant_time;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use shared::telemetry::throttle::Throttle;
use tower_http::timeout::TimeoutLayer;
use tracing::{debug, warn};

use super::context::Context;
use super::receipt_tasks::{Busy, ReceiptTasks};
use crate::config::ProviderConfig;
use crate::metrics as m;
use crate::receipts::store::ReceiptStore;
use crate::receipts::{Receipt, infobip, twilio};

/// Infobip batches up to 100 reports.
const BODY_LIMIT: usize = 256 * 1024;
/// Twilio's callbacks are a few hundred bytes: a larger body is refused before anyone parses or
/// signs it.
const TWILIO_BODY_LIMIT: usize = 16 * 1024;
/// At most one warning of forged callbacks per provider in this long.
const FORGED_WARNINGS_EVERY: Duration = Duration::from_secs(10);
/// A request that takes longer than this (a slow client) is cut off.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) const TWILIO_PATH: &str = "/v1/callbacks/twilio";
pub(crate) const INFOBIP_PATH: &str = "/v1/callbacks/infobip";

/// What the handlers need: the worker, and how to authenticate each provider.
struct Callbacks {
    context: Arc<Context>,
    store: ReceiptStore,
    tasks: ReceiptTasks,
    /// The URL Twilio calls, as we gave it: the signature covers it.
    twilio_url: String,
    twilio_auth_token: Option<SecretString>,
    infobip_secret: Option<String>,
    /// Warnings of forged callbacks, one throttle per provider: anyone can send them, as fast as
    /// they like, and a line each would crowd out the log's real warnings (a flood of forged
    /// Twilio callbacks must not hide a real Infobip secret gone wrong either).
    /// `sms_callbacks_rejected_total` counts them all.
    forged_twilio_warnings: Throttle,
    forged_infobip_warnings: Throttle,
}

/// The callback routes, or `None` when receipts are off. Receipts are applied on `tasks`.
pub(crate) fn router(context: Arc<Context>, tasks: ReceiptTasks) -> Option<Router> {
    let config = context.config.callbacks.as_ref()?;
    let store = context.receipts.clone()?;
    let twilio_auth_token = context.config.providers.iter().find_map(|p| match p {
        ProviderConfig::Twilio(twilio) => twilio.auth_token.clone(),
        _ => None,
    });
    let infobip_secret = context
        .config
        .seal_key
        .as_ref()
        .map(infobip::callback_secret);
    let callbacks = Arc::new(Callbacks {
        twilio_url: format!("{}{TWILIO_PATH}", config.base_url),
        context: context.clone(),
        store,
        tasks,
        twilio_auth_token,
        infobip_secret,
        forged_twilio_warnings: Throttle::new(FORGED_WARNINGS_EVERY),
        forged_infobip_warnings: Throttle::new(FORGED_WARNINGS_EVERY),
    });
    Some(
        Router::new()
            .route(
                TWILIO_PATH,
                post(twilio_callback).layer(DefaultBodyLimit::max(TWILIO_BODY_LIMIT)),
            )
            .route(INFOBIP_PATH, post(infobip_callback))
            .fallback(|| async { problem(StatusCode::NOT_FOUND, "not_found", "No such callback.") })
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                REQUEST_TIMEOUT,
            ))
            .with_state(callbacks),
    )
}

async fn twilio_callback(
    State(callbacks): State<Arc<Callbacks>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reject = |reason| rejected("twilio", reason);
    if !content_type_is(&headers, "application/x-www-form-urlencoded") {
        reject("malformed");
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Twilio posts application/x-www-form-urlencoded.",
        );
    }
    let Some(auth_token) = &callbacks.twilio_auth_token else {
        reject("signature");
        return problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Twilio is not configured here.",
        );
    };
    let signature = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // A caller with no signature of the right shape costs no parsing and no HMAC (the port is
    // public).
    if !twilio::signature_is_well_formed(signature) {
        return forged_twilio_callback(&callbacks, reject);
    }
    let Ok(params) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) else {
        reject("malformed");
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The form is unreadable.",
        );
    };
    // Twilio signs the exact URL it called, query included.
    let url = match uri.query() {
        Some(query) => format!("{}?{query}", callbacks.twilio_url),
        None => callbacks.twilio_url.clone(),
    };
    if !twilio::signature_is_valid(auth_token.expose_secret(), &url, &params, signature) {
        return forged_twilio_callback(&callbacks, reject);
    }
    let dedupe = headers
        .get("i-twilio-idempotency-token")
        .and_then(|v| v.to_str().ok())
        .map(|token| token.chars().take(128).collect());
    let Some(receipt) = twilio::receipt(&params, dedupe) else {
        // A status we do not track (e.g. `receiving`): nothing to do, and nothing to resend.
        debug!("ignored a Twilio callback without a status we track");
        return StatusCode::NO_CONTENT.into_response();
    };
    applied(callbacks.apply("twilio", vec![receipt]).await)
}

async fn infobip_callback(
    State(callbacks): State<Arc<Callbacks>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let reject = |reason| rejected("infobip", reason);
    let given = uri.query().and_then(|query| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(query)
            .ok()?
            .into_iter()
            .find_map(|(name, value)| (name == "secret").then_some(value))
    });
    let authentic = match (&callbacks.infobip_secret, given) {
        (Some(expected), Some(given)) => {
            constant_time::verify_slices_are_equal(expected.as_bytes(), given.as_bytes()).is_ok()
        }
        _ => false,
    };
    if !authentic {
        reject("secret");
        if let Some(held_back) = callbacks.forged_infobip_warnings.let_through() {
            warn!(
                held_back,
                "refused an Infobip delivery report without the callback secret (one such warning per 10 s: held_back counts the others)"
            );
        }
        return problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "The callback secret is missing or wrong.",
        );
    }
    if !content_type_is(&headers, "application/json") {
        reject("malformed");
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Delivery reports are expected as application/json.",
        );
    }
    // Read only now, once the caller is known: an unauthenticated one is answered before its
    // body is read, so a flood of large bodies holds no memory.
    let Ok(body) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        reject("malformed");
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "The delivery reports are larger than a batch can be, or were cut off.",
        );
    };
    let Ok(reports) = serde_json::from_slice::<infobip::Reports>(&body) else {
        reject("malformed");
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The body is not Infobip delivery reports.",
        );
    };
    let repeats_refused = reports
        .results
        .iter()
        .filter(|r| r.is_duplicate_request())
        .count();
    let receipts = reports
        .results
        .iter()
        .filter_map(infobip::Report::receipt)
        .collect();
    // One failed report fails the batch, so Infobip sends it again; the ones applied already
    // are no-ops then.
    let outcome = callbacks.apply("infobip", receipts).await;
    if repeats_refused > 0 && matches!(outcome, Ok(Ok(()))) {
        // Once the batch is taken (a batch refused comes again): a sign that Infobip's
        // idempotency is on, which INFOBIP_IDEMPOTENT counts on.
        metrics::counter!(m::RECEIPTS_IGNORED, "provider" => "infobip", "reason" => "duplicate_request")
            .increment(u64::try_from(repeats_refused).unwrap_or(u64::MAX));
    }
    applied(outcome)
}

impl Callbacks {
    async fn apply(
        &self,
        provider: &'static str,
        receipts: Vec<Receipt>,
    ) -> Result<redis::RedisResult<()>, Busy> {
        let outcome = self.tasks.apply(&self.context, &self.store, receipts).await;
        if outcome.is_err() {
            rejected(provider, "busy");
        }
        outcome
    }
}

/// The answer to a Twilio callback without a signature that matches, counted and logged.
fn forged_twilio_callback(callbacks: &Callbacks, reject: impl Fn(&'static str)) -> Response {
    reject("signature");
    if let Some(held_back) = callbacks.forged_twilio_warnings.let_through() {
        warn!(
            held_back,
            "refused a Twilio callback with a missing or wrong X-Twilio-Signature (one such warning per 10 s: held_back counts the others)"
        );
    }
    problem(
        StatusCode::FORBIDDEN,
        "forbidden",
        "The X-Twilio-Signature does not match.",
    )
}

fn rejected(provider: &'static str, reason: &'static str) {
    metrics::counter!(m::CALLBACKS_REJECTED, "provider" => provider, "reason" => reason)
        .increment(1);
}

fn applied(outcome: Result<redis::RedisResult<()>, Busy>) -> Response {
    match outcome {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Err(Busy) => {
            warn!(
                "every place is still applying receipts; refused one, the provider will send it again"
            );
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "Too many receipts are being applied; send it again later.",
            )
        }
        // Logged where it happened: the task applying it.
        Ok(Err(_)) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "The receipt could not be recorded; send it again later.",
        ),
    }
}

fn content_type_is(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

/// RFC 9457, shaped as the api's errors are.
fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    let body = json!({
        "type": format!("urn:otp-auth:problem:{code}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

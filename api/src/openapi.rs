//! The OpenAPI document, generated from the handlers' annotations.
//!
//! Handlers describe only what is theirs: their success bodies and the errors they can answer,
//! with a sentence each. [`ProblemResponses`] then gives every error response the one problem+json
//! body, every route that reads JSON the answers any JSON body can get (400, 413, 415), and every
//! route the answers any request can get (500, 503), so the document stays true without repeating
//! those on every route. [`document`] then writes this server's own rules into it: the OTP's
//! length and whether numbers must be E.164 depend on the configuration.

use utoipa::openapi::path::Operation;
use utoipa::openapi::response::Response;
use utoipa::openapi::schema::Schema;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::config::ApiConfig;
use crate::error::{PROBLEM_CONTENT_TYPE, ProblemBody};
use crate::routes;

/// E.164: `+`, a country code and subscriber number, 7 to 15 digits in all.
pub const E164_PATTERN: &str = r"^\+[1-9][0-9]{6,14}$";

#[derive(OpenApi)]
#[openapi(
    info(title = "otp-auth API", description = "Phone-number sign-in with one-time passwords sent by SMS. Errors are RFC 9457 problem+json with a stable `code`."),
    paths(
        routes::otp::request_otp,
        routes::otp::verify_otp,
        routes::otp::signup,
        routes::session::refresh,
        routes::session::logout,
        routes::session::me,
        routes::health::healthz,
        routes::health::readyz,
        routes::health::metrics,
    ),
    components(schemas(ProblemBody)),
    modifiers(&BearerAuth, &ProblemResponses),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

struct ProblemResponses;

/// What any route with a JSON body can answer before its handler runs.
const JSON_BODY_ERRORS: [(&str, &str); 3] = [
    (
        "400",
        "`invalid_request`: malformed JSON, or a missing or wrong-typed field",
    ),
    ("413", "`payload_too_large`: the body is over 16 KiB"),
    ("415", "`unsupported_media_type`: the body is not JSON"),
];

/// What any route can answer.
const ANY_ROUTE_ERRORS: [(&str, &str); 2] = [
    (
        "500",
        "`internal`: an unexpected error, logged with the request id",
    ),
    (
        "503",
        "`unavailable`: a dependency is down, or the request took longer than 10 s",
    ),
];

impl Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for path in openapi.paths.paths.values_mut() {
            let operations = [
                &mut path.get,
                &mut path.post,
                &mut path.put,
                &mut path.patch,
                &mut path.delete,
            ];
            for operation in operations.into_iter().flatten() {
                describe_errors(operation);
            }
        }
    }
}

fn describe_errors(operation: &mut Operation) {
    let responses = &mut operation.responses.responses;
    if operation.request_body.is_some() {
        for (status, description) in JSON_BODY_ERRORS {
            responses
                .entry(status.to_owned())
                .or_insert_with(|| RefOr::T(Response::new(description)));
        }
    }
    for (status, description) in ANY_ROUTE_ERRORS {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(Response::new(description)));
    }
    for (status, response) in responses.iter_mut() {
        let is_error = status.starts_with('4') || status.starts_with('5');
        if let (true, RefOr::T(response)) = (is_error, response) {
            let schema = Ref::from_schema_name(ProblemBody::name());
            response.content.clear();
            response.content.insert(
                PROBLEM_CONTENT_TYPE.to_owned(),
                Content::new(Some(schema)).into(),
            );
        }
    }
}

/// The document for this server: [`ApiDoc`] with the patterns its configuration enforces.
pub fn document(config: &ApiConfig) -> utoipa::openapi::OpenApi {
    let mut openapi = ApiDoc::openapi();
    let otp = format!("^[0-9]{{{}}}$", config.otp.length);
    // With a DEFAULT_REGION, national numbers are accepted too: no pattern then.
    let phone = config
        .phone
        .default_region
        .is_none()
        .then_some(E164_PATTERN);
    if let Some(components) = openapi.components.as_mut() {
        for schema in components.schemas.values_mut() {
            let RefOr::T(Schema::Object(object)) = schema else {
                continue;
            };
            for (name, property) in &mut object.properties {
                let RefOr::T(Schema::Object(property)) = property else {
                    continue;
                };
                match name.as_str() {
                    "otp" => property.pattern = Some(otp.clone()),
                    "phone_number" if property.pattern.is_some() || phone.is_none() => {
                        property.pattern = phone.map(str::to_owned);
                    }
                    _ => {}
                }
            }
        }
    }
    openapi
}

//! `fake-sms`: a stand-in for the SMS providers (Twilio's Messages API and Infobip's SMS API v3)
//! for tests, benchmarks and the local stack.
//!
//! - `twilio`: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, answered as Twilio does.
//! - `infobip`: `POST /auth/1/oauth2/token` and `POST /sms/3/messages`, answered as Infobip does;
//!   `/control/infobip` sets the token endpoint's lifetime, rate limit and invalidation.
//! - `inbox`: `GET /messages?to=` lists the accepted messages as JSON; `GET /requests?to=`
//!   lists every request with the status it got; `DELETE /messages` forgets both; `GET /` is an
//!   HTML inbox where a developer reads the codes.
//! - `faults`: `GET|POST|DELETE /control/faults` reads, sets or clears fault injection:
//!   latency, a queue of next responses (e.g. 503, or 429 with `Retry-After`), an answer for
//!   every request, and per-number answers (e.g. Twilio error 21610 for one `To`).
//! - `carrier`: what becomes of accepted messages that asked for receipts: Twilio's signed status
//!   callbacks and Infobip's delivery reports, with outcomes by number prefix, delays,
//!   duplicates and reordering (`/control/carrier`, `/control/carrier/callbacks`).
//! - `store`: what it remembers, shared by the handlers and an in-process [`FakeSms`].
//!
//! Configuration (environment, all optional): `FAKE_SMS_ADDR` (`127.0.0.1:9099`),
//! `FAKE_SMS_ACCOUNT_SID` ([`DEFAULT_ACCOUNT_SID`]), `FAKE_SMS_AUTH_TOKEN`
//! ([`DEFAULT_AUTH_TOKEN`]), `FAKE_SMS_API_KEY_SID` ([`DEFAULT_API_KEY_SID`]),
//! `FAKE_SMS_API_KEY_SECRET` ([`DEFAULT_API_KEY_SECRET`]), `FAKE_SMS_INFOBIP_CLIENT_ID`,
//! `FAKE_SMS_INFOBIP_CLIENT_SECRET`, `FAKE_SMS_INFOBIP_API_KEY` (the `DEFAULT_INFOBIP_*` values).

mod carrier;
mod faults;
mod inbox;
mod infobip;
mod store;
mod twilio;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use shared::{ConfigError, Env};

pub use carrier::{Carrier, Outcome, SentCallback, twilio_signature};
pub use faults::{Faults, InjectedResponse, Rule};
pub use infobip::{TokenCall, TokenPolicy};
pub use store::{FakeState, RecordedMessage, RecordedRequest, SmsProvider};

pub const DEFAULT_ADDR: &str = "127.0.0.1:9099";
/// Test credentials, not secrets: they only open this fake.
pub const DEFAULT_ACCOUNT_SID: &str = "AC00000000000000000000000000fa4e00";
pub const DEFAULT_AUTH_TOKEN: &str = "fake-sms-auth-token";
pub const DEFAULT_API_KEY_SID: &str = "SK00000000000000000000000000fa4e00";
pub const DEFAULT_API_KEY_SECRET: &str = "fake-sms-api-key-secret";
pub const DEFAULT_INFOBIP_CLIENT_ID: &str = "fake-sms-infobip";
pub const DEFAULT_INFOBIP_CLIENT_SECRET: &str = "fake-sms-infobip-secret";
pub const DEFAULT_INFOBIP_API_KEY: &str = "fake-sms-infobip-api-key";

#[derive(Debug, Clone)]
pub struct FakeSmsConfig {
    pub addr: SocketAddr,
    pub account_sid: String,
    pub auth_token: String,
    pub api_key_sid: String,
    pub api_key_secret: String,
    pub infobip_client_id: String,
    pub infobip_client_secret: String,
    pub infobip_api_key: String,
}

impl Default for FakeSmsConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR.parse().expect("a literal address"),
            account_sid: DEFAULT_ACCOUNT_SID.to_owned(),
            auth_token: DEFAULT_AUTH_TOKEN.to_owned(),
            api_key_sid: DEFAULT_API_KEY_SID.to_owned(),
            api_key_secret: DEFAULT_API_KEY_SECRET.to_owned(),
            infobip_client_id: DEFAULT_INFOBIP_CLIENT_ID.to_owned(),
            infobip_client_secret: DEFAULT_INFOBIP_CLIENT_SECRET.to_owned(),
            infobip_api_key: DEFAULT_INFOBIP_API_KEY.to_owned(),
        }
    }
}

impl FakeSmsConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            addr: env.parse("FAKE_SMS_ADDR", defaults.addr)?,
            account_sid: env.string("FAKE_SMS_ACCOUNT_SID", DEFAULT_ACCOUNT_SID),
            auth_token: env.string("FAKE_SMS_AUTH_TOKEN", DEFAULT_AUTH_TOKEN),
            api_key_sid: env.string("FAKE_SMS_API_KEY_SID", DEFAULT_API_KEY_SID),
            api_key_secret: env.string("FAKE_SMS_API_KEY_SECRET", DEFAULT_API_KEY_SECRET),
            infobip_client_id: env.string("FAKE_SMS_INFOBIP_CLIENT_ID", DEFAULT_INFOBIP_CLIENT_ID),
            infobip_client_secret: env.string(
                "FAKE_SMS_INFOBIP_CLIENT_SECRET",
                DEFAULT_INFOBIP_CLIENT_SECRET,
            ),
            infobip_api_key: env.string("FAKE_SMS_INFOBIP_API_KEY", DEFAULT_INFOBIP_API_KEY),
        })
    }

    /// Port 0 on localhost: what tests use.
    pub fn ephemeral() -> Self {
        Self {
            addr: "127.0.0.1:0".parse().expect("a literal address"),
            ..Self::default()
        }
    }
}

/// A fake-sms server running in this process (real HTTP on a real port).
pub struct FakeSms {
    addr: SocketAddr,
    state: Arc<FakeState>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeSms {
    pub async fn start(config: FakeSmsConfig) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        let state = FakeState::new(config);
        let app = router(state.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake-sms stopped");
            }
        });
        Ok(Self {
            addr,
            state,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What `TWILIO_BASE_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> &Arc<FakeState> {
        &self.state
    }

    pub fn config(&self) -> &FakeSmsConfig {
        &self.state.config
    }
}

impl std::ops::Deref for FakeSms {
    type Target = FakeState;
    fn deref(&self) -> &FakeState {
        &self.state
    }
}

impl Drop for FakeSms {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub fn router(state: Arc<FakeState>) -> Router {
    Router::new()
        .route("/", get(inbox::page))
        .route(
            "/2010-04-01/Accounts/{account_sid}/Messages.json",
            post(twilio::create_message),
        )
        .route("/messages", get(inbox::list_messages).delete(inbox::clear))
        .route("/messages/count", get(inbox::count_messages))
        .route("/requests", get(inbox::list_requests))
        .route("/auth/1/oauth2/token", post(infobip::issue_token))
        .route("/sms/3/messages", post(infobip::send_messages))
        .route(
            "/control/faults",
            get(faults::get_faults)
                .post(faults::set_faults)
                .delete(faults::reset_faults),
        )
        .route(
            "/control/faults/{provider}",
            get(faults::get_faults)
                .post(faults::set_faults)
                .delete(faults::reset_faults),
        )
        .route(
            "/control/infobip",
            get(infobip::get_policy).post(infobip::set_policy),
        )
        .route(
            "/control/carrier",
            get(carrier::get_carrier)
                .post(carrier::set_carrier)
                .delete(carrier::reset_carrier),
        )
        .route("/control/carrier/callbacks", get(carrier::list_callbacks))
        .route(
            "/control/infobip/token-calls",
            get(infobip::list_token_calls),
        )
        .with_state(state)
}

/// Serves until `shutdown` resolves: what the `fake-sms` binary runs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<FakeState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

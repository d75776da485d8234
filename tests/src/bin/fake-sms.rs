//! `fake-sms`: a local Twilio Messages API with an inbox at `/`. See `tests::fake_sms` for the
//! endpoints and the environment variables.

use std::process::ExitCode;

use shared::{Env, LogFormat};
use tests::fake_sms::{FakeSmsConfig, FakeState, serve};

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::from_process();
    let config = match FakeSmsConfig::from_env(&env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let format = env
        .parse("LOG_FORMAT", LogFormat::Pretty)
        .unwrap_or(LogFormat::Pretty);
    let _logs = shared::telemetry::init_logging(format);
    let listener = match tokio::net::TcpListener::bind(config.addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on FAKE_SMS_ADDR {}: {e}", config.addr);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .map_or_else(|_| config.addr.to_string(), |a| a.to_string());
    // 0.0.0.0 (or [::]) is where it listens, not an address to send requests to: the hint names
    // loopback instead; other hosts and containers use this host's name with the same port.
    let url_addr = listener.local_addr().map_or_else(
        |_| config.addr.to_string(),
        |mut a| {
            if a.ip().is_unspecified() {
                a.set_ip(if a.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            a.to_string()
        },
    );
    tracing::info!(
        %addr,
        account_sid = %config.account_sid,
        api_key_sid = %config.api_key_sid,
        "fake-sms listening: set TWILIO_BASE_URL=http://{url_addr} (from another host or container, its name instead of the IP) and the same account SID and token (FAKE_SMS_AUTH_TOKEN); inbox at http://{url_addr}/"
    );
    let state = FakeState::new(config);
    match serve(listener, state, shared::telemetry::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-sms failed: {e}");
            ExitCode::FAILURE
        }
    }
}

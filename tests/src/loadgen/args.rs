//! The command line.

use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Request,
    Signup,
    Verify,
    Me,
    Drain,
    Failover,
    Receipts,
    Resend,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", about = "Load generator for the OTP auth stack")]
pub struct Args {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Requests (or flows) in flight at once.
    #[arg(short, long, default_value_t = 64)]
    pub concurrency: usize,
    /// Run for this many seconds (ignored when --count is given).
    #[arg(short, long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many operations (for `drain`: events to publish).
    #[arg(short = 'n', long)]
    pub count: Option<u64>,
    /// Cap the offered load (operations per second); 0: as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api_url: String,
    #[arg(long, default_value = "http://127.0.0.1:9099")]
    pub sms_url: String,
    /// Latency fake-sms adds to every send, set for the run and reset after it.
    #[arg(long)]
    pub sms_latency_ms: Option<u64>,
    /// `drain` publishes here.
    #[arg(long, default_value = shared::config::DEFAULT_AMQP_URL)]
    pub amqp_url: String,
    /// `drain`: the NAMESPACE of the workers.
    #[arg(long, default_value = shared::config::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// `receipts`: the worker's public callback listener (`CALLBACK_BASE_URL`).
    #[arg(long, default_value = "http://127.0.0.1:9092")]
    pub callback_url: String,
    /// `receipts`: the auth token fake-sms (and the worker) sign Twilio callbacks with.
    #[arg(long, default_value = crate::fake_sms::DEFAULT_AUTH_TOKEN)]
    pub twilio_auth_token: String,
    /// `me`: sign-ins whose tokens are used.
    #[arg(long, default_value_t = 32)]
    pub users: usize,
    /// Measure what the run costs: CPU microseconds per accepted operation of every api,
    /// sms-worker, fake-sms, RabbitMQ, Redis and PostgreSQL process on this machine (from
    /// /proc), until the last SMS is in.
    #[arg(long)]
    pub cost: bool,
    /// Soak: print the resident memory of the stack's processes every this many seconds.
    #[arg(long, value_name = "SECS")]
    pub rss_every: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// `request`, `signup`: where the run's numbers start (random by default). Runs whose
    /// numbers must not meet (the drill's phases) give ranges apart.
    #[arg(long)]
    pub phone_offset: Option<u64>,
}

impl Args {
    /// Arguments for a scenario with defaults, for tests.
    pub fn for_scenario(scenario: Scenario) -> Self {
        let name = match scenario {
            Scenario::Request => "request",
            Scenario::Signup => "signup",
            Scenario::Verify => "verify",
            Scenario::Me => "me",
            Scenario::Drain => "drain",
            Scenario::Failover => "failover",
            Scenario::Receipts => "receipts",
            Scenario::Resend => "resend",
        };
        Self::parse_from(["loadgen", name])
    }
}

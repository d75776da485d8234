//! Load generator for the running stack: api, sms-worker and fake-sms.
//!
//! Scenarios:
//! - `request`: `POST /v1/otp` for distinct phone numbers.
//! - `signup`: the whole flow: request, read the code from fake-sms, verify, `GET /v1/me`.
//! - `verify`: `POST /v1/otp/verify` alone, with codes requested and read from fake-sms before
//!   the clock starts (`--count` codes, 10,000 by default).
//! - `me`: authenticated reads with tokens from a few sign-ins.
//! - `drain`: publish N events straight to RabbitMQ, then time how fast the workers deliver them
//!   to fake-sms (with `--sms-latency-ms` injected there).
//! - `failover`: steady sends while fake-sms's Twilio fails for the middle third of the run:
//!   how fast the workers move to Infobip and back.
//! - `receipts`: signed Twilio status callbacks posted to a worker's `CALLBACK_ADDR`: how many
//!   one worker absorbs.
//! - `resend`: codes requested through the api whose Twilio carrier drops them: the delay from
//!   the `undelivered` callback to the resend through Infobip.
//!
//! The api must allow the load: run it with a high `OTP_PER_IP_PER_HOUR` (every request comes
//! from 127.0.0.1).
//!
//! Where things are: `args` is the command line; `api` and `sms_inbox` are the clients of the
//! api and of fake-sms; `prepare` gets codes and tokens before a timed run; `scenarios` is one
//! operation of each; `load` runs them concurrently at the offered rate; `drain` is the
//! worker-only run; `cost` reads what each process of the stack spent; `report` is what is
//! printed.

mod api;
mod args;
pub mod cost;
mod drain;
mod failover;
mod load;
mod prepare;
mod receipts;
mod report;
mod scenarios;
mod sms_inbox;

pub use args::{Args, Scenario};
pub use report::{Latency, Report};
pub use sms_inbox::extract_code;

use sms_inbox::SmsInbox;

/// Runs `args.scenario` and reports on it. fake-sms's latency, if `--sms-latency-ms` set it, is
/// reset afterwards, whatever the outcome.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(1))
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let sms = SmsInbox::new(client.clone(), &args.sms_url);
    if let Some(latency) = args.sms_latency_ms {
        sms.set_latency(latency).await?;
    }
    let result = match args.scenario {
        Scenario::Drain => drain::drain(&args, &sms).await,
        Scenario::Failover => failover::failover(&args, &sms).await,
        Scenario::Receipts => receipts::absorb(&args, &sms).await,
        Scenario::Resend => receipts::resend(&args, client, &sms).await,
        _ => load::load(args.clone(), client, &sms).await,
    };
    if args.sms_latency_ms.is_some() {
        let _ = sms.set_latency(0).await;
    }
    result
}

/// Distinct, valid US numbers; the offset keeps runs from colliding with earlier runs' limits.
fn phone(offset: u64, i: u64) -> String {
    let n = offset + i;
    // Exchanges 200–899 without 555 (fictional numbers): 699 of them, so that skipping 555
    // does not fold its numbers onto another exchange's.
    let exchange = 200 + (n / 10_000) % 699;
    let exchange = if exchange >= 555 {
        exchange + 1
    } else {
        exchange
    };
    format!("+1415{exchange}{:04}", n % 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_distinct() {
        let a: std::collections::HashSet<_> = (0..50_000).map(|i| phone(0, i)).collect();
        assert_eq!(a.len(), 50_000);
        assert!(a.iter().all(|p| p.len() == 12 && !p.contains("+1415555")));
        // Across the skipped exchange 555: once folded onto 556, 10,000 repeats made a soak
        // answer 10,000 requests with 429.
        let around_555: std::collections::HashSet<_> =
            (3_530_000..3_580_000).map(|i| phone(0, i)).collect();
        assert_eq!(around_555.len(), 50_000);
        assert!(around_555.iter().all(|p| !p.contains("+1415555")));
        let all: std::collections::HashSet<_> =
            (0..6_990_000).step_by(9_973).map(|i| phone(0, i)).collect();
        assert!(
            all.iter()
                .all(|p| p.as_bytes()[5] >= b'2' && p.as_bytes()[5] <= b'8')
        );
    }
}

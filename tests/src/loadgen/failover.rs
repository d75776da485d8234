//! `failover`: steady sends straight to the broker while fake-sms's Twilio fails for the middle
//! third of the run, with Infobip configured second. Reports how long the first SMS through
//! Infobip took after Twilio's first failure, how long after Twilio's recovery traffic returned
//! to it, how the SMS split between the providers, and the Infobip token endpoint's calls
//! scaled to an hour.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use lapin::options::BasicPublishOptions;
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use shared::{OtpRequested, PhoneNumber};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::sms_inbox::SmsInbox;
use super::{Args, Report, Scenario, phone};
use crate::wait::{Pace, poll};

const EVENT_TTL: Duration = Duration::from_secs(600);

pub(super) async fn failover(args: &Args, sms: &SmsInbox) -> anyhow::Result<Report> {
    let rate = if args.rate > 0.0 { args.rate } else { 100.0 };
    let duration = Duration::from_secs_f64(args.duration.max(3.0));
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ")?;
    let topology = shared::Topology::new(&args.namespace, shared::QueueType::Classic);
    let channel = connection.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let offset = rand::random_range(6_500_000..7_000_000);
    let ttl_ms = u64::try_from(EVENT_TTL.as_millis()).unwrap_or(u64::MAX);
    let before = sms.count().await?;

    let started = Instant::now();
    let mut fault_at = None;
    let mut recovery_at = None;
    let mut published = 0u64;
    while started.elapsed() < duration {
        let elapsed = started.elapsed();
        if fault_at.is_none() && elapsed >= duration / 3 {
            sms.set_twilio_faults(Some(json!({"always": {"status": 500}})))
                .await?;
            fault_at = Some(OffsetDateTime::now_utc());
        }
        if recovery_at.is_none() && elapsed >= duration * 2 / 3 {
            sms.set_twilio_faults(None).await?;
            recovery_at = Some(OffsetDateTime::now_utc());
        }
        let event = OtpRequested::valid_for(
            PhoneNumber::parse(&phone(offset, published))?,
            format!("{:06}", published % 1_000_000),
            EVENT_TTL,
            format!("failover-{published}"),
        );
        channel
            .basic_publish(
                topology.events_exchange().into(),
                shared::event::ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&event)?,
                shared::amqp::event_properties(&event, ttl_ms),
            )
            .await?
            .await?;
        published += 1;
        let due = Duration::from_secs_f64(published as f64 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = poll(
        Duration::from_secs(120),
        Pace::every(Duration::from_millis(100)),
        || async {
            matches!(sms.count().await, Ok(n) if n.saturating_sub(before) >= published)
                .then_some(())
        },
    )
    .await;
    let _ = connection.close(200, "done".into()).await;

    let requests = sms.list("/requests").await?;
    let at = |r: &Value| {
        r["received_at"]
            .as_str()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
    };
    let first = |provider: &str, ok: bool, after: OffsetDateTime| {
        requests
            .iter()
            .filter(|r| {
                r["provider"] == provider && (r["status"].as_u64().unwrap_or(0) < 300) == ok
            })
            .filter_map(at)
            .filter(|t| *t >= after)
            .min()
    };
    let mut figures = BTreeMap::new();
    if let Some(fault_at) = fault_at
        && let Some(failure) = first("twilio", false, fault_at)
        && let Some(rescue) = first("infobip", true, failure)
    {
        figures.insert(
            "failover_ms".to_owned(),
            (rescue - failure).whole_milliseconds() as f64,
        );
    }
    if let Some(recovery_at) = recovery_at
        && let Some(back) = first("twilio", true, recovery_at)
    {
        figures.insert(
            "back_to_first_ms".to_owned(),
            (back - recovery_at).whole_milliseconds() as f64,
        );
    }
    for provider in ["twilio", "infobip"] {
        let sent = requests
            .iter()
            .filter(|r| r["provider"] == provider && r["status"].as_u64().unwrap_or(0) < 300)
            .count();
        figures.insert(format!("sent_{provider}"), sent as f64);
    }
    let token_calls = sms
        .list("/control/infobip/token-calls")
        .await
        .unwrap_or_default()
        .len();
    figures.insert(
        "token_calls_per_hour".to_owned(),
        token_calls as f64 * 3600.0 / elapsed.max(1e-9),
    );

    let delivered = sms.count().await?.saturating_sub(before);
    let mut errors = BTreeMap::new();
    if delivered < published {
        errors.insert("undelivered".to_owned(), published - delivered);
    }
    Ok(Report {
        scenario: Scenario::Failover,
        concurrency: args.concurrency,
        elapsed_secs: elapsed,
        ok: delivered,
        throughput_per_sec: delivered as f64 / elapsed.max(1e-9),
        latency: None,
        errors,
        delivery: None,
        undelivered: None,
        figures,
        costs: None,
        rss: Vec::new(),
        refused_503: Vec::new(),
    })
}

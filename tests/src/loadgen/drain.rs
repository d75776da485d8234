//! `drain`: publishes events straight to the broker, then times how fast the workers deliver
//! them to fake-sms.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use lapin::options::BasicPublishOptions;
use lapin::{Connection, ConnectionProperties};
use shared::{OtpRequested, PhoneNumber};

use super::sms_inbox::SmsInbox;
use super::{Args, Report, Scenario, phone};
use crate::wait::{Pace, poll};

/// Past this the run stops waiting and reports the rest as undelivered.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(600);
/// The events' validity: longer than any drain takes.
const EVENT_TTL: Duration = Duration::from_secs(600);

pub(super) async fn drain(args: &Args, sms: &SmsInbox) -> anyhow::Result<Report> {
    let count = args.count.unwrap_or(10_000);
    let before = sms.count().await?;
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ")?;
    publish(&connection, &args.namespace, count).await?;
    let started = Instant::now();
    let delivered_all = poll(
        DELIVERY_DEADLINE,
        Pace::every(Duration::from_millis(20)),
        || async {
            match sms.count().await {
                Ok(now) if now.saturating_sub(before) < count => None,
                outcome => Some(outcome),
            }
        },
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = match delivered_all {
        Some(now) => now?,
        None => sms.count().await?,
    }
    .saturating_sub(before);
    let _ = connection.close(200, "done".into()).await;
    let mut errors = BTreeMap::new();
    if delivered < count {
        errors.insert("undelivered".to_owned(), count - delivered);
    }
    Ok(Report {
        scenario: Scenario::Drain,
        concurrency: args.concurrency,
        elapsed_secs: elapsed,
        ok: delivered,
        throughput_per_sec: delivered as f64 / elapsed.max(1e-9),
        latency: None,
        errors,
        delivery: None,
        undelivered: None,
        figures: BTreeMap::new(),
        costs: None,
        rss: Vec::new(),
        refused_503: Vec::new(),
    })
}

/// Publishes `count` events as the api does, all confirms awaited together so the broker, not
/// the round trips, sets the pace.
pub(super) async fn publish(
    connection: &Connection,
    namespace: &str,
    count: u64,
) -> anyhow::Result<()> {
    let topology = shared::Topology::new(namespace, shared::QueueType::Classic);
    let channel = connection.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let offset = rand::random_range(6_000_000..6_500_000);
    let ttl_ms = u64::try_from(EVENT_TTL.as_millis()).unwrap_or(u64::MAX);
    let mut confirms = Vec::with_capacity(count as usize);
    for i in 0..count {
        let event = OtpRequested::valid_for(
            PhoneNumber::parse(&phone(offset, i))?,
            format!("{:06}", i % 1_000_000),
            EVENT_TTL,
            format!("loadgen-{i}"),
        );
        let body = serde_json::to_vec(&event)?;
        confirms.push(
            channel
                .basic_publish(
                    topology.events_exchange().into(),
                    shared::event::ROUTING_KEY.into(),
                    BasicPublishOptions::default(),
                    &body,
                    shared::amqp::event_properties(&event, ttl_ms),
                )
                .await?,
        );
    }
    for confirm in confirms {
        confirm.await?;
    }
    Ok(())
}

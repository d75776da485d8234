//! A timed run: `--concurrency` tasks take operation numbers until `--count` or `--duration` is
//! reached, paced to `--rate`, and their results are added up into a report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use time::OffsetDateTime;

use super::api::Api;
use super::scenarios::Operations;
use super::sms_inbox::SmsInbox;
use super::{Args, Latency, Report, Scenario, cost, phone, prepare};

/// Hands out operation numbers until the run is over.
struct Pacer {
    count: Option<u64>,
    duration: f64,
    rate: f64,
    issued: AtomicU64,
    started: Instant,
}

impl Pacer {
    /// The next operation number, or None when the run is over. Paces to `--rate`.
    async fn next(&self) -> Option<u64> {
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        if let Some(count) = self.count {
            if i >= count {
                return None;
            }
        } else if self.started.elapsed().as_secs_f64() >= self.duration {
            return None;
        }
        if self.rate > 0.0 {
            let due = Duration::from_secs_f64(i as f64 / self.rate);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        Some(i)
    }
}

/// What one task (or, added up, the run) counted.
#[derive(Default)]
struct Tally {
    ok: u64,
    latencies_us: Vec<u64>,
    errors: BTreeMap<String, u64>,
    /// (phone, when the 202 came) for delivery latency.
    accepted: Vec<(String, OffsetDateTime)>,
    /// When each success came, since the start: for the longest stall.
    succeeded_at_ms: Vec<u64>,
    /// `request`: the numbers answered 503.
    refused_503: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Self) {
        self.ok += other.ok;
        self.latencies_us.extend(other.latencies_us);
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        self.accepted.extend(other.accepted);
        self.succeeded_at_ms.extend(other.succeeded_at_ms);
        self.refused_503.extend(other.refused_503);
    }

    /// The longest time without a success, between the first and the last: how long a failover
    /// stalled the run (0 with fewer than two successes).
    fn longest_stall_ms(&self) -> u64 {
        let mut at = self.succeeded_at_ms.clone();
        at.sort_unstable();
        at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }
}

pub(super) async fn load(
    mut args: Args,
    client: reqwest::Client,
    sms: &SmsInbox,
) -> anyhow::Result<Report> {
    let api = Api::new(client, &args.api_url);
    let codes = if args.scenario == Scenario::Verify {
        let codes = prepare::codes(&args, &api, sms).await?;
        args.count = Some(codes.len() as u64);
        codes
    } else {
        Vec::new()
    };
    let tokens = if args.scenario == Scenario::Me {
        prepare::tokens(&args, &api, sms).await?
    } else {
        Vec::new()
    };
    let operations = Arc::new(Operations {
        scenario: args.scenario,
        api,
        sms: sms.clone(),
        codes,
        tokens,
        phone_offset: args
            .phone_offset
            .unwrap_or_else(|| rand::random_range(0..5_000_000)),
    });
    let stack = if args.cost || args.rss_every.is_some() {
        cost::discover()?
    } else {
        Vec::new()
    };
    let soak = args
        .rss_every
        .map(|secs| cost::sample_rss(stack.clone(), Duration::from_secs_f64(secs.max(0.1))));
    let inbox_before = if matches!(args.scenario, Scenario::Request | Scenario::Signup) {
        sms.count().await?
    } else {
        0
    };
    let meter = args.cost.then(|| cost::CpuMeter::start(stack));
    let pacer = Arc::new(Pacer {
        count: args.count,
        duration: args.duration,
        rate: args.rate,
        issued: AtomicU64::new(0),
        started: Instant::now(),
    });
    let tasks = (0..args.concurrency.max(1)).map(|_| {
        let (pacer, operations) = (pacer.clone(), operations.clone());
        tokio::spawn(async move {
            let mut tally = Tally::default();
            while let Some(i) = pacer.next().await {
                let started = Instant::now();
                match operations.run(i).await {
                    Ok(accepted) => {
                        tally.ok += 1;
                        tally
                            .succeeded_at_ms
                            .push(pacer.started.elapsed().as_millis() as u64);
                        tally
                            .latencies_us
                            .push(started.elapsed().as_micros() as u64);
                        tally.accepted.extend(accepted);
                    }
                    Err(kind) => {
                        if operations.scenario == Scenario::Request && kind == "503" {
                            tally.refused_503.push(phone(operations.phone_offset, i));
                        }
                        *tally.errors.entry(kind).or_default() += 1;
                    }
                }
            }
            tally
        })
    });
    let mut total = Tally::default();
    for tally in join_all(tasks).await.into_iter().filter_map(Result::ok) {
        total.add(tally);
    }
    let elapsed = pacer.started.elapsed().as_secs_f64();
    if !total.accepted.is_empty() {
        sms.wait_for_count(inbox_before + total.accepted.len() as u64)
            .await;
    }
    // Per accepted OTP for `request` (the SMS it caused included), per operation otherwise.
    let costs = meter.map(|m| m.finish(total.ok));
    let rss = match soak {
        Some((task, samples)) => {
            task.abort();
            std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()))
        }
        None => Vec::new(),
    };
    let (delivery, undelivered) = if total.accepted.is_empty() {
        (None, None)
    } else {
        // Counted, not looked up: fake-sms forgets all but its latest 100,000 messages, so a
        // long run's latencies come from those (the run's last), its losses from the count.
        let received = sms.count().await?.saturating_sub(inbox_before);
        let (latency, _) = sms.deliveries(&total.accepted).await?;
        (
            latency,
            Some((total.accepted.len() as u64).saturating_sub(received)),
        )
    };
    let mut figures = std::collections::BTreeMap::new();
    if args.rate > 0.0 {
        // At a fixed rate, a gap much longer than 1/rate is a stall (a failover, an outage).
        figures.insert(
            "longest_stall_ms".to_owned(),
            total.longest_stall_ms() as f64,
        );
    }
    Ok(Report {
        scenario: args.scenario,
        concurrency: args.concurrency,
        elapsed_secs: elapsed,
        ok: total.ok,
        throughput_per_sec: total.ok as f64 / elapsed.max(1e-9),
        latency: Latency::from_micros(total.latencies_us),
        errors: total.errors,
        delivery,
        undelivered,
        figures,
        costs,
        rss,
        refused_503: total.refused_503,
    })
}

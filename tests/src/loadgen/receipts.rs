//! Delivery receipts, for a worker started with `CALLBACK_ADDR`:
//!
//! - `receipts`: how many receipts one worker absorbs. fake-sms's carrier is muted, N events go
//!   straight to the broker, and once their SMS are at fake-sms loadgen posts each message's
//!   signed Twilio callbacks itself (`sent`, then `delivered`) to `--callback-url`, `-c` at once.
//! - `resend`: how soon a dropped code goes out again. Codes are requested through the api (so
//!   the api holds them) while fake-sms's Twilio carrier answers `undelivered` 30007 for all of
//!   them; the figure is the time from that callback leaving fake-sms to the resend reaching
//!   fake-sms's Infobip.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use futures_util::stream;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::api::Api;
use super::sms_inbox::SmsInbox;
use super::{Args, Latency, Report, Scenario, drain, phone};
use crate::fake_sms::twilio_signature;
use crate::wait::{Pace, poll};

pub(super) async fn absorb(args: &Args, sms: &SmsInbox) -> anyhow::Result<Report> {
    let count = args.count.unwrap_or(5_000);
    let url = format!(
        "{}/v1/callbacks/twilio",
        args.callback_url.trim_end_matches('/')
    );
    sms.set_carrier(Some(json!({ "mute": true }))).await?;
    let before = sms.count().await?;
    let outcome = async {
        let connection = lapin::Connection::connect(&args.amqp_url, Default::default())
            .await
            .context("cannot connect to RabbitMQ")?;
        drain::publish(&connection, &args.namespace, count).await?;
        let _ = connection.close(200, "done".into()).await;
        poll(
            Duration::from_secs(300),
            Pace::every(Duration::from_millis(100)),
            || async { matches!(sms.count().await, Ok(n) if n >= before + count).then_some(()) },
        )
        .await
        .context("the workers did not send every SMS")?;
        anyhow::Ok(())
    }
    .await;
    sms.set_carrier(None).await?;
    outcome?;
    let messages = sms.messages(None).await?;
    let sent: Vec<(String, String, String)> = messages[before as usize..]
        .iter()
        .filter(|m| m["provider"] == "twilio")
        .map(|m| {
            let field = |name: &str| m[name].as_str().unwrap_or_default().to_owned();
            (field("sid"), field("to"), field("from"))
        })
        .collect();

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let token = Arc::new(args.twilio_auth_token.clone());
    let unix_ms = || (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as f64;
    let mut figures = BTreeMap::new();
    // When the callbacks were posted, for measuring the worker's CPU over just that window.
    figures.insert("posting_from_unix_ms".to_owned(), unix_ms());
    let started = Instant::now();
    let results: Vec<Vec<(u64, Result<u16, String>)>> = stream::iter(sent)
        .map(|(sid, to, from)| {
            let (client, url, token) = (client.clone(), url.clone(), token.clone());
            async move {
                let mut out = Vec::with_capacity(2);
                for status in ["sent", "delivered"] {
                    let params: Vec<(String, String)> = [
                        ("AccountSid", crate::fake_sms::DEFAULT_ACCOUNT_SID),
                        ("ApiVersion", "2010-04-01"),
                        ("From", from.as_str()),
                        ("MessageSid", sid.as_str()),
                        ("MessageStatus", status),
                        ("SmsSid", sid.as_str()),
                        ("SmsStatus", status),
                        ("To", to.as_str()),
                    ]
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect();
                    let signature = twilio_signature(&token, &url, &params);
                    let call = Instant::now();
                    let answer = client
                        .post(&url)
                        .header("X-Twilio-Signature", signature)
                        .header(
                            "I-Twilio-Idempotency-Token",
                            uuid::Uuid::new_v4().to_string(),
                        )
                        .form(&params)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .map_err(|e| if e.is_connect() { "connect" } else { "failed" }.to_owned());
                    out.push((
                        u64::try_from(call.elapsed().as_micros()).unwrap_or(u64::MAX),
                        answer,
                    ));
                }
                out
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    figures.insert("posting_to_unix_ms".to_owned(), unix_ms());
    let mut latencies = Vec::new();
    let mut errors = BTreeMap::new();
    for (micros, answer) in results.into_iter().flatten() {
        match answer {
            Ok(204) => latencies.push(micros),
            Ok(status) => *errors.entry(status.to_string()).or_default() += 1,
            Err(kind) => *errors.entry(kind).or_default() += 1,
        }
    }
    let ok = latencies.len() as u64;
    Ok(Report {
        scenario: Scenario::Receipts,
        concurrency: args.concurrency,
        elapsed_secs: elapsed,
        ok,
        throughput_per_sec: ok as f64 / elapsed.max(1e-9),
        latency: Latency::from_micros(latencies),
        errors,
        delivery: None,
        undelivered: None,
        figures,
        costs: None,
        rss: Vec::new(),
        refused_503: Vec::new(),
    })
}

pub(super) async fn resend(
    args: &Args,
    client: reqwest::Client,
    sms: &SmsInbox,
) -> anyhow::Result<Report> {
    let count = args.count.unwrap_or(200);
    let rate = if args.rate > 0.0 { args.rate } else { 50.0 };
    let api = Api::new(client, &args.api_url);
    let offset = rand::random_range(7_000_000..7_500_000);
    let phones: Vec<String> = (0..count).map(|i| phone(offset, i)).collect();
    sms.set_carrier(Some(json!({
        "delay_ms": 10,
        "outcomes": [{"prefix": "+1415", "provider": "twilio", "status": "undelivered", "error_code": 30007}]
    })))
    .await?;
    let started = Instant::now();
    let mut errors = BTreeMap::new();
    for (i, to) in phones.iter().enumerate() {
        if let Err(status) = api.request_code(to).await {
            *errors.entry(format!("request {status}")).or_default() += 1;
        }
        let due = Duration::from_secs_f64((i + 1) as f64 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let resent_all = poll(
        Duration::from_secs(60),
        Pace::every(Duration::from_millis(200)),
        || async {
            let messages = sms.messages(None).await.ok()?;
            let resent = messages
                .iter()
                .filter(|m| {
                    m["provider"] == "infobip" && phones.iter().any(|p| m["to"] == p.as_str())
                })
                .count();
            (resent as u64 >= count).then_some(())
        },
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    sms.set_carrier(None).await?;
    if resent_all.is_none() {
        errors.insert("not_resent".to_owned(), 0);
    }

    let at = |v: &Value, field: &str| {
        v[field]
            .as_str()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
    };
    let dropped: HashMap<String, OffsetDateTime> = sms
        .list("/control/carrier/callbacks")
        .await?
        .iter()
        .filter(|c| c["provider"] == "twilio" && c["status"] == "undelivered")
        .filter_map(|c| Some((c["to"].as_str()?.to_owned(), at(c, "at")?)))
        .collect();
    let mut delays = Vec::new();
    for m in sms.messages(None).await? {
        if m["provider"] != "infobip" {
            continue;
        }
        let (Some(to), Some(received)) = (m["to"].as_str(), at(&m, "received_at")) else {
            continue;
        };
        if let Some(dropped_at) = dropped.get(to) {
            delays.push(
                u64::try_from((received - *dropped_at).whole_microseconds().max(0)).unwrap_or(0),
            );
        }
    }
    let resent = delays.len() as u64;
    if resent < count {
        *errors.entry("not_resent".to_owned()).or_default() += count - resent;
    }
    Ok(Report {
        scenario: Scenario::Resend,
        concurrency: 1,
        elapsed_secs: elapsed,
        ok: resent,
        throughput_per_sec: resent as f64 / elapsed.max(1e-9),
        latency: Latency::from_micros(delays),
        errors,
        delivery: None,
        undelivered: None,
        figures: BTreeMap::new(),
        costs: None,
        rss: Vec::new(),
        refused_503: Vec::new(),
    })
}

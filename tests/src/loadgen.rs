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
//!
//! The api must allow the load: run it with a high `OTP_PER_IP_PER_HOUR` (every request comes
//! from 127.0.0.1).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures_util::future::join_all;
use lapin::options::BasicPublishOptions;
use lapin::{Connection, ConnectionProperties};
use serde::Serialize;
use serde_json::{Value, json};
use shared::OtpRequested;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Request,
    Signup,
    Verify,
    Me,
    Drain,
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
    /// `me`: sign-ins whose tokens are used.
    #[arg(long, default_value_t = 32)]
    pub users: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
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
        };
        Self::parse_from(["loadgen", name])
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn from_micros(mut samples: Vec<u64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[index] as f64 / 1000.0
        };
        Some(Self {
            count: samples.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub concurrency: usize,
    pub elapsed_secs: f64,
    /// Successful operations (a whole flow for `signup`).
    pub ok: u64,
    pub throughput_per_sec: f64,
    pub latency: Option<Latency>,
    /// Failures by HTTP status (or `connect`, `timeout`, `no-sms`).
    pub errors: BTreeMap<String, u64>,
    /// `request` and `signup`: from the api's 202 to fake-sms receiving the SMS.
    pub delivery: Option<Latency>,
    /// `request`: accepted requests whose SMS had not arrived when the report was made.
    pub undelivered: Option<u64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scenario     {:?} (concurrency {})",
            self.scenario, self.concurrency
        )?;
        writeln!(f, "elapsed      {:.2} s", self.elapsed_secs)?;
        writeln!(f, "ok           {}", self.ok)?;
        writeln!(f, "throughput   {:.0}/s", self.throughput_per_sec)?;
        let line = |f: &mut fmt::Formatter<'_>, name: &str, l: &Option<Latency>| match l {
            Some(l) => writeln!(
                f,
                "{name:<12} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count
            ),
            None => Ok(()),
        };
        line(f, "latency", &self.latency)?;
        line(f, "202→sms", &self.delivery)?;
        if let Some(n) = self.undelivered {
            writeln!(f, "undelivered  {n}")?;
        }
        if self.errors.is_empty() {
            writeln!(f, "errors       none")?;
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            writeln!(f, "errors       {}", list.join(", "))?;
        }
        Ok(())
    }
}

/// Distinct, valid US numbers; the offset keeps runs from colliding with earlier runs' limits.
fn phone(offset: u64, i: u64) -> String {
    let n = offset + i;
    let exchange = 200 + (n / 10_000) % 700;
    let exchange = if exchange == 555 { 556 } else { exchange };
    format!("+1415{exchange}{:04}", n % 10_000)
}

struct Shared {
    args: Args,
    client: reqwest::Client,
    issued: AtomicU64,
    started: Instant,
    offset: u64,
}

impl Shared {
    /// The next operation number, or None when the run is over. Paces to `--rate`.
    async fn next(&self) -> Option<u64> {
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        if let Some(count) = self.args.count {
            if i >= count {
                return None;
            }
        } else if self.started.elapsed().as_secs_f64() >= self.args.duration {
            return None;
        }
        if self.args.rate > 0.0 {
            let due = Duration::from_secs_f64(i as f64 / self.args.rate);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        Some(i)
    }
}

#[derive(Default)]
struct TaskResult {
    ok: u64,
    latencies_us: Vec<u64>,
    errors: HashMap<String, u64>,
    /// (phone, when the 202 came) for delivery latency.
    accepted: Vec<(String, OffsetDateTime)>,
}

fn classify(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".into()
    } else if error.is_connect() {
        "connect".into()
    } else {
        "transport".into()
    }
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(1))
        .timeout(Duration::from_secs(30))
        .build()?;
    let sms = SmsInbox {
        client: client.clone(),
        url: args.sms_url.trim_end_matches('/').to_owned(),
    };
    if let Some(latency) = args.sms_latency_ms {
        sms.set_latency(latency).await?;
    }
    let result = match args.scenario {
        Scenario::Drain => drain(&args, &sms).await,
        _ => load(args.clone(), client, &sms).await,
    };
    if args.sms_latency_ms.is_some() {
        let _ = sms.set_latency(0).await;
    }
    result
}

async fn load(mut args: Args, client: reqwest::Client, sms: &SmsInbox) -> anyhow::Result<Report> {
    let api = args.api_url.trim_end_matches('/').to_owned();
    let codes = if args.scenario == Scenario::Verify {
        let codes = prepare_codes(&args, &client, sms).await?;
        args.count = Some(codes.len() as u64);
        codes
    } else {
        Vec::new()
    };
    let codes = Arc::new(codes);
    let tokens = if args.scenario == Scenario::Me {
        prepare_tokens(&args, &client, sms).await?
    } else {
        Vec::new()
    };
    let tokens = Arc::new(tokens);
    let shared = Arc::new(Shared {
        client,
        issued: AtomicU64::new(0),
        started: Instant::now(),
        offset: rand::random_range(0..5_000_000),
        args: args.clone(),
    });
    let tasks = (0..args.concurrency.max(1)).map(|_| {
        let shared = shared.clone();
        let tokens = tokens.clone();
        let codes = codes.clone();
        let api = api.clone();
        let sms = sms.clone();
        tokio::spawn(async move {
            let mut result = TaskResult::default();
            while let Some(i) = shared.next().await {
                let started = Instant::now();
                let outcome = match shared.args.scenario {
                    Scenario::Request => request(&shared, &api, i).await,
                    Scenario::Signup => signup(&shared, &api, &sms, i).await,
                    Scenario::Verify => verify(&shared, &api, &codes[i as usize]).await,
                    Scenario::Me => me(&shared, &api, &tokens[i as usize % tokens.len()]).await,
                    Scenario::Drain => unreachable!("drain has its own loop"),
                };
                match outcome {
                    Ok(accepted) => {
                        result.ok += 1;
                        result
                            .latencies_us
                            .push(started.elapsed().as_micros() as u64);
                        if let Some(accepted) = accepted {
                            result.accepted.push(accepted);
                        }
                    }
                    Err(kind) => *result.errors.entry(kind).or_default() += 1,
                }
            }
            result
        })
    });
    let results: Vec<TaskResult> = join_all(tasks)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let elapsed = shared.started.elapsed().as_secs_f64();
    let mut ok = 0;
    let mut latencies = Vec::new();
    let mut errors = BTreeMap::new();
    let mut accepted = Vec::new();
    for r in results {
        ok += r.ok;
        latencies.extend(r.latencies_us);
        for (k, v) in r.errors {
            *errors.entry(k).or_default() += v;
        }
        accepted.extend(r.accepted);
    }
    let (delivery, undelivered) = if accepted.is_empty() {
        (None, None)
    } else {
        let (latency, missing) = sms.delivery_latency(&accepted).await?;
        (latency, Some(missing))
    };
    Ok(Report {
        scenario: args.scenario,
        concurrency: args.concurrency,
        elapsed_secs: elapsed,
        ok,
        throughput_per_sec: ok as f64 / elapsed.max(1e-9),
        latency: Latency::from_micros(latencies),
        errors,
        delivery,
        undelivered,
    })
}

type Outcome = Result<Option<(String, OffsetDateTime)>, String>;

async fn post(shared: &Shared, url: String, body: Value) -> Result<(u16, Value), String> {
    let response = shared
        .client
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| classify(&e))?;
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, body))
}

async fn request(shared: &Shared, api: &str, i: u64) -> Outcome {
    let phone = phone(shared.offset, i);
    let (status, _) = post(
        shared,
        format!("{api}/v1/otp"),
        json!({ "phone_number": phone }),
    )
    .await?;
    if status != 202 {
        return Err(status.to_string());
    }
    Ok(Some((phone, OffsetDateTime::now_utc())))
}

async fn signup(shared: &Shared, api: &str, sms: &SmsInbox, i: u64) -> Outcome {
    let phone = phone(shared.offset, i);
    let (status, _) = post(
        shared,
        format!("{api}/v1/otp"),
        json!({ "phone_number": phone }),
    )
    .await?;
    if status != 202 {
        return Err(status.to_string());
    }
    let accepted_at = OffsetDateTime::now_utc();
    let code = sms
        .wait_for_code(&phone, Duration::from_secs(20))
        .await
        .ok_or("no-sms")?;
    let (status, session) = post(
        shared,
        format!("{api}/v1/otp/verify"),
        json!({ "phone_number": phone, "otp": code }),
    )
    .await?;
    if status != 200 {
        return Err(format!("verify {status}"));
    }
    let token = session["access_token"].as_str().unwrap_or_default();
    me(shared, api, token).await?;
    Ok(Some((phone, accepted_at)))
}

async fn verify(shared: &Shared, api: &str, (phone, code): &(String, String)) -> Outcome {
    let (status, _) = post(
        shared,
        format!("{api}/v1/otp/verify"),
        json!({ "phone_number": phone, "otp": code }),
    )
    .await?;
    if status != 200 {
        return Err(format!("verify {status}"));
    }
    Ok(None)
}

/// Requests `--count` codes (default 10,000) for fresh numbers and reads them from fake-sms, so
/// the `verify` run measures verification alone.
async fn prepare_codes(
    args: &Args,
    client: &reqwest::Client,
    sms: &SmsInbox,
) -> anyhow::Result<Vec<(String, String)>> {
    let count = args.count.unwrap_or(10_000);
    let offset = rand::random_range(6_500_000..6_900_000);
    let api = args.api_url.trim_end_matches('/').to_owned();
    let next = Arc::new(AtomicU64::new(0));
    let tasks = (0..args.concurrency.max(1)).map(|_| {
        let (client, api, next) = (client.clone(), api.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok(());
                }
                let response = client
                    .post(format!("{api}/v1/otp"))
                    .json(&json!({ "phone_number": phone(offset, i) }))
                    .send()
                    .await?;
                if response.status().as_u16() != 202 {
                    bail!(
                        "preparing codes: POST /v1/otp answered {}",
                        response.status()
                    );
                }
            }
        })
    });
    for task in join_all(tasks).await {
        task??;
    }
    let wanted: std::collections::HashSet<String> = (0..count).map(|i| phone(offset, i)).collect();
    let started = Instant::now();
    loop {
        let mut codes = HashMap::new();
        for message in sms.messages(None).await? {
            if let (Some(to), Some(body)) = (message["to"].as_str(), message["body"].as_str())
                && wanted.contains(to)
                && let Some(code) = extract_code(body)
            {
                codes.insert(to.to_owned(), code);
            }
        }
        if codes.len() as u64 == count {
            return Ok(codes.into_iter().collect());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "preparing codes: only {} of {count} SMS reached fake-sms",
                codes.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn me(shared: &Shared, api: &str, token: &str) -> Outcome {
    let response = shared
        .client
        .get(format!("{api}/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| classify(&e))?;
    let status = response.status().as_u16();
    // Read the body so the connection goes back to the pool.
    let _ = response.bytes().await;
    if status != 200 {
        return Err(format!("me {status}"));
    }
    Ok(None)
}

async fn prepare_tokens(
    args: &Args,
    client: &reqwest::Client,
    sms: &SmsInbox,
) -> anyhow::Result<Vec<String>> {
    let shared = Shared {
        args: args.clone(),
        client: client.clone(),
        issued: AtomicU64::new(0),
        started: Instant::now(),
        offset: rand::random_range(5_000_000..6_000_000),
    };
    let api = args.api_url.trim_end_matches('/');
    let mut tokens = Vec::new();
    for i in 0..args.users.max(1) as u64 {
        let phone = phone(shared.offset, i);
        let (status, body) = post(
            &shared,
            format!("{api}/v1/otp"),
            json!({ "phone_number": phone }),
        )
        .await
        .map_err(|e| anyhow::anyhow!("request: {e}"))?;
        if status != 202 {
            bail!("preparing tokens: POST /v1/otp answered {status}: {body}");
        }
        let code = sms
            .wait_for_code(&phone, Duration::from_secs(20))
            .await
            .context("preparing tokens: no SMS arrived at fake-sms; is the sms-worker running?")?;
        let (status, session) = post(
            &shared,
            format!("{api}/v1/otp/verify"),
            json!({ "phone_number": phone, "otp": code }),
        )
        .await
        .map_err(|e| anyhow::anyhow!("verify: {e}"))?;
        if status != 200 {
            bail!("preparing tokens: verify answered {status}: {session}");
        }
        tokens.push(
            session["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    Ok(tokens)
}

/// fake-sms's HTTP API.
#[derive(Clone)]
struct SmsInbox {
    client: reqwest::Client,
    url: String,
}

impl SmsInbox {
    async fn set_latency(&self, latency_ms: u64) -> anyhow::Result<()> {
        self.client
            .post(format!("{}/control/faults", self.url))
            .json(&json!({ "latency_ms": latency_ms }))
            .send()
            .await
            .context("cannot reach fake-sms")?
            .error_for_status()?;
        Ok(())
    }

    async fn messages(&self, to: Option<&str>) -> anyhow::Result<Vec<Value>> {
        let url = match to {
            Some(to) => format!(
                "{}/messages?{}",
                self.url,
                serde_urlencoded::to_string([("to", to)])?
            ),
            None => format!("{}/messages", self.url),
        };
        Ok(self
            .client
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    async fn wait_for_code(&self, phone: &str, deadline: Duration) -> Option<String> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        while started.elapsed() < deadline {
            if let Ok(messages) = self.messages(Some(phone)).await
                && let Some(code) = messages
                    .last()
                    .and_then(|m| m["body"].as_str())
                    .and_then(extract_code)
            {
                return Some(code);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        None
    }

    /// Latency from each 202 to fake-sms's receipt, and how many never arrived (waits up to 30 s).
    async fn delivery_latency(
        &self,
        accepted: &[(String, OffsetDateTime)],
    ) -> anyhow::Result<(Option<Latency>, u64)> {
        let started = Instant::now();
        loop {
            let messages = self.messages(None).await?;
            let mut received: HashMap<&str, OffsetDateTime> = HashMap::new();
            for m in &messages {
                if let (Some(to), Some(at)) = (m["to"].as_str(), m["received_at"].as_str())
                    && let Ok(at) =
                        OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                {
                    received.entry(to).or_insert(at);
                }
            }
            let mut samples = Vec::new();
            let mut missing = 0;
            for (phone, at) in accepted {
                match received.get(phone.as_str()) {
                    Some(got) => samples
                        .push(u64::try_from((*got - *at).whole_microseconds().max(0)).unwrap_or(0)),
                    None => missing += 1,
                }
            }
            if missing == 0 || started.elapsed() > Duration::from_secs(30) {
                return Ok((Latency::from_micros(samples), missing));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The first run of 4 to 10 digits in an SMS body.
pub fn extract_code(body: &str) -> Option<String> {
    body.split(|c: char| !c.is_ascii_digit())
        .find(|run| (4..=10).contains(&run.len()))
        .map(str::to_owned)
}

/// Publishes `count` events straight to the broker, then waits until fake-sms has received them.
async fn drain(args: &Args, sms: &SmsInbox) -> anyhow::Result<Report> {
    let count = args.count.unwrap_or(10_000);
    let before = self_count(sms).await?;
    let topology = shared::Topology::new(&args.namespace, shared::QueueType::Classic);
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let offset = rand::random_range(6_000_000..6_500_000);
    let mut confirms = Vec::with_capacity(count as usize);
    for i in 0..count {
        let event = OtpRequested::valid_for(
            phone(offset, i),
            format!("{:06}", i % 1_000_000),
            Duration::from_secs(600),
            format!("loadgen-{i}"),
        );
        let properties = shared::amqp::event_properties(&event, 600_000);
        let body = serde_json::to_vec(&event)?;
        confirms.push(
            channel
                .basic_publish(
                    topology.events_exchange().into(),
                    shared::event::ROUTING_KEY.into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        confirm.await?;
    }
    let started = Instant::now();
    let deadline = Duration::from_secs(600);
    let mut delivered = 0;
    while started.elapsed() < deadline {
        delivered = self_count(sms).await?.saturating_sub(before);
        if delivered >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
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
    })
}

/// How many messages fake-sms has accepted so far.
async fn self_count(sms: &SmsInbox) -> anyhow::Result<u64> {
    Ok(sms.messages(None).await?.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_code_in_an_sms() {
        assert_eq!(
            extract_code("Your Cheershare code is 123456. It expires in 5 minutes.").as_deref(),
            Some("123456")
        );
        assert_eq!(
            extract_code("code 12\n@example.com #98765432").as_deref(),
            Some("98765432")
        );
        assert_eq!(extract_code("no code"), None);
    }

    #[test]
    fn phones_are_distinct() {
        let a: std::collections::HashSet<_> = (0..50_000).map(|i| phone(0, i)).collect();
        assert_eq!(a.len(), 50_000);
        assert!(a.iter().all(|p| p.len() == 12 && !p.contains("+1415555")));
    }

    #[test]
    fn percentiles() {
        let l = Latency::from_micros((1..=100).map(|n| n * 1000).collect()).unwrap();
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (51.0, 99.0, 100.0));
    }
}

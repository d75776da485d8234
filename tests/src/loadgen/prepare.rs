//! What `verify` and `me` need before the clock starts: codes waiting to be verified, and
//! signed-in users.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail};
use futures_util::future::join_all;

use super::api::Api;
use super::sms_inbox::{SmsInbox, extract_code};
use super::{Args, phone};
use crate::wait::{Pace, poll};

/// How long the prepared codes' SMS may take, all together.
const CODES_DEADLINE: Duration = Duration::from_secs(60);

/// Requests `--count` codes (default 10,000) for fresh numbers and reads them from fake-sms, so
/// the `verify` run measures verification alone.
pub(super) async fn codes(
    args: &Args,
    api: &Api,
    sms: &SmsInbox,
) -> anyhow::Result<Vec<(String, String)>> {
    let count = args.count.unwrap_or(10_000);
    let offset = rand::random_range(6_500_000..6_900_000);
    let next = Arc::new(AtomicU64::new(0));
    let tasks = (0..args.concurrency.max(1)).map(|_| {
        let (api, next) = (api.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok(());
                }
                if let Err(failure) = api.request_code(&phone(offset, i)).await {
                    bail!("preparing codes: POST /v1/otp answered {failure}");
                }
            }
        })
    });
    for task in join_all(tasks).await {
        task??;
    }
    let wanted: HashSet<String> = (0..count).map(|i| phone(offset, i)).collect();
    let complete = poll(
        CODES_DEADLINE,
        Pace::every(Duration::from_millis(200)),
        || async {
            match arrived_codes(sms, &wanted).await {
                Ok(codes) if (codes.len() as u64) < count => None,
                outcome => Some(outcome),
            }
        },
    )
    .await;
    match complete {
        Some(codes) => Ok(codes?.into_iter().collect()),
        None => bail!(
            "preparing codes: only {} of {count} SMS reached fake-sms",
            arrived_codes(sms, &wanted).await?.len()
        ),
    }
}

/// The codes fake-sms holds for the `wanted` numbers, by number.
async fn arrived_codes(
    sms: &SmsInbox,
    wanted: &HashSet<String>,
) -> anyhow::Result<HashMap<String, String>> {
    let mut codes = HashMap::new();
    for message in sms.messages(None).await? {
        if let (Some(to), Some(body)) = (message["to"].as_str(), message["body"].as_str())
            && wanted.contains(to)
            && let Some(code) = extract_code(body)
        {
            codes.insert(to.to_owned(), code);
        }
    }
    Ok(codes)
}

/// Signs `--users` fresh numbers in, one after the other: their access tokens.
pub(super) async fn tokens(args: &Args, api: &Api, sms: &SmsInbox) -> anyhow::Result<Vec<String>> {
    let offset = rand::random_range(5_000_000..6_000_000);
    let mut tokens = Vec::new();
    for i in 0..args.users.max(1) as u64 {
        let (token, _) =
            api.sign_in(sms, &phone(offset, i))
                .await
                .map_err(|failure| match failure.as_str() {
                    "no-sms" => anyhow!(
                        "preparing tokens: no SMS arrived at fake-sms; is the sms-worker running?"
                    ),
                    _ => anyhow!("preparing tokens: signing in failed: {failure}"),
                })?;
        tokens.push(token);
    }
    Ok(tokens)
}

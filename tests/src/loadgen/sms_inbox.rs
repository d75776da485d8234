//! fake-sms's HTTP API, from where loadgen reads the codes and times the deliveries.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::Latency;
use crate::wait::{Pace, poll};

/// How long the SMS of accepted requests may take before they count as undelivered.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub(super) struct SmsInbox {
    client: reqwest::Client,
    /// Without a trailing slash.
    url: String,
}

impl SmsInbox {
    pub(super) fn new(client: reqwest::Client, url: &str) -> Self {
        Self {
            client,
            url: url.trim_end_matches('/').to_owned(),
        }
    }

    /// Every provider's latency (Twilio's and Infobip's endpoints alike).
    pub(super) async fn set_latency(&self, latency_ms: u64) -> anyhow::Result<()> {
        for provider in ["twilio", "infobip"] {
            self.client
                .post(format!("{}/control/faults/{provider}", self.url))
                .json(&json!({ "latency_ms": latency_ms }))
                .send()
                .await
                .context("cannot reach fake-sms")?
                .error_for_status()?;
        }
        Ok(())
    }

    pub(super) async fn messages(&self, to: Option<&str>) -> anyhow::Result<Vec<Value>> {
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

    /// Sets Twilio's faults (`None` clears them).
    pub(super) async fn set_twilio_faults(&self, faults: Option<Value>) -> anyhow::Result<()> {
        self.control("/control/faults", faults).await
    }

    /// Sets the carrier's behaviour (`None` resets it).
    pub(super) async fn set_carrier(&self, carrier: Option<Value>) -> anyhow::Result<()> {
        self.control("/control/carrier", carrier).await
    }

    /// POSTs `setting` to a control endpoint, or DELETEs it (back to the default) for `None`.
    async fn control(&self, path: &str, setting: Option<Value>) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.url);
        let request = match setting {
            Some(setting) => self.client.post(url).json(&setting),
            None => self.client.delete(url),
        };
        request
            .send()
            .await
            .context("cannot reach fake-sms")?
            .error_for_status()?;
        Ok(())
    }

    /// A list fake-sms serves as JSON (`/requests`, `/control/infobip/token-calls`).
    pub(super) async fn list(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// How many messages fake-sms has received since it started (without copying the inbox, which
    /// keeps only the latest 100,000).
    pub(super) async fn count(&self) -> anyhow::Result<u64> {
        let reply: Value = self
            .client
            .get(format!("{}/messages/count", self.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        reply["count"]
            .as_u64()
            .context("fake-sms's /messages/count has no count")
    }

    /// Waits (up to [`DELIVERY_DEADLINE`]) until the inbox holds `expected` messages, so that a
    /// cost measurement ends when the last SMS is in; polling the count costs fake-sms nothing
    /// worth measuring, unlike the whole list.
    pub(super) async fn wait_for_count(&self, expected: u64) {
        poll(
            DELIVERY_DEADLINE,
            Pace::every(Duration::from_millis(20)),
            || async { (self.count().await.ok()? >= expected).then_some(()) },
        )
        .await;
    }

    /// The code in the latest SMS to `phone`, once there is one.
    pub(super) async fn wait_for_code(&self, phone: &str, deadline: Duration) -> Option<String> {
        // A sign-in's latency includes this wait: look again soon at first.
        let pace = Pace::doubling(Duration::from_millis(2), Duration::from_millis(50));
        poll(deadline, pace, || async {
            let messages = self.messages(Some(phone)).await.ok()?;
            messages
                .last()
                .and_then(|m| m["body"].as_str())
                .and_then(extract_code)
        })
        .await
    }

    /// Delivery latencies of the `accepted` requests whose SMS has arrived, and how many have not.
    pub(super) async fn deliveries(
        &self,
        accepted: &[(String, OffsetDateTime)],
    ) -> anyhow::Result<(Option<Latency>, u64)> {
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
        Ok((Latency::from_micros(samples), missing))
    }
}

/// The first run of 4 to 10 digits in an SMS body.
pub fn extract_code(body: &str) -> Option<String> {
    body.split(|c: char| !c.is_ascii_digit())
        .find(|run| (4..=10).contains(&run.len()))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_code_in_an_sms() {
        assert_eq!(
            extract_code("Your sign-in code is 123456. It expires in 5 minutes.").as_deref(),
            Some("123456")
        );
        assert_eq!(
            extract_code("code 12\n@example.com #98765432").as_deref(),
            Some("98765432")
        );
        assert_eq!(extract_code("no code"), None);
    }
}
